"""The documentation site builds with warnings as errors, and what it generates is there: the tutorials executed
with their outputs, the demo's figures on every experiment page, every public object in the API reference, the
benchmark and coverage tables, the command-line reference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import narrowgate
from narrowgate.cli import commands

# A demo run and three tutorials (a few minutes), built once for the session (`built_once`): two builds side by
# side in one checkout race (the tutorials run in it).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _build(out: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env.pop("NARROWGATE_DOCS_DEMO", None)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "WARNING -" not in done.stderr, done.stderr[-5000:]  # mkdocs' own warnings (strict stops on them)


@pytest.fixture(scope="module")
def site(built_once) -> Path:
    return built_once("docs-site", _build)


def _page(site: Path, path: str) -> str:
    return (site / path / "index.html").read_text()


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html).replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&")


def test_tutorials_ran_and_show_their_outputs(site):
    gate = _text(_page(site, "tutorials/find-the-gate"))
    assert re.search(r"most damaging position: \d+ \(eoi\), [0-9.]+ nats = [0-9.]+ of the whole image", gate)
    assert "gated: a narrow gate at eoi: necessity" in gate  # the verdict's wording (docs/gate-scan.md)
    assert re.search(r"native: (?!a narrow gate)[^\n]*necessity 0\.[0-4]", gate)  # no gate: necessity below 0.5
    read = _text(_page(site, "tutorials/knockout-patch-read"))
    assert "mask mode, max difference between images: 0.0" in read
    assert "refused: Knockout eoi->text@99" in read
    html = _page(site, "tutorials/reproduce-table-1")
    table1 = _text(html)
    for name in ("vqav2", "coco", "flickr30k", "imagenet"):
        assert f"{name} -> " in table1
    rendered = _text(html[html.index('class="dataframe"') :]).split()  # the table the executed cell displayed
    at = rendered.index("dataset")
    assert rendered[at + 1] == "vqav2"  # first row: its metric, or why its baseline was refused (a 'refused' column)
    assert rendered[at + 2] == "vqa_accuracy" or "refused" in rendered[:at]
    assert {"coco", "flickr30k", "imagenet", "cider", "overlap@last"} <= set(rendered[:60])
    assert "Traceback" not in gate + read + table1


def test_every_experiment_page_shows_the_demo_figures_and_its_options(site):
    from narrowgate.analyses import EXPERIMENTS

    steering = _text(_page(site, "experiments/steering"))  # a table, not a figure
    assert re.search(r"gated\s+1-\d+\s+paper\s+0\.\d+\s+0\.\d+", steering), steering[-3000:]
    for name in set(EXPERIMENTS) - {"steering"}:
        html = _page(site, f"experiments/{name}")
        images = re.findall(r'<img alt="[^"]*" src="([^"]+\.png)"', html)
        assert images, name
        for src in images:
            assert (site / "experiments" / name / src).resolve().is_file(), (name, src)
        assert "<code>--model</code>" in html and "<code>--data</code>" in html  # the generated options table
    assert "--n-per-class" in _text(_page(site, "experiments/gate-scan"))


def test_api_reference_documents_every_public_name(site):
    html = _page(site, "api")
    for name in narrowgate.__all__:
        assert re.search(rf'id="narrowgate\.[\w.]*\b{name}"', html), name


def test_generated_tables_come_from_their_committed_sources(site):
    html = _page(site, "performance")
    perf = _text(html[html.index("<article") : html.index("</article>")])  # the page, not its table of contents
    bench = json.loads((ROOT / "docs" / "_generated" / "engine-benchmark.json").read_text())
    latest = perf[perf.index("The latest measurement") : perf.index("Earlier measurements")]
    cells = [c.strip() for c in latest.splitlines() if c.strip()]
    for key in bench["targets"]:
        row = cells.index(key.replace("_", " "))  # ratio, measured, target, naive: one cell per line
        assert cells[row + 1] == f"{bench[key]:.2f}" and cells[row + 2] == f"≤ {bench['targets'][key]:g}", key
    assert bench["date"] in latest and bench["machine"] in latest
    coverage = (ROOT / "docs" / "_generated" / "coverage.md").read_text().strip().splitlines()[-1]
    assert coverage.startswith("coverage: ") and coverage in _text(_page(site, "supported-models"))
    cli = _text(_page(site, "cli"))
    for path in commands():  # every command, groups and experiments included
        assert " ".join(["narrowgate", *path]) in cli
    organisms = _text(_page(site, "organisms"))
    assert "Gate scan:" in organisms and "gated, gate removed" in organisms  # this build's demo summary
    study = _page(site, "study-emergence")  # the committed results, as the study wrote them
    outcome = re.search(r"\*\*(.+?)\*\*", (ROOT / "studies" / "emergence" / "summary.md").read_text()).group(1)
    assert outcome in _text(study) and "share0-tokens16-layers4-seed0" in _text(study)
    assert (site / "figures" / "studies" / "emergence" / "emergence.png").is_file() and "emergence.png" in study
    assert "Attempt 6" in _text(_page(site, "cards/gated"))  # the card, with every training attempt
    assert narrowgate.__version__ in _text(_page(site, "changelog"))
