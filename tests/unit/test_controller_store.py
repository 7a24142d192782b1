"""The goal store: no I/O before open(), writes in order on one thread, idempotent close."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.state import AppGoal, DeploymentGoal
from controller.store import SCHEMA_VERSION, GoalStore
from serve._models import CodeEnv, DeploymentConfig, DeploymentID, DeploymentSpec


def app(name: str, version: str) -> AppGoal:
    spec = DeploymentSpec("Model", b"code", b"args", version, DeploymentConfig(num_replicas=2))
    goal = DeploymentGoal(DeploymentID("Model", name), spec, 2)
    return AppGoal(name, "Model", "/", CodeEnv("/", ()), {"Model": goal}, 0.0)


async def test_writes_land_in_order_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = GoalStore(path)
    assert not path.exists()  # the constructor does no I/O
    async with store:
        writes = [store.save(app("a", f"v{i}")) for i in range(20)]
        writes.append(store.save_replica("a#Model#x", 42, "v19", "{}"))
        await writes[-1]  # one writer thread: everything before it has committed too
        assert all(w.done() for w in writes)
    await store.aclose()  # idempotent
    async with GoalStore(path) as reopened:
        (loaded,) = await reopened.load()
        assert loaded.deployments["Model"].version == "v19"
        assert await reopened.load_replicas() == [("a#Model#x", 42, "v19", "{}")]


async def test_using_a_store_before_open_says_so(tmp_path: Path) -> None:
    store = GoalStore(tmp_path / "state.db")
    with pytest.raises(RuntimeError, match="not open"):
        store.delete("a")


async def test_a_failed_open_leaves_nothing_open(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with GoalStore(path) as store:
        await store._run(lambda: store.db.execute("UPDATE meta SET value='99'"))
    broken = GoalStore(path)
    with pytest.raises(RuntimeError, match="schema 99"):
        await broken.open()
    assert broken._closed
    await broken.aclose()  # still idempotent


async def test_a_database_of_the_previous_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema', '1');"
        "CREATE TABLE replicas (replica_id TEXT PRIMARY KEY, pid INTEGER NOT NULL,"
        " code_version TEXT NOT NULL);"
        "INSERT INTO replicas VALUES ('a#Model#x', 42, 'v1');"
    )
    old.commit()
    old.close()
    async with GoalStore(path) as store:
        assert await store.load_replicas() == [("a#Model#x", 42, "v1", "")]
        await store.save_replica("a#Model#y", 43, "v1", '{"num_cpus": 2.0}')
    async with GoalStore(path) as reopened:
        rows = await reopened.load_replicas()
        assert ("a#Model#y", 43, "v1", '{"num_cpus": 2.0}') in rows
        version = await reopened._run(
            lambda: reopened.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        )
        assert version == (str(SCHEMA_VERSION),)
