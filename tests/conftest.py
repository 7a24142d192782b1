"""Shared fixtures: an isolated state directory per session, a shared embedded controller for
e2e tests, and a check that no serve process outlives the tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ingress import MODE_ENV, MODES, Ingress
from tests.support.procs import (
    StandaloneController,
    kill_tree,
    proxy_details,
    running_controller,
    serve_processes,
    wait_for,
)

GREETER_SERVICER = "tests.support.greeter_pb2_grpc.add_GreeterServicer_to_server"

# Tests must never find an operator's controller in ~/.serve, nor talk to one via SERVE_ADDRESS.
_STATE_DIR = tempfile.mkdtemp(prefix="serve-test-state-")
os.environ["SERVE_STATE_DIR"] = _STATE_DIR
os.environ.pop("SERVE_ADDRESS", None)
os.environ.pop("SERVE_CLUSTER_TOKEN", None)
os.environ.setdefault("SERVE_LOG_LEVEL", "WARNING")
os.environ.setdefault("SERVE_ORPHAN_TIMEOUT_S", "10")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# No proxy on port 8000 per test: ingress tests ask for one, on an ephemeral port.
os.environ.setdefault("SERVE_PROXY_LOCATION", "Disabled")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's state directory, unless tests failed: then its logs may tell why."""
    if exitstatus == 0:
        shutil.rmtree(_STATE_DIR, ignore_errors=True)
    else:
        print(f"\nThe daemons' state and logs of this run: {_STATE_DIR}")


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return Path(_STATE_DIR)


# The ingress mode of the shared controller (tests/support/ingress.py), once one is running.
_mode: list[str] = []


def _use_mode(mode: str) -> None:
    """The shared controller, in this ingress mode (restarted in it if it ran in another)."""
    import serve

    if _mode == [mode]:
        return
    if _mode:
        _stop_serve()
    serve.start(
        proxy_location="EveryNode",
        http_options={"port": 0},
        grpc_options={"port": 0, "grpc_servicer_functions": [GREETER_SERVICER]},
        controller_options={"runtime_env": {"env_vars": MODE_ENV[mode]}},
    )
    _mode[:] = [mode]


def _stop_serve() -> None:
    import serve

    _mode.clear()
    serve.shutdown()
    try:
        wait_for(lambda: not serve_processes(), timeout_s=30)
    finally:
        for proc in serve_processes():
            kill_tree(proc.pid)


@pytest.fixture(scope="session")
def serve_session() -> Iterator[None]:
    """One embedded controller for the e2e tests of this pytest process, with a proxy serving
    HTTP and the test Greeter service over gRPC on ephemeral ports (in the ingress mode the
    tests ask for; the default proxy unless one does)."""
    yield
    if _mode:
        _stop_serve()


@pytest.fixture
def serve_instance(serve_session: None) -> Iterator[None]:
    """The shared controller (in any ingress mode), with every application deleted after the
    test."""
    import serve

    if not _mode:
        _use_mode("proxy")
    yield
    names = list(serve.status().applications)
    for name in names:  # all at once: each waits for its replicas' draining periods
        serve.delete(name, _blocking=False)
    if names:
        wait_for(lambda: not serve.status().applications, timeout_s=60, interval_s=0.05)


@pytest.fixture
def http_url(serve_instance: None) -> str:
    """The shared proxy's HTTP base URL (it may have been replaced by an earlier test), with the
    default proxy (no direct ingress)."""
    _use_mode("proxy")
    return f"http://{proxy_details().http_address}"


@pytest.fixture
def haproxy(serve_instance: None) -> Ingress:
    """HTTP ingress through HAProxy (SERVE_ENABLE_HA_PROXY=1) alone."""
    if shutil.which("haproxy") is None:
        pytest.fail("HAProxy is not installed: run scripts/install_haproxy.sh (as root)")
    _use_mode("haproxy")
    return Ingress("haproxy")


@pytest.fixture
def direct(serve_instance: None) -> Ingress:
    """Ingress replicas serving HTTP and gRPC themselves (SERVE_ENABLE_DIRECT_INGRESS=1)."""
    _use_mode("direct")
    return Ingress("direct")


@pytest.fixture(scope="session", params=MODES)
def ingress_mode(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@pytest.fixture
def ingress(serve_instance: None, ingress_mode: str) -> Ingress:
    """HTTP ingress in each mode: the default proxy, direct ingress, HAProxy in front."""
    if ingress_mode == "haproxy" and shutil.which("haproxy") is None:
        pytest.fail("HAProxy is not installed: run scripts/install_haproxy.sh (as root)")
    _use_mode(ingress_mode)
    return Ingress(ingress_mode)


@pytest.fixture
def standalone_controller(tmp_path: Path) -> Iterator[StandaloneController]:
    """A controller daemon of the test's own (not the shared one), which a test may kill."""
    with running_controller(tmp_path / "state", SERVE_ORPHAN_TIMEOUT_S="60") as controller:
        yield controller
