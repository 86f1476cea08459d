"""``report.html``: a run's figures and tables in one self-contained page."""

from __future__ import annotations

import base64
import html
import json

from .fileio import atomic_write


def write_report(store, experiment: str, tables: dict, figures: list[str], info: dict) -> None:
    manifest = json.loads(store.manifest_path.read_text()) if store.manifest_path.exists() else {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>narrowgate: {html.escape(experiment)} on {html.escape(info['family'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(experiment)} — {html.escape(info['family'])}</h1>",
        f"<p>Model: <code>{html.escape(str(info.get('name_or_path')))}</code>, {info['n_layers']} layers, "
        f"{html.escape(info['dtype'])}. Command: <code>{html.escape(manifest.get('command', ''))}</code></p>",
    ]
    for name in figures:
        data = base64.b64encode(store.figure_path(name, "png").read_bytes()).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img src='data:image/png;base64,{data}'>")
    for name, df in tables.items():
        parts.append(f"<h2>Table: {html.escape(name)} ({len(df)} rows)</h2>")
        parts.append(df.head(200).to_html(index=False, float_format=lambda x: f"{x:.4g}"))
    parts.append(
        f"<h2>Manifest</h2><pre>{html.escape(json.dumps(manifest, indent=2, default=str))}</pre></body></html>"
    )
    atomic_write(store.path / "report.html", lambda p: p.write_text("\n".join(parts)))
