"""What a replica asks of the node it runs on, as Ray spells it, and one node's capacity.

``ResourceRequest`` is parsed once from a deployment's ``ray_actor_options`` and
``max_replicas_per_node``; every launcher gets it with each launch. ``NodeCapacity`` is the pure
book-keeping of the local launcher: what fits now, what never fits, which GPUs a replica gets.
No I/O here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from serve._models import DeploymentConfig

DEFAULT_NUM_CPUS = 1.0  # Ray Serve's default ray_actor_options: {"num_cpus": 1}
_EPSILON = 1e-9


@dataclasses.dataclass(frozen=True)
class ResourceRequest:
    """One replica's resources and placement constraints."""

    num_cpus: float = DEFAULT_NUM_CPUS
    num_gpus: float = 0.0
    memory_bytes: int = 0
    custom: tuple[tuple[str, float], ...] = ()  # Ray's custom `resources`, sorted by name
    max_replicas_per_node: int | None = None
    group: str = ""  # the deployment: max_replicas_per_node counts replicas of one group
    avoid_nodes: tuple[str, ...] = ()  # where the group's replicas kept failing to start
    # A gang member: its gang is placed as one unit (under Slurm, one job of gang_size tasks).
    gang_id: str = ""
    gang_size: int = 0
    gang_strategy: str = ""  # serve.gang.GangPlacementStrategy

    @classmethod
    def from_config(
        cls, config: DeploymentConfig, group: str, avoid_nodes: tuple[str, ...] = ()
    ) -> ResourceRequest:
        options: Mapping[str, Any] = config.ray_actor_options or {}
        num_cpus = options.get("num_cpus")
        custom = options.get("resources") or {}
        return cls(
            num_cpus=DEFAULT_NUM_CPUS if num_cpus is None else float(num_cpus),
            num_gpus=float(options.get("num_gpus") or 0.0),
            memory_bytes=int(options.get("memory") or 0),
            custom=tuple(sorted((str(k), float(v)) for k, v in custom.items() if v)),
            max_replicas_per_node=config.max_replicas_per_node,
            group=group,
            avoid_nodes=avoid_nodes,
        )

    def to_json(self) -> str:
        """The request as the state database keeps it (a restarted controller re-adopts its
        replicas with what they asked for: spreading and resource accounting hold)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ResourceRequest:
        """Inverse of ``to_json``; an empty or unreadable record is the default request."""
        try:
            data = json.loads(text) if text else {}
            data["custom"] = tuple((str(k), float(v)) for k, v in data.get("custom", ()))
            data["avoid_nodes"] = tuple(str(n) for n in data.get("avoid_nodes", ()))
            return cls(**data)
        except (ValueError, TypeError, AttributeError):
            return cls()

    def describe(self) -> str:
        """Ray's way of showing a request: {"CPU": 1.0, "GPU": 1.0, "memory": ..., ...}."""
        parts = [f'"CPU": {self.num_cpus}']
        if self.num_gpus:
            parts.append(f'"GPU": {self.num_gpus}')
        if self.memory_bytes:
            parts.append(f'"memory": {self.memory_bytes}')
        parts += [f'"{name}": {amount}' for name, amount in self.custom]
        text = "{" + ", ".join(parts) + "}"
        if self.max_replicas_per_node:
            text += f" with max_replicas_per_node={self.max_replicas_per_node}"
        return text


@dataclasses.dataclass(frozen=True)
class GangSpec:
    """A gang to launch: its members' replica ids, by rank (each asks for the same request)."""

    gang_id: str
    members: tuple[str, ...]
    strategy: str

    def context(self, rank: int, pg_name: str = "") -> dict[str, Any]:
        """What member ``rank`` sees as its serve.gang.GangContext (Ray's fields)."""
        return {
            "gang_id": self.gang_id,
            "rank": rank,
            "world_size": len(self.members),
            "member_replica_ids": [member.rsplit("#", 1)[-1] for member in self.members],
            "pg_name": pg_name,
        }


@dataclasses.dataclass(frozen=True)
class Grant:
    """What a replica got on the node: the GPU indices it sees as CUDA_VISIBLE_DEVICES."""

    gpu_ids: tuple[int, ...] = ()


