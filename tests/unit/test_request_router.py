"""Ray's RequestRouter interface as serve drives it: ranks, probes, backoff, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve._models import DeploymentID, ReplicaInfo
from serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    PowerOfTwoChoicesRequestRouter,
    RequestMetadata,
    RequestRouter,
    RunningReplica,
)
from serve.request_router._base import RouterFailure

DEP = DeploymentID("Model", "app")


PROBES: dict[str, list[int]] = {}  # replica name -> what its probes answered


def replica(
    name: str, *, host: str = "h1", queue_len: int = 0, models: tuple[str, ...] = ()
) -> RunningReplica:
    PROBES[name] = []

    async def probe(info: ReplicaInfo, deadline_s: float) -> int:
        PROBES[name].append(queue_len)
        return queue_len

    return RunningReplica(
        ReplicaInfo(f"app#Model#{name}", f"{host}:1", host, 2, frozenset(models)), probe
    )


def request(model_id: str = "") -> PendingRequest:
    return PendingRequest(metadata=RequestMetadata(request_id="r", multiplexed_model_id=model_id))


class Ranked(RequestRouter):
    """Returns the ranks it is told to."""

    ranks: Any = None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Any = None
    ) -> list[list[RunningReplica]]:
        ranks: list[list[RunningReplica]] = self.ranks(candidate_replicas)
        return ranks


def router(replicas: list[RunningReplica], ranks: Any) -> Ranked:
    r = Ranked(deployment_id=DEP, self_node_id="h1")
    r.ranks = ranks
    r.update_replicas(replicas)
    return r


async def test_the_first_rank_with_room_wins_probing_what_the_cache_does_not_know() -> None:
    full, free = replica("full", queue_len=2), replica("free", queue_len=0)
    r = router([full, free], lambda c: [[c[0]], [c[1]]])
    chosen = await r._choose_replica_for_request(request())
    assert chosen is free
    assert (PROBES["full"], PROBES["free"]) == ([2], [0])
    assert r.replica_queue_len_cache.get(full.replica_id) == 2  # what the probes said


async def test_a_cached_queue_length_saves_the_probe() -> None:
    a = replica("a", queue_len=1)
    r = router([a], lambda c: [c])
    r.replica_queue_len_cache.update(a.replica_id, 1)
    assert await r._choose_replica_for_request(request()) is a
    assert PROBES["a"] == []


async def test_it_backs_off_until_a_replica_has_room() -> None:
    busy = replica("busy", queue_len=2)
    r = router([busy], lambda c: [c])
    attempts: list[int] = []

    async def backoff(attempt: int) -> None:
        attempts.append(attempt)
        busy._probe = lambda info, deadline_s: _async(0)  # it frees up

    r._backoff = backoff  # type: ignore[method-assign]
    pending = request()
    pending.routing_context.should_backoff = True
    assert await r._choose_replica_for_request(pending) is busy
    assert attempts == [0]  # no sleep after the first pass, one before the third


async def _async(value: int) -> int:
    return value


@pytest.mark.parametrize(
    ("ranks", "error"),
    [
        (lambda c: (_ for _ in ()).throw(ValueError("nope")), "raised ValueError: nope"),
        (lambda c: "not ranks", "must return a list of lists of replicas"),
        (lambda c: [c[0]], "must return a list of lists of replicas"),
    ],
)
async def test_a_broken_router_raises_router_failure(ranks: Any, error: str) -> None:
    r = router([replica("a")], ranks)
    with pytest.raises(RouterFailure, match=error):
        await r._choose_replica_for_request(request())


async def test_a_router_that_hangs_is_cut_off() -> None:
    class Hangs(RequestRouter):
        choose_replicas_timeout_s = 0.05

        async def choose_replicas(
            self, candidate_replicas: Any, pending_request: Any = None
        ) -> Any:
            await asyncio.sleep(30)

    r = Hangs(deployment_id=DEP)
    r.update_replicas([replica("a")])
    with pytest.raises(RouterFailure, match=r"did not return within 0\.05s"):
        await r._choose_replica_for_request(request())


async def test_it_waits_for_replicas_when_there_are_none() -> None:
    r = router([], lambda c: [c])
    waiting = asyncio.ensure_future(r._choose_replica_for_request(request()))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    a = replica("a")
    r.update_replicas([a])
    assert await asyncio.wait_for(waiting, 5) is a


def test_mixins_rank_by_model_then_node() -> None:
    class Both(MultiplexMixin, LocalityMixin, Ranked):
        pass

    here, there, holder = (
        replica("here"),
        replica("there", host="h2"),
        replica("holder", models=("m",)),
    )
    r = Both(deployment_id=DEP, self_node_id="h1")
    r.update_replicas([here, there, holder])
    assert r.rank_replicas_via_multiplex([here, there, holder], "m") == [
        [holder],
        [here, there],
        [],
    ]
    assert r.rank_replicas_via_locality([here, there, holder]) == [[here, holder], [], [there]]
    r.replica_queue_len_cache.update(here.replica_id, 2)
    assert r.select_available_replicas() == [there, holder]


async def test_the_default_router_samples_two_of_the_preferred_candidates() -> None:
    replicas = [replica(str(i)) for i in range(5)]
    r = PowerOfTwoChoicesRequestRouter(deployment_id=DEP, self_node_id="h1")
    r.update_replicas(replicas)
    (rank,) = await r.choose_replicas(replicas, request())
    assert len(set(rank)) == len(rank) == 2
    with_model = [*replicas, replica("m", models=("x",))]
    r.update_replicas(with_model)
    (rank,) = await r.choose_replicas(with_model, request("x"))
    assert [x.replica_id.unique_id for x in rank] == ["m"]
