"""mkdocs hooks of the documentation site (mkdocs.yml: ``hooks``); every warning here fails the strict build.

Pages ask for generated content with one-line HTML comments, each replaced at build time:

- ``<!-- demo-figures RUN ... -->``: the figures of those demo runs (e.g. ``ablation-vqa``), every model's, and the
  overlay on relative depth. The demo runs once per build (``demo.demo`` on the shipped organisms at
  `DEMO_SCALE`, plus `EXTRA_PLAN`), into ``.cache/docs-demo/`` where later builds of the same sources and plan
  reuse it; ``NARROWGATE_DOCS_DEMO=DIR`` uses a demo output you already have, which must hold every run the pages show
  (``demo.demo(DIR, plan=demo.PLAN + EXTRA_PLAN)`` writes one; ``narrowgate demo`` alone has no steering,
  logit-lens or two-images run).
- ``<!-- demo-table RUN TABLE -->``: that table of a demo run (``tables/TABLE.csv``), every model's, in one table.
- ``<!-- demo-summary -->``: the demo's ablation summary, verdicts and gate-scan table.
- ``<!-- options EXPERIMENT -->``: the experiment's options, from its settings dataclass.
- ``<!-- benchmark -->``: the engine benchmark's tables, from ``docs/_generated/engine-benchmark.json``.
- ``<!-- scaling -->``: the scaling benchmark's time and memory ratios per analysis and size, and its slopes, from
  ``docs/_generated/scaling.json`` (``python benchmarks/scaling.py --json ...``); nothing where it is missing.
- ``<!-- study NAME -->``: a study's committed results, ``studies/NAME/summary.md`` and its figures.
- ``<!-- cli -->``: ``--help`` of every command.

Checks: the API page documents every name of ``narrowgate.__all__``, and each of them (and each public method or
property of its classes) has a docstring.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

from filelock import FileLock

log = logging.getLogger("mkdocs.plugins.narrowgate_docs")

ROOT = Path(__file__).resolve().parents[1]
DEMO_SCALE = 0.1
#: Experiments the demo does not run but whose pages show a figure: (run name, experiment, settings).
EXTRA_PLAN = (
    ("steering", "steering", dict(n_per_class=40, max_new_tokens=4)),
    ("logit-lens", "logit-lens", dict(n_per_class=40)),
    ("two-images", "two-images", dict(n_per_class=40)),
)
BENCHMARK = ROOT / "docs" / "_generated" / "engine-benchmark.json"
SCALING = ROOT / "docs" / "_generated" / "scaling.json"
DIRECTIVE = re.compile(
    r"^<!-- (demo-figures|demo-table|demo-summary|options|benchmark|scaling|study|cli)\b ?(.*?) ?-->$", re.M
)
FIGURES = "figures/demo"
#: A study's committed results (`narrowgate study NAME --out studies/NAME`): its summary and figure.
STUDIES = ROOT / "studies"

_demo: Path | None = None


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _source_digest() -> str:
    """A digest of narrowgate's sources, the organisms' weights and `EXTRA_PLAN`: a cached demo is reused only for
    the same code and the same runs."""
    import hashlib

    digest = hashlib.sha256(repr(EXTRA_PLAN).encode())
    src = ROOT / "src" / "narrowgate"
    for path in sorted([*src.rglob("*.py"), *src.rglob("*.safetensors")]):
        digest.update(str(path.relative_to(src)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _demo_dir() -> Path:
    """The demo output the pages show: NARROWGATE_DOCS_DEMO, or a run made (once) for the docs."""
    global _demo
    if _demo is not None:
        return _demo
    given = os.environ.get("NARROWGATE_DOCS_DEMO")
    if given:
        _demo = Path(given)
        if not (_demo / "summary.csv").is_file():
            raise SystemExit(f"NARROWGATE_DOCS_DEMO={given} holds no demo output (no summary.csv).")
        return _demo
    import narrowgate
    from narrowgate import demo

    out = ROOT / ".cache" / "docs-demo" / f"{narrowgate.__version__}-{DEMO_SCALE}-{_source_digest()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two builds at once in one checkout: the second waits for the first's demo and reuses it (a demo that did not
    # finish has no summary.csv, and is run again from scratch).
    with FileLock(str(out) + ".lock"):
        if not (out / "summary.csv").is_file():
            from rich.console import Console

            from narrowgate.deprecation import dependency_deprecations_hidden

            log.info("narrowgate docs: running the demo at scale %s into %s", DEMO_SCALE, out)
            shutil.rmtree(out, ignore_errors=True)
            with dependency_deprecations_hidden():
                demo.demo(
                    out,
                    scale=DEMO_SCALE,
                    progress=False,
                    console=Console(file=io.StringIO()),
                    plan=demo.PLAN + EXTRA_PLAN,
                )
    _demo = out
    return out


def _figures(demo: Path) -> dict[tuple[str, str], list[Path]]:
    """(model label, run name) -> that run's PNG figures; ("compare", run) -> the overlays."""
    out: dict[tuple[str, str], list[Path]] = {}
    for model in sorted(p for p in demo.iterdir() if p.is_dir() and p.name not in ("compare", "remove-gate")):
        for run in sorted(p for p in model.iterdir() if (p / "figures").is_dir()):
            out[(model.name, run.name)] = sorted((run / "figures").glob("*.png"))
    for run in sorted((demo / "compare").glob("*")):
        out[("compare", run.name)] = sorted(run.glob("*.png"))
    return out


