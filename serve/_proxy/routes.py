"""The proxy's route table: the longest matching ``route_prefix`` wins, as in Ray."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from serve._ingress import ASGI_METHOD
from serve._models import Route
from serve.handle import DeploymentHandle


class RouteTable:
    """Routes, longest prefix first, with one ingress handle per application (kept across
    updates, so an application keeps its router and its replica-set watch). Call on the
    proxy's loop."""

    def __init__(self) -> None:
        self._routes: list[Route] = []
        self._handles: dict[tuple[str, str], DeploymentHandle[Any]] = {}
        self._forwarders: dict[tuple[str, str], DeploymentHandle[Any]] = {}

    def update(self, routes: Iterable[Route]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.route_prefix), reverse=True)
        live = {(r.app_name, r.ingress) for r in self._routes}
        for handles in (self._handles, self._forwarders):
            for key in list(handles):
                if key not in live:
                    del handles[key]
        for route in self._routes:
            # Follow each ingress's replica set from now on, so this proxy keeps routing on
            # the last sets it saw if the controller goes away.
            self.handle(route)._router.state()

    @property
    def routes(self) -> list[Route]:
        return self._routes

    def match(self, path: str) -> Route | None:
        for route in self._routes:
            prefix = route.route_prefix
            if (
                prefix == "/"
                or path == prefix
                or (path.startswith(prefix) and path[len(prefix)] == "/")
            ):
                return route
        return None

    def by_app(self, app_name: str) -> Route | None:
        return next((r for r in self._routes if r.app_name == app_name), None)

    def forwarder(self, route: Route) -> DeploymentHandle[Any]:
        """The handle that forwards HTTP connections to the route's ingress deployment."""
        key = (route.app_name, route.ingress)
        found = self._forwarders.get(key)
        if found is None:
            found = self._forwarders[key] = self.handle(route).options(
                method_name=ASGI_METHOD,
                stream=True,
                request_serialization="pickle",
                response_serialization="pickle",
            )
        return found

    def handle(self, route: Route) -> DeploymentHandle[Any]:
        key = (route.app_name, route.ingress)
        found = self._handles.get(key)
        if found is None:
            # As Ray's proxies (RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING): replicas on this
            # proxy's node first, so a node's proxy keeps its traffic on the node.
            found = self._handles[key] = DeploymentHandle(route.ingress, route.app_name).options(
                _prefer_local_routing=True
            )
        return found
