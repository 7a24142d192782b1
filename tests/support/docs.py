"""What the docs site shows as code, found the way MkDocs finds it, so tests can hold it to
account: every file a page includes (``--8<--``, pymdownx.snippets) must be run by a test, and
no page may carry Python of its own beyond a one-liner.

A ``.py`` file a page includes is run by ``tests/e2e/test_docs_examples.py``, unless
:data:`RUN_ELSEWHERE` names the test that already runs it (or, for a file that is not a
program, the test that uses it).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from tests.support.procs import ROOT

DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
_SNIPPET = re.compile(r"""^\s*-{1,}8<-{1,}\s+["']?(?P<target>[^"'\s]+)["']?\s*$""")

# Included files run (or used) by a test elsewhere: file -> "test file::test function". The
# test's source must mention the file's stem, or the word after "#" (what uses the file).
RUN_ELSEWHERE = {
    "examples/hello.py": "tests/e2e/test_processes.py::test_seed_example_runs_as_a_plain_script",
    "examples/ray_compat.py": (
        "tests/e2e/test_processes.py::test_a_ray_program_runs_with_only_the_import_changed"
    ),
    "examples/streaming.py": (
        "tests/e2e/test_processes.py::test_the_multiplexing_and_streaming_examples_run"
    ),
    "examples/multiplexing.py": (
        "tests/e2e/test_processes.py::test_the_multiplexing_and_streaming_examples_run"
    ),
    "examples/batching.py": "tests/e2e/test_batching.py::test_the_batching_example_runs",
    "examples/http_ingress.py": (
        "tests/e2e/test_http_ingress.py::test_the_http_ingress_example_runs"
    ),
    "examples/grpc_service.py": "tests/e2e/test_ingress_examples.py::test_the_grpc_example",
    # grpc_service.py imports the code generated from it (make proto-check: no drift).
    "examples/protos/hello.proto": (
        "tests/e2e/test_ingress_examples.py::test_the_grpc_example#grpc_service"
    ),
    "examples/https.py": "tests/e2e/test_ingress_examples.py::test_the_https_example",
    "examples/load_shedding.py": (
        "tests/e2e/test_ingress_examples.py::test_the_load_shedding_example"
    ),
    "examples/custom_router.py": (
        "tests/e2e/test_extension_examples.py::test_the_extension_examples_run"
    ),
    "examples/custom_autoscaling.py": (
        "tests/e2e/test_extension_examples.py::test_the_extension_examples_run"
    ),
    "examples/rollout.py": "tests/e2e/test_extension_examples.py::test_the_extension_examples_run",
    "examples/app_autoscaling.py": (
        "tests/e2e/test_extension_examples.py::"
        "test_the_application_level_autoscaling_example_deploys"
    ),
    "examples/app_autoscaling.yaml": (
        "tests/e2e/test_extension_examples.py::"
        "test_the_application_level_autoscaling_example_deploys"
    ),
    "examples/config.yaml": "tests/e2e/test_cli.py::test_deploy_status_redeploy_delete_shutdown",
    # config.yaml's applications import it (examples.apps:app).
    "examples/apps.py": (
        "tests/e2e/test_cli.py::test_deploy_status_redeploy_delete_shutdown#config.yaml"
    ),
    "examples/otlp_exporter.py": (
        "tests/e2e/test_tracing.py::test_spans_reach_an_otlp_collector_over_grpc"
    ),
    "examples/observability.py": (
        "tests/e2e/test_docs_examples.py::test_the_observability_example"
    ),
    "examples/slurm_controller.yaml": (
        "tests/unit/test_docs.py::test_the_slurm_controller_config_is_valid"
    ),
}


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page."""

    page: str
    line: int
    language: str
    lines: tuple[str, ...]

    @property
    def includes(self) -> list[str]:
        return [m.group("target") for m in map(_SNIPPET.match, self.lines) if m]

    @property
    def own_code(self) -> list[str]:
        """Its lines that are not snippet directives (or blank)."""
        return [line for line in self.lines if line.strip() and not _SNIPPET.match(line)]


def pages() -> dict[str, str]:
    """Every page's Markdown: the files under docs/ and the reference pages the hook makes."""
    from scripts.docs_hooks import generated_pages

    found = {str(p.relative_to(DOCS)): p.read_text() for p in sorted(DOCS.rglob("*.md"))}
    found.update(generated_pages())
    return found


def blocks(name: str, text: str) -> list[Block]:
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening.group("fence"), len(opening.group("indent"))
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:])
            j += 1
        out.append(Block(name, i + 1, opening.group("lang").lower(), tuple(body)))
        i = j + 1
    return out


def included_files() -> dict[str, list[str]]:
    """Every file a page includes -> the pages (``page:line``) that include it."""
    found: dict[str, list[str]] = {}
    for name, text in pages().items():
        for block in blocks(name, text):
            for target in block.includes:
                path = target.split(":", 1)[0]
                found.setdefault(path, []).append(f"{name}:{block.line}")
    return found


def run_here() -> list[str]:
    """The included Python files tests/e2e/test_docs_examples.py runs itself."""
    return sorted(
        path for path in included_files() if path.endswith(".py") and path not in RUN_ELSEWHERE
    )


def source_of_test(reference: str) -> str | None:
    """The source of the test function ``file::name`` (with its decorators), or None."""
    file, _, name = reference.partition("#")[0].partition("::")
    path = ROOT / file
    if not path.exists():
        return None
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            return "\n".join(text.splitlines()[start - 1 : node.end_lineno])
    return None
