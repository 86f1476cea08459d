"""Issue 23: the run directory's lock is never followed, and what it guarantees when its files are damaged."""

from __future__ import annotations

import json
import os

import pytest

from narrowgate.store import DirectoryLock, RunLocked, RunStore


# --- item 7: the lock is opened without following links --------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "fifo", "directory"])
def test_a_lock_that_is_not_a_regular_file_is_refused_untouched(tmp_path, kind):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    run = tmp_path / "run"
    run.mkdir()
    lock = run / "lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(tmp_path / "created-through-the-link")
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(RunLocked, match=r"run/lock is .*never followed, read or truncated") as err:
        RunStore(run).lock("narrowgate run ...")
    assert "do not truncate me" not in str(err.value)
    assert victim.read_text() == "do not truncate me"
    assert not (tmp_path / "created-through-the-link").exists()
    with pytest.raises(RunLocked):
        DirectoryLock(run).acquire()


def test_directory_lock_is_exclusive_and_released(tmp_path):
    with DirectoryLock(tmp_path / "ft", command="narrowgate finetune ...") as held:
        assert json.loads(held.path.read_text())["command"] == "narrowgate finetune ..."
        with pytest.raises(RunLocked, match=r"in use by another run \(pid \d+ .*narrowgate finetune"):
            DirectoryLock(tmp_path / "ft").acquire()
    assert (tmp_path / "ft" / "lock").read_text() == ""
    with DirectoryLock(tmp_path / "ft"):  # released: taken again at once
        pass
