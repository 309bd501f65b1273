"""The documentation site: it builds strictly, and it covers what the code has.

``mkdocs build --strict`` fails on any warning (a broken link, a page missing from the
navigation, a docstring mkdocstrings cannot render). The other tests check the pages against
the code, so a new public name, setting or app cannot land undocumented.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import asyncflow as af

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _grep(pattern: str, *folders: str) -> set[str]:
    found: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            found.update(re.findall(pattern, path.read_text(encoding="utf-8")))
    return found


@pytest.mark.slow
def test_mkdocs_build_strict_passes(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(mkdocs.parent)},
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = (DOCS / "reference" / "asyncflow.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: asyncflow\.(\w+)$", reference, re.MULTILINE))
    public = {n for n in af.__all__ if n != "__version__"}
    assert sorted(public - listed) == [], "add these to docs/reference/asyncflow.md"
    assert sorted(listed - public) == [], "the reference lists names af.__all__ does not export"


def test_every_asyncflow_environment_variable_is_in_the_configuration_reference() -> None:
    variables = _grep(r"\bASYNCFLOW_[A-Z_]+[A-Z]\b", "asyncflow", "adapters", "apps")
    page = (DOCS / "operations" / "configuration.md").read_text(encoding="utf-8")
    assert sorted(v for v in variables if v not in page) == []


def test_every_app_has_its_page() -> None:
    apps = {p.stem for p in (ROOT / "apps").glob("*.py") if not p.stem.startswith("_")}
    pages = {p.stem.replace("-", "_") for p in (DOCS / "apps").glob("*.md")}
    assert apps <= pages


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")]
    assert sorted(p for p in pages if p not in nav) == []


def test_the_readme_links_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/index.md" in readme and "mkdocs" in readme


def test_every_yaml_block_of_the_docs_parses() -> None:
    """The Kubernetes examples are not run, but they are valid YAML."""
    import yaml

    from tests.docs.markdown_examples import blocks_of, pages

    blocks = [b for page in pages() for b in blocks_of(page) if b.lang in ("yaml", "yml")]
    assert blocks
    for b in blocks:
        docs = [d for d in yaml.safe_load_all(b.code) if d is not None]
        assert docs, b.id
        for d in docs:
            assert "kind" in d and "apiVersion" in d, b.id


def test_help_asyncflow_shows_the_user_api_and_not_the_internals() -> None:
    import pydoc

    text = pydoc.render_doc(af, renderer=pydoc.plaintext)
    for internal in ("RawBatch", "TopicSpec", "TopicPartition", "Watermark", "Broker", "Source"):
        assert f"class {internal}(" not in text, internal
        assert internal not in af.__all__
    for public in ("App", "Stream", "Tumbling", "ConsoleSink", "Record", "Retry"):
        assert f"class {public}(" in text, public


def test_names_code_imports_from_asyncflow_still_import() -> None:
    """Leaving ``__all__`` does not remove a name: code written against it keeps working."""
    for name in ("Agent", "Broker", "RawBatch", "RawRecordData", "Source", "TopicPartition",
                 "TopicSpec", "Watermark"):
        assert getattr(af, name) is not None
