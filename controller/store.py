"""The goal state on disk: SQLite in the state directory.

Every deploy is committed (WAL, ``synchronous=FULL``) before it is acknowledged, so a restarted
controller converges to the same goal. One transaction per change keeps it atomic; each
application row carries a version that increases with every write.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from controller.state import AppGoal, DeploymentGoal
from serve._models import CodeEnv, DeploymentConfig, DeploymentID, DeploymentSpec
from serve.config import AutoscalingConfig

SCHEMA_VERSION = 1

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
    code_version TEXT NOT NULL
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


class GoalStore:
    """Applications and their deployments, as last deployed."""

    def __init__(self, path: Path) -> None:
        # Goal state holds constructor arguments: the file is private, and SQLite gives its
        # -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(
                f"State database {path} has schema {row[0]}, this controller reads "
                f"{SCHEMA_VERSION}; use a fresh --state-dir."
            )

    def close(self) -> None:
        self._db.close()

    def save(self, app: AppGoal) -> None:
        """Write one application (replacing what was stored) in one transaction."""
        document = orjson.dumps(
            {
                "ingress": app.ingress,
                "route_prefix": app.route_prefix,
                "cwd": app.code_env.cwd,
                "sys_path": list(app.code_env.sys_path),
                "deployed_at_s": app.deployed_at_s,
                "deleting": app.deleting,
            }
        )
        with self._transaction():
            row = self._db.execute("SELECT version FROM apps WHERE name=?", (app.name,)).fetchone()
            version = (row[0] if row else 0) + 1
            self._db.execute(
                "INSERT OR REPLACE INTO apps (name, version, document) VALUES (?, ?, ?)",
                (app.name, version, document),
            )
            self._db.execute("DELETE FROM deployments WHERE app=?", (app.name,))
            self._db.executemany(
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

    def mark_deleting(self, name: str) -> None:
        with self._transaction():
            row = self._db.execute(
                "SELECT version, document FROM apps WHERE name=?", (name,)
            ).fetchone()
            if row is None:
                return
            document = orjson.loads(row[1])
            document["deleting"] = True
            self._db.execute(
                "UPDATE apps SET version=?, document=? WHERE name=?",
                (row[0] + 1, orjson.dumps(document), name),
            )

    def delete(self, name: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM apps WHERE name=?", (name,))
            self._db.execute("DELETE FROM deployments WHERE app=?", (name,))

    def load(self) -> list[AppGoal]:
        apps = []
        for name, _, document in self._db.execute("SELECT name, version, document FROM apps"):
            meta = orjson.loads(document)
            goals: dict[str, DeploymentGoal] = {}
            for dep_name, code, init, version, config in self._db.execute(
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
                )
            )
        return apps

    def save_replica(self, replica_id: str, pid: int, code_version: str) -> None:
        """Remember a replica process, so a restarted controller knows whom to wait for."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO replicas VALUES (?, ?, ?)", (replica_id, pid, code_version)
            )

    def forget_replica(self, replica_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM replicas WHERE replica_id=?", (replica_id,))

    def load_replicas(self) -> list[tuple[str, int, str]]:
        """(replica id, pid, code version) of every replica the last controller ran."""
        return list(self._db.execute("SELECT replica_id, pid, code_version FROM replicas"))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
