"""A custom autoscaling policy (Ray's ``AutoscalingPolicy``) driven by a custom metric.

Replicas report the length of their work backlog with ``record_autoscaling_stats()``; a
class-based policy, built once in the controller with ``policy_kwargs``, asks for enough
replicas to keep each backlog under ``backlog_per_replica``. The controller applies the
config's delays and bounds, logs each decision and lists it in ``serve status``. A Ray program
would differ only in its imports. Run it with ``python examples/custom_autoscaling.py``.
"""

import math
import time
from typing import Any

import serve
from serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy


class BacklogPolicy:
    def __init__(self, backlog_per_replica: int) -> None:
        self.per_replica = backlog_per_replica

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        backlogs = ctx.aggregated_metrics.get("backlog", {})  # replica -> average backlog
        total = sum(backlogs.values())
        wanted = max(1, math.ceil(total / self.per_replica))
        return wanted, {"reason": f"backlog {total:.0f}"}


@serve.deployment(
    autoscaling_config=AutoscalingConfig(
        min_replicas=1,
        max_replicas=3,
        metrics_interval_s=0.2,
        look_back_period_s=1,
        upscale_delay_s=0,
        downscale_delay_s=0,
        policy=AutoscalingPolicy(
            policy_function=BacklogPolicy, policy_kwargs={"backlog_per_replica": 10}
        ),
    ),
)
class Worker:
    def __init__(self) -> None:
        self.backlog = 0

    def enqueue(self, jobs: int) -> None:
        self.backlog += jobs

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"backlog": self.backlog}


def replicas() -> int:
    status = serve.status().applications["default"].deployments["Worker"]
    return status.replica_states.get("RUNNING", 0)


if __name__ == "__main__":
    handle = serve.run(Worker.bind())
    handle.enqueue.remote(25).result()  # one replica now holds a backlog of 25: 3 replicas
    deadline = time.monotonic() + 60
    while replicas() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    status = serve.status().applications["default"].deployments["Worker"]
    decision = status.scaling_decisions[0]
    print(f"policy {status.autoscaling_policy}")
    print(f"scaled {decision.prev_num_replicas} -> {decision.curr_num_replicas}: {decision.reason}")
    assert replicas() == 3
    serve.shutdown()
    print("custom autoscaling example OK")
