"""A request runs at most once: a replica that dies while running it is never sent it again.

Each request below appends its token to a file and then ends its replica's process at once (as a
segfaulting C extension would). Admission is implicit in the outcome, so the router cannot tell
whether such a request started: it fails with ReplicaDiedError instead of being re-sent.
"""

from __future__ import annotations

import asyncio
import collections
import os
from pathlib import Path

import pytest

import serve
from serve.exceptions import ReplicaDiedError

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


def _record_and_die(path: str, token: str) -> None:
    with open(path, "a") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os._exit(1)


@serve.deployment(num_replicas=2, max_ongoing_requests=100, health_check_period_s=1)
class DiesAsync:
    def __init__(self, path: str) -> None:
        self.path = path

    async def __call__(self, token: str) -> str:
        _record_and_die(self.path, token)
        return token


@serve.deployment(num_replicas=2, max_ongoing_requests=100, health_check_period_s=1)
class DiesSync:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, token: str) -> str:
        _record_and_die(self.path, token)
        return token


@pytest.mark.parametrize("deployment", [DiesAsync, DiesSync], ids=["async", "sync"])
def test_a_request_whose_replica_dies_runs_at_most_once(
    deployment: serve.Deployment[object], tmp_path: Path
) -> None:
    path = tmp_path / "ran.txt"
    handle = serve.run(deployment.bind(str(path)), name="at-most-once")
    tokens = [f"t{i}" for i in range(12)]

    async def main() -> list[object]:
        return await asyncio.gather(*(handle.remote(t) for t in tokens), return_exceptions=True)

    outcomes = asyncio.run(main())
    ran = collections.Counter(path.read_text().split())
    assert ran, "no request ran at all"
    assert max(ran.values()) == 1, f"requests ran more than once: {ran}"
    assert set(ran) <= set(tokens)
    for outcome in outcomes:
        assert isinstance(outcome, ReplicaDiedError), outcome
        assert "it was not retried" in str(outcome)
