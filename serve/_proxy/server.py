"""One serve-proxy process: uvicorn (httptools, uvloop) serving ``ProxyApp``, plus the gRPC
ingress when gRPC servicer functions are configured.

The proxy watches the controller's route table over one stream (which also tells the controller
this proxy is alive), and routes through ordinary handles on its own loop, as a replica does.
``workers`` > 1 starts that many processes in all, sharing the listening socket; each extra
worker runs the same server, and exits when its parent's pipe closes. Without a controller for
``orphan_timeout_s`` the proxy exits (no leaked processes); until then it keeps serving on the
last route table, and re-links to a controller that comes back at the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from serve import _client
from serve._daemon import OrphanClock, on_stdin_closed, route_address
from serve._models import ProxyInfo
from serve._proxy.http import ProxyApp
from serve._proxy.protocol import server_config
from serve._proxy.routes import RouteTable
from serve._rpc.channel import TlsFiles
from serve._settings import settings
from serve._sync import set_home_loop
from serve.config import HTTPOptions, gRPCOptions

if TYPE_CHECKING:
    from serve._proxy.haproxy import HAProxyFront

logger = logging.getLogger(__name__)

WORKER_STOP_S = 5.0


class ProxyServer:
    def __init__(
        self,
        *,
        controller_address: str,
        token: str | None,
        tls: TlsFiles | None,
        node_id: str,
        http: HTTPOptions,
        grpc: gRPCOptions,
        workers: int = 1,
        worker_fd: int | None = None,
        orphan_timeout_s: float = 30.0,
        log_file: str | None = None,
    ) -> None:
        self._controller_address = controller_address
        self._token = token
        self._tls = tls
        self._node_id = node_id
        self._http = http
        self._grpc = grpc
        self._workers = workers
        self._worker_fd = worker_fd
        self._orphan_timeout_s = orphan_timeout_s
        self._log_file = log_file
        self._routes = RouteTable()
        self._app = ProxyApp(self._routes, request_timeout_s=http.request_timeout_s)
        self._server: Any = None  # the uvicorn.Server
        self._front: HAProxyFront | None = None  # HAProxy in front (SERVE_ENABLE_HA_PROXY)
        self._exit_code = 0
        self._have_routes = asyncio.Event()
        self._grpc_ready = _Ready()

    @property
    def is_worker(self) -> bool:
        return self._worker_fd is not None

    async def run(self) -> int:
        import uvicorn

        loop = asyncio.get_running_loop()
        set_home_loop(loop)
        for signum in (signal.SIGTERM, signal.SIGINT):  # stop as one would, cleaning up below
            loop.add_signal_handler(signum, self._stop)
        client = _client.ServeClient(
            self._controller_address, token=self._token, tls=self._tls, owner=None
        )
        _client.install(client)
        sock = self._socket()
        host, port = sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):  # every interface: say the one peers reach it on
            host = route_address(self._controller_address)
        http_address = f"{host}:{port}"
        grpc_server = None
        grpc_address = grpc_fallback = ""
        grpc_sock: socket.socket | None = None  # the gRPC port HAProxy takes
        if self._grpc.grpc_servicer_functions and not self.is_worker:
            from serve._rpc.grpc_ingress import start_grpc_ingress, via_handles

            grpc_host, grpc_port = self._http.host, self._grpc.port
            if settings().ha_proxy:  # this proxy's gRPC ingress serves behind HAProxy
                grpc_sock = self._grpc_socket()
                grpc_host, grpc_port = _loopback(self._http.host), 0
            grpc_server, grpc_port = await start_grpc_ingress(
                self._routes,
                via_handles(self._routes, self._grpc.grpc_servicer_functions),
                host=grpc_host,
                port=grpc_port,
                request_timeout_s=self._grpc.request_timeout_s,
                ready=self._grpc_ready,
            )
            if grpc_sock is not None:
                v6 = ":" in grpc_host
                grpc_fallback = f"[{grpc_host}]:{grpc_port}" if v6 else f"{grpc_host}:{grpc_port}"
                grpc_port = grpc_sock.getsockname()[1]
            grpc_address = f"{host}:{grpc_port}"
        info = ProxyInfo(
            node_id="" if self.is_worker else self._node_id,
            pid=os.getpid(),
            http_address=http_address,
            grpc_address=grpc_address,
        )
        try:
            config = server_config(self._app, self._http)
        except SystemExit as exc:
            raise SystemExit(f"serve-proxy: {exc}") from exc
        server = self._server = uvicorn.Server(config)
        serve_sock = sock
        if settings().ha_proxy and not self.is_worker:
            # HAProxy takes the port; this proxy serves behind it, as every route's backup.
            from serve._proxy.haproxy import HAProxyFront, address_of, fallback_socket

            serve_sock = fallback_socket(self._http.host)
            self._front = HAProxyFront(
                client,
                http=self._http,
                sock=sock,
                fallback=address_of(serve_sock),
                grpc_sock=grpc_sock,
                grpc_fallback=grpc_fallback,
            )
        watch = asyncio.create_task(self._watch_routes(client, info), name="proxy:routes")
        children: list[subprocess.Popen[bytes]] = []
        exited: asyncio.Task[None] | None = None
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await self._have_routes.wait()
            if self._front is not None:
                await self._start_front(self._front)
                exited = asyncio.create_task(
                    self._stop_when_front_exits(self._front), name="proxy:haproxy:exit"
                )
            if not self.is_worker:
                children = [self._start_worker(serve_sock) for _ in range(self._workers - 1)]
                ready = {
                    "event": "ready",
                    "address": http_address,
                    "http": http_address,
                    "grpc": grpc_address,
                    "pid": os.getpid(),
                }
                sys.stdout.write(json.dumps(ready) + "\n")
                sys.stdout.flush()
                logger.info(
                    "serve-proxy serving HTTP on %s%s",
                    http_address,
                    f" and gRPC on {grpc_address}" if grpc_address else "",
                )
            else:
                on_stdin_closed(loop, self._stop)  # the first worker is gone
            # Not serve(): it would take SIGTERM, then raise it again once the server stopped,
            # killing this process before the cleanup below (HAProxy's files were left behind).
            await server._serve(sockets=[serve_sock])
        finally:
            if exited is not None:
                exited.cancel()
                await asyncio.gather(exited, return_exceptions=True)
            if self._front is not None:
                await self._front.aclose()
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            for child in children:
                _stop_worker(child)
            if grpc_server is not None:
                await grpc_server.stop(1.0)
            await client.aclose()
            sock.close()
            serve_sock.close()
            if grpc_sock is not None:
                grpc_sock.close()
        logger.info("serve-proxy (pid %d) stopped", os.getpid())
        return self._exit_code

    async def _start_front(self, front: HAProxyFront) -> None:
        from serve._proxy.haproxy import HAProxyExited

        try:
            await front.start()
        except HAProxyExited as exc:
            raise SystemExit(f"serve-proxy: {exc}") from exc

    async def _stop_when_front_exits(self, front: HAProxyFront) -> None:
        """HAProxy died: this proxy exits too, and the controller starts both again."""
        code = await front.wait_exited()
        logger.error("HAProxy exited (code %d): stopping, to be started again", code)
        self._exit_code = 1
        self._stop()

    def _socket(self) -> socket.socket:
        if self._worker_fd is not None:
            return socket.socket(fileno=self._worker_fd)
        family = socket.AF_INET6 if ":" in self._http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._http.host, self._http.port))
        except OSError as exc:
            sock.close()
            raise SystemExit(
                f"serve-proxy: cannot listen on {self._http.host}:{self._http.port}: "
                f"{exc.strerror}. Free the port or choose another with "
                "http_options={'port': ...} (serve start --http-port)."
            ) from exc
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def _grpc_socket(self) -> socket.socket:
        """The gRPC port, for HAProxy to serve on."""
        host, port = self._http.host, self._grpc.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise SystemExit(
                f"serve-proxy: cannot listen for gRPC on {host}:{port}: {exc.strerror}. Free "
                "the port or choose another with grpc_options={'port': ...} (serve start "
                "--grpc-port)."
            ) from exc
        sock.listen(2048)
        return sock

    def _start_worker(self, sock: socket.socket) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-P", "-m", "serve._proxy", *sys.argv[1:]]
        command += ["--worker-fd", str(sock.fileno())]
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,  # closed by this process (or its death): the worker exits
            stdout=subprocess.DEVNULL,
            pass_fds=[sock.fileno()],
        )

    def _stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

    async def _watch_routes(self, client: _client.ServeClient, info: ProxyInfo) -> None:
        """Keep the route table current; exit after orphan_timeout_s without a controller."""
        clock = OrphanClock(self._controller_address, self._orphan_timeout_s, lost=False)
        while True:
            try:
                async with asyncio.timeout(clock.remaining_s()) as deadline:
                    async for routes in client.controller.watch_routes(info):
                        self._routes.update(routes)
                        if self._front is not None:
                            self._front.update_routes(routes)
                        # As Ray's: ready once some application was exposed (then for good);
                        # over HTTP only one with a route prefix counts.
                        if self._routes.routes:
                            self._grpc_ready.ready = True
                        if any(r.route_prefix for r in self._routes.routes):
                            self._app.ready = True
                        self._have_routes.set()
                        clock.linked()
                        deadline.reschedule(None)
            except Exception as exc:  # ControllerUnavailableError, a refusal, the orphan timeout
                logger.debug("Route watch failed: %s", exc)
            if clock.orphaned():
                self._stop()
                return
            await clock.pause()


def _loopback(host: str) -> str:
    return "::1" if ":" in host else "127.0.0.1"


class _Ready:
    """Whether the gRPC ingress has had an application to route to."""

    ready = False


def _stop_worker(child: subprocess.Popen[bytes]) -> None:
    if child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    try:
        child.wait(WORKER_STOP_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
