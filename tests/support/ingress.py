"""HTTP and gRPC ingress in their three modes, for tests that must hold in each: the default
proxy, direct ingress (the request goes to the application's ingress replica itself, as a load
balancer in front of it would send it) and HAProxy in front of direct ingress.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import psutil

from tests.support.procs import proxy_details, wait_for

MODES = ("proxy", "direct", "haproxy")
MODE_ENV = {
    "proxy": {},
    # Tests call direct-ingress replicas themselves: no load balancer needs the draining period.
    "direct": {
        "SERVE_ENABLE_DIRECT_INGRESS": "1",
        "SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    },
    "haproxy": {"SERVE_ENABLE_HA_PROXY": "1"},
}


class Ingress:
    """Where a test's HTTP requests go in one mode: ``url("/echo/x")``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __repr__(self) -> str:
        return f"Ingress({self.mode!r})"

    def url(self, path: str = "/", *, app: str | None = None, replicas: bool = True) -> str:
        """The URL of ``path`` (route prefix included). Direct: the address of a replica of
        the application the path routes to (or of ``app``); HAProxy: its port, once it sends
        the application's requests to its replicas (not to the proxy behind it), unless
        ``replicas`` is False (the application has none)."""
        if self.mode == "direct":
            app = app or _route_of(path)
            assert app is not None
            return f"http://{replica_addresses(app)[0]}{path}"
        address = proxy_details().http_address
        if self.mode == "haproxy" and replicas:
            app = app or _route_of(path, required=False)
            if app is not None:
                routed = app
                wait_for(lambda: haproxy_serves(routed), timeout_s=30, interval_s=0.05)
        return f"http://{address}{path}"

    def grpc_address(self, app: str | None = None) -> str:
        """Where a test's gRPC calls for ``app`` go: the proxy's gRPC port, HAProxy's (once it
        sends the application's calls to its replicas), or a replica of ``app`` (direct;
        without ``app``, the proxy's: nothing to call directly)."""
        if self.mode == "direct" and app is not None:
            return replica_addresses(app, grpc=True)[0]
        if self.mode == "haproxy" and app is not None:
            wait_for(lambda: haproxy_serves(app, grpc=True), timeout_s=30, interval_s=0.05)
        address: str = proxy_details().grpc_address
        return address

    def host_port(self, path: str = "/") -> tuple[str, int]:
        """Where a raw socket connects to reach ``path``."""
        url = self.url(path).removeprefix("http://")
        host, port = url.split("/", 1)[0].rsplit(":", 1)
        return host, int(port)


def _route_of(path: str, *, required: bool = True) -> str | None:
    """The application ``path`` routes to (the longest matching route prefix)."""
    import serve

    found: tuple[int, str] | None = None
    path = path.split("?", 1)[0]
    for name, app in serve.status().applications.items():
        prefix = app.route_prefix
        if not prefix:
            continue
        matches = prefix == "/" or path == prefix or path.startswith(prefix + "/")
        if matches and (found is None or len(prefix) > found[0]):
            found = (len(prefix), name)
    if found is None:
        if required:
            raise AssertionError(f"No application serves {path!r}")
        return None
    return found[1]


def replica_addresses(app_name: str, timeout_s: float = 30.0, *, grpc: bool = False) -> list[str]:
    """Where the ingress replicas of ``app_name`` serve HTTP (or gRPC) themselves (direct
    ingress), once some do."""
    from serve import _client
    from serve._models import DeploymentID
    from serve._sync import run_sync

    client = _client.current()
    assert client is not None

    async def addresses() -> list[str]:
        found = await client.controller.get_application(app_name)
        if found is None:
            return []
        async with asyncio.timeout(5.0):
            async for replica_set in client.controller.watch(DeploymentID(found[0], app_name)):
                return [
                    r.ingress_grpc_address if grpc else r.ingress_http_address
                    for r in replica_set.replicas
                ]
        return []

    def some() -> list[str]:
        listed = [a for a in run_sync(addresses()) if a]
        return listed

    found: list[str] = wait_for(some, timeout_s=timeout_s, interval_s=0.05)
    return found


def haproxy_admin_socket() -> str:
    """The runtime API socket of the HAProxy the shared serve-proxy runs."""
    proxy = psutil.Process(proxy_details().pid)
    for child in proxy.children():
        cmdline = child.cmdline()
        if "-f" in cmdline and cmdline[cmdline.index("-f") + 1].endswith("haproxy.cfg"):
            run_dir = cmdline[cmdline.index("-f") + 1].rsplit("/", 1)[0]
            return f"{run_dir}/admin.sock"
    raise AssertionError(f"No HAProxy under the serve-proxy (pid {proxy.pid})")


def haproxy_command(command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5.0)
        sock.connect(haproxy_admin_socket())
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def haproxy_servers() -> dict[str, str]:
    """HAProxy's replica servers that hold a replica: address -> status (UP, DOWN, DRAIN)."""
    lines = haproxy_command("show stat -1 4 -1").splitlines()
    header = lines[0].removeprefix("# ").split(",")
    out = {}
    for line in lines[1:]:
        row: dict[str, Any] = dict(zip(header, line.split(","), strict=False))
        if row.get("svname", "").startswith("r") and row.get("status") != "MAINT":
            out[row["addr"]] = row["status"]
    return out


def haproxy_requests() -> int:
    """Requests HAProxy has sent to replicas so far (every application)."""
    lines = haproxy_command("show stat -1 4 -1").splitlines()
    header = lines[0].removeprefix("# ").split(",")
    total = 0
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("svname", "").startswith("r") and (row.get("stot") or "").isdigit():
            total += int(row["stot"])
    return total


def haproxy_sent_to(addresses: list[str]) -> dict[str, int]:
    """Requests HAProxy has sent so far to the servers at these addresses."""
    lines = haproxy_command("show stat -1 4 -1").splitlines()
    header = lines[0].removeprefix("# ").split(",")
    out = dict.fromkeys(addresses, 0)
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("addr") in out and (row.get("stot") or "").isdigit():
            out[row["addr"]] += int(row["stot"])
    return out


def haproxy_serves(app_name: str, *, grpc: bool = False) -> bool:
    """Whether HAProxy sends the application's requests (gRPC calls) to each of its ingress
    replicas."""
    wanted = replica_addresses(app_name, grpc=grpc)
    try:
        servers = haproxy_servers()
    except (OSError, AssertionError):  # HAProxy is still starting
        return False
    return all(servers.get(address) == "UP" for address in wanted)
