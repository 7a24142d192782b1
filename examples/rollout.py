"""Rollouts bounded as Ray's: ``rolling_update_percentage`` and ``max_surge_percent``.

By default a new version replaces max(int(0.2 * replicas), 1) replicas at a time and never runs
more than the target (old replicas stop first). ``max_surge_percent`` starts replacements first
instead, up to that share above the target, so capacity never dips. A Ray program would differ
only in its imports. Run it with ``python examples/rollout.py``.
"""

import threading
import time

import serve


@serve.deployment(num_replicas=4)
class Model:
    def __init__(self, version: str) -> None:
        time.sleep(0.3)  # loading weights
        self.version = version

    def __call__(self) -> str:
        return self.version


def roll_out(**options: object) -> int:
    """Deploy v2 over v1 with ``options``; the most replicas seen live (not stopping)."""
    serve.run(Model.bind("v1"), name="rollout")
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            states = serve.status().applications["rollout"].deployments["Model"].replica_states
            most = max(most, sum(n for state, n in states.items() if state != "STOPPING"))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    handle = serve.run(Model.options(version="v2", **options).bind("v2"), name="rollout")
    done.set()
    watcher.join()
    assert {handle.remote().result() for _ in range(8)} == {"v2"}
    return most


if __name__ == "__main__":
    print("default rollout, most live replicas:", roll_out())
    print(
        "50% surge, most live replicas:",
        roll_out(max_surge_percent=50, rolling_update_percentage=0.5),
    )
    serve.shutdown()
    print("rollout example OK")
