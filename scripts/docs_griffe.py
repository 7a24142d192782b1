"""A griffe extension for the docs site: serve's docstrings, written for ``help()``, as Markdown.

The code's docstrings use reST habits that read well in a terminal: ``Example::`` followed by an
indented literal block, and roles such as ``:class:`Lane```. Markdown would show the first as
"Example::" over an unhighlighted block and the second as raw text. This extension rewrites them
as the reference pages load them (the source stays as it is): a literal block becomes a fenced
block (Python, or text for a drawing), a role becomes inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")
_INTRO = re.compile(r"^(?P<indent>\s*)(?P<text>.*?)(?P<colons>::)\s*$")


def to_markdown(text: str) -> str:
    """Rewrite reST literal blocks and roles in a docstring as Markdown."""
    text = _ROLE.sub(lambda m: f"``{m.group(1)}``", text)
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _INTRO.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        # "Example::" -> "Example:"; a lone "::" disappears.
        intro = match.group("text").rstrip()
        if intro:
            out.append(f"{match.group('indent')}{intro}:")
        base = len(match.group("indent"))
        i += 1
        block: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > base
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        body = [line for line in block if line.strip()]
        if not body:
            continue
        cut = min(len(line) - len(line.lstrip()) for line in body)
        code = [line[cut:] if line.strip() else "" for line in block]
        while code and not code[0]:
            code.pop(0)
        language = "text" if any(ch in "".join(code) for ch in "├└│") else "python"
        out += ["", f"```{language}", *code, "```", ""]
    return "\n".join(out)


class RestToMarkdown(griffe.Extension):
    """Applies :func:`to_markdown` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
