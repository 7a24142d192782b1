"""Publication derived from state: only what changed gets a new version and wakes watchers."""

from __future__ import annotations

import asyncio

from controller.publisher import Publisher
from serve._models import DeploymentID, ReplicaInfo, ReplicaSet

DEP = DeploymentID("Model", "app")


def replica_set(*replica_ids: str) -> ReplicaSet:
    return ReplicaSet(
        version=0,
        exists=True,
        replicas=tuple(ReplicaInfo(r, f"127.0.0.1:{i}", "h", 5) for i, r in enumerate(replica_ids)),
    )


async def test_only_changes_get_a_new_version() -> None:
    publisher = Publisher()
    publisher.update({DEP: replica_set("a")})
    first = publisher.published_version(DEP)
    assert first > 0
    publisher.update({DEP: replica_set("a")})
    assert publisher.published_version(DEP) == first
    publisher.update({DEP: replica_set("a", "b")})
    assert publisher.published_version(DEP) > first


async def test_watchers_wait_for_the_first_update_then_see_each_change() -> None:
    publisher = Publisher()
    seen: list[ReplicaSet] = []
    got = asyncio.Event()

    async def watch() -> None:
        async for current in publisher.watch(DEP):
            seen.append(current)
            got.set()

    watcher = asyncio.create_task(watch(), name="test:watch")
    try:
        await asyncio.sleep(0)
        assert not seen  # nothing before the first update (recovery after a restart)
        publisher.update({DEP: replica_set("a")})
        await asyncio.wait_for(got.wait(), 5)
        got.clear()
        publisher.update({})  # the deployment is gone
        await asyncio.wait_for(got.wait(), 5)
        assert [len(s.replicas) for s in seen] == [1, 0]
        assert [s.exists for s in seen] == [True, False]
        assert seen[1].version > seen[0].version
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
