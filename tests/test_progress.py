"""Progress off a terminal: plain lines with counts and an estimate at least every interval, on a fake clock."""

from __future__ import annotations

import io
import re
import time

import torch
from rich.console import Console

from narrowgate.progress import INTERVAL, LineProgress, eta, interval, progress_bar


def _log_console(buf: io.StringIO) -> Console:
    return Console(file=buf, width=200)  # a file: not a terminal, as under `> log 2>&1`, nohup or CI


def test_off_a_terminal_a_line_at_least_every_interval_with_counts_and_estimate():
    buf, now = io.StringIO(), [0.0]
    bar = progress_bar("loss {task.fields[loss]}", console=_log_console(buf), get_time=lambda: now[0])
    assert isinstance(bar, LineProgress) and bar.every == INTERVAL == 30
    with bar:
        task = bar.add_task("finetune remove-gate", total=20, loss="-")
        for step in range(20):
            now[0] += 7.0  # one step every 7 s: a line is due every 5th step (35 s > 30 s)
            bar.update(task, advance=1, loss=f"{1 / (step + 1):.3f}")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "finetune remove-gate: 0/20 (0%), loss -, 0:00:00 elapsed"
    assert lines[1] == "finetune remove-gate: 5/20 (25%), loss 0.200, 0:00:35 elapsed, ~0:01:45 left"
    assert lines[-1] == "finetune remove-gate: 20/20 (100%), loss 0.050, 0:02:20 elapsed, finished"
    assert len(lines) == 5  # start, steps 5, 10 and 15, end
    stamps = [int(m.group(1)) * 60 + int(m.group(2)) for m in re.finditer(r"0:(\d\d):(\d\d) elapsed", buf.getvalue())]
    assert all(b - a <= INTERVAL + 7 for a, b in zip(stamps, stamps[1:]))  # never longer than interval + one step


def test_a_step_longer_than_the_interval_still_reports_from_the_background():
    buf, now = io.StringIO(), [0.0]
    with LineProgress(console=_log_console(buf), every=30, get_time=lambda: now[0]) as bar:
        task = bar.add_task("gate-scan (chameleon)", total=4)
        bar.advance(task)
        now[0] = 100.0  # the second unit takes minutes: no update comes
        deadline = time.monotonic() + 20  # the heartbeat checks about once a second
        while buf.getvalue().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = buf.getvalue().splitlines()  # read before the block ends (its end prints a line too)
    assert lines[1] == "gate-scan (chameleon): 1/4 (25%), 0:01:40 elapsed, ~0:05:00 left", lines
    assert buf.getvalue().splitlines()[-1].startswith("gate-scan (chameleon): 1/4 (25%)")  # stopped: where it was


def test_unknown_total_counts_without_estimate_and_quiet_prints_nothing():
    buf, now = io.StringIO(), [0.0]
    with progress_bar(console=_log_console(buf), get_time=lambda: now[0]) as bar:
        task = bar.add_task("modality-gap (llava)", total=None)
        now[0] = 31.0
        bar.advance(task, 8)
    assert "modality-gap (llava): 8 done, 0:00:31 elapsed" in buf.getvalue()
    quiet = io.StringIO()
    with progress_bar(console=_log_console(quiet), disable=True) as bar:
        bar.advance(bar.add_task("x", total=3), 3)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_live_bar_and_the_interval_is_settable(monkeypatch):
    terminal = Console(file=io.StringIO(), force_terminal=True, force_interactive=True)
    assert not isinstance(progress_bar(console=terminal), LineProgress)
    monkeypatch.setenv("NARROWGATE_PROGRESS_SECONDS", "5")
    assert interval() == 5.0 and progress_bar(console=_log_console(io.StringIO())).every == 5.0
    monkeypatch.setenv("NARROWGATE_PROGRESS_SECONDS", "soon")
    assert interval() == INTERVAL
    assert eta(0, 4, 10) == "0/4, 0:00:10 elapsed" and eta(1, 4, 10) == "1/4, 0:00:10 elapsed, ~0:00:30 left"


def test_organism_training_phase_reports_off_a_terminal(capsys, monkeypatch):
    from narrowgate.organisms.common import Phase, run_phase

    monkeypatch.setenv("NARROWGATE_PROGRESS_SECONDS", "0")  # a line at every step
    w = torch.nn.Parameter(torch.ones(2, 2))
    run_phase(Phase("lm", 3, 1, 0.1), [w], lambda step: (w**2).sum())
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "lm: 0/3 (0%), loss -, 0:00:00 elapsed"
    counts = list(dict.fromkeys(line.split(",")[0] for line in err[1:]))  # a slow step may also get a heartbeat line
    assert counts == ["lm: 1/3 (33%)", "lm: 2/3 (67%)", "lm: 3/3 (100%)"]
    assert "left" in err[1] and err[-1].endswith("finished")
