"""The README: at most 200 lines, every link resolves, and its Python example runs and says what the text says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    assert max(len(line) for line in README.splitlines()) <= 200  # table rows with links; prose wraps at 120
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(local) > 20  # it points into the docs
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


@pytest.mark.slow
def test_readme_python_example_runs_as_written():
    block = re.search(r"## In Python\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(block.strip().splitlines()) <= 20
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    gate, rest = map(float, re.findall(r"knocked out: ([0-9.]+); with image->text: ([0-9.]+)", lines[0])[0])
    # The README says: about 0.06 and 0.94 on the gated organism (a planted gate at [EOI]).
    assert gate <= 0.2 and rest >= 0.8, lines[0]
    assert lines[1].startswith("torch.Size([16, 5, 128]) torch.Size([16, 4])")


def test_docs_nest_lists_at_four_spaces():
    """The docs site's Markdown nests a list only at four spaces: at two or three, the inner items render as items
    of the outer list (the emergence study's outcome list and the prompt kinds did)."""
    shallow = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        fenced = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            fenced ^= line.lstrip().startswith("```")
            if not fenced and re.match(r" {1,3}([-*+]|\d+\.) ", line):
                shallow.append(f"{page.relative_to(ROOT)}:{number}")
    assert not shallow, shallow
