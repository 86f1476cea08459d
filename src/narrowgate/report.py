"""Every HTML report narrowgate writes: one self-contained page (figures inlined), built and written here.

A run's ``report.html`` (`write_report`, called by the runner) and the demo's side-by-side ``report.html``
(`narrowgate.demo.write_report`) share the page, its style, inlined images, table formatting and the atomic
write, so the two never drift apart.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import atomic_write

if TYPE_CHECKING:
    import pandas as pd

    from .store import RunStore

#: The end of every page, which `append_section` writes new sections before.
END = "</body></html>"


def escape(text: object) -> str:
    """``text`` as HTML text (``<``, ``&`` and quotes escaped)."""
    return html.escape(str(text))


def image(path: Path) -> str:
    """A PNG inlined as an ``<img>`` (the page stays one file that can be mailed or archived)."""
    return f"<img src='data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()}'>"


def table(df: pd.DataFrame, digits: str = ".4g", na_rep: str = "NaN") -> str:
    """``df`` as an HTML table, floats written with ``digits`` (a format spec) and missing values as ``na_rep``."""
    return df.to_html(index=False, float_format=lambda x: f"{x:{digits}}", na_rep=na_rep)


def page(title: str, parts: Iterable[str], width: int = 1100, font_size: int = 12) -> str:
    """A whole HTML page: the common head and style, then ``parts`` (HTML fragments) in order."""
    return "\n".join(
        [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
            f"<style>body{{font-family:sans-serif;max-width:{width}px;margin:2em auto}}table{{border-collapse:"
            f"collapse;font-size:{font_size}px}}td,th{{border:1px solid #ccc;padding:2px 6px;vertical-align:top}}"
            "img{max-width:100%}</style></head><body>",
            *parts,
            END,
        ]
    )


def write_page(path: Path, title: str, parts: Iterable[str], width: int = 1100, font_size: int = 12) -> Path:
    """Write `page` to ``path`` atomically (a reader never sees half a report); returns ``path``."""
    text = page(title, parts, width, font_size)
    atomic_write(Path(path), lambda p: p.write_text(text))
    return Path(path)


def append_section(path: Path, parts: Iterable[str]) -> None:
    """Add ``parts`` at the end of the page at ``path`` (before its closing tags), atomically."""
    text = Path(path).read_text()
    if not text.rstrip().endswith(END):
        raise ValueError(f"{path} is not a page narrowgate wrote (it does not end with {END}).")
    body = text.rstrip()[: -len(END)]
    atomic_write(Path(path), lambda p: p.write_text(body + "\n".join(parts) + "\n" + END))


def write_report(store: RunStore, experiment: str, tables: dict, figures: list[str], info: dict) -> None:
    """A run's ``report.html``: its figures, its tables (first 200 rows each) and its manifest."""
    manifest = json.loads(store.manifest_path.read_text()) if store.manifest_path.exists() else {}
    parts = [
        f"<h1>{escape(experiment)} — {escape(info['family'])}</h1>",
        f"<p>Model: <code>{escape(info.get('name_or_path'))}</code>, {info['n_layers']} layers, "
        f"{escape(info['dtype'])}. Command: <code>{escape(manifest.get('command', ''))}</code></p>",
    ]
    for name in figures:
        parts.append(f"<h2>{escape(name)}</h2>{image(store.figure_path(name, 'png'))}")
    for name, df in tables.items():
        parts.append(f"<h2>Table: {escape(name)} ({len(df)} rows)</h2>")
        parts.append(table(df.head(200)))
    parts.append(f"<h2>Manifest</h2><pre>{escape(json.dumps(manifest, indent=2, default=str))}</pre>")
    write_page(store.path / "report.html", f"narrowgate: {experiment} on {info['family']}", parts)
