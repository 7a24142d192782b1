"""Gang scheduling through real replica processes (the local launcher: one node)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

import serve
from serve.config import GangSchedulingConfig
from tests.support.procs import pids_alive, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


@serve.deployment(num_replicas=4, gang_scheduling_config=GangSchedulingConfig(gang_size=2))
class Member:
    def __call__(self) -> dict[str, Any]:
        context = serve.get_replica_context()
        gang = context.gang_context
        assert gang is not None
        return {
            "pid": os.getpid(),
            "replica": context.replica_tag,
            "gang_id": gang.gang_id,
            "rank": gang.rank,
            "world_size": gang.world_size,
            "members": gang.member_replica_ids,
        }


def members_of(handle: Any, replicas: int = 4) -> dict[str, dict[str, Any]]:
    """Each replica's answer, by replica, once all ``replicas`` have answered."""
    seen: dict[str, dict[str, Any]] = {}

    def all_seen() -> bool:
        answer = handle.remote().result(timeout_s=30)
        seen[answer["replica"]] = answer
        return len(seen) == replicas

    wait_for(all_seen, timeout_s=60, interval_s=0)
    return seen


def test_gang_members_know_their_gang_and_a_member_lost_restarts_its_gang_whole() -> None:
    handle = serve.run(Member.bind(), name="gangs")
    members = members_of(handle)
    gangs: dict[str, list[dict[str, Any]]] = {}
    for answer in members.values():
        gangs.setdefault(answer["gang_id"], []).append(answer)
    assert len(gangs) == 2
    for gang in gangs.values():
        assert sorted(m["rank"] for m in gang) == [0, 1]
        assert {m["world_size"] for m in gang} == {2}
        assert sorted(gang[0]["members"]) == sorted(m["replica"] for m in gang)
        assert gang[0]["members"] == gang[1]["members"]  # the same order (by rank) for all
    broken_id, kept_id = sorted(gangs)
    broken = gangs[broken_id]
    os.kill(broken[0]["pid"], signal.SIGKILL)  # one member dies: its gang restarts whole
    wait_for(lambda: not pids_alive([m["pid"] for m in broken]), timeout_s=30)

    def restarted() -> bool:
        now = members_of(handle)
        ids = {m["gang_id"] for m in now.values()}
        return len(ids) == 2 and kept_id in ids and broken_id not in ids

    wait_for(restarted, timeout_s=60, interval_s=0.2)
    kept_pids = {m["pid"] for m in gangs[kept_id]}
    assert kept_pids <= {m["pid"] for m in members_of(handle).values()}  # the other gang ran on
    serve.delete("gangs")
