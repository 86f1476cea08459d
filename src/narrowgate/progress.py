"""The one look of narrowgate's progress (experiment runs, the demo, fine-tuning, organism training).

On a terminal: a live bar. Anywhere else (a CI log, ``nohup``, ``> log 2>&1``, a notebook) a live bar
prints nothing until it ends, so instead every task prints one plain line when it starts, then at least
every `interval()` seconds (30 by default; ``NARROWGATE_PROGRESS_SECONDS`` sets it) even while one step is
still running, and once when it ends: done/total, its fields (e.g. the loss), elapsed time and an estimate
of the time left.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import get_console as _global_console

#: Seconds between two progress lines of a task when the output is not a terminal.
INTERVAL = 30.0


def interval() -> float:
    """`INTERVAL`, or ``NARROWGATE_PROGRESS_SECONDS`` when set (e.g. 5 for a busier log)."""
    value = os.environ.get("NARROWGATE_PROGRESS_SECONDS", "")
    try:
        return float(value) if value and float(value) >= 0 else INTERVAL
    except ValueError:
        return INTERVAL


def progress_bar(*fields: str, disable: bool = False, console: Console | None = None, get_time=None) -> Progress:
    """Description, bar, done/total, then each ``fields`` text column (e.g. ``"loss {task.fields[loss]}"``),
    elapsed and remaining time; plain `LineProgress` lines instead when ``console`` is not a terminal."""
    console = console or _global_console()
    if disable:
        return Progress(disable=True, console=console)
    if not (console.is_interactive and console.is_terminal) or console.is_jupyter:  # is_terminal: read now
        return LineProgress(console=console, every=interval(), get_time=get_time)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console, get_time=get_time)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def eta(done: int, total: int, elapsed: float) -> str:
    """``done/total, H:MM:SS elapsed, ~H:MM:SS left`` (the estimate once something is done)."""
    text = f"{done}/{total}, {_duration(elapsed)} elapsed"
    return text + (f", ~{_duration(elapsed * (total - done) / done)} left" if done else "")


class LineProgress(Progress):
    """A `rich.progress.Progress` that, instead of a live display, prints a line per task when it starts,
    at least every ``every`` seconds (from a background thread, so a slow step still reports) and when it ends."""

    def __init__(self, *, console: Console, every: float = INTERVAL, get_time=None):
        super().__init__(console=console, disable=True, get_time=get_time)
        self.every = every
        self._last: dict[TaskID, float] = {}
        self._ended: set[TaskID] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def line(task: Task) -> str:
        """``description: done/total (pct%), fields, elapsed, ~time left``."""
        if task.total:
            parts = [f"{task.completed:g}/{task.total:g} ({task.percentage:.0f}%)"]
        else:
            parts = [f"{task.completed:g} done"]
        parts += [f"{k} {v}" for k, v in task.fields.items()]
        elapsed = task.elapsed or 0.0
        parts.append(f"{_duration(elapsed)} elapsed")
        if task.finished:
            parts.append("finished")
        elif task.total and task.completed > 0:
            parts.append(f"~{_duration(elapsed * (task.total - task.completed) / task.completed)} left")
        return f"{task.description}: " + ", ".join(parts)

    def _report(self, task_id: TaskID) -> None:
        with self._lock:
            self._last[task_id] = self.get_time()
            text = self.line(self._tasks[task_id])
        self.console.print(escape(text), highlight=False, soft_wrap=True)

    def report_due(self, at_least: float = 0.0) -> None:
        """Print a line for every unfinished task whose last line is ``every`` (and ``at_least``) seconds old."""
        now, wait = self.get_time(), max(self.every, at_least)
        with self._lock:
            due = [i for i, t in self._tasks.items() if i not in self._ended and now - self._last[i] >= wait]
        for task_id in due:
            self._report(task_id)

    def _beat(self) -> None:
        # The heartbeat reports a step that outlasts the interval; it never repeats a line within a second (with an
        # interval of 0, every update prints one and the heartbeat stays quiet).
        while not self._stop.wait(min(1.0, max(self.every / 4, 0.01))):
            self.report_due(at_least=1.0)

    def start(self) -> None:
        """Start the heartbeat thread, which prints the line of a task whose step outlasts ``every``."""
        super().start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="narrowgate-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat; each task not yet finished (an interrupted run) prints a last line of where it stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for task_id in [i for i in self._tasks if i not in self._ended]:  # interrupted: where it stopped
            self._ended.add(task_id)
            self._report(task_id)
        super().stop()

    def add_task(self, description, start=True, total=100.0, completed=0, visible=True, **fields) -> TaskID:
        """`rich.progress.Progress.add_task`, then the task's first line."""
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        self._report(task_id)
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:  # type: ignore[override]
        """`rich.progress.Progress.update`, then the task's last line if it has just finished, else the lines due."""
        super().update(task_id, **kwargs)
        if self._tasks[task_id].finished and task_id not in self._ended:
            self._ended.add(task_id)
            self._report(task_id)
        else:
            self.report_due()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        """`rich.progress.Progress.advance`, then report as `update` does."""
        super().advance(task_id, advance)
        self.update(task_id)
