"""A big payload costs about twice its size per process, not several times (issue 11, finding 4).

Out-of-band buffers travel as bounded chunks (gRPC copies each message whole), so the replica
of a 200 MiB echo peaks near 2x the payload (what it received, and what it sends one chunk at
a time), and the driver near 3x: its own argument, the result, and one transient join.
"""

from __future__ import annotations

import json

import pytest

from tests.support.procs import run_script

pytestmark = pytest.mark.e2e

DRIVER = """
import json, resource
import serve

MIB = 1024 * 1024

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

@serve.deployment
class Echo:
    def __call__(self, data):
        return data

    def peak(self):
        return peak_mib()

h = serve.run(Echo.bind(), name="payload-memory")
size = 200 * MIB
replica_before, driver_before = h.peak.remote().result(), peak_mib()
result = h.remote(b"x" * size).result()
assert len(result) == size and result[:1] == b"x"
print(json.dumps({
    "driver": (peak_mib() - driver_before) / 200,
    "replica": (h.peak.remote().result() - replica_before) / 200,
}))
"""


def test_a_big_payload_costs_about_twice_its_size() -> None:
    result = run_script(DRIVER, timeout_s=120)
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.strip().splitlines()[-1])  # in payload sizes
    assert growth["replica"] < 2.4, growth  # received + sent a chunk at a time
    assert growth["driver"] < 3.5, growth  # argument + result + one transient join
