"""Ray 2.60's smaller additions through real daemons: reconfigure(user_config, rank), the
LoggingConfig class, local testing mode beside a controller, serve.start's logging_config and
controller_options."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

import serve
from serve.schema import LoggingConfig, ReplicaRank
from tests.support.procs import run_script, wait_for

pytestmark = pytest.mark.e2e


@serve.deployment(num_replicas=2, user_config={"model": "m1"})
class RankAware:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def reconfigure(self, user_config: dict[str, Any], rank: ReplicaRank) -> None:
        self.seen.append((user_config["model"], (type(rank).__name__, rank.rank)))

    def __call__(self) -> list[tuple[Any, Any]]:
        return self.seen


@serve.deployment(num_replicas=2)
class RankOnly:
    """No user_config: Ray still calls a reconfigure that takes the rank."""

    def __init__(self) -> None:
        self.rank = -1

    def reconfigure(self, user_config: Any, rank: ReplicaRank) -> None:
        assert user_config is None
        self.rank = rank.rank

    def __call__(self) -> int:
        return self.rank


@pytest.mark.usefixtures("serve_instance")
def test_reconfigure_gets_the_rank_when_it_takes_one() -> None:
    h = serve.run(RankAware.bind(), name="rank-aware", route_prefix=None)
    seen: set[str] = set()

    def both_replicas_seen() -> bool:
        seen.add(json.dumps(h.remote().result()))
        return len(seen) == 2

    wait_for(both_replicas_seen, timeout_s=30)
    assert sorted(json.loads(s) for s in seen) == [
        [["m1", ["ReplicaRank", 0]]],
        [["m1", ["ReplicaRank", 1]]],
    ]
    # a user_config change reaches reconfigure again, with each replica's rank
    serve.run(RankAware.options(user_config={"model": "m2"}).bind(), name="rank-aware")
    last = {h.remote().result()[-1][0] for _ in range(10)}
    assert last == {"m2"}
    h2 = serve.run(RankOnly.bind(), name="rank-only", route_prefix=None)
    ranks: set[int] = set()

    def both_ranks_seen() -> bool:
        ranks.add(h2.remote().result())
        return len(ranks) == 2

    wait_for(both_ranks_seen, timeout_s=30)
    assert ranks == {0, 1}


@serve.deployment(logging_config=LoggingConfig(encoding="JSON", enable_access_log=False))
class JsonByClass:
    def __call__(self) -> str:
        import logging

        logging.getLogger("user.app").warning("from the LoggingConfig class")
        return "ok"


@pytest.mark.usefixtures("serve_instance")
def test_the_logging_config_class_sets_the_encoding(state_dir: Path) -> None:
    h = serve.run(JsonByClass.bind(), name="json-class", route_prefix=None)
    assert h.remote().result() == "ok"

    def entries() -> list[dict[str, Any]]:
        found = []
        for path in (state_dir / "logs").rglob("replica_json-class_JsonByClass_*.log"):
            for line in path.read_text().splitlines():
                if line.startswith("{") and "LoggingConfig class" in line:
                    found.append(json.loads(line))
        return found

    (entry, *_) = wait_for(entries)
    assert entry["logger"] == "user.app"
    assert not any(
        "serve.access" in p.read_text()
        for p in (state_dir / "logs").rglob("replica_json-class_JsonByClass_*.log")
    )  # enable_access_log=False


def test_local_testing_mode_works_beside_a_connected_controller() -> None:
    script = textwrap.dedent(
        """
        import os
        import serve

        @serve.deployment
        class Doubler:
            def double(self, s):
                return s + " " + s, os.getpid()

        @serve.deployment
        class Hello:
            def __init__(self, doubler):
                self.doubler = doubler

            async def __call__(self, name):
                return await self.doubler.double.remote(f"Hello, {name}!")

        app = Hello.bind(Doubler.bind())
        remote = serve.run(app)
        text, remote_pid = remote.remote("Ray").result()
        assert text == "Hello, Ray! Hello, Ray!" and remote_pid != os.getpid()
        local = serve.run(app, name="local", _local_testing_mode=True)
        text, local_pid = local.remote("Ray").result()
        assert text == "Hello, Ray! Hello, Ray!" and local_pid == os.getpid()
        assert remote.remote("again").result()[1] == remote_pid  # the first still works
        serve.shutdown()
        print("OK")
        """
    )
    result = run_script(script, timeout_s=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_serve_start_takes_logging_config_and_controller_options() -> None:
    script = textwrap.dedent(
        """
        import os
        import serve
        from serve.config import ControllerOptions

        serve.start(
            logging_config={"encoding": "JSON", "log_level": "INFO"},
            controller_options=ControllerOptions(runtime_env={"env_vars": {"TUNING": "16"}}),
        )

        @serve.deployment
        class Env:
            def __call__(self):
                return os.environ.get("TUNING"), os.environ.get("SERVE_LOG_FORMAT")

        print(serve.run(Env.bind(), route_prefix=None).remote().result())
        try:
            ControllerOptions(runtime_env={"pip": ["x"]})
        except ValueError as exc:
            print(exc)
        serve.shutdown()
        """
    )
    result = run_script(script, timeout_s=120)
    assert result.returncode == 0, result.stderr
    assert "('16', 'json')" in result.stdout  # the controller's environment, inherited
    assert "controller_options.runtime_env field(s) ['pip'] are not allowed" in result.stdout
