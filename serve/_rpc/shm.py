"""Big payloads through shared memory, between a router and a replica on the same host.

A frame's out-of-band buffers (pickle protocol 5 buffers: big ``bytes``, arrays) normally
follow it on the Connect stream as raw gRPC messages. When both ends of a stream share
``/dev/shm``, buffers of at least ``SERVE_SHM_MIN_BYTES`` in total go instead into one file
there (a *segment*), written once by the sender and read once by the receiver, and the frame
names it by number (``FrameHeader.shm_segment``).

**Same host, proven.** A stream uses segments only after a handshake says both ends see the
same ``/dev/shm`` as the same user. The router creates ``serve-<token>-hello`` holding a random
secret and sends ``<token>`` with the stream's metadata; the replica opens it by that name (the
file must be its own user's: files are ``0600``), unlinks it, and answers the secret in its
initial metadata. Only a replica that read the secret can answer it, so a replica on another
host (where no such file exists), in another mount namespace, or running as another user
answers nothing, and the stream carries every buffer over gRPC as before.

**Never leaked.** Every segment of a stream is named ``serve-<token>-<d|r><n>`` (``d``: sent by
the router, ``r``: by the replica), so whichever end outlives the stream can find them all:

- the receiver unlinks a segment as soon as it opened it, whether it uses it or not (a rejected
  request's arguments too); the data lives on until it is read;
- when the stream ends, each end removes every ``serve-<token>-*`` left (what a sender wrote
  and the receiver never got to), after it stopped writing. A process killed mid-transfer
  wrote nothing after its death, and its peer sees the stream end after it. The one exception:
  a replica that closes a stream itself (it is stopping) first lets its live router take the
  last results it wrote, for at most a couple of seconds, then removes what is left.

The token travels only inside the authenticated stream, names are built by the receiver from
it and a number (never taken from the wire as a path), and files are opened with
``O_NOFOLLOW`` and created with ``O_EXCL``. Last, for when both ends died (or a router died
before its replica took the hello file): the token starts with the router's pid, and a
router opening a stream removes this user's files of dead routers older than a minute.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from typing import Final

logger = logging.getLogger(__name__)

SHM_DIR: Final = "/dev/shm"
TOKEN_METADATA_KEY: Final = "serve-shm-token"  # router -> replica: the stream's token
PROOF_METADATA_KEY: Final = "serve-shm-proof"  # replica -> router: the hello file's secret
_TOKEN: Final = re.compile(r"[0-9a-f]{32}")
_MAX_READ: Final = 0x7FFFF000  # Linux moves at most this much in one read or write call
_CREATE: Final = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
_OPEN: Final = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)


# Segments this process wrote and read (for tests and benchmarks to tell which path was taken).
counts = {"written": 0, "read": 0}


class SegmentError(OSError):
    """A segment named in a frame could not be read (missing, wrong size, not ours)."""


def _path(token: str, name: str) -> str:
    return f"{SHM_DIR}/serve-{token}-{name}"


def valid_token(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


def available() -> bool:
    """Whether this process can create segments at all (a Linux ``/dev/shm`` it may write)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


class Hello:
    """The router's side of the handshake: a file only a same-host peer can read."""

    def __init__(self) -> None:
        # The token starts with the router's pid: remove_orphans() can tell a dead stream's.
        self.token = f"{os.getpid() & 0xFFFFFFFF:08x}{secrets.token_hex(12)}"
        self.secret = secrets.token_hex(16)
        self.created = False
        remove_orphans()

    def create(self) -> bool:
        try:
            fd = os.open(_path(self.token, "hello"), _CREATE, 0o600)
        except OSError:
            return False
        try:
            os.write(fd, self.secret.encode())
        finally:
            os.close(fd)
        self.created = True
        return True

    def proven(self, proof: str | None) -> bool:
        """Whether the replica's answer proves it read the file (which it also removed)."""
        self.remove()
        return proof is not None and secrets.compare_digest(proof, self.secret)

    def remove(self) -> None:
        if self.created:
            self.created = False
            _unlink(_path(self.token, "hello"))


def answer_hello(token: str) -> str | None:
    """The replica's side: the secret in the router's hello file, or None if this process
    cannot read it as its own (another host, namespace or user). Removes the file."""
    if not valid_token(token):
        return None
    path = _path(token, "hello")
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if status.st_uid != os.getuid() or status.st_size > 64:
            return None  # not ours: neither read nor removed
        _unlink(path)
        return os.read(fd, 64).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


