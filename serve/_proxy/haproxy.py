"""HAProxy as the front door (``SERVE_ENABLE_HA_PROXY=1``, Ray's RAY_SERVE_ENABLE_HA_PROXY).

The serve-proxy process of a node runs HAProxy (Debian's package, ``scripts/install_haproxy.sh``)
on the proxy's port and keeps it current; the ingress replicas serve HTTP themselves
(``replica/direct_ingress.py``) and HAProxy balances onto them:

- **Routes** come from the controller's route table. A change rewrites the configuration and
  reloads HAProxy (master-worker mode, SIGUSR2): the listening socket stays open (HAProxy
  inherits it from this process) and the old worker finishes the requests it holds, so no
  connection is dropped.
- **Replicas** come from the replica set of each application's ingress deployment, which
  lists the replicas that run and passed the controller's health check, with their HTTP
  addresses. They are added and removed through HAProxy's runtime API, without a reload. A
  replica that leaves the set (it is stopping) is drained first: no new request goes to it,
  and it is removed once the requests it holds are done. HAProxy also checks each replica's
  own ``/-/healthz``, and marks one down at its first refused connection, re-sending the
  request (which no replica read) to another.
- **The serve-proxy beside it** is every application's backup server: while no replica of an
  application is up, requests go the proxy's way (they wait for a replica, or get 503 with the
  reason when the deploy failed).
- **gRPC**, when the serve-proxy serves it: HAProxy takes the gRPC port too and sends each
  call, by its ``application`` metadata, to that application's replicas' own gRPC ports
  (``replica/direct_grpc.py``), kept current the same way; the serve-proxy's gRPC ingress
  beside it answers the rest (see ``haproxy_config.py``).
- **HAProxy's death** ends this process (``HAProxyExited``), which the controller replaces like
  any proxy that dies, HAProxy with it. HAProxy dies with this process (parent-death signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from serve._client import ServeClient
from serve._models import DeploymentID, ReplicaSet, Route
from serve._proxy import haproxy_config as cfg
from serve._rpc.channel import raise_open_file_limit
from serve._settings import settings
from serve.config import HTTPOptions

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 120.0  # a draining replica's requests: the replica's own stop bounds them
DRAIN_POLL_S = 0.1
WATCH_RETRY_S = 0.5
FD_RESERVE = 100  # descriptors HAProxy keeps for itself (listeners, sockets, files)


class HAProxyExited(Exception):
    """HAProxy stopped: the serve-proxy that ran it exits, and the controller starts another."""


class HAProxyCommandError(Exception):
    """HAProxy refused a runtime API command (its state is not what this process thinks)."""


class HAProxyFront:
    """HAProxy on ``sock`` (the proxy's listening socket), kept current by this process.

    Call :meth:`update_routes` with each route table; :meth:`wait_exited` returns if HAProxy
    dies. Constructed without I/O; :meth:`start` launches it, :meth:`aclose` stops it.
    """

    def __init__(
        self,
        client: ServeClient,
        *,
        http: HTTPOptions,
        sock: socket.socket,
        fallback: str,
        grpc_sock: socket.socket | None = None,
        grpc_fallback: str = "",
    ) -> None:
        self._client = client
        self._http = http
        self._sock = sock
        self._fallback = fallback
        self._grpc_sock = grpc_sock  # the gRPC port, or None: no gRPC
        self._grpc_fallback = grpc_fallback  # the serve-proxy's gRPC ingress
        self._run_dir = ""
        self._process: asyncio.subprocess.Process | None = None
        self._front: cfg.Frontend | None = None
        self._routes: list[Route] = []
        self._grpc_routes: list[Route] = []  # every application, when gRPC is served
        self._names: dict[tuple[str, str, bool], str] = {}  # (app, ingress, grpc) -> backend
        self._servers: dict[str, dict[str, str]] = {}  # backend -> replica -> its address
        self._check_ports: dict[str, dict[str, int]] = {}  # gRPC backend -> replica -> port
        self._books: dict[str, cfg.SlotBook] = {}  # backend -> which replica holds which slot
        self._watches: dict[str, asyncio.Task[None]] = {}  # backend -> its replica-set watch
        self._draining: dict[tuple[str, str], asyncio.Task[None]] = {}  # (backend, replica)
        self._rendered: object = None  # what the running configuration was made from
        self._exposed = False  # an application was routed: healthy from then on
        self._changed = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._last_alert = ""

    @property
    def tls(self) -> bool:
        return bool(self._http.ssl_certfile)

    async def start(self) -> None:
        """Write the configuration (no application yet), start HAProxy, wait until it serves."""
        s = settings()
        self._run_dir = tempfile.mkdtemp(prefix="serve-haproxy-")
        self._front = cfg.Frontend(
            bind=f"fd@{self._sock.fileno()}",
            run_dir=self._run_dir,
            fallback=self._fallback,
            # Each client connection may hold one to a replica too: two descriptors.
            max_connections=min(
                s.http_max_connections, (raise_open_file_limit() - FD_RESERVE) // 2
            ),
            max_header_bytes=s.http_max_header_bytes,
            max_headers=s.http_max_headers,
            max_body_bytes=s.http_max_body_bytes,
            header_timeout_s=s.http_header_timeout_s,
            body_timeout_s=s.http_body_timeout_s,
            keep_alive_timeout_s=self._http.keep_alive_timeout_s,
            balance=s.haproxy_balance,
            nbthread=s.haproxy_nbthread,
            tls_pem=self._tls_pem(),
            grpc_bind=f"fd@{self._grpc_sock.fileno()}" if self._grpc_sock is not None else "",
            grpc_fallback=self._grpc_fallback,
        )
        self._write_config(self._backends())
        binary = shutil.which(s.haproxy_binary)
        if binary is None:
            raise SystemExit(
                f"serve-proxy: SERVE_ENABLE_HA_PROXY=1 needs HAProxy, and {s.haproxy_binary!r} "
                "is not found. Install it (Debian: scripts/install_haproxy.sh, or apt-get "
                "install haproxy) or set SERVE_HAPROXY_BINARY_PATH."
            )
        command = [binary, "-W", "-db", "-f", f"{self._run_dir}/haproxy.cfg"]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:  # HAProxy dies with this process, however it ends
            command = [setpriv, "--pdeathsig", "KILL", *command]
        fds = [self._sock.fileno()]
        if self._grpc_sock is not None:
            fds.append(self._grpc_sock.fileno())
        for fd in fds:
            os.set_inheritable(fd, True)
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=fds,
        )
        self._log_task = asyncio.create_task(
            self._log_messages(self._process), name="proxy:haproxy:log"
        )
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not await self._worker_pid():
                    if self._process.returncode is not None:
                        await asyncio.wait_for(asyncio.shield(self._log_task), 1.0)
                        raise HAProxyExited(
                            f"HAProxy exited with code {self._process.returncode} at start: "
                            + (self._last_alert or "(see this proxy's log)")
                        )
                    await asyncio.sleep(0.02)
        except TimeoutError as exc:
            raise HAProxyExited(f"HAProxy did not start within {START_TIMEOUT_S:g}s") from exc
        self._rendered = self._render_key()
        self._sync_task = asyncio.create_task(self._sync_loop(), name="proxy:haproxy:sync")
        logger.info("HAProxy (pid %d) serves on %s", self._process.pid, self._bind_address())

    async def _log_messages(self, process: asyncio.subprocess.Process) -> None:
        """HAProxy's own messages, into this proxy's log (its alerts as errors)."""
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if "[ALERT]" in text:
                self._last_alert = text.split(":", 1)[-1].strip()
                logger.error("haproxy: %s", text)
            elif text:
                logger.info("haproxy: %s", text)

    async def wait_exited(self) -> int:
        """Until HAProxy exits (its master process): its exit code."""
        assert self._process is not None
        return await self._process.wait()

    async def aclose(self) -> None:
        tasks = [*self._watches.values(), *self._draining.values()]
        if self._sync_task is not None:
            tasks.append(self._sync_task)
        if self._log_task is not None:
            tasks.append(self._log_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()
        self._draining.clear()
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)  # the master stops its workers
            try:
                async with asyncio.timeout(5.0):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # What HAProxy should do.

    def update_routes(self, routes: list[Route]) -> None:
        """A new route table: follow each routed application's ingress replicas."""
        self._routes = [r for r in routes if r.route_prefix]
        self._grpc_routes = list(routes) if self._grpc_sock is not None else []
        self._exposed = self._exposed or bool(self._routes)
        live = set()
        wanted = [(r, False) for r in self._routes] + [(r, True) for r in self._grpc_routes]
        for route, grpc in wanted:
            name = self._backend_name(route, grpc)
            live.add(name)
            if name not in self._watches:
                self._servers.setdefault(name, {})
                self._books.setdefault(name, cfg.SlotBook())
                self._watches[name] = asyncio.create_task(
                    self._watch_replicas(name, route, grpc), name=f"proxy:haproxy:watch:{name}"
                )
        for name in list(self._watches):
            if name not in live:
                self._watches.pop(name).cancel()
                self._servers.pop(name, None)
                self._check_ports.pop(name, None)
                self._books.pop(name, None)  # its slots go with the next reload
        self._changed.set()

    def _backend_name(self, route: Route, grpc: bool = False) -> str:
        key = (route.app_name, route.ingress, grpc)
        if key not in self._names:
            name = cfg.grpc_backend_name if grpc else cfg.backend_name
            self._names[key] = name(len(self._names))
        return self._names[key]

    async def _watch_replicas(self, backend: str, route: Route, grpc: bool = False) -> None:
        """The application's ingress replicas that serve HTTP (or gRPC), as the controller
        publishes them."""
        deployment = DeploymentID(route.ingress, route.app_name)
        while True:
            try:
                async for replica_set in self._client.controller.watch(deployment):
                    if grpc:
                        self._servers[backend], self._check_ports[backend] = _grpc_servers_of(
                            replica_set
                        )
                    else:
                        self._servers[backend] = _servers_of(replica_set)
                    self._changed.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no controller now: keep the last set, watch again
                logger.debug("Replica-set watch of %s failed: %s", deployment, exc)
            await asyncio.sleep(WATCH_RETRY_S)

    def _backends(self) -> list[cfg.Backend]:
        out = []
        for route, grpc in self._wanted():
            name = self._backend_name(route, grpc)
            book = self._books.setdefault(name, cfg.SlotBook())
            slots = book.layout()
            ports: tuple[int | None, ...] = ()
            if grpc:
                by_slot = {slot: r for r, slot in book.holders.items()}
                known = self._check_ports.get(name, {})
                ports = tuple(
                    known.get(by_slot[i]) if i in by_slot else None for i in range(len(slots))
                )
            out.append(cfg.Backend(name, route, slots, grpc=grpc, check_ports=ports))
        return out

    def _wanted(self) -> list[tuple[Route, bool]]:
        """The backends: each routed application's HTTP one, and each application's gRPC one."""
        return [(r, False) for r in self._routes] + [(r, True) for r in self._grpc_routes]

    def _render_key(self) -> object:
        wanted = self._wanted()
        routes = tuple((self._backend_name(r, g), r.route_prefix, r.app_name) for r, g in wanted)
        slots = tuple(len(self._books[self._backend_name(r, g)].addresses) for r, g in wanted)
        return routes, slots, self._exposed

    # Making it so.

    async def _sync_loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                # What HAProxy holds is not known now: a reload makes it what the books say.
                logger.exception("Could not bring HAProxy up to date; reloading it")
                self._rendered = None
                await asyncio.sleep(WATCH_RETRY_S)
                self._changed.set()

    async def _sync(self) -> None:
        """Reload if the routes changed or an application needs more slots; then fill, ready
        and drain slots through the runtime API to match the replica sets."""
        backends = [self._backend_name(r, grpc) for r, grpc in self._wanted()]
        for backend in backends:
            book = self._books[backend]
            wanted = self._servers.get(backend, {})
            if not book.fits(wanted):
                book.grow(sum(1 for r in wanted if r not in book.holders))
        key = self._render_key()  # routes may change while HAProxy reloads: the next round
        if key != self._rendered:
            # New slots and routes need a reload: the configuration carries the replicas
            # known now; draining ones finish in the old process.
            for backend in backends:
                book = self._books[backend]
                for replica in list(book.draining):
                    book.release(replica)
                for replica, address in self._servers.get(backend, {}).items():
                    if replica not in book.holders:
                        book.take(replica, address)
            await self._reload()
            self._rendered = key
        for backend in backends:
            await self._apply(backend, self._books[backend], self._servers.get(backend, {}))

    async def _apply(self, backend: str, book: cfg.SlotBook, wanted: dict[str, str]) -> None:
        check_ports = self._check_ports.get(backend, {})
        for replica, address in wanted.items():
            if replica not in book.holders:
                slot = book.take(replica, address)
                for command in cfg.fill_slot(backend, slot, address, check_ports.get(replica)):
                    await self._command(command)
            elif replica in book.draining:  # back in the set before it left
                book.draining.discard(replica)
                task = self._draining.pop((backend, replica), None)
                if task is not None:
                    task.cancel()
                slot_name = cfg.slot_name(book.holders[replica])
                await self._command(cfg.ready_server(backend, slot_name))
        for replica in list(book.holders):
            if replica not in wanted and replica not in book.draining:
                book.draining.add(replica)
                self._draining[(backend, replica)] = asyncio.create_task(
                    self._drain(backend, book, replica),
                    name=f"proxy:haproxy:drain:{backend}/{replica}",
                )

    async def _drain(self, backend: str, book: cfg.SlotBook, replica: str) -> None:
        """No new request for it; its slot is freed once it holds none (or it is gone)."""
        name = cfg.slot_name(book.holders[replica])
        try:
            await self._command(cfg.drain_server(backend, name))
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    while True:
                        stats = cfg.servers_in_use(await self._command("show stat -1 4 -1"))
                        current = stats.get((backend, name))
                        if current is None or current[0] == 0:
                            break
                        await asyncio.sleep(DRAIN_POLL_S)
            except TimeoutError:
                logger.warning(
                    "Replica %s still busy after %gs of draining; freeing its slot",
                    replica,
                    DRAIN_TIMEOUT_S,
                )
            await self._command(cfg.free_slot(backend, name))
        except (OSError, TimeoutError, HAProxyCommandError) as exc:
            logger.warning("Could not drain replica %s (%s); reloading HAProxy", replica, exc)
            self._rendered = None  # the reload leaves it out
            self._changed.set()
        finally:
            # Unless it was called off (the replica came back, or a reload took it out).
            if self._draining.get((backend, replica)) is asyncio.current_task():
                del self._draining[(backend, replica)]
                book.release(replica)

    async def _reload(self) -> None:
        """Rewrite the configuration and reload HAProxy (the old process finishes its
        requests; the listening socket is never closed)."""
        assert self._process is not None
        for task in self._draining.values():
            task.cancel()
        self._draining.clear()
        old = await self._worker_pid()
        self._write_config(self._backends())
        self._process.send_signal(signal.SIGUSR2)
        async with asyncio.timeout(RELOAD_TIMEOUT_S):
            while True:
                pid = await self._worker_pid()
                if pid and pid != old:
                    break
                if self._process.returncode is not None:
                    raise HAProxyExited(f"HAProxy exited with code {self._process.returncode}")
                await asyncio.sleep(0.02)

    def _write_config(self, backends: list[cfg.Backend]) -> None:
        assert self._front is not None
        run_dir = Path(self._run_dir)
        for name, content in cfg.files(backends).items():
            _write_private(run_dir / name, content)
        _write_private(
            run_dir / "haproxy.cfg",
            cfg.render(self._front, backends, exposed=self._exposed).encode(),
        )

    def _tls_pem(self) -> str:
        """HTTPS: HAProxy wants the certificate and its key in one file."""
        http = self._http
        if not (http.ssl_certfile and http.ssl_keyfile):
            return ""
        if http.ssl_keyfile_password:
            raise SystemExit(
                "serve-proxy: HAProxy (SERVE_ENABLE_HA_PROXY=1) cannot use a key protected by "
                "a password (ssl_keyfile_password): give it the key unencrypted (a file only "
                "this user can read), or use the default proxy."
            )
        try:
            pem = Path(http.ssl_certfile).read_bytes() + b"\n" + Path(http.ssl_keyfile).read_bytes()
        except OSError as exc:
            raise SystemExit(
                f"serve-proxy: cannot serve HTTPS with ssl_keyfile={http.ssl_keyfile!r} and "
                f"ssl_certfile={http.ssl_certfile!r}: {exc}."
            ) from exc
        path = Path(self._run_dir) / "tls.pem"
        _write_private(path, pem)
        return str(path)

    def _bind_address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    async def _worker_pid(self) -> int:
        try:
            return cfg.worker_pid(await self._command("show info"))
        except OSError:
            return 0

    async def _command(self, command: str) -> str:
        """One runtime API command (a connection each: HAProxy closes it after answering)."""
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(cfg.admin_socket(self._run_dir))
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                answer = (await reader.read()).decode(errors="replace")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if command.startswith("set ") and not cfg.command_worked(command, answer):
            raise HAProxyCommandError(f"HAProxy answered {answer.strip()!r} to {command!r}")
        return answer


def _servers_of(replica_set: ReplicaSet) -> dict[str, str]:
    return {
        r.replica_id: r.ingress_http_address for r in replica_set.replicas if r.ingress_http_address
    }


def _grpc_servers_of(replica_set: ReplicaSet) -> tuple[dict[str, str], dict[str, int]]:
    """The replicas' gRPC addresses, and the HTTP ports their health is checked on."""
    serving = [r for r in replica_set.replicas if r.ingress_grpc_address and r.ingress_http_address]
    return (
        {r.replica_id: r.ingress_grpc_address for r in serving},
        {r.replica_id: cfg.split_address(r.ingress_http_address)[1] for r in serving},
    )


def _write_private(path: Path, content: bytes) -> None:
    """Write a file only this user reads, replacing the old one at once (HAProxy may be
    reading it)."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)
    os.replace(temporary, path)


def fallback_socket(host: str) -> socket.socket:
    """The socket of the serve-proxy behind HAProxy (its backup server): loopback, ephemeral."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
