"""``DeploymentHandle.choose_replica()`` and ``dispatch()`` (Ray 2.60's developer API), through
real replicas: the selection names the replica that runs the request, holds a slot on it until
dispatch or the end of the block, and a selection whose replica is gone fails clearly."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

import serve
from serve.exceptions import ReplicaUnavailableError
from serve.handle import DeploymentHandle, ReplicaSelection
from tests.support.procs import pids_alive, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


@serve.deployment(num_replicas=3)
class WhoAmI:
    def __call__(self, x: int = 0) -> tuple[str, int]:
        return serve.get_replica_context().replica_id.unique_id, x

    async def count(self, n: int) -> AsyncIterator[str]:
        me = serve.get_replica_context().replica_id.unique_id
        for i in range(n):
            yield f"{me}:{i}"

    def pid(self) -> int:
        return os.getpid()


@serve.deployment(max_ongoing_requests=1)
class OneAtATime:
    def __call__(self) -> str:
        return "ran"


def test_the_chosen_replica_runs_the_request_one_by_one_and_in_parallel() -> None:
    handle: DeploymentHandle[Any] = serve.run(WhoAmI.bind(), name="choose")

    async def one(x: int) -> None:
        async with handle.choose_replica(x) as selection:
            assert isinstance(selection, ReplicaSelection)
            assert selection.node_ip == "127.0.0.1"
            assert selection.port > 0
            ran_on, echoed = await handle.dispatch(selection, x)
        assert (ran_on, echoed) == (selection.replica_id, x)

    async def main() -> set[str]:
        for x in range(6):
            await one(x)
        chosen: list[str] = []

        async def remember(x: int) -> None:
            async with handle.choose_replica() as selection:
                chosen.append(selection.replica_id)
                ran_on, _ = await handle.dispatch(selection, x)
                assert ran_on == selection.replica_id

        await asyncio.gather(*(remember(x) for x in range(30)))
        return set(chosen)

    assert len(asyncio.run(main())) == 3  # power of two choices spreads them


def test_other_methods_and_streams_are_dispatched_as_remote_would() -> None:
    handle: DeploymentHandle[Any] = serve.run(WhoAmI.bind(), name="choose-methods")

    async def main() -> None:
        counter = handle.options(stream=True).count
        async with counter.choose_replica() as selection:
            items = [item async for item in counter.dispatch(selection, 3)]
        me = selection.replica_id
        assert items == [f"{me}:0", f"{me}:1", f"{me}:2"]

    asyncio.run(main())


def test_the_slot_is_held_until_dispatch_or_the_end_of_the_block() -> None:
    handle: DeploymentHandle[Any] = serve.run(OneAtATime.bind(), name="choose-slot")

    async def main() -> None:
        async with handle.choose_replica() as selection:
            # The only slot is held: an ordinary call waits in the handle's queue...
            waiting = asyncio.ensure_future(handle.remote())
            done, _ = await asyncio.wait([waiting], timeout=0.5)
            assert not done
            # ...while the dispatched request is never rejected.
            assert await handle.dispatch(selection) == "ran"
        assert await waiting == "ran"
        async with handle.choose_replica():
            pass  # not dispatched: leaving gives the slot back
        assert await asyncio.wait_for(handle.remote(), 10) == "ran"

    asyncio.run(main())


def test_dispatch_into_a_held_slot_is_not_subject_to_backpressure() -> None:
    app = OneAtATime.options(max_queued_requests=1).bind()
    handle: DeploymentHandle[Any] = serve.run(app, name="choose-backpressure")

    async def main() -> None:
        async with handle.choose_replica() as selection:
            waiting = asyncio.ensure_future(handle.remote())  # fills the one-request queue
            await asyncio.sleep(0.2)
            assert not waiting.done()
            assert await handle.dispatch(selection) == "ran"  # no queue, no BackPressureError
        assert await waiting == "ran"

    asyncio.run(main())


def test_a_selection_is_used_once_and_only_for_its_own_deployment() -> None:
    handle: DeploymentHandle[Any] = serve.run(WhoAmI.bind(), name="choose-misuse")
    other: DeploymentHandle[Any] = serve.run(
        OneAtATime.bind(), name="choose-other", route_prefix=None
    )

    async def main() -> None:
        async with handle.choose_replica() as selection:
            with pytest.raises(ValueError, match="different deployment"):
                other.dispatch(selection)
            await handle.dispatch(selection, 1)
            with pytest.raises(RuntimeError, match="already dispatched"):
                handle.dispatch(selection, 2)
        with pytest.raises(TypeError, match="ReplicaSelection"):
            handle.dispatch("replica-1", 3)  # type: ignore[arg-type]
        async with handle.choose_replica() as unused:
            pass
        with pytest.raises(RuntimeError, match="has ended"):
            handle.dispatch(unused, 4)

    asyncio.run(main())


def test_dispatch_to_a_replica_that_died_raises_replica_unavailable() -> None:
    handle: DeploymentHandle[Any] = serve.run(
        WhoAmI.options(num_replicas=1).bind(), name="choose-died"
    )

    async def main() -> None:
        async with handle.choose_replica() as selection:
            pid = await handle.pid.remote()
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(wait_for, lambda: not pids_alive([pid]))
            conn = selection._reservation.conn
            async with asyncio.timeout(10):  # until this process has seen the stream end
                while conn.broken is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            with pytest.raises(ReplicaUnavailableError, match="choose a replica again"):
                await handle.dispatch(selection, 1)
        # The controller replaces the replica; choosing again works.
        async with asyncio.timeout(30):
            async with handle.choose_replica() as again:
                assert (await handle.dispatch(again, 2))[1] == 2

    asyncio.run(main())
