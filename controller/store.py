"""The goal state on disk: SQLite in the state directory.

Every deploy is committed (WAL, ``synchronous=FULL``) before it is acknowledged, so a restarted
controller converges to the same goal. One transaction per change keeps it atomic; each
application row carries a version that increases with every write.

SQLite runs in one writer thread, never on the event loop: each call queues its work there (in
order) and returns an awaitable that completes once the work committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson

from controller.state import AppGoal, DeploymentGoal
from serve._models import CodeEnv, DeploymentConfig, DeploymentID, DeploymentSpec
from serve.config import AutoscalingConfig, AutoscalingPolicy

T = TypeVar("T")

SCHEMA_VERSION = 2
# Each step upgrades a database of the previous schema in place (one transaction for all).
_MIGRATIONS = {
    1: "ALTER TABLE replicas ADD COLUMN request TEXT NOT NULL DEFAULT ''",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    document BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    code_version TEXT NOT NULL,
    request TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS deployments (
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    serialized_callable BLOB NOT NULL,
    serialized_init_args BLOB NOT NULL,
    code_version TEXT NOT NULL,
    config BLOB NOT NULL,
    PRIMARY KEY (app, name)
);
"""


def config_to_json(config: DeploymentConfig) -> bytes:
    return orjson.dumps(dataclasses.asdict(config))


def config_from_json(raw: bytes) -> DeploymentConfig:
    data: dict[str, Any] = orjson.loads(raw)
    auto = data.pop("autoscaling_config", None)
    return DeploymentConfig(
        autoscaling_config=AutoscalingConfig(**auto) if auto is not None else None, **data
    )


class StoreError(Exception):
    """The state database cannot be used; the message names the file and what to do."""


_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little- / big-endian


def check_wal(path: Path) -> None:
    """Refuse a write-ahead log with a damaged frame, instead of letting SQLite drop it.

    SQLite stops reading a WAL at the first frame whose checksum fails and silently loses the
    transactions from there on (an application then vanished after a restart). Frames left from
    before the log's last reset carry other salts and are fine; a frame with the log's salts and
    a wrong checksum is damage.
    """
    wal = path.with_name(path.name + "-wal")
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return
    if len(data) < 32:
        return  # empty or never started: nothing committed there
    magic, _, page_size, _, salt1, salt2 = struct.unpack(">6I", data[:24])
    if magic not in _WAL_MAGIC or page_size < 512:
        raise StoreError(_damaged(wal, "its header is not a SQLite write-ahead log's"))
    order = "<" if magic == _WAL_MAGIC[0] else ">"
    s0, s1 = _wal_checksum(order, data[:24], 0, 0)
    if (s0, s1) != struct.unpack(">2I", data[24:32]):
        raise StoreError(_damaged(wal, "its header checksum is wrong"))
    offset, frame = 32, 1
    while offset + 24 + page_size <= len(data):
        header = data[offset : offset + 24]
        if struct.unpack(">2I", header[8:16]) != (salt1, salt2):
            return  # frames from before the last reset: not part of the log
        s0, s1 = _wal_checksum(order, header[:8], s0, s1)
        s0, s1 = _wal_checksum(order, data[offset + 24 : offset + 24 + page_size], s0, s1)
        if (s0, s1) != struct.unpack(">2I", header[16:24]):
            raise StoreError(_damaged(wal, f"frame {frame} is damaged"))
        offset += 24 + page_size
        frame += 1


