"""HAProxy's configuration and runtime API, as pure functions (no I/O): the file a reload
reads, the commands that add, drain and remove a replica, and the parsing of what HAProxy
answers. ``serve/_proxy/haproxy.py`` does the I/O.

The front door's bounds are HAProxy's here, from the same settings as the proxy's
(``serve/_proxy/protocol.py``): the request head must fit ``tune.bufsize`` (over it: 400,
HAProxy's answer) with at most ``tune.http.maxhdr`` fields and arrive within ``timeout
http-request`` (408); ``maxconn`` connections at most (more wait in the kernel's accept queue);
a declared body over the limit is refused with 413 before any of it is forwarded. Behind it the
replicas' own HTTP servers keep every bound of the proxy (chunked bodies, slow bodies).

gRPC (when the serve-proxy serves it): a second frontend on the gRPC port speaks HTTP/2
(``proto h2``) and sends each call by its ``application`` metadata (or, with one application,
without it) to that application's replicas' own gRPC ports, over HTTP/2 too; their health is
checked on their HTTP port (``/-/healthz``, the replica's own, which fails once it stops). What
no replica serves goes to the serve-proxy's gRPC ingress beside HAProxy, which answers as
without HAProxy: Ray's ``RayServeAPIService`` and ``grpc.health.v1.Health``, NOT_FOUND for an
unknown or unset application, and an application's calls while none of its replicas is up.
Message sizes are bounded by the replicas' servers (HAProxy streams HTTP/2 bodies through).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable

import orjson

from serve._models import Route

HEALTH_PATH = "/-/healthz"
# HAProxy's buffer also holds headers it adds (its rewrite reserve, 1 KiB by default).
REWRITE_RESERVE_BYTES = 1024
# Replicas are checked often (a dead one is also marked down at its first refused connection:
# `observe layer4`), and one good check brings a replica back.
SERVER_OPTIONS = (
    "check inter 1s fastinter 250ms downinter 1s fall 2 rise 1 "
    "observe layer4 error-limit 1 on-error mark-down"
)
FALLBACK = "fallback"  # the serve-proxy's server name in every backend
GRPC_FALLBACK = "grpc-fallback"  # the backend of calls the serve-proxy answers
# The services the serve-proxy answers for every application (no replica has the whole view).
GRPC_SERVE_SERVICES = ("/ray.serve.RayServeAPIService/", "/grpc.health.v1.Health/")
MIN_SLOTS = 8
REPLICA_GONE = (
    "ReplicaDiedError: the replica serving this request closed its connection before it "
    "answered (it died, or its answer was cut). The request may have partly run; it was not "
    "retried."
)
# A gRPC replica is sent HTTP/2 (cleartext) and checked over HTTP/1.1 on its HTTP port.
GRPC_SERVER = "proto h2 check-proto h1"
PARKED = "0.0.0.0:1"  # a free slot's address (in maintenance: never used)
TIMEOUT_SERVER_S = 3600  # a replica silent this long in a response (a long stream) is cut
TIMEOUT_TUNNEL_S = 3600  # WebSockets


@dataclasses.dataclass(frozen=True)
class Frontend:
    """What the front door needs to know besides routes and replicas."""

    bind: str  # "fd@3" (a socket this process bound) or "host:port"
    run_dir: str  # where the admin socket and the pattern and answer files are
    fallback: str  # host:port of the serve-proxy beside it (the backup of every application)
    max_connections: int
    max_header_bytes: int
    max_headers: int
    max_body_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_timeout_s: float
    balance: str
    nbthread: int
    tls_pem: str = ""  # cert and key in one PEM (HTTPS), or "" for HTTP
    hard_stop_after_s: float = 60.0  # an old process (after a reload) finishes within this
    grpc_bind: str = ""  # where gRPC is served ("fd@4"), or "" for none
    grpc_fallback: str = ""  # host:port of the serve-proxy's gRPC ingress


@dataclasses.dataclass(frozen=True)
class Backend:
    """One application: its route, its backend's name, and its server slots, each the
    address (host:port) of the replica it holds or None (free). A gRPC backend's slots are
    the replicas' gRPC addresses, and ``check_ports`` their HTTP ports (health checks)."""

    name: str
    route: Route
    slots: tuple[str | None, ...] = ()
    grpc: bool = False
    check_ports: tuple[int | None, ...] = ()


