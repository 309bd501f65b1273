"""A griffe extension for the API reference: our docstrings' ``Example:`` sections are examples.

The code base writes ``Example:`` (and ``Example (what it shows):``, ``Example: what it
shows.``) above its doctests, where the Google style that mkdocstrings parses expects
``Examples:``. Without this, the doctests would be read as Markdown prose (``[1, 2]`` as a
link). The docstrings themselves are left as they are: only the copy mkdocstrings renders is
rewritten.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example(?:\s*\((?P<paren>[^)]*)\))?:[ \t]*(?P<rest>\S.*)?$",
                      re.MULTILINE)


def _rewrite(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        indent = m.group("indent")
        note = m.group("paren") or m.group("rest")
        out = f"{indent}Examples:"
        if note:
            out += f"\n{indent}    {note.strip()}\n"
        return out

    return _EXAMPLE.sub(repl, text)


class ExampleSections(Extension):
    """Rename ``Example:`` sections to ``Examples:`` before the docstrings are parsed."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is not None and "Example" in doc.value:
            doc.value = _rewrite(doc.value)