def on_files(files, config):
    from mkdocs.structure.files import File

    for study in sorted(STUDIES.glob("*/*.png")):
        uri = f"figures/studies/{study.parent.name}/{study.name}"
        files.append(File.generated(config, uri, abs_src_path=str(study)))

    for (label, run), pngs in _figures(_demo_dir()).items():
        for png in pngs:
            uri = f"{FIGURES}/{_slug(label)}/{run}/{png.name}"
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def _md_table(df) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.3f}"
        return str(v).replace("|", "/")

    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def _demo_figures(runs: list[str], page) -> str:
    demo = _demo_dir()
    figures = _figures(demo)
    models = [m for m, _ in figures if m != "compare"]
    up = "../" * page.file.src_uri.count("/")
    parts = []
    for run in runs:
        if not any(r == run for _, r in figures):
            log.warning("%s: the demo has no run %r", page.file.src_uri, run)
            continue
        for png in figures.get(("compare", run), []):
            parts.append(
                f"**{run}, every model on relative depth**\n\n![{run}: overlay]({up}{FIGURES}/compare/{run}/{png.name})\n"
            )
        for model in dict.fromkeys(models):
            for png in figures.get((model, run), []):
                parts.append(
                    f"**{run}: {model}** (`{png.stem}`)\n\n![{run}: {model}]({up}{FIGURES}/{_slug(model)}/{run}/{png.name})\n"
                )
    scale = "given by NARROWGATE_DOCS_DEMO" if os.environ.get("NARROWGATE_DOCS_DEMO") else f"--scale {DEMO_SCALE}"
    note = (
        f"*Figures drawn by this site's build from a demo run on the shipped organisms ({scale}: small samples, so "
        "noisier than `narrowgate demo` at full scale).*\n\n"
    )
    return note + "\n".join(parts)


def _demo_table(run: str, table: str, page) -> str:
    import pandas as pd

    demo = _demo_dir()
    frames = []
    for model in sorted(p for p in demo.iterdir() if (p / run / "tables" / f"{table}.csv").is_file()):
        frames.append(pd.read_csv(model / run / "tables" / f"{table}.csv").assign(model=model.name))
    if not frames:
        log.warning("%s: no demo run %r has a table %r", page.file.src_uri, run, table)
        return ""
    df = pd.concat(frames, ignore_index=True)
    return _md_table(df[["model", *[c for c in df.columns if c != "model"]]]) + "\n"


