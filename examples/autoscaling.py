"""Autoscaling by load: a deployment that sleeps at zero replicas, wakes on its first request,
grows while requests pile up and shrinks when they stop. The delays here are seconds so the
example finishes quickly; Ray's defaults (30 s up, 600 s down) suit production.
Run it: ``python examples/autoscaling.py``.
"""

import time

import serve

# --8<-- [start:config]


@serve.deployment(
    max_ongoing_requests=4,
    autoscaling_config={
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": 2,  # aim for 2 requests in each replica
        "metrics_interval_s": 0.5,  # replicas and handles report their load this often
        "look_back_period_s": 1,  # ... averaged over this window
        "upscale_delay_s": 0.5,  # the load must ask for more this long
        "downscale_delay_s": 2,
        "downscale_to_zero_delay_s": 2,
    },
)
class Resizer:
    def __call__(self, size: int) -> int:
        time.sleep(0.2)  # stands in for real work
        return size // 2


# --8<-- [end:config]


def replicas() -> int:
    deployment = serve.status().applications["resize"].deployments["Resizer"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_until(condition: str, predicate: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not {condition} within {timeout_s}s"
        time.sleep(0.1)


# --8<-- [start:run]
handle = serve.run(Resizer.bind(), name="resize", route_prefix=None)
print("replicas at start:", replicas())  # 0: nothing runs until a request comes

assert handle.remote(64).result() == 32  # waits while the first replica starts
print("replicas after one request:", replicas())

responses = [handle.remote(n) for n in range(60)]  # 60 waiting: wants 3 replicas (the max)
wait_until("scaled up", lambda: replicas() == 3)
print("replicas under load:", replicas())
assert [r.result() for r in responses] == [n // 2 for n in range(60)]

wait_until("scaled to zero", lambda: replicas() == 0)  # idle: back to zero
print("replicas when idle:", replicas())
# --8<-- [end:run]

serve.shutdown()
print("autoscaling example OK")
