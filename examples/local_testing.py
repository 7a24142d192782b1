"""Unit-testing deployments in one process: ``serve.run(app, _local_testing_mode=True)`` builds
every deployment in the test's own process, with no controller, replicas or ports.

These are pytest tests (``pytest examples/local_testing.py``); ``python
examples/local_testing.py`` runs them too.
"""

# --8<-- [start:tests]
import pytest

import serve
from serve.handle import DeploymentHandle


@serve.deployment
class Normalizer:
    def __call__(self, text: str) -> str:
        if not text.strip():
            raise ValueError("empty input")
        return " ".join(text.lower().split())


@serve.deployment
class Greeter:
    def __init__(self, normalizer: DeploymentHandle) -> None:
        self.normalizer = normalizer

    async def __call__(self, name: str) -> str:
        return f"hello {await self.normalizer.remote(name)}"


def test_the_graph_composes() -> None:
    handle = serve.run(Greeter.bind(Normalizer.bind()), _local_testing_mode=True)
    assert handle.remote("  ADA   Lovelace ").result() == "hello ada lovelace"


def test_errors_reach_the_caller_as_they_would_from_a_replica() -> None:
    handle = serve.run(Normalizer.bind(), _local_testing_mode=True)
    with pytest.raises(ValueError, match="empty input"):
        handle.remote("   ").result()


# --8<-- [end:tests]

if __name__ == "__main__":
    test_the_graph_composes()
    test_errors_reach_the_caller_as_they_would_from_a_replica()
    print("local testing example OK")
