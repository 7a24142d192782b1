"""Chaos: SIGKILL a random replica every second under load; only killed replicas may fail.

Runs an application of several replicas on an embedded controller, drives it with closed-loop
callers, and kills a random replica every ``--interval`` seconds for ``--seconds``. Every failed
request must be a ReplicaDiedError naming a replica this script killed; afterwards no serve
process may be left. Prints a JSON report; exits 1 if a rule was broken.

    python scripts/chaos.py --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve
from serve.exceptions import ReplicaDiedError


@serve.deployment(num_replicas=4, max_ongoing_requests=8)
class Worker:
    async def __call__(self) -> int:
        await asyncio.sleep(0.02)
        return os.getpid()


def replicas() -> dict[str, int]:
    """replica id -> pid, for the replicas under this process."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if "replica" in cmdline and "--replica-id" in cmdline:
            found[cmdline[cmdline.index("--replica-id") + 1]] = child.pid
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to kill for")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between kills")
    parser.add_argument("--callers", type=int, default=16, help="closed-loop callers")
    args = parser.parse_args()
    os.environ.setdefault("SERVE_LOG_LEVEL", "ERROR")

    handle = serve.run(Worker.bind(), name="chaos")
    killed: dict[str, int] = {}
    outcomes: list[Any] = []
    stop = threading.Event()

    def killer() -> None:
        rng = random.Random()
        while not stop.wait(args.interval):
            alive = {rid: pid for rid, pid in replicas().items() if rid not in killed}
            if alive:
                replica_id, pid = rng.choice(sorted(alive.items()))
                killed[replica_id] = pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    async def caller(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            try:
                outcomes.append(await handle.remote())
            except Exception as exc:
                outcomes.append(exc)

    async def load() -> None:
        stop_at = time.monotonic() + args.seconds
        await asyncio.gather(*(caller(stop_at) for _ in range(args.callers)))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    started = time.monotonic()
    asyncio.run(load())
    stop.set()
    thread.join(10)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    on_killed = [
        f
        for f in failures
        if isinstance(f, ReplicaDiedError)
        and (m := re.search(r"Replica (\S+) of", str(f))) is not None
        and m.group(1) in killed
    ]
    others = [f for f in failures if f not in on_killed]
    serve.shutdown()
    time.sleep(1.0)
    leaked = [p.pid for p in psutil.Process().children(recursive=True)]
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "replicas_killed": len(killed),
        "sent": len(outcomes),
        "succeeded": len(outcomes) - len(failures),
        "failed_on_killed_replicas": len(on_killed),
        "failed_otherwise": len(others),
        "examples_of_other_failures": [repr(f) for f in others[:5]],
        "leaked_processes": leaked,
    }
    print(json.dumps(report, indent=2))
    return 0 if not others and not leaked and report["succeeded"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
