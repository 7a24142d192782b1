"""A stalled stream consumer holds at most about its byte window, in the driver and the replica.

Flow control used to count items: a consumer of 16 MiB items that stopped reading made both
processes buffer over 1 GB. Credit now counts bytes too (SERVE_STREAM_WINDOW_BYTES).
"""

from __future__ import annotations

import json

import pytest

from tests.support.procs import run_script

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
WINDOW = 32 * MIB

DRIVER = """
import json, os, time
import psutil
import serve

ITEM = 16 * 1024 * 1024

@serve.deployment
class Producer:
    def pid(self):
        return os.getpid()

    def sync_items(self, count):
        for _ in range(count):
            yield b"x" * ITEM

    async def async_items(self, count):
        for _ in range(count):
            yield b"x" * ITEM

h = serve.run(Producer.bind(), name="stream-memory")
replica = psutil.Process(h.pid.remote().result())
me = psutil.Process()
growth = {}
for method in ("sync_items", "async_items"):  # warm both paths up (first-use allocations)
    assert sum(1 for _ in getattr(h.options(stream=True), method).remote(4)) == 4
for method in ("sync_items", "async_items"):
    time.sleep(0.5)
    base_me, base_replica = me.memory_info().rss, replica.memory_info().rss
    stream = getattr(h.options(stream=True), method).remote(60)  # 960 MiB in all
    first = next(iter(stream))
    assert len(first) == ITEM
    del first
    time.sleep(2.0)  # a stalled consumer: the replica must stop after about a window
    growth[method] = {
        "driver": me.memory_info().rss - base_me,
        "replica": replica.memory_info().rss - base_replica,
    }
    count = 1 + sum(1 for _ in stream)  # and the rest still arrives once it reads again
    assert count == 60, count
    del stream
print(json.dumps(growth))
"""


def test_a_stalled_consumer_bounds_memory_by_the_byte_window() -> None:
    result = run_script(DRIVER, timeout_s=120, SERVE_STREAM_WINDOW_BYTES=str(WINDOW))
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    for method, sides in growth.items():
        for side, grown in sides.items():
            # Under two windows (what is in flight never exceeds the window; an item waits
            # for credit, one is buffered): measured 0-51 MiB here, where counting items let
            # both processes reach about 1 GB.
            assert grown < 2 * WINDOW, (method, side, grown / MIB)
