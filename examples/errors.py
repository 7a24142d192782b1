"""What a caller sees when things go wrong: the user's own exception, a timeout that leaves the
request running, a cancelled request, a full queue, a constructor that keeps failing.
Run it: ``python examples/errors.py``.
"""

import asyncio
import time

import serve
from serve.exceptions import (
    BackPressureError,
    DeploymentFailedError,
    RemoteTraceback,
    RequestCancelledError,
)

# --8<-- [start:user_error]


class OutOfStock(Exception):
    pass


@serve.deployment
class Shop:
    def buy(self, item: str) -> str:
        if item == "unicorn":
            raise OutOfStock(f"no {item} left")
        return f"one {item}"


shop = serve.run(Shop.bind(), name="shop", route_prefix=None)
try:
    shop.buy.remote("unicorn").result()
except OutOfStock as exc:  # the user's own type, raised again in the caller
    assert isinstance(exc.__cause__, RemoteTraceback)  # the replica's traceback
    print(f"OutOfStock: {exc}")
# --8<-- [end:user_error]

# --8<-- [start:timeout]


@serve.deployment
class Slow:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def wait(self) -> str:
        await self.release.wait()
        return "done"

    def go(self) -> None:
        self.release.set()


slow = serve.run(Slow.bind(), name="slow", route_prefix=None)
response = slow.wait.remote()
try:
    response.result(timeout_s=0.2)
except TimeoutError:
    print("not yet")  # the request is still running in the replica
slow.go.remote().result()
print(response.result())  # ask again: the same request, now done
# --8<-- [end:timeout]

# --8<-- [start:cancel]


@serve.deployment
class Sleeper:
    async def nap(self) -> None:
        await asyncio.sleep(60)


sleeper = serve.run(Sleeper.bind(), name="sleeper", route_prefix=None)
response = sleeper.nap.remote()
time.sleep(0.2)  # (for the example: let it start in the replica)
response.cancel()  # cancels the coroutine in the replica, and any calls it made
try:
    response.result()
except RequestCancelledError:
    print("cancelled")
# --8<-- [end:cancel]

# --8<-- [start:backpressure]


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Narrow:
    def work(self) -> str:
        time.sleep(1)
        return "ok"


narrow = serve.run(Narrow.bind(), name="narrow", route_prefix=None)
running = narrow.work.remote()  # runs in the replica
time.sleep(0.2)  # (for the example: let it get there)
queued = narrow.work.remote()  # waits in this handle's queue
try:
    narrow.work.remote().result()  # one too many: dropped at once, nothing was sent
except BackPressureError as exc:
    print(f"dropped: {exc}")
print(running.result(), queued.result())
# --8<-- [end:backpressure]

# --8<-- [start:constructor]


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("model file missing")


try:
    serve.run(Broken.bind(), name="broken", route_prefix=None)
except DeploymentFailedError:  # after a bounded number of attempts, with the traceback
    print("deploy failed")
# --8<-- [end:constructor]

serve.shutdown()
print("errors example OK")
