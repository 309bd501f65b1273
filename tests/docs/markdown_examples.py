"""The code blocks of the documentation (``docs/**/*.md`` and ``README.md``), as test cases.

Rules the pages follow (see ``docs/index.md``, "How the examples are checked"):

- A ```` ```python ```` block is run as a script of its own, in a fresh module, in a
  temporary directory, with no ``ASYNCFLOW_*`` variable set (so the broker is the
  embedded ``memory://`` one).
- A Python block preceded by the line ``<!-- docs: continuation -->`` runs after the
  previous Python block of the same page, in its namespace (a page's later blocks can use
  what an earlier one declared).
- An ```` ```output ```` block right after a Python block is what that block must print
  (exactly, line for line, trailing spaces aside).
- A Python block preceded by ``<!-- docs: notest -->`` is shown and never run: only for
  code that needs a real Kafka cluster, an AWS account or another framework. Shell, YAML
  and Dockerfile blocks are not Python and are not run.

The flags are HTML comments (invisible on the site and on GitHub) because MkDocs'
fences take no words after the language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<ticks>`{3,})(?P<info>[^`]*)$")
FLAGS = re.compile(r"^\s*<!--\s*docs:\s*(?P<flags>[\w\s]+?)\s*-->\s*$")


@dataclass
class Block:
    """One code block of a page."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    flags: tuple[str, ...]
    code: str
    expected: str | None = None  # the ```output block that follows, if any
    previous: list[Block] = field(default_factory=list)  # what a continuation runs first

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        ticks, info = m.group("ticks"), m.group("info").strip()
        words = info.split()
        lang = words[0].lower() if words else ""
        start = i
        before = lines[i - 1] if i > 0 else ""
        flagged = FLAGS.match(before)
        if flagged is not None:
            words = [*words, *flagged.group("flags").split()]
        body: list[str] = []
        i += 1
        indent = len(m.group("indent"))
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        out.append(Block(path, start + 1, lang, tuple(w.lower() for w in words[1:]),
                         "\n".join(body) + "\n"))
    return out


def python_examples(path: Path) -> list[Block]:
    """The Python blocks of a page to run, each with its expected output and what it continues."""
    runnable: list[Block] = []
    blocks = blocks_of(path)
    last: Block | None = None
    for n, b in enumerate(blocks):
        if b.lang not in ("python", "py") or "notest" in b.flags:
            continue
        if "continuation" in b.flags:
            if last is None:
                raise ValueError(f"{b.id}: a continuation block with no Python block before it")
            b.previous = [*last.previous, last]
        nxt = blocks[n + 1] if n + 1 < len(blocks) else None
        if nxt is not None and nxt.lang == "output":
            b.expected = nxt.code
        runnable.append(b)
        last = b
    return runnable


def pages() -> list[Path]:
    """The Markdown files whose examples run: the README and every page of ``docs/``."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
