"""The proxy's route table (serve._proxy.routes): the longest matching prefix wins, as in Ray,
and an application keeps its ingress handle across route updates.

The handles' routers get their routing state from a fake client (no controller); nothing
here routes a request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve import _client
from serve._ingress import ASGI_METHOD
from serve._models import DeploymentID, ReplicaSet, Route
from serve._proxy.routes import RouteTable
from serve._routing_state import RoutingState


class FakeClient:
    """Hands out one routing state per deployment, and remembers who asked."""

    def __init__(self) -> None:
        self.states: dict[DeploymentID, RoutingState] = {}

    def routing_state(self, deployment_id: DeploymentID) -> RoutingState:
        if deployment_id not in self.states:
            self.states[deployment_id] = RoutingState(
                deployment_id, watch=self._watch, open_connection=self._open
            )
        return self.states[deployment_id]

    async def _watch(self, deployment_id: DeploymentID) -> AsyncIterator[ReplicaSet]:
        raise AssertionError("the route table does not start watches itself")
        yield

    def _open(self, *args: Any) -> Any:
        raise AssertionError("nothing is sent")


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    fake = FakeClient()
    monkeypatch.setattr(_client, "_client", fake)
    return fake


def table(*routes: Route) -> RouteTable:
    found = RouteTable()
    found.update(routes)
    return found


API = Route("/api", "api", "Api")
API_V2 = Route("/api/v2", "v2", "ApiV2")
ROOT = Route("/", "root", "Root")
GRPC_ONLY = Route("", "grpc", "Greeter")


@pytest.mark.parametrize(
    ("path", "app"),
    [
        ("/api", "api"),
        ("/api/", "api"),
        ("/api/users/1", "api"),
        ("/api/v2", "v2"),  # the longest matching prefix wins
        ("/api/v2/users", "v2"),
        ("/api/v20", "api"),  # a prefix matches whole path segments only
        ("/apix", "root"),
        ("/", "root"),
        ("/anything/else", "root"),
    ],
)
def test_the_longest_matching_prefix_wins(client: FakeClient, path: str, app: str) -> None:
    routes = table(API, ROOT, GRPC_ONLY, API_V2)  # in no particular order
    found = routes.match(path)
    assert found is not None
    assert found.app_name == app


def test_no_match_without_a_root_route(client: FakeClient) -> None:
    routes = table(API, API_V2)
    assert routes.match("/apix") is None
    assert routes.match("/") is None
    assert routes.match("/ap") is None


def test_an_application_without_a_route_prefix_is_not_served_over_http(
    client: FakeClient,
) -> None:
    routes = table(GRPC_ONLY)
    assert routes.match("/") is None
    assert routes.match("") is None
    assert routes.by_app("grpc") == GRPC_ONLY  # gRPC finds it by name


def test_routes_are_kept_longest_prefix_first(client: FakeClient) -> None:
    routes = table(ROOT, API, GRPC_ONLY, API_V2)
    assert routes.routes == [API_V2, API, ROOT, GRPC_ONLY]


def test_by_app(client: FakeClient) -> None:
    routes = table(API, ROOT)
    assert routes.by_app("api") == API
    assert routes.by_app("missing") is None


def test_an_update_follows_every_ingress_at_once(client: FakeClient) -> None:
    """The proxy keeps routing on the last replica sets it saw if the controller goes away,
    so each ingress's state is asked for when its route appears, not on the first request."""
    table(API, GRPC_ONLY)
    assert set(client.states) == {DeploymentID("Api", "api"), DeploymentID("Greeter", "grpc")}


def test_an_application_keeps_its_handles_across_updates(client: FakeClient) -> None:
    routes = table(API, ROOT)
    handle, forwarder = routes.handle(API), routes.forwarder(API)
    routes.update([API, API_V2])  # root gone, v2 new, api unchanged
    assert routes.handle(API) is handle
    assert routes.forwarder(API) is forwarder


def test_a_removed_application_loses_its_handles(client: FakeClient) -> None:
    routes = table(API)
    handle, forwarder = routes.handle(API), routes.forwarder(API)
    routes.update([])
    assert routes.routes == []
    assert routes.match("/api") is None
    routes.update([API])
    assert routes.handle(API) is not handle
    assert routes.forwarder(API) is not forwarder


def test_a_new_ingress_for_the_same_application_gets_a_new_handle(client: FakeClient) -> None:
    routes = table(API)
    handle = routes.handle(API)
    moved = Route("/api", "api", "NewIngress")
    routes.update([moved])
    assert routes.handle(moved) is not handle
    assert routes.handle(moved).deployment_id == DeploymentID("NewIngress", "api")


def test_the_handles_prefer_replicas_on_the_proxys_node(client: FakeClient) -> None:
    routes = table(API)
    assert routes.handle(API).handle_options.prefer_local_routing
    assert routes.forwarder(API).handle_options.prefer_local_routing
    assert routes.handle(API).deployment_id == DeploymentID("Api", "api")


def test_the_forwarder_streams_asgi_messages_pickled(client: FakeClient) -> None:
    routes = table(API)
    options = routes.forwarder(API).handle_options
    assert options.method_name == ASGI_METHOD
    assert options.stream
    assert options.request_serialization == "pickle"
    assert options.response_serialization == "pickle"
    # It shares the ingress handle's router: one queue, one replica-set watch per application.
    assert routes.forwarder(API)._router is routes.handle(API)._router
