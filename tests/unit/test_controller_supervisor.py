"""The supervisor with a fake launcher and fake replica clients: no processes, no sockets."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from controller.events import Verdict
from controller.launcher import Exit
from controller.resources import GangSpec, ResourceRequest
from controller.store import GoalStore
from controller.supervisor import Supervisor
from serve._models import (
    ApplicationStatus,
    CodeEnv,
    DeploymentConfig,
    DeploymentID,
    DeploymentSpec,
    Failure,
)
from serve._rpc.replica_client import ReplicaClient

DEP = DeploymentID("Model", "app")


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ident = f"pid {pid}"
        self.code: int | None = None
        self._exited = asyncio.Event()

    async def running(self) -> int | None:
        return self.pid

    async def wait(self) -> Exit:
        await self._exited.wait()
        assert self.code is not None
        return Exit(self.code)

    async def stop(self, grace_s: float) -> None:
        self.exit(-15)

    def exit(self, code: int) -> None:
        if self.code is None:
            self.code = code
        self._exited.set()

    def kill(self) -> None:
        self.exit(-9)


class FakeLauncher:
    def __init__(self) -> None:
        self.processes: dict[str, FakeProcess] = {}
        self.requests: dict[str, ResourceRequest] = {}
        self.launched: asyncio.Queue[str] = asyncio.Queue()
        self._pids = itertools.count(1000)

    async def launch(
        self, replica_id: str, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> FakeProcess:
        process = self.processes[replica_id] = FakeProcess(next(self._pids))
        self.requests[replica_id] = request
        self.launched.put_nowait(replica_id)
        return process

    async def launch_gang(
        self, gang: GangSpec, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> list[FakeProcess]:
        raise AssertionError("these tests deploy no gang")

    async def adopt(
        self, replica_id: str, pid: int, request: ResourceRequest
    ) -> FakeProcess | None:
        return None

    async def aclose(self) -> None:
        pass


class FakeClient:
    """Answers like a healthy replica; Stop makes its process exit."""

    def __init__(self, launcher: FakeLauncher, address: str) -> None:
        self._process = launcher.processes[address]  # the fake address is the replica id

    async def initialize(self, *args: Any) -> Failure | None:
        return None

    async def check_health(self, timeout_s: float) -> Failure | None:
        return None

    async def reconfigure(self, *args: Any, **kwargs: Any) -> Failure | None:
        return None

    async def stop(self, timeout_s: float) -> int:
        self._process.exit(0)
        return 0

    async def aclose(self) -> None:
        pass


async def test_deploy_link_run_publish_delete(tmp_path: Path) -> None:
    launcher = FakeLauncher()
    spec = DeploymentSpec("Model", b"code", b"args", "v1", DeploymentConfig(num_replicas=1))
    async with GoalStore(tmp_path / "state.db") as store:
        supervisor = Supervisor(
            store=store,
            launcher=launcher,
            token="token",
            tls=None,
            # A fake for the calls the supervisor makes of a ReplicaClient.
            connect=lambda address: cast(ReplicaClient, FakeClient(launcher, address)),
        )
        async with supervisor:
            await supervisor.deploy(
                app_name="app",
                route_prefix=None,
                ingress="Model",
                specs=[spec],
                code_env=CodeEnv("/", ()),
            )
            assert [app.name for app in await store.load()] == ["app"]
            watch = supervisor.publisher.watch(DEP)
            replica_id = await asyncio.wait_for(launcher.launched.get(), 5)
            verdict, ended = supervisor.link(
                replica_id=replica_id,
                address=replica_id,
                pid=launcher.processes[replica_id].pid,
                host="h",
                initialized=False,
                code_version="",
                user_config_json=b"",
            )
            assert verdict is Verdict.ACCEPTED
            assert ended is not None
            app = await supervisor.wait_application("app", 5)
            assert app is not None
            assert supervisor.app_status(app)[0] is ApplicationStatus.RUNNING
            published = await asyncio.wait_for(anext(watch), 5)
            assert [r.replica_id for r in published.replicas] == [replica_id]
            assert await asyncio.wait_for(supervisor.delete("app", wait=True), 5)
            assert supervisor.apps == {}
            assert ended.is_set()  # the replica's link was ended when it was forgotten
            gone = await asyncio.wait_for(anext(watch), 5)
            assert not gone.exists
            await watch.aclose()
        assert await store.load() == []
        assert await store.load_replicas() == []