class SegmentLane:
    """One end's segments on one stream: those it writes, and those its peer wrote to it."""

    __slots__ = ("_counter", "_mine", "_peer", "min_bytes", "token")

    def __init__(self, token: str, *, router: bool, min_bytes: int) -> None:
        self.token = token
        self._mine = "d" if router else "r"
        self._peer = "r" if router else "d"
        self._counter = 0
        self.min_bytes = min_bytes

    def put(self, buffers: Sequence[bytes | memoryview]) -> int:
        """Write ``buffers`` into a new segment; returns its number. Raises OSError (full
        ``/dev/shm``, ...) having left nothing behind: the caller sends them over gRPC."""
        self._counter += 1
        number = self._counter
        path = _path(self.token, f"{self._mine}{number}")
        fd = os.open(path, _CREATE, 0o600)
        try:
            for buffer in buffers:
                with memoryview(buffer) as view, view.cast("B") as data:
                    offset = 0
                    while offset < len(data):
                        offset += os.write(fd, data[offset : offset + _MAX_READ])
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        counts["written"] += 1
        return number

    def take(self, number: int, lengths: Sequence[int]) -> list[bytes]:
        """The buffers of the peer's segment ``number``, which is removed at once."""
        path = _path(self.token, f"{self._peer}{number}")
        try:
            fd = os.open(path, _OPEN)
        except OSError as exc:
            raise SegmentError(f"Shared-memory segment {number} is missing: {exc}") from exc
        try:
            _unlink(path)
            expected = sum(lengths)
            size = os.fstat(fd).st_size
            if size != expected:
                raise SegmentError(
                    f"Shared-memory segment {number} holds {size} bytes, announced {expected}."
                )
            buffers = []
            offset = 0
            for length in lengths:
                buffers.append(_read(fd, offset, length))
                offset += length
            counts["read"] += 1
            return buffers
        finally:
            os.close(fd)

    def discard(self, number: int) -> None:
        """Remove the peer's segment ``number`` unread."""
        _unlink(_path(self.token, f"{self._peer}{number}"))

    def sweep(self, *, own: bool = True) -> int:
        """Remove the segments of this stream still there (call once writing has stopped):
        the peer's, which nobody will read now, and with ``own`` this end's too."""
        return sweep(self.token, None if own else self._peer)

    async def linger(self, timeout_s: float) -> None:
        """Until the peer took every segment this end wrote, at most ``timeout_s``: a stream
        this end closed may still be read by a live peer, which removes them itself."""
        pattern = _path(self.token, f"{self._mine}*")
        deadline = time.monotonic() + timeout_s
        # Polled: the peer's unlink, in another process, signals nothing here.
        while glob.glob(pattern) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def sweep(token: str, side: str | None = None) -> int:
    """Remove every ``serve-<token>-*`` file (only ``side``'s, ``d`` or ``r``, if given);
    returns how many there were."""
    if not valid_token(token):
        return 0
    removed = 0
    for path in glob.glob(_path(token, f"{side or ''}*")):
        if _unlink(path):
            removed += 1
    return removed


ORPHAN_AGE_S: Final = 60.0
_last_orphan_sweep = -ORPHAN_AGE_S


def remove_orphans(now: float | None = None) -> int:
    """Remove this user's segments (and hello files) of streams whose router process is gone
    and that are over a minute old: what is left when both ends of a stream died, or a router
    died before its replica took the hello file. Runs at most once a minute per process."""
    global _last_orphan_sweep
    now = time.monotonic() if now is None else now
    if now - _last_orphan_sweep < ORPHAN_AGE_S:
        return 0
    _last_orphan_sweep = now
    removed = 0
    uid, wall = os.getuid(), time.time()
    for path in glob.glob(f"{SHM_DIR}/serve-*-*"):
        token = path[len(SHM_DIR) + len("/serve-") :].split("-", 1)[0]
        if not valid_token(token):
            continue
        try:
            status = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        if status.st_uid != uid or wall - status.st_mtime < ORPHAN_AGE_S:
            continue
        if not _alive(int(token[:8], 16)) and _unlink(path):
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's, or not ours to ask: assume it lives
    return True


def _read(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    done = len(data)
    while done < length:
        part = os.pread(fd, min(length - done, _MAX_READ), offset + done)
        if not part:
            raise SegmentError(f"A shared-memory segment ended {length - done} bytes early.")
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("Could not remove shared-memory segment %s: %s", path, exc)
        return False
    return True
