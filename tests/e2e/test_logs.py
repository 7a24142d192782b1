"""Logs: files in the state directory, request ids through nested calls, access lines, JSON."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

import serve
from tests.support.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]

user_logger = logging.getLogger("user.app")


@serve.deployment(logging_config={"log_level": "INFO"})
class Downstream:
    def __call__(self, text: str) -> str:
        user_logger.info("downstream got %s", text)
        return text.upper()


@serve.deployment(logging_config={"log_level": "INFO"})
class Ingress:
    def __init__(self, downstream: Any) -> None:
        self._downstream = downstream

    async def __call__(self, text: str) -> str:
        user_logger.info("ingress got %s", text)
        return await self._downstream.remote(text)


@serve.deployment(logging_config={"encoding": "JSON", "log_level": "INFO"})
class JsonLogged:
    def __call__(self) -> int:
        user_logger.info("json line")
        return os.getpid()


def _log_lines(state_dir: Path, app: str, deployment: str) -> list[str]:
    lines: list[str] = []
    for path in sorted((state_dir / "logs").rglob(f"replica_{app}_{deployment}_*.log")):
        lines.extend(path.read_text().splitlines())
    return lines


def test_request_ids_follow_nested_calls_and_each_request_gets_an_access_line(
    state_dir: Path,
) -> None:
    h = serve.run(Ingress.bind(Downstream.bind()), name="logged")
    response = h.remote("hi")
    assert response.result() == "HI"
    request_id = response.request_id

    def lines_with_id(deployment: str) -> list[str]:
        return [line for line in _log_lines(state_dir, "logged", deployment) if request_id in line]

    ingress = wait_for(lambda: len(lines_with_id("Ingress")) >= 2 and lines_with_id("Ingress"))
    downstream = wait_for(
        lambda: len(lines_with_id("Downstream")) >= 2 and lines_with_id("Downstream")
    )
    assert any("ingress got hi" in line for line in ingress)
    assert any("downstream got hi" in line for line in downstream)  # the same id, one hop down
    for lines in (ingress, downstream):
        access = [line for line in lines if "serve.access" in line]
        assert len(access) == 1
        assert "__call__ OK" in access[0]
        assert access[0].rstrip().endswith("ms")


def test_json_log_lines(state_dir: Path) -> None:
    h = serve.run(JsonLogged.bind(), name="json-logged")
    response = h.remote()
    response.result()

    def entries() -> list[dict[str, Any]]:
        found = []
        for line in _log_lines(state_dir, "json-logged", "JsonLogged"):
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("request_id") == response.request_id:
                    found.append(entry)
        return found

    found = wait_for(lambda: len(entries()) >= 2 and entries())
    assert {e["logger"] for e in found} >= {"user.app", "serve.access"}
    access = next(e for e in found if e["logger"] == "serve.access")
    assert access["method"] == "__call__"
    assert access["outcome"] == "OK"
    assert access["duration_ms"] >= 0


def test_controller_log_file_exists(state_dir: Path) -> None:
    assert any((state_dir / "logs").rglob("controller.log"))


def test_bad_logging_config_is_rejected_at_decoration() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        serve.deployment(logging_config={"colour": "blue"})(Downstream.func_or_class)
    with pytest.raises(ValueError, match="encoding must be"):
        serve.deployment(logging_config={"encoding": "XML"})(Downstream.func_or_class)
