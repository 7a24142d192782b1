"""serve.run(app, _local_testing_mode=True): the whole application in the test's process."""

from __future__ import annotations

import pytest

from tests.support.procs import run_script

pytestmark = pytest.mark.e2e

DRIVER = """
import asyncio, time
import psutil
import serve
from serve.exceptions import RequestCancelledError
from serve.handle import DeploymentHandle


@serve.deployment(user_config={"greeting": "Howdy"})
class Greeter:
    def __init__(self):
        self.greeting = "Hello"

    def reconfigure(self, config):
        self.greeting = config["greeting"]

    def __call__(self, name):  # a sync method
        return f"{self.greeting} {name}!"

    async def count(self, n):
        for i in range(n):
            yield i

    def words(self, text):
        yield from text.split()

    async def slow(self):
        await asyncio.sleep(30)

    def where(self):
        context = serve.get_replica_context()
        return context.app_name, context.deployment


@serve.deployment
class Ingress:
    async def __init__(self, greeter: DeploymentHandle):  # an async constructor
        self.greeter = greeter

    async def __call__(self, name):
        return await self.greeter.remote(name)

    def fails(self):
        raise ValueError("raised locally")


handle = serve.run(Ingress.bind(Greeter.bind()), name="local", _local_testing_mode=True)
assert handle.remote("Ada").result() == "Howdy Ada!"
greeter = serve.get_deployment_handle("Greeter", "local")
assert greeter.where.remote().result() == ("local", "Greeter")
assert list(greeter.options(stream=True).count.remote(3)) == [0, 1, 2]
assert list(greeter.options(stream=True).words.remote("a b c")) == ["a", "b", "c"]
try:
    handle.fails.remote().result()
except ValueError as exc:
    assert "raised locally" in str(exc)
else:
    raise AssertionError("no error")
slow = greeter.slow.remote()
time.sleep(0.1)
slow.cancel()
try:
    slow.result(timeout_s=5)
except RequestCancelledError:
    pass


async def choose_then_dispatch():
    async with greeter.choose_replica() as selection:
        assert selection.replica_id == "local"
        return await greeter.dispatch(selection, "Cy")


assert asyncio.run(choose_then_dispatch()) == "Howdy Cy!"
assert serve.status().applications["local"].status == "RUNNING"
assert serve.get_app_handle("local").remote("Bo").result() == "Howdy Bo!"
daemons = [p for p in psutil.Process().children(recursive=True)]
assert daemons == [], daemons  # nothing was started: no controller, no replicas
serve.shutdown()
print("local mode OK")
"""


def test_local_testing_mode_runs_everything_in_process() -> None:
    result = run_script(DRIVER, timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "local mode OK"


def test_a_local_program_that_never_calls_shutdown_exits_cleanly() -> None:
    script = (
        "import asyncio, serve\n"
        "@serve.deployment\n"
        "def double(x):\n"
        "    return 2 * x\n"
        "handle = serve.run(double.bind(), _local_testing_mode=True)\n"
        "async def main():\n"
        "    print(await handle.remote(3))\n"
        "asyncio.run(main())\n"
    )
    result = run_script(script, timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6"
    assert "Task was destroyed" not in result.stderr, result.stderr