def _demo_summary() -> str:
    import pandas as pd

    from narrowgate.demo import SUMMARY, verdict

    demo = _demo_dir()
    summary = pd.read_csv(demo / "summary.csv")
    table = (
        summary.pivot_table(index=["model", "task", "metric"], columns="condition", values="score", sort=False)[
            list(SUMMARY)
        ]
        .rename_axis(columns=None)
        .reset_index()
    )
    text = "Scores (baseline and with each knockout):\n\n" + _md_table(table) + "\n"
    text += "".join(f"- {v}\n" for v in verdict(summary).values())
    gates = demo / "gates.csv"
    if gates.is_file():
        g = pd.read_csv(gates)
        text += "\nGate scan:\n\n" + _md_table(g.drop(columns="verdict")) + "\n"
        text += "".join(f"- {v}\n" for v in g["verdict"])
    return text


def _options(experiment: str, page) -> str:
    from dataclasses import MISSING, fields

    from narrowgate.analyses import EXPERIMENTS

    if experiment not in EXPERIMENTS:
        log.warning("%s: no experiment %r", page.file.src_uri, experiment)
        return ""
    rows = ["| option | default | what |", "|---|---|---|"]
    for f in fields(EXPERIMENTS[experiment].config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag") or f"--{f.name.replace('_', '-')}"
        flag = f"`{flag}`" + (f", `{meta['short']}`" if meta.get("short") else "")
        default = "required" if meta.get("required") else ("" if f.default in (MISSING, None) else f"`{f.default}`")
        what = meta["help"] + (f" One of: {', '.join(map(str, meta['choices']))}." if meta.get("choices") else "")
        rows.append(f"| {flag} | {default} | {what.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _benchmark() -> str:
    data = json.loads(BENCHMARK.read_text())
    targets = data.get("targets", {})
    rows = ["| ratio | measured | target | naive |", "|---|---|---|---|"]
    for key, target in targets.items():
        naive = data.get("naive", {}).get(key)
        rows.append(
            f"| {key.replace('_', ' ')} | {data[key]:.2f} | ≤ {target:g} | {'' if naive is None else f'{naive:.2f}'} |"
        )
    text = "\n".join(rows) + "\n\n"
    text += (
        f"Measured {data.get('date', '(no date)')} on {data.get('machine', '(machine not recorded)')}: "
        f"`--config {data.get('config')}`, {data.get('dtype')}, {data.get('n_layers')} layers, plain forward "
        f"{data.get('plain_forward_s', float('nan')):.3f} s, plain 20-token generate "
        f"{data.get('plain_generate_s', float('nan')):.3f} s. Gate scan: {data.get('scan_positions')} image-side "
        f"positions, {data.get('scan_suffix_tokens')} text tokens after [EOI], floor "
        f"{data.get('R5_floor', float('nan')):.2f} plain forwards counting tokens and "
        f"{data.get('R5_floor_flops', float('nan')):.2f} counting FLOPs, {data.get('scan_positions_per_s', 0):.0f} "
        "positions/s.\n"
    )
    if data.get("source"):
        text += f"\n*Source of these numbers: {data['source']}*\n"
    return text


def _study(name: str, page) -> str:
    """The committed results of ``narrowgate study NAME``: its summary (verdict, trend test, one row per model) and
    its figures, as ``studies/NAME`` holds them, so the page never drifts from the results."""
    folder = STUDIES / name
    summary = folder / "summary.md"
    if not summary.is_file():
        log.warning("%s: studies/%s has no summary.md", page.file.src_uri, name)
        return ""
    up = "../" * page.file.src_uri.count("/")
    figures = "".join(
        f"![{name}: {png.stem}]({up}figures/studies/{name}/{png.name})\n\n" for png in sorted(folder.glob("*.png"))
    )
    return figures + summary.read_text() + "\n"


def _scaling() -> str:
    if not SCALING.is_file():
        return "*Not yet measured on a quiet machine (no `docs/_generated/scaling.json`).*\n"
    data = json.loads(SCALING.read_text())
    rows = data["rows"]
    text = ""
    for series in sorted({r["series"] for r in rows}, key=lambda s: s != data["slopes_series"]):
        mine = [r for r in rows if r["series"] == series]
        sizes = sorted({r["image_tokens"] for r in mine})
        one = mine[0]
        plain = {r["image_tokens"]: r for r in mine if r["analysis"] == "forward"}
        text += (
            f"**{series}**: hidden {one['hidden']}, {one['heads']} heads over {one['kv_heads']} key/value heads, "
            f"{one['layers']} decoder layer(s). Plain forward: "
            + ", ".join(f"{s:,} tokens {plain[s]['seconds']:.2f} s, {plain[s]['peak_mib']:.0f} MiB" for s in sizes)
            + ".\n\n| analysis | "
            + " | ".join(f"{s:,} tokens: time / memory" for s in sizes)
            + " |\n|---|"
            + "---|" * len(sizes)
            + "\n"
        )
        for name in dict.fromkeys(r["analysis"] for r in mine):
            cells = {r["image_tokens"]: r for r in mine if r["analysis"] == name}
            text += (
                f"| {name} | "
                + " | ".join(f"{cells[s]['time_ratio']:.2f} / {cells[s]['memory_ratio']:.2f}" for s in sizes)
                + " |\n"
            )
        text += "\n"
    slopes = ", ".join(f"{k} {v:.2f}" for k, v in data["slopes"].items())
    text += (
        f"Ratios to the plain forward of the same size (time / peak working memory). Log-log slope of time against "
        f"image tokens ({data['slopes_series']}): {slopes}. Measured {data['date']} on {data['machine']}, "
        f"`--config {data['config']}`, {data['total_seconds'] / 60:.1f} minutes in all.\n"
    )
    return text


def _cli() -> str:
    from typer.testing import CliRunner

    from narrowgate.cli import app, commands

    runner = CliRunner()
    env = {"COLUMNS": "110", "TERM": "dumb", "NO_COLOR": "1"}
    parts = []
    for args in ([*path, "--help"] for path in commands()):
        result = runner.invoke(app, args, env=env)
        if result.exit_code != 0:
            log.warning("narrowgate %s failed: %s", " ".join(args), result.output)
        title = " ".join(a for a in args if a != "--help") or "narrowgate"
        parts.append(
            f"## `{'narrowgate ' + title if title != 'narrowgate' else title}`\n\n```text\n{result.output.rstrip()}\n```\n"
        )
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    def replace(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2).split()
        if kind == "demo-figures":
            return _demo_figures(arg, page)
        if kind == "demo-table":
            return _demo_table(arg[0], arg[1], page)
        if kind == "demo-summary":
            return _demo_summary()
        if kind == "options":
            return _options(arg[0], page)
        if kind == "benchmark":
            return _benchmark()
        if kind == "scaling":
            return _scaling()
        if kind == "study":
            return _study(arg[0], page)
        return _cli()

    if page.file.src_uri == "api.md":
        _check_api(markdown)
    return DIRECTIVE.sub(replace, markdown)


def _public_paths(package) -> dict[str, str]:
    """Each name of narrowgate.__all__ -> the path where it is defined (``narrowgate.batch.Batch``)."""
    import narrowgate

    out = {}
    for name in narrowgate.__all__:
        if name in narrowgate._LAZY:  # provided on first use (PEP 562): griffe sees no import in __init__
            out[name] = f"narrowgate{narrowgate._LAZY[name]}.{name}"
        else:
            obj = package[name]
            out[name] = obj.target_path if obj.is_alias else obj.path
    return out


def _check_api(markdown: str) -> None:
    """Every name of narrowgate.__all__ is on the API page, and it and its public members have docstrings."""
    import griffe

    package = griffe.load("narrowgate", search_paths=[str(ROOT / "src")])
    shown = set(re.findall(r"^::: (narrowgate[\w.]*)\s*$", markdown, re.M))
    for name, path in _public_paths(package).items():
        if path not in shown:
            log.warning("api.md: narrowgate.%s is in narrowgate.__all__ but not documented (add '::: %s')", name, path)
        target = package[path.removeprefix("narrowgate.")]
        if not target.docstring:
            log.warning("%s (narrowgate.%s) has no docstring", path, name)
        if not target.is_class:
            continue
        for member_name, member in target.members.items():
            if member_name.startswith("_") or member.is_alias:
                continue
            if (member.is_function or (member.is_attribute and "property" in member.labels)) and not member.docstring:
                log.warning("%s.%s (public) has no docstring", path, member_name)
