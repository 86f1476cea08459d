"""The ``narrowgate`` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Measure how visual information reaches the text inside vision-language models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def models() -> None:
    """List the supported model families, the checkpoints they were written for, and their [EOI] token."""
    from .families import FAMILIES

    table = Table(title="Supported model families")
    table.add_column("family")
    table.add_column("model_type")
    table.add_column("checkpoints")
    table.add_column("eoi")
    for fam in FAMILIES:
        table.add_row(fam.name, ", ".join(fam.model_types), "\n".join(fam.checkpoints), fam.eoi_doc)
    console.print(table)


@app.command()
def roles(
    model: str = typer.Argument(..., help="Hub id or checkpoint directory."),
    prompt: str = typer.Option("Provide a one-sentence caption for the provided image.", help="Prompt text."),
    text_first: bool = typer.Option(False, "--text-first", help="Put the text before the image."),
) -> None:
    """Show where every role sits in one example prompt of MODEL (a blank grey image)."""
    from PIL import Image

    from .loading import load
    from .roles import ROLE_NAMES

    vlm = load(model)
    batch = vlm.prepare([Image.new("RGB", (224, 224), (128, 128, 128))], [prompt], image_first=not text_first)
    tok = vlm.family.tokenizer
    table = Table(title=f"{vlm.family.name}: {batch.length} tokens")
    table.add_column("role")
    table.add_column("positions")
    table.add_column("tokens")
    for name in ROLE_NAMES:
        pos = batch.positions(name)[0].tolist()
        shown = pos if len(pos) <= 6 else pos[:3] + ["..."] + pos[-2:]
        toks = tok.convert_ids_to_tokens(batch.input_ids[0, pos[:3]].tolist()) if pos else []
        table.add_row(name, f"{shown} ({len(pos)})", " ".join(toks) + (" ..." if len(pos) > 3 else ""))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
