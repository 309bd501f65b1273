"""Every Python code block of the docs and the README runs and prints what the page says.

See ``tests/docs/markdown_examples.py`` for the rules a page's blocks follow.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import types
from pathlib import Path

import pytest

from tests.docs.markdown_examples import Block, pages, python_examples

EXAMPLES = [b for page in pages() for b in python_examples(page)]


def _run(block: Block, namespace: dict[str, object]) -> None:
    code = compile(block.code, str(block.path) + f" (block at line {block.line})", "exec")
    exec(code, namespace)  # noqa: S102 - the documentation's own examples


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@pytest.mark.timeout(60)  # an example that hangs fails alone (each takes well under a second)
@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_documentation_example_runs_and_prints_what_the_page_shows(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("ASYNCFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_example_{block.line}")
    module.__file__ = str(block.path)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for earlier in block.previous:
        with contextlib.redirect_stdout(io.StringIO()):
            _run(earlier, namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _run(block, namespace)
    if block.expected is not None:
        assert _normalise(printed.getvalue()) == _normalise(block.expected), (
            f"{block.id} printed something else than the ```output block after it"
        )


def test_every_page_has_a_runnable_example_or_says_why_not() -> None:
    """Each concept page shows running code (the issue's "runnable examples")."""
    concepts = sorted((Path(__file__).resolve().parents[2] / "docs" / "concepts").glob("*.md"))
    assert concepts
    without = [p.name for p in concepts if not python_examples(p)]
    assert without == []
