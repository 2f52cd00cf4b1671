"""Every Python code block in README.md and docs/*.md runs as written.

Each ```python block is executed on its own, in a fresh namespace, with the working directory set to
a temporary folder (so blocks that write files leave nothing behind). A block that is meant as an
excerpt and cannot run alone is fenced as ```py instead (rendered the same, not run); keep those rare.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def _blocks():
    for path in DOC_FILES:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{line}")


BLOCKS = list(_blocks())


def test_the_docs_have_code_blocks():
    assert len(BLOCKS) >= 3, "README.md lost its runnable examples"


@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs(code, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    import matplotlib

    matplotlib.use("Agg")
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


@pytest.mark.timeout(600)
def test_api_reference_builds_in_strict_mode(tmp_path):
    """mkdocs + mkdocstrings render every page and every documented name; a broken reference fails."""
    pytest.importorskip("mkdocstrings_handlers.python", reason="pip install diffkernels[docs]")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "sparse" / "index.html").is_file()