def _wal_checksum(order: str, chunk: bytes, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(chunk) // 4}I", chunk)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _damaged(wal: Path, why: str) -> str:
    return (
        f"The state database's write-ahead log {wal} is damaged ({why}): the changes after the "
        "damage would be lost. Nothing was changed. Restore the state directory from a backup, "
        f"or move {wal.name} aside to start from the last checkpoint (recent deploys may be "
        "missing; redeploy them)."
    )


class GoalStore:
    """Applications and their deployments, as last deployed; an async context manager."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    async def __aenter__(self) -> GoalStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open (creating or checking the schema) in the writer thread."""
        self._writer = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="controller:store"
        )
        try:
            await self._run(self._open)
        except BaseException:
            await self.aclose()  # no thread or connection left behind by a failed open
            raise

    def _open(self) -> None:
        path = self._path
        # Private files (they hold user code and its arguments): SQLite gives its -wal and -shm
        # files the database file's mode, so creating that one 0600 covers all three.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for existing in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(existing, 0o600)
        check_wal(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # One controller per state directory (its lock file): exclusive locking keeps the
            # WAL index in memory, so SQLite never maps a -shm file (an unwritable or truncated
            # one used to kill the controller with SIGBUS).
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            checked = self._db.execute("PRAGMA quick_check").fetchone()
            if checked is None or checked[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {checked[0] if checked else None}")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"The state database {path} cannot be used ({exc}). Nothing was changed. "
                "Move it (with its -wal file) aside and start again to begin with no "
                "applications (then redeploy them), or restore it from a backup."
            ) from exc
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            return
        version = int(row[0])
        if version != SCHEMA_VERSION and version not in _MIGRATIONS:
            raise RuntimeError(
                f"State database {path} has schema {row[0]}, this controller reads "
                f"{SCHEMA_VERSION}; use a fresh --state-dir."
            )
        with self._transaction():
            while version < SCHEMA_VERSION:
                self._db.execute(_MIGRATIONS[version])
                version += 1
            self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version),))

    async def aclose(self) -> None:
        """Finish queued writes, then close. Idempotent."""
        if self._closed or self._writer is None:
            self._closed = True
            return
        self._closed = True
        writer = self._writer
        try:
            await asyncio.shield(self._run(self._close))
        finally:
            writer.shutdown(wait=False)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` on the writer thread (in order); the future of its result."""
        if self._writer is None:
            raise RuntimeError("The goal store is not open; call open() (or use async with).")
        return asyncio.get_running_loop().run_in_executor(
            self._writer, functools.partial(fn, *args)
        )

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("The goal store is not open; call open() (or use async with).")
        return self._db

    # The operations, each queued on the writer thread.

    def save(self, app: AppGoal) -> asyncio.Future[None]:
        return self._run(self._save, app)

    def mark_deleting(self, name: str) -> asyncio.Future[None]:
        return self._run(self._mark_deleting, name)

    def delete(self, name: str) -> asyncio.Future[None]:
        return self._run(self._delete, name)

    def load(self) -> asyncio.Future[list[AppGoal]]:
        return self._run(self._load)

    def save_replica(
        self, replica_id: str, pid: int, code_version: str, request: str
    ) -> asyncio.Future[None]:
        """Remember a replica (its pid once known, its resource request as JSON), so a
        restarted controller knows whom to wait for and what each one holds."""
        return self._run(self._save_replica, replica_id, pid, code_version, request)

    def forget_replica(self, replica_id: str) -> asyncio.Future[None]:
        return self._run(self._forget_replica, replica_id)

    def load_replicas(self) -> asyncio.Future[list[tuple[str, int, str, str]]]:
        """(replica id, pid, code version, request) of every replica the last controller ran."""
        return self._run(self._load_replicas)

    # In the writer thread.

    def _save(self, app: AppGoal) -> None:
        """Write one application (replacing what was stored) in one transaction."""
        document = orjson.dumps(
            {
                "ingress": app.ingress,
                "route_prefix": app.route_prefix,
                "cwd": app.code_env.cwd,
                "sys_path": list(app.code_env.sys_path),
                "deployed_at_s": app.deployed_at_s,
                "deleting": app.deleting,
                "config_json": app.config_json,
                "autoscaling_policy": (
                    dataclasses.asdict(app.autoscaling_policy) if app.autoscaling_policy else None
                ),
            }
        )
        with self._transaction():
            row = self.db.execute("SELECT version FROM apps WHERE name=?", (app.name,)).fetchone()
            version = (row[0] if row else 0) + 1
            self.db.execute(
                "INSERT OR REPLACE INTO apps (name, version, document) VALUES (?, ?, ?)",
                (app.name, version, document),
            )
            self.db.execute("DELETE FROM deployments WHERE app=?", (app.name,))
            self.db.executemany(
                "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        app.name,
                        goal.spec.name,
                        goal.spec.serialized_callable,
                        goal.spec.serialized_init_args,
                        goal.spec.code_version,
                        config_to_json(goal.spec.config),
                    )
                    for goal in app.deployments.values()
                ],
            )

    def _mark_deleting(self, name: str) -> None:
        with self._transaction():
            row = self.db.execute(
                "SELECT version, document FROM apps WHERE name=?", (name,)
            ).fetchone()
            if row is None:
                return
            document = orjson.loads(row[1])
            document["deleting"] = True
            self.db.execute(
                "UPDATE apps SET version=?, document=? WHERE name=?",
                (row[0] + 1, orjson.dumps(document), name),
            )

    def _delete(self, name: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM apps WHERE name=?", (name,))
            self.db.execute("DELETE FROM deployments WHERE app=?", (name,))

    def _load(self) -> list[AppGoal]:
        apps = []
        for name, _, document in self.db.execute("SELECT name, version, document FROM apps"):
            meta = orjson.loads(document)
            goals: dict[str, DeploymentGoal] = {}
            for dep_name, code, init, version, config in self.db.execute(
                "SELECT name, serialized_callable, serialized_init_args, code_version, config "
                "FROM deployments WHERE app=?",
                (name,),
            ):
                spec = DeploymentSpec(dep_name, code, init, version, config_from_json(config))
                goals[dep_name] = DeploymentGoal(
                    DeploymentID(dep_name, name), spec, spec.config.initial_replicas()
                )
            apps.append(
                AppGoal(
                    name=name,
                    ingress=meta["ingress"],
                    route_prefix=meta["route_prefix"],
                    code_env=CodeEnv(meta["cwd"], tuple(meta["sys_path"])),
                    deployments=goals,
                    deployed_at_s=meta["deployed_at_s"],
                    deleting=meta["deleting"],
                    config_json=meta.get("config_json", ""),
                    autoscaling_policy=(
                        AutoscalingPolicy.from_value(meta["autoscaling_policy"])
                        if meta.get("autoscaling_policy")
                        else None
                    ),
                )
            )
        return apps

    def _save_replica(self, replica_id: str, pid: int, code_version: str, request: str) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO replicas VALUES (?, ?, ?, ?)",
                (replica_id, pid, code_version, request),
            )

    def _forget_replica(self, replica_id: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM replicas WHERE replica_id=?", (replica_id,))

    def _load_replicas(self) -> list[tuple[str, int, str, str]]:
        return list(self.db.execute("SELECT replica_id, pid, code_version, request FROM replicas"))

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