def backend_name(index: int) -> str:
    return f"app-{index}"


def grpc_backend_name(index: int) -> str:
    return f"grpc-{index}"


def slot_name(index: int) -> str:
    return f"r{index}"


def slot_count(replicas: int, current: int = 0) -> int:
    """Server slots for this many replicas: room to grow without a reload (a runtime API
    command fills a slot), doubling when they run out."""
    count = max(current, MIN_SLOTS)
    while count < replicas:
        count *= 2
    return count


class SlotBook:
    """One backend's server slots: which replica holds which. A freed slot is reused last,
    so the connections HAProxy still holds to the replica that left are gone by then."""

    def __init__(self) -> None:
        self.addresses: list[str | None] = [None] * MIN_SLOTS  # of the replica in each slot
        self.holders: dict[str, int] = {}  # replica -> its slot
        self.draining: set[str] = set()  # replicas that get no new request
        self._free: collections.deque[int] = collections.deque(range(MIN_SLOTS))

    def fits(self, replicas: Iterable[str]) -> bool:
        """Whether the free slots can take these replicas (those not in one yet)."""
        return sum(1 for r in replicas if r not in self.holders) <= len(self._free)

    def grow(self, replicas: int) -> None:
        """Enough slots for ``replicas`` more than held now (a reload applies it)."""
        old = len(self.addresses)
        new = slot_count(len(self.holders) + replicas, old)
        self.addresses += [None] * (new - old)
        self._free.extend(range(old, new))

    def take(self, replica: str, address: str) -> int:
        slot = self._free.popleft()
        self.holders[replica] = slot
        self.addresses[slot] = address
        return slot

    def release(self, replica: str) -> None:
        slot = self.holders.pop(replica)
        self.draining.discard(replica)
        self.addresses[slot] = None
        self._free.append(slot)

    def layout(self) -> tuple[str | None, ...]:
        """What a reload renders: the replicas that get requests (a draining one finishes in
        the old process, which keeps its connections)."""
        out = list(self.addresses)
        for replica in self.draining:
            out[self.holders[replica]] = None
        return tuple(out)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> host, port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def admin_socket(run_dir: str) -> str:
    return f"{run_dir}/admin.sock"


def _seconds(value: float) -> str:
    return f"{max(1, round(value * 1000))}ms"


def files(backends: list[Backend]) -> dict[str, bytes]:
    """The files the configuration refers to, by name in the run directory: each route's
    path patterns (read from files: no quoting of user text in the configuration) and the
    answer of /-/routes."""
    out = {
        "routes.json": orjson.dumps(
            {
                b.route.route_prefix: b.route.app_name
                for b in backends
                if b.route.route_prefix and not b.grpc
            }
        ),
        "502.http": _error_response(500, REPLICA_GONE),
        "504.http": _error_response(500, REPLICA_GONE),
    }
    for backend in backends:
        if backend.grpc:  # the application's name, matched against the call's metadata
            out[f"{backend.name}.app"] = backend.route.app_name.encode() + b"\n"
            continue
        prefix = backend.route.route_prefix
        if prefix and prefix != "/":
            out[f"{backend.name}.path"] = prefix.encode() + b"\n"
            out[f"{backend.name}.beg"] = prefix.encode() + b"/\n"
    return out


