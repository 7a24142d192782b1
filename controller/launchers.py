"""Which launcher a controller uses, from its command line: the seam a new engine plugs into.

A Kubernetes launcher (a pod per replica) would be one more ``kind`` here and one module that
implements ``controller.launcher.Launcher``; nothing else in the controller changes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from controller.launcher import Launcher, LocalProcessLauncher
from controller.resources import NodeCapacity
from controller.slurm import SlurmLauncher
from controller.slurm_cli import SlurmOptions, instance_tag

KINDS = ("local", "slurm")


@dataclasses.dataclass(frozen=True)
class LauncherConfig:
    kind: str = "local"
    num_cpus: float | None = None  # local: CPUs replicas may hold (None: no cap)
    num_gpus: int | None = None  # local: GPUs handed out as CUDA_VISIBLE_DEVICES (None: unmanaged)
    replica_host: str = "127.0.0.1"  # local: where replicas bind
    slurm: SlurmOptions = dataclasses.field(default_factory=SlurmOptions)

    def build(self, address: str, token: str, log_dir: Path, state_dir: Path) -> Launcher:
        if self.kind == "slurm":
            return SlurmLauncher(
                address, token, log_dir, instance=instance_tag(state_dir), options=self.slurm
            )
        if self.kind != "local":
            raise ValueError(f"Unknown launcher {self.kind!r}; use one of {', '.join(KINDS)}.")
        capacity = NodeCapacity(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        return LocalProcessLauncher(
            address, token, log_dir, capacity=capacity, replica_host=self.replica_host
        )
