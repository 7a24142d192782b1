"""The docs site cannot rot: every included example is run by some test, pages carry no
untested Python, the reference pages generate (their drift checks pass), and the examples in
public docstrings compile and name real serve attributes."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import typing
from pathlib import Path

import pytest

from scripts.docs_griffe import to_markdown
from scripts.docs_hooks import DocsDriftError, generated_pages, public_modules
from tests.support.docs import (
    RUN_ELSEWHERE,
    blocks,
    included_files,
    pages,
    run_here,
    source_of_test,
)
from tests.support.procs import ROOT


def test_every_included_file_exists() -> None:
    missing = {
        path: where for path, where in included_files().items() if not (ROOT / path).exists()
    }
    assert missing == {}


def test_every_included_file_is_run_by_a_test() -> None:
    """A ``.py`` file not named in RUN_ELSEWHERE is run by test_docs_examples.py; any other
    file must be named there, with a test that exists and mentions it."""
    unowned = [
        path for path in included_files() if not path.endswith(".py") and path not in RUN_ELSEWHERE
    ]
    assert unowned == [], "add each to RUN_ELSEWHERE with the test that uses it"
    for path, reference in RUN_ELSEWHERE.items():
        source = source_of_test(reference)
        assert source is not None, f"{path}: no test {reference}"
        word = reference.partition("#")[2] or Path(path).stem
        assert word in source, f"{reference} does not mention {word!r} ({path})"
        assert not _runs_only_in_make_test_slow(reference), f"{reference} is marked slow"


def _runs_only_in_make_test_slow(reference: str) -> bool:
    """`make test` skips tests marked slow: a docs example run only there would rot."""
    file = reference.partition("::")[0]
    module = ast.parse((ROOT / file).read_text())
    marks = [
        ast.unparse(node.value)
        for node in module.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
    ]
    return "mark.slow" in (source_of_test(reference) or "") + "".join(marks)


def test_the_docs_examples_test_runs_what_is_left() -> None:
    assert run_here(), "no example left for tests/e2e/test_docs_examples.py: check the finder"
    assert "examples/composition.py" in run_here()


def test_pages_carry_no_untested_python() -> None:
    """Python on a page comes from an included file; a page's own Python is one line at most
    (an import, a one-call sketch). Every fence names its language."""
    offenders = []
    for name, text in pages().items():
        for block in blocks(name, text):
            if not block.language:
                offenders.append(f"{name}:{block.line}: a fence without a language")
            elif block.language in ("python", "py", "pycon") and len(block.own_code) > 1:
                offenders.append(f"{name}:{block.line}: {len(block.own_code)} lines of Python")
    assert offenders == []


def test_the_reference_pages_generate() -> None:
    """The same generation and drift checks as `make docs`."""
    generated = generated_pages()
    assert set(generated) >= {f"reference/api/{m}.md" for m in public_modules()}
    assert "`SERVE_HEARTBEAT_TIMEOUT_S`" in generated["reference/settings.md"]
    assert "`max_ongoing_requests`" in generated["reference/config-file.md"]
    assert "### `serve deploy`" in generated["reference/cli.md"]


def test_a_setting_missing_from_the_settings_table_fails_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import scripts.docs_hooks as hooks

    read = hooks.env_vars_read_by_code()
    monkeypatch.setattr(hooks, "env_vars_read_by_code", lambda: read | {"SERVE_NEW_KNOB"})
    with pytest.raises(DocsDriftError, match="SERVE_NEW_KNOB"):
        hooks.settings_page()


def test_a_wrong_default_in_the_settings_table_fails_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import serve._settings

    doc = serve._settings.__doc__ or ""
    wrong = re.sub(r"(\| SERVE_HEARTBEAT_TIMEOUT_S \|[^|]*\|) 5 \|", r"\1 7 |", doc)
    assert wrong != doc
    monkeypatch.setattr(serve._settings, "__doc__", wrong)
    import scripts.docs_hooks as hooks

    with pytest.raises(DocsDriftError, match="SERVE_HEARTBEAT_TIMEOUT_S"):
        hooks.check_settings()


def test_the_slurm_controller_config_is_valid() -> None:
    """examples/slurm_controller.yaml, which the cluster guide includes, is what
    serve-controller --config reads."""
    from controller.cli import _apply_config_file, build_parser

    parser = build_parser()
    _apply_config_file(parser, str(ROOT / "examples/slurm_controller.yaml"))
    args = parser.parse_args([])
    assert args.launcher == "slurm"
    assert args.slurm_partition == "serve"
    assert args.slurm_option == ["--time=7-00:00:00", "--account=ml"]
    assert args.proxy_location == "HeadOnly"


def _docstring_examples() -> list[tuple[str, str]]:
    found = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        objects = [(module_name, module)]
        objects += [
            (f"{module_name}.{n}", getattr(module, n)) for n in getattr(module, "__all__", [])
        ]
        for name, obj in objects:
            text = to_markdown(inspect.getdoc(obj) or "")
            for block in blocks(name, text):
                if block.language == "python":
                    found.append((name, "\n".join(block.lines)))
    return found


def _serve_attribute_chains(tree: ast.AST) -> list[str]:
    chains = []
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "serve" and parts:
            chains.append(".".join(["serve", *reversed(parts)]))
    return chains


@pytest.mark.parametrize(("name", "code"), _docstring_examples(), ids=lambda v: str(v)[:40])
def test_a_docstring_example_compiles_and_names_real_serve_attributes(name: str, code: str) -> None:
    tree = compile(code, name, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    import serve

    for chain in _serve_attribute_chains(tree):
        target: object = serve
        for part in chain.split(".")[1:]:
            if not (inspect.ismodule(target) or inspect.isclass(target)):
                break  # past a function or a value: the user's business
            assert hasattr(target, part), f"{name}: {chain}"
            target = getattr(target, part)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("serve"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), (
                    f"{name}: from {node.module} import {alias.name}"
                )


def _glossary_code_names() -> list[str]:
    """The code names the glossary quotes, but for the pending renames' targets (the third
    column of its last table, names the code does not have yet)."""
    names = []
    for line in (ROOT / "docs" / "glossary.md").read_text().splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) == 6:
            line = "|".join(cells[:3] + cells[4:])
        names += re.findall(r"`([^`\s]+)`", line)
    return names


def _defined(name: str) -> bool:
    """A class or module-level name in our code or generated stubs, or a proto message/RPC."""
    pattern = re.compile(rf"^(class {name}\b|{name}(: [^=]+)? = )", re.MULTILINE)
    proto = re.compile(rf"^\s*(message|rpc|service|enum) {name}\b", re.MULTILINE)
    for package in ("serve", "controller", "replica"):
        for path in (ROOT / package).rglob("*.py*"):
            if path.suffix in (".py", ".pyi") and pattern.search(path.read_text()):
                return True
    return any(proto.search(p.read_text()) for p in (ROOT / "proto").rglob("*.proto"))


def test_the_glossary_names_code_that_exists() -> None:
    """A rename that lands without the glossary (or the reverse) fails here."""
    from scripts.docs_hooks import env_vars_read_by_code

    settings = env_vars_read_by_code()
    missing = []
    for name in _glossary_code_names():
        if re.fullmatch(r"(serve|controller|replica)(\.\w+)+", name):
            module, _, attr = name.rpartition(".")
            try:
                found = hasattr(importlib.import_module(module), attr)
            except ImportError:
                found = False
        elif re.fullmatch(r"(serve|controller|replica|scripts)/\S*", name):
            found = any(ROOT.glob(name.rstrip("/")))
        elif name.startswith("SERVE_"):
            found = name in settings
        elif re.fullmatch(r"_?[A-Z][a-z]\w*", name) and not hasattr(typing, name):
            found = _defined(name)
        else:
            continue
        if not found:
            missing.append(name)
    assert missing == []