def _error_response(status: int, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status} Internal Server Error\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def render(front: Frontend, backends: list[Backend], *, exposed: bool = False) -> str:
    """The whole configuration: routes longest prefix first (as the proxy matches them), each
    application's replicas, and the serve-proxy as every application's backup (it answers while
    no replica is up: queueing until one is, or 503 for a failed deploy). ``/-/healthz`` is
    200 once an application was ``exposed`` (routed) by this proxy, and stays so (as the
    proxy's)."""
    d = front.run_dir
    lines = [
        "global",
        f"    stats socket {admin_socket(d)} mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
        f"    maxconn {front.max_connections}",
        f"    nbthread {front.nbthread}",
        f"    hard-stop-after {_seconds(front.hard_stop_after_s)}",
        f"    tune.bufsize {front.max_header_bytes + REWRITE_RESERVE_BYTES}",
        f"    tune.http.maxhdr {front.max_headers}",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        f"    timeout client {_seconds(front.body_timeout_s)}",
        f"    timeout server {TIMEOUT_SERVER_S}s",
        f"    timeout http-request {_seconds(front.header_timeout_s)}",
        f"    timeout http-keep-alive {_seconds(front.keep_alive_timeout_s)}",
        f"    timeout tunnel {TIMEOUT_TUNNEL_S}s",
        "    timeout queue 30s",
        "    option abortonclose",
        # After a reload the old process answers the next request of an idle keep-alive
        # connection (with "connection: close") instead of closing it under a client that
        # may be sending one: reloads fail no request.
        "    option idle-close-on-response",
        "    option http-no-delay",
        "    http-reuse always",
        # Only a request no replica read is sent again, to another replica: at most once.
        "    retry-on conn-failure",
        "    retries 3",
        "    option redispatch 1",
        # A replica that closed the connection without an answer: 500, as the proxy answers.
        f"    errorfile 502 {d}/502.http",
        f"    errorfile 504 {d}/504.http",
        "frontend serve",
        f"    bind {front.bind}" + (f" ssl crt {front.tls_pem}" if front.tls_pem else ""),
        f"    maxconn {front.max_connections}",
        f"    acl healthz path {HEALTH_PATH}",
        "    acl routes path /-/routes",
    ]
    routed = [b for b in backends if b.route.route_prefix and not b.grpc]
    if routed or exposed:
        lines.append(
            "    http-request return status 200 content-type text/plain string success if healthz"
        )
    else:  # as the proxy (and Ray) answer until an application is exposed
        lines.append(
            "    http-request return status 503 content-type text/plain "
            'string "Route table is not populated yet." if healthz'
        )
    lines += [
        "    http-request return status 200 content-type application/json "
        f"file {d}/routes.json if routes",
        "    http-request deny deny_status 413 if "
        f"{{ req.hdr_val(content-length) gt {front.max_body_bytes} }}",
    ]
    ordered = sorted(routed, key=lambda b: len(b.route.route_prefix), reverse=True)
    for backend in ordered:
        prefix = backend.route.route_prefix
        if prefix == "/":
            lines.append(f"    use_backend {backend.name}")
        else:
            lines.append(
                f"    use_backend {backend.name} if {{ path -f {d}/{backend.name}.path }} "
                f"or {{ path_beg -f {d}/{backend.name}.beg }}"
            )
    lines += [
        "    default_backend not-found",
        "backend not-found",
        '    http-request return status 404 content-type "text/plain; charset=utf-8" '
        "lf-string \"Path '%[path]' not found. Ping http://.../-/routes for available "
        'routes."',
    ]
    tls = " ssl verify none" if front.tls_pem else ""
    for backend in ordered:
        lines += [
            f"backend {backend.name}",
            f"    balance {front.balance}",
            f"    option httpchk GET {HEALTH_PATH}",
            "    http-check expect status 200",
        ]
        # Static servers, which HAProxy 2.6 keeps idle connections to (not to servers added
        # at run time): free ones wait in maintenance for a replica's address.
        lines += [
            f"    server {slot_name(i)} {address or PARKED} {SERVER_OPTIONS}{tls}"
            + ("" if address else " disabled")
            for i, address in enumerate(backend.slots)
        ]
        lines.append(f"    server {FALLBACK} {front.fallback}{tls} backup")
    if front.grpc_bind:
        lines += _render_grpc(front, [b for b in backends if b.grpc])
    return "\n".join(lines) + "\n"


