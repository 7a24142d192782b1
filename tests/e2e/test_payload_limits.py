"""Payload limits (SERVE_MAX_MESSAGE_BYTES): an oversized argument or result fails that call
alone, with an error naming the limit; everything else on the same stream keeps working."""

from __future__ import annotations

import pytest

from tests.support.procs import run_script

pytestmark = pytest.mark.e2e

DRIVER = """
import asyncio
import serve

@serve.deployment(max_ongoing_requests=100)
class Echo:
    def __call__(self, data):
        return len(data)

    def big(self, size):
        return b"x" * size

    def items(self, size):
        yield b"small"
        yield b"x" * size

h = serve.run(Echo.bind(), name="limits")
limit = 1024 * 1024

try:
    h.remote(b"x" * (2 * limit))
except ValueError as exc:
    assert "SERVE_MAX_MESSAGE_BYTES" in str(exc), exc
else:
    raise AssertionError("an oversized argument was sent")

try:
    h.big.remote(2 * limit).result()
except ValueError as exc:
    assert "over the 1048576-byte message limit" in str(exc), exc
else:
    raise AssertionError("an oversized result came back")

stream = h.options(stream=True).items.remote(2 * limit)
assert next(iter(stream)) == b"small"
try:
    list(stream)
except Exception as exc:
    assert "SERVE_MAX_MESSAGE_BYTES" in str(exc), exc
else:
    raise AssertionError("an oversized stream item came back")

async def many():
    # 40 calls of 100 KB queued together: more than one message's worth, split into batches.
    return await asyncio.gather(*(h.remote(b"y" * 100_000) for _ in range(40)))

assert asyncio.run(many()) == [100_000] * 40
assert h.remote(b"ok").result() == 2
print("limits OK")
"""


def test_oversized_payloads_fail_alone_with_the_limit_named() -> None:
    result = run_script(DRIVER, timeout_s=90, SERVE_MAX_MESSAGE_BYTES=str(1024 * 1024))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "limits OK"
