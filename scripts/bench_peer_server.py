"""One peer of `make bench` serving a noop over HTTP, run by scripts/bench_peers.py with the
peer's own interpreter (a venv under .venv-peers/, made by scripts/bench_peers_setup.sh): it
imports nothing of this project, only its framework.

    python bench_peer_server.py PEER PORT

PEER is one of ``ray`` (Ray Serve 2.60, default proxy), ``ray-haproxy`` (the same with
RAY_SERVE_ENABLE_HA_PROXY=1 set by the harness: HAProxy in front, direct ingress replicas),
``litserve`` or ``bentoml``. Each serves on 127.0.0.1:PORT with one replica or worker and its
per-request access log off, as our bench deployments do. Ray stops when stdin closes (its local
cluster shut down); LitServe and BentoML when the harness signals their process group. Files go
under $BENCH_PEER_SCRATCH, a folder the harness makes and removes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

BENTOML_SERVICE = """
import bentoml


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Noop:
    @bentoml.api
    async def noop(self) -> str:
        return "ok"
"""


def ray_serve(port: int) -> None:
    """The bench's HttpNoop on Ray Serve: the same class, ``from ray import serve``."""
    import ray
    from ray import serve

    scratch = os.environ["BENCH_PEER_SCRATCH"]  # short: Ray's socket paths have a limit
    ray.init(address="local", include_dashboard=False, _temp_dir=f"{scratch}/ray")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    log = {"enable_access_log": False, "log_level": "WARNING"}

    @serve.deployment(max_ongoing_requests=1000, logging_config=log)
    class HttpNoop:
        async def __call__(self, request: Any) -> str:
            return "ok"

    serve.run(HttpNoop.bind(), route_prefix="/")
    print("READY", flush=True)
    sys.stdin.read()  # until the harness closes our stdin
    # No serve.shutdown(): in HAProxy mode it drains the ingress replica for 35 s, which only
    # lengthens the bench. Stopping the local cluster ends its actors and their HAProxy.
    ray.shutdown()


def litserve(port: int) -> None:
    """LitServe's defaults (one worker on the CPU, one API server process), POST /predict."""
    import litserve as ls

    server = ls.LitServer(LitNoop())
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


def bentoml(port: int) -> None:
    """`bentoml serve` of a one-worker service with one async API, POST /noop."""
    workdir = Path(os.environ["BENCH_PEER_SCRATCH"]) / "bentoml"
    workdir.mkdir()
    (workdir / "service.py").write_text(BENTOML_SERVICE)
    cli = str(Path(sys.executable).parent / "bentoml")
    argv = [cli, "serve", "service:Noop", "--host", "127.0.0.1", "--port", str(port)]
    os.execv(cli, [*argv, "--working-dir", str(workdir)])


try:  # at module level: LitServe's worker processes import it from here by name
    import litserve as ls

    class LitNoop(ls.LitAPI):  # type: ignore[misc]
        def setup(self, device: Any) -> None:
            pass

        # Unannotated: LitServe reads the request's type from this signature (an ``Any`` here
        # makes it a required query parameter, a 422 for every POST).
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            return request

        def predict(self, x: Any) -> str:
            return "ok"

        def encode_response(self, output: Any) -> Any:
            return output

except ImportError:  # another peer's venv
    pass

PEERS = {"ray": ray_serve, "ray-haproxy": ray_serve, "litserve": litserve, "bentoml": bentoml}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in PEERS:
        sys.exit(f"usage: bench_peer_server.py {{{','.join(PEERS)}}} PORT")
    PEERS[sys.argv[1]](int(sys.argv[2]))