def _render_grpc(front: Frontend, backends: list[Backend]) -> list[str]:
    """The gRPC frontend and backends (HTTP/2 on both sides)."""
    d = front.run_dir
    lines = [
        "frontend serve-grpc",
        f"    bind {front.grpc_bind} proto h2",
        f"    maxconn {front.max_connections}",
        # A call may stream for long with a silent client; an idle connection is closed
        # after the keep-alive timeout (HTTP/2: between streams).
        f"    timeout client {TIMEOUT_SERVER_S}s",
        "    acl serve_services path_beg " + " ".join(GRPC_SERVE_SERVICES),
        f"    use_backend {GRPC_FALLBACK} if serve_services",
    ]
    for backend in backends:
        lines.append(
            f"    use_backend {backend.name} if {{ req.hdr(application) -m str -f "
            f"{d}/{backend.name}.app }}"
        )
    if len(backends) == 1:  # one application: the metadata may be left out
        lines.append(f"    use_backend {backends[0].name} if !{{ req.hdr(application) -m found }}")
    lines += [
        f"    default_backend {GRPC_FALLBACK}",  # NOT_FOUND, in the serve-proxy's words
        f"backend {GRPC_FALLBACK}",
        f"    server {FALLBACK} {front.grpc_fallback} proto h2",
    ]
    for backend in backends:
        lines += [
            f"backend {backend.name}",
            f"    balance {front.balance}",
            f"    option httpchk GET {HEALTH_PATH}",
            "    http-check expect status 200",
        ]
        ports = backend.check_ports or (None,) * len(backend.slots)
        for i, (address, port) in enumerate(zip(backend.slots, ports, strict=True)):
            line = f"    server {slot_name(i)} {address or PARKED} {SERVER_OPTIONS} {GRPC_SERVER}"
            if address and port:
                line += f" port {port}"
            lines.append(line + ("" if address else " disabled"))
        lines.append(f"    server {FALLBACK} {front.grpc_fallback} proto h2 backup")
    return lines


# The runtime API (HAProxy's "stats socket", level admin).


def fill_slot(backend: str, index: int, address: str, check_port: int | None = None) -> list[str]:
    """Commands that put a replica in a free slot and start sending to it (the controller
    publishes only replicas that run and passed its health check; HAProxy keeps checking,
    on ``check_port`` if given: a gRPC backend checks the replica's HTTP port)."""
    host, port = split_address(address)
    name = slot_name(index)
    commands = [f"set server {backend}/{name} addr {host} port {port}"]
    if check_port is not None:
        commands.append(f"set server {backend}/{name} check-port {check_port}")
    return [*commands, ready_server(backend, name)]


def ready_server(backend: str, name: str) -> str:
    return f"set server {backend}/{name} state ready"


def drain_server(backend: str, name: str) -> str:
    """No new request goes to it; those in progress finish."""
    return f"set server {backend}/{name} state drain"


def free_slot(backend: str, name: str) -> str:
    """Maintenance: it gets nothing until a replica fills it again."""
    return f"set server {backend}/{name} state maint"


def command_worked(command: str, answer: str) -> bool:
    """Whether a ``set server`` command worked: a state change answers nothing, an address
    change says what changed (or that nothing needed to)."""
    text = answer.strip()
    if " addr " in command:
        return "changed" in text or "no need" in text
    return not text


def servers_in_use(stat_csv: str) -> dict[tuple[str, str], tuple[int, str]]:
    """``show stat`` (CSV) -> (backend, server) -> (requests in progress, status)."""
    header: list[str] = []
    out: dict[tuple[str, str], tuple[int, str]] = {}
    for line in stat_csv.splitlines():
        if line.startswith("# "):
            header = line[2:].split(",")
            continue
        if not line or not header:
            continue
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("svname") in ("FRONTEND", "BACKEND", None):
            continue
        current = row.get("scur") or "0"
        out[(row["pxname"], row["svname"])] = (
            int(current) if current.isdigit() else 0,
            row.get("status", ""),
        )
    return out


def worker_pid(info: str) -> int:
    """The worker's pid in ``show info`` (0 if absent)."""
    found = re.search(r"^Pid: (\d+)$", info, re.M)
    return int(found.group(1)) if found else 0