class NodeCapacity:
    """One node's CPUs, GPUs and per-deployment replica counts, and who holds what.

    ``num_cpus=None`` does not cap CPUs (the local default, so laptops and tests keep working);
    ``num_gpus=None`` does not manage GPUs at all (CUDA_VISIBLE_DEVICES is left alone).
    GPUs are whole devices, or fractions of one device as in Ray (two 0.5 requests share it).
    """

    def __init__(self, *, num_cpus: float | None = None, num_gpus: int | None = None) -> None:
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._gpu_free = [1.0] * (num_gpus or 0)
        self._held: dict[str, tuple[ResourceRequest, Grant]] = {}

    def _cpus_used(self) -> float:
        return sum(request.num_cpus for request, _ in self._held.values())

    def _in_group(self, group: str) -> int:
        return sum(1 for request, _ in self._held.values() if request.group == group)

    def never_fits(self, request: ResourceRequest) -> str | None:
        """Why this request cannot run here even on an idle node (None: it can)."""
        if self.num_cpus is not None and request.num_cpus > self.num_cpus + _EPSILON:
            return (
                f"needs {request.num_cpus:g} CPU(s) but this node has {self.num_cpus:g} "
                "(serve-controller --num-cpus)"
            )
        if self.num_gpus is not None and request.num_gpus > self.num_gpus + _EPSILON:
            return (
                f"needs {request.num_gpus:g} GPU(s) but this node has {self.num_gpus} "
                "(serve-controller --num-gpus)"
            )
        if request.num_gpus > 1 and not float(request.num_gpus).is_integer():
            return f"num_gpus={request.num_gpus:g}: above 1, GPUs are whole devices"
        return None

    def why_not(self, request: ResourceRequest) -> str | None:
        """Why this request does not fit now (None: it does). Assumes ``never_fits`` passed."""
        if self.num_cpus is not None:
            used = self._cpus_used()
            if used + request.num_cpus > self.num_cpus + _EPSILON:
                return (
                    f"needs {request.num_cpus:g} CPU(s); {self.num_cpus - used:g} of "
                    f"{self.num_cpus:g} free"
                )
        if self.num_gpus is not None and request.num_gpus and self._pick_gpus(request) is None:
            free = sum(1 for f in self._gpu_free if f >= 1.0 - _EPSILON)
            return f"needs {request.num_gpus:g} GPU(s); {free} of {self.num_gpus} free"
        limit = request.max_replicas_per_node
        if limit is not None and self._in_group(request.group) >= limit:
            return f"max_replicas_per_node={limit} reached on this node"
        return None

    def _pick_gpus(self, request: ResourceRequest) -> tuple[int, ...] | None:
        if request.num_gpus < 1:
            for index, free in enumerate(self._gpu_free):
                if free + _EPSILON >= request.num_gpus:
                    return (index,)
            return None
        whole = [i for i, free in enumerate(self._gpu_free) if free >= 1.0 - _EPSILON]
        wanted = math.ceil(request.num_gpus - _EPSILON)
        return tuple(whole[:wanted]) if len(whole) >= wanted else None

    def take(self, holder: str, request: ResourceRequest) -> Grant:
        """Hold the request's resources for ``holder``; call only when ``why_not`` is None."""
        gpu_ids: tuple[int, ...] = ()
        if self.num_gpus is not None and request.num_gpus:
            picked = self._pick_gpus(request)
            assert picked is not None
            share = min(request.num_gpus, 1.0)
            for index in picked:
                self._gpu_free[index] -= share
            gpu_ids = picked
        grant = Grant(gpu_ids)
        self._held[holder] = (request, grant)
        return grant

    def hold(self, holder: str, request: ResourceRequest, gpu_ids: tuple[int, ...]) -> None:
        """Count what a running replica already holds (re-adopted after a restart), even past
        the capacity: it runs, so it uses it."""
        share = min(request.num_gpus, 1.0)
        if self.num_gpus is not None:
            for index in gpu_ids:
                if 0 <= index < len(self._gpu_free):
                    self._gpu_free[index] = max(0.0, self._gpu_free[index] - share)
        self._held[holder] = (request, Grant(gpu_ids))

    def release(self, holder: str) -> None:
        """Give back what ``holder`` held (nothing if it held nothing)."""
        held = self._held.pop(holder, None)
        if held is None:
            return
        request, grant = held
        share = min(request.num_gpus, 1.0)
        for index in grant.gpu_ids:
            self._gpu_free[index] = min(1.0, self._gpu_free[index] + share)
