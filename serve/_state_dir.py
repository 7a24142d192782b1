"""The state directory's contract, shared by drivers, the CLI and the controller.

A standalone controller keeps in its state directory (``SERVE_STATE_DIR``, default ``~/.serve``):

- ``controller.json``: ``{"address", "pid"}`` of the running controller; drivers and the CLI
  find it here.
- ``token``: the cluster token (generated once, or the configured one); drivers read it.
- ``controller.lock``: locked by the controller for its life (one controller per directory).
- ``state.db``: the controller's goal store, read back after a restart.

The directory is private to its user (``0700``) and every file in it ``0600``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

RECORD_FILE = "controller.json"
TOKEN_FILE = "token"
LOCK_FILE = "controller.lock"
STATE_DB_FILE = "state.db"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` if needed, and make it ``0700`` whatever made it first.

    Missing parents are created ``0700`` too (``mkdir(parents=True)`` would give them the
    umask's mode).
    """
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    os.chmod(path, 0o700)


def write_private(path: Path, text: str) -> None:
    """Write a file readable by this user only, atomically."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_token(state_dir: Path) -> str | None:
    """The token stored in the state directory, if any."""
    try:
        return (state_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def ensure_token(state_dir: Path, configured: str | None) -> str:
    """The configured token, else the stored one, else a new one; stored ``0600`` either way."""
    token = configured or read_token(state_dir) or secrets.token_urlsafe(32)
    write_private(state_dir / TOKEN_FILE, token)
    return token


def record_controller(state_dir: Path, address: str, pid: int) -> None:
    write_private(state_dir / RECORD_FILE, json.dumps({"address": address, "pid": pid}))


def forget_controller(state_dir: Path) -> None:
    try:
        (state_dir / RECORD_FILE).unlink()
    except FileNotFoundError:
        pass


def last_address(state_dir: Path) -> str | None:
    """The address the last controller of this directory recorded, alive or not (a crashed
    one leaves its record: a new one on the same port lets its replicas re-link)."""
    try:
        address = json.loads((state_dir / RECORD_FILE).read_text()).get("address")
    except (OSError, ValueError, AttributeError):
        return None
    return address if isinstance(address, str) else None


def recorded_controller(state_dir: Path) -> str | None:
    """The address of a standalone controller recorded in the state directory, if it lives."""
    try:
        record = json.loads((state_dir / RECORD_FILE).read_text())
        pid = int(record["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _is_zombie(pid):  # dead, not yet reaped (its parent, often init, has not waited)
        return None
    address = record.get("address")
    return address if isinstance(address, str) else None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
