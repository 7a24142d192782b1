"""The replica process: gRPC server, link to the controller, graceful stop.

The replica links to its controller with a server-streaming ``Link`` call held open for its
whole life. If the link breaks (the controller crashed), the replica keeps serving and keeps
re-linking; after ``orphan_timeout_s`` without a controller it exits, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replica import stats
from replica.executor import Executor
from replica.output import capture_user_output
from replica.servicer import ReplicaServicer, register
from serve import _client
from serve._context import current_gang_context as replica_context_gang
from serve._daemon import OrphanClock
from serve._logging import access_log, configure
from serve._models import ReplicaID
from serve._multiplex import registry as multiplex_registry
from serve._proxy_flags import inherited_ingress_options
from serve._rpc.channel import TlsFiles, new_server
from serve._rpc.controller_client import ControllerClient, LinkInfo, ReplicaLoad
from serve._settings import settings
from serve._sync import set_home_loop
from serve.exceptions import ServeError
from serve.metrics import snapshot as user_metrics_snapshot

if TYPE_CHECKING:
    from replica.direct_grpc import DirectGrpc
    from replica.direct_ingress import DirectIngress

logger = logging.getLogger(__name__)

STOP_GRACE_S = 0.5


class ReplicaServer:
    """Owns everything the replica process runs."""

    def __init__(
        self,
        replica_id: ReplicaID,
        *,
        controller_address: str,
        host: str,
        port: int,
        token: str | None,
        tls: TlsFiles | None,
        orphan_timeout_s: float,
        log_file: Path | None = None,
    ) -> None:
        self._log_file = log_file
        self.replica_id = replica_id
        self._controller_address = controller_address
        self._host = host
        self._port = port
        self._token = token
        self._tls = tls
        self._orphan_timeout_s = orphan_timeout_s
        self._stopped: asyncio.Event | None = None
        self._executor: Executor | None = None
        self._servicer: ReplicaServicer | None = None
        self._signals = 0
        self._controller: ControllerClient | None = None
        self._report: asyncio.Task[None] | None = None
        self._reported_models: frozenset[str] = frozenset()
        self._ingress: DirectIngress | None = None
        self._grpc_ingress: DirectGrpc | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        set_home_loop(loop)
        self._stopped = asyncio.Event()
        client = _client.ServeClient(
            self._controller_address, token=self._token, tls=self._tls, owner=None
        )
        _client.install(client)
        self._controller = client.controller  # one channel to the controller, shared
        executor = self._executor = Executor(self.replica_id)
        servicer = self._servicer = ReplicaServicer(
            executor, on_stop=self.drain, on_initialized=self._initialized
        )
        server, port = new_server(self._token, self._tls, self._host, self._port)
        register(server, servicer)
        await server.start()
        address = f"{self._host}:{port}"
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        sys.stdout.write(
            json.dumps(
                {
                    "event": "ready",
                    "address": address,
                    "pid": os.getpid(),
                    "replica_id": str(self.replica_id),
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        capture_user_output(self.replica_id, self._log_file)
        multiplex_registry.set_listener(self._models_changed)
        ingress_address = grpc_address = ""
        if settings().direct_ingress:
            # Imported only here: uvicorn, httptools and websockets cost an idle replica MBs.
            from replica.direct_grpc import DirectGrpc
            from replica.direct_ingress import DirectIngress

            http, grpc_options = inherited_ingress_options()
            self._ingress = DirectIngress(executor, http, self._host)
            ingress_address = await self._ingress.discover(client.controller)
            if ingress_address and grpc_options.grpc_servicer_functions:
                self._grpc_ingress = DirectGrpc(executor, self._ingress, grpc_options, self._host)
                grpc_address = await self._grpc_ingress.start()
        link = asyncio.create_task(
            self._link_loop(address, ingress_address, grpc_address), name="replica:link"
        )
        reporter = asyncio.create_task(self._report_loop(), name="replica:report-load")
        routing_stats = asyncio.create_task(
            stats.routing_stats_loop(executor, self._report_routing_stats),
            name="replica:report-routing-stats",
        )
        try:
            await self._stopped.wait()
        finally:
            multiplex_registry.set_listener(None)
            tasks = [link, reporter, routing_stats, *([self._report] if self._report else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._grpc_ingress is not None:
                await self._grpc_ingress.aclose()
            if self._ingress is not None:
                await self._ingress.aclose()
            await servicer.close_sessions()
            await server.stop(STOP_GRACE_S)
            await executor.shutdown()
            log = access_log()
            if log is not None:
                log.flush()  # the last requests' lines, before the process exits
            await client.aclose()
        return 0

    def _initialized(self) -> None:
        """The constructor ran: logging as the deployment says, and HTTP served if direct."""
        self._apply_logging_config()
        if self._ingress is not None:
            self._ingress.start()

    def _apply_logging_config(self) -> None:
        """The deployment's logging_config (Ray's fields) takes over once it is known."""
        assert self._executor is not None
        config = self._executor.config.logging_config
        if not config:
            return
        configure(
            f"replica:{self.replica_id}",
            self._log_file,
            json_lines=config.get("encoding") == "JSON",
            level=config.get("log_level", "INFO"),
        )
        self._executor.access_log = bool(config.get("enable_access_log", True))

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning("Second signal: exiting now")
            os._exit(1)
        timeout_s = self._executor.config.graceful_shutdown_timeout_s if self._executor else 0
        asyncio.get_running_loop().create_task(self.drain(timeout_s), name="replica:drain")

    async def drain(self, timeout_s: float) -> int:
        """Reject new requests as retryable, wait for in-flight ones, then stop the process."""
        executor = self._executor
        assert executor is not None
        assert self._stopped is not None
        executor.draining = True
        try:
            async with asyncio.timeout(timeout_s):
                if self._ingress is not None:  # a load balancer stops sending first
                    await self._ingress.drain()
                await executor.wait_idle()
        except TimeoutError:
            logger.warning(
                "%d request(s) still running after graceful_shutdown_timeout_s=%s; stopping",
                executor.ongoing,
                timeout_s,
            )
        abandoned = executor.ongoing
        self._stopped.set()
        return abandoned

    def _report_interval_s(self) -> float:
        assert self._executor is not None
        interval = settings().metrics_interval_s
        autoscaling = self._executor.config.autoscaling_config
        if autoscaling is not None:
            interval = min(interval, autoscaling.metrics_interval_s)
        return max(interval, 0.05)

    async def _report_loop(self) -> None:
        """Every metrics interval: average ongoing requests (for autoscaling) and counters."""
        assert self._executor is not None
        assert self._controller is not None
        executor = self._executor
        samples: list[int] = []
        last_report = time.monotonic()
        while True:
            interval_s = self._report_interval_s()  # known only once initialized
            await asyncio.sleep(min(interval_s / 10, 0.1))
            samples.append(executor.ongoing)
            if not executor.initialized or time.monotonic() - last_report < interval_s:
                continue
            last_report = time.monotonic()
            ongoing, samples = sum(samples) / len(samples), []
            counts = executor.stats
            load = ReplicaLoad(
                ongoing=ongoing,
                requests_total=counts.requests,
                errors_total=counts.errors,
                latency_bucket_counts=tuple(counts.cumulative_buckets()),
                latency_sum_ms=counts.sum_ms,
                user_metrics=tuple(user_metrics_snapshot()),
                autoscaling_stats=await stats.autoscaling_stats(executor, interval_s),
            )
            try:
                await self._controller.report_replica_load(
                    self.replica_id.deployment_id, str(self.replica_id), load
                )
            except ServeError:
                pass  # no controller right now: the next report carries the same counters

    async def _report_routing_stats(self, stats_json: bytes) -> None:
        assert self._controller is not None
        await self._controller.report_routing_stats(str(self.replica_id), stats_json)

    def _models_changed(self, model_ids: frozenset[str]) -> None:
        """Multiplexed models changed: tell the controller now (one report in flight at a time)."""
        if self._report is None or self._report.done():
            self._report = asyncio.get_running_loop().create_task(
                self._report_models(), name="replica:report-models"
            )

    async def _report_models(self) -> None:
        assert self._controller is not None
        while True:
            current = multiplex_registry.model_ids()
            if current == self._reported_models:
                return
            try:
                await self._controller.report_models(str(self.replica_id), sorted(current))
            except ServeError as exc:
                logger.warning("Could not report model ids to the controller: %s", exc)
                return  # the next change (or the next link) reports them again
            self._reported_models = current

    def _gang_fields(self) -> dict[str, Any]:
        """Its gang as the controller records it (members by full replica id)."""
        gang = replica_context_gang()
        if gang is None:
            return {}
        deployment_id = self.replica_id.deployment_id
        members = tuple(str(ReplicaID(tag, deployment_id)) for tag in gang.member_replica_ids)
        return {"gang_id": gang.gang_id, "gang_rank": gang.rank, "gang_members": members}

    async def _link_loop(
        self, address: str, ingress_http_address: str = "", ingress_grpc_address: str = ""
    ) -> None:
        """Hold the Link stream; re-link after a loss; exit after orphan_timeout_s alone."""
        assert self._executor is not None
        assert self._controller is not None
        executor = self._executor
        clock = OrphanClock(self._controller_address, self._orphan_timeout_s, lost=True)
        while True:
            info = LinkInfo(
                replica_id=str(self.replica_id),
                address=address,
                pid=os.getpid(),
                host=settings().node_id,
                initialized=executor.initialized,
                code_version=executor.code_version,
                user_config_json=executor.user_config_json or b"",
                model_ids=tuple(sorted(multiplex_registry.model_ids())),
                draining=executor.draining,
                ingress_http_address=ingress_http_address,
                ingress_grpc_address=ingress_grpc_address,
                **self._gang_fields(),
            )
            try:
                async with asyncio.timeout(clock.remaining_s()) as deadline:
                    async for keep in self._controller.link(info):
                        if not keep:
                            logger.info("The controller does not want this replica; stopping")
                            await self.drain(executor.config.graceful_shutdown_timeout_s)
                            return
                        clock.linked()
                        deadline.reschedule(None)  # linked: no orphan deadline while it lasts
            except Exception as exc:  # ControllerUnavailableError, a refusal, the orphan timeout
                logger.debug("Link to the controller failed: %s", exc)
            if clock.orphaned():
                await self.drain(0)
                return
            await clock.pause()
