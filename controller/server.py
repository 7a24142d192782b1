"""The controller process: state directory, token, gRPC server, and how it stops.

A standalone controller (an operator's ``serve-controller``) records its address in the state
directory so drivers find it, and on SIGTERM stops alone: its replicas keep serving and re-link
to the next controller. An embedded controller (``--embedded``, started by a driver) stops
everything, replicas included, when its driver closes its stdin or dies.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import IO

import grpc.aio

from controller.launcher import Launcher
from controller.launchers import LauncherConfig
from controller.node_proxies import NodeProxies, ProxyLauncher, node_proxy_command
from controller.proxies import ProxyManager
from controller.servicer import ControllerServicer
from controller.store import GoalStore, StoreError
from controller.supervisor import Supervisor
from serve._daemon import on_stdin_closed
from serve._proto import controller_pb2
from serve._rpc.channel import new_server, tls_from_settings
from serve._rpc.service import add_service
from serve._settings import settings
from serve._state_dir import (
    LOCK_FILE,
    STATE_DB_FILE,
    ensure_private_dir,
    ensure_token,
    forget_controller,
    record_controller,
)
from serve._tracing import describe as describe_tracing
from serve.config import ProxyLocation

logger = logging.getLogger(__name__)

STOP_GRACE_S = 1.0


class ControllerServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        state_dir: Path,
        embedded: bool,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = None,
        metrics_no_auth: bool = False,
        log_dir: Path | None = None,
        proxy_location: ProxyLocation = ProxyLocation.Disabled,
        proxy_flags: list[str] | None = None,
        advertise_host: str | None = None,
        launcher: LauncherConfig | None = None,
    ) -> None:
        self._proxy_location = proxy_location
        self._proxy_flags = proxy_flags or []
        self._advertise_host = advertise_host
        self._launcher = launcher if launcher is not None else LauncherConfig()
        self._metrics_no_auth = metrics_no_auth
        self._log_dir = log_dir if log_dir is not None else state_dir / "logs"
        self._metrics_host = metrics_host
        self._metrics_port = metrics_port
        self._host = host
        self._port = port
        self._state_dir = state_dir
        self._embedded = embedded
        self._stop: asyncio.Event | None = None
        self._stop_replicas = embedded
        self._signals = 0
        self._lock_file: IO[str] | None = None

    def _acquire_lock(self) -> None:
        self._lock_file = open(self._state_dir / LOCK_FILE, "w")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SystemExit(
                f"Another serve-controller already uses the state directory {self._state_dir}; "
                "stop it or pass a different --state-dir."
            ) from exc

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ensure_private_dir(self._state_dir)
        self._acquire_lock()
        token = ensure_token(self._state_dir, settings().token)
        tls = tls_from_settings()
        server, port = new_server(token, tls, self._host, self._port)
        advertised = self._advertise_host or (
            "127.0.0.1" if self._host in ("0.0.0.0", "::", "") else self._host
        )
        address = f"{advertised}:{port}"
        launcher = self._launcher.build(address, token, self._log_dir, self._state_dir)
        try:
            async with GoalStore(self._state_dir / STATE_DB_FILE) as store:
                supervisor = Supervisor(store=store, launcher=launcher, token=token, tls=tls)
                proxies = ProxyManager(
                    location=self._proxy_location,
                    flags=self._proxy_flags,
                    controller_address=address,
                    token=token,
                    node_id=settings().node_id,
                    state_dir=self._state_dir,
                    log_dir=self._log_dir,
                    others=self._node_proxies(launcher, supervisor, address),
                )
                servicer = ControllerServicer(
                    supervisor, on_shutdown=self._request_full_stop, proxies=proxies
                )
                add_service(server, controller_pb2.DESCRIPTOR, "Controller", servicer)
                await supervisor.start()
                try:
                    await self._serve(loop, server, supervisor, proxies, servicer, address, token)
                finally:
                    await proxies.aclose(stop_proxy=self._stop_replicas)
                    await supervisor.aclose(stop_replicas=False)
        except StoreError as exc:
            logger.error("%s", exc)
            raise SystemExit(f"serve-controller: {exc}") from exc
        finally:
            forget_controller(self._state_dir)
            if self._embedded:
                shutil.rmtree(self._state_dir, ignore_errors=True)
        return 0

    async def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        server: grpc.aio.Server,
        supervisor: Supervisor,
        proxies: ProxyManager,
        servicer: ControllerServicer,
        address: str,
        token: str,
    ) -> None:
        assert self._stop is not None
        await server.start()
        proxies.start()
        ready: dict[str, object] = {"event": "ready", "address": address, "pid": os.getpid()}
        metrics = dashboard = None
        if self._metrics_port is not None:
            from controller.dashboard import Dashboard
            from controller.metrics import MetricsServer, is_loopback

            dashboard = Dashboard(
                supervisor,
                proxies,
                address=address,
                log_dir=self._log_dir,
                report_interval_s=settings().metrics_interval_s,
                tracing=describe_tracing(),
            )
            dashboard.start()
            guard = None if self._metrics_no_auth or is_loopback(self._metrics_host) else token
            metrics = MetricsServer(
                supervisor.metrics_snapshot,
                self._metrics_host,
                self._metrics_port,
                guard,
                dashboard=dashboard.wsgi,
            )
            ready["metrics"] = metrics.address
            ready["dashboard"] = servicer.dashboard_url = f"http://{metrics.address}/"
            logger.info("Prometheus metrics at http://%s/metrics", metrics.address)
            logger.info("Dashboard at http://%s/", metrics.address)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        if self._embedded:
            self._watch_stdin(loop)
        record_controller(self._state_dir, address, os.getpid())
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        logger.info(
            "serve-controller ready at %s (state directory %s, logs in %s)",
            address,
            self._state_dir,
            self._log_dir,
        )
        try:
            await self._stop.wait()
            logger.info("Stopping%s", " with all replicas" if self._stop_replicas else "")
            await proxies.aclose(stop_proxy=self._stop_replicas)
            await supervisor.aclose(stop_replicas=self._stop_replicas)
            await server.stop(STOP_GRACE_S)
        finally:
            if metrics is not None:
                metrics.close()
            if dashboard is not None:
                await dashboard.aclose()

    def _node_proxies(
        self, launcher: Launcher, supervisor: Supervisor, address: str
    ) -> NodeProxies | None:
        """EveryNode on a cluster: a proxy on each node that runs replicas, besides this one."""
        if self._proxy_location is not ProxyLocation.EveryNode or not isinstance(
            launcher, ProxyLauncher
        ):
            return None
        head = settings().node_id
        flags, log_dir = self._proxy_flags, self._log_dir

        def nodes() -> set[str] | None:
            running = supervisor.replica_nodes()
            return None if running is None else running - {head}

        return NodeProxies(
            launcher=launcher,
            command=lambda node: node_proxy_command(address, flags, log_dir, node),
            nodes=nodes,
            changed=supervisor.status_changed,
        )

    def _request_full_stop(self) -> None:
        assert self._stop is not None
        self._stop_replicas = True
        self._stop.set()

    def _on_signal(self) -> None:
        assert self._stop is not None
        self._signals += 1
        if self._signals > 1:
            logger.warning("Second signal: exiting now")
            os._exit(1)
        self._stop.set()

    def _watch_stdin(self, loop: asyncio.AbstractEventLoop) -> None:
        """An embedded controller stops everything when its driver closes stdin (or dies)."""

        def driver_gone() -> None:
            logger.info("The driver is gone (stdin closed)")
            self._request_full_stop()

        on_stdin_closed(loop, driver_gone)
