"""narrowgate.report: the one writer of HTML reports (a run's report.html and the demo's) — page, sections, escaping."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image

from narrowgate import demo, report


class _Tags(HTMLParser):
    """Counts opening and closing tags, and keeps the text, to check a page is well formed."""

    def __init__(self):
        super().__init__()
        self.open, self.closed, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.open.append(tag)

    def handle_endtag(self, tag):
        self.closed.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _parsed(path) -> _Tags:
    tags = _Tags()
    tags.feed(path.read_text())
    return tags


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def test_a_page_escapes_text_inlines_images_and_takes_sections_before_its_end(tmp_path):
    png = _png(tmp_path / "a.png")
    df = pd.DataFrame({"condition": ["<eoi>", "base"], "score": [0.123456, float("nan")]})
    page = report.write_page(
        tmp_path / "report.html", "a <b> title", ["<h1>x</h1>", report.image(png), report.table(df, ".2f", "none")]
    )
    text = page.read_text()
    assert "<title>a &lt;b&gt; title</title>" in text and "&lt;eoi&gt;" in text and "<eoi>" not in text
    assert "0.12" in text and "0.123456" not in text and ">none<" in text
    assert text.count("data:image/png;base64") == 1 and text.endswith(report.END)
    report.append_section(page, ["<h2>added</h2>"])
    tags = _parsed(page)
    assert tags.closed[-2:] == ["body", "html"] and tags.closed.count("html") == 1 and "added" in tags.text
    assert page.read_text().index("<h2>added</h2>") > page.read_text().index("data:image/png")
    (tmp_path / "other.html").write_text("<p>not ours</p>")
    with pytest.raises(ValueError, match="not a page narrowgate wrote"):
        report.append_section(tmp_path / "other.html", ["<h2>x</h2>"])


def test_the_demo_report_is_written_by_the_report_module(tmp_path, monkeypatch):
    """The demo's page goes through `report.write_page` (one head, one style) and its removal section is appended."""
    written = []
    write_page = report.write_page
    monkeypatch.setattr(
        report, "write_page", lambda path, title, *a, **k: written.append(title) or write_page(path, title, *a, **k)
    )
    runs = {}
    for label in ("gated", demo.REMOVED):
        run_dir = tmp_path / label / "ablation-vqa"
        _png(run_dir / "figures" / "ablation.png")
        runs[label] = {"ablation-vqa": run_dir}
    summary = pd.DataFrame(
        [
            {"model": m, "task": "vqa", "metric": "accuracy", "chance": 0.1, "condition": c, "score": s, "relative": r}
            for m in ("gated", demo.REMOVED)
            for c, s, r in (("baseline", 0.8, 1.0), ("eoi->text", 0.2, 0.25), ("image->text", 0.7, 0.875))
        ]
    )
    verdicts = {"gated": "gated: <EOI> is a narrow gate"}
    demo.write_report(tmp_path, runs, summary, verdicts, plan=(("ablation-vqa", "ablation", {}),))
    assert written == ["narrowgate demo"]
    (tmp_path / "remove-gate").mkdir()
    (tmp_path / "remove-gate" / "card.json").write_text(json.dumps({"knockouts": ["eoi->text"], "steps": 3}))
    demo.add_removal_section(tmp_path, summary)
    text = (tmp_path / "report.html").read_text()
    tags = _parsed(tmp_path / "report.html")
    assert text.count("<!doctype html>") == 1 and tags.closed[-2:] == ["body", "html"]
    assert "&lt;EOI&gt; is a narrow gate" in text and text.count("data:image/png;base64") == 2
    assert "Removing the gate" in text and "before (relative)" in text and "0.250" in text
