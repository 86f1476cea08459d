"""The one look of narrowgate's progress bars (experiment runs, organism training)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(*fields: str, disable: bool = False, console: Console | None = None) -> Progress:
    """Description, bar, done/total, then each ``fields`` text column (e.g. ``"loss {task.fields[loss]}"``),
    elapsed and remaining time."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, disable=disable, console=console)
