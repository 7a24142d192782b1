"""print() in a replica reaches the driver's terminal, prefixed as in Ray, and its log file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.procs import run_script

pytestmark = pytest.mark.e2e

DRIVER = """
import sys, threading
import serve

@serve.deployment
class Printer:
    def __call__(self, text):
        print("printed:", text)
        print("to stderr:", text, file=sys.stderr)
        return "ok"

    async def from_async(self, text):
        print("async printed:", text, end="")
        print()
        return "ok"

h = serve.run(Printer.bind(), name="printing")
assert h.remote("hello").result() == "ok"
assert h.from_async.remote("there").result() == "ok"
serve.shutdown()
print("done")
"""


def test_print_in_a_replica_is_shown_prefixed_and_kept_in_its_log(tmp_path: Path) -> None:
    result = run_script(DRIVER, SERVE_STATE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    lines = result.stderr.splitlines()
    for text in ("printed: hello", "to stderr: hello", "async printed: there"):
        shown = [line for line in lines if line.endswith(text)]
        assert shown, (text, result.stderr)
        assert shown[0].startswith("(ServeReplica:printing:Printer pid="), shown[0]
    logs = list(tmp_path.glob("logs/session_*/replica_printing_Printer_*.log"))
    assert len(logs) == 1, logs
    kept = logs[0].read_text().splitlines()
    for text in ("printed: hello", "to stderr: hello", "async printed: there"):
        assert text in kept, (text, kept)


def test_user_modules_named_like_the_daemons_do_not_break_them(tmp_path: Path) -> None:
    """A `controller.py` or a `replica` package in the working directory is the user's: the
    daemons still start from their own modules, and user code still imports from there."""
    (tmp_path / "controller.py").write_text("raise ImportError('the user controller.py')\n")
    (tmp_path / "replica").mkdir()
    (tmp_path / "replica" / "__init__.py").write_text("raise ImportError('the user replica')\n")
    (tmp_path / "helpers.py").write_text("def shout(text):\n    return text.upper()\n")
    driver = """
import serve

@serve.deployment
class UsesLocalModule:
    def __call__(self, text):
        import helpers
        return helpers.shout(text)

print(serve.run(UsesLocalModule.bind(), name="collide").remote("hi").result())
"""
    result = run_script(driver, SERVE_STATE_DIR=str(tmp_path / "state"), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "HI"
