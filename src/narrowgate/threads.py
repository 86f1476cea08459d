"""A fair share of the CPU: the OpenMP wait policy and thread count, set before torch loads.

PyTorch's CPU kernels run on an OpenMP thread pool. By default (GNU libgomp, which the PyPI wheels ship)
a thread that finishes its part of a parallel region *spins* for a while before it sleeps, and the
pool has one thread per CPU. Alone on a machine that is fastest; beside other busy processes (several
analyses at once, data loaders, a notebook, a shared CI runner) the spinning threads take the cores the
others need and every parallel region waits for a descheduled thread: 30 forwards of the native
organism took 170 s instead of 6.1 s on a 2-core machine with two other jobs running.

`configure` makes the choice that shares fairly, for whatever has not been chosen already:

- ``GOMP_SPINCOUNT=10000`` and ``OMP_WAIT_POLICY=PASSIVE``, unless the environment already sets
  ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` (libgomp's own spin count; ``GOMP_SPINCOUNT=300000`` restores
  libgomp's default exactly) or ``KMP_BLOCKTIME`` (Intel OpenMP's). libgomp, which the PyPI wheels ship,
  takes its spin count over the policy: an idle thread spins about 0.1 ms, then sleeps — long enough to catch
  the next parallel region of a run of small kernels (sleeping at once cost a quiet machine 10-25% on the
  engine's condition suites), short enough not to take a core from another process. Other OpenMP runtimes
  read the policy: their idle threads sleep at once;
- ``OMP_NUM_THREADS`` = the CPUs this process may run on (`os.sched_getaffinity`: a ``taskset`` or a
  container's cpuset, not the machine's count), divided among the processes of a ``torchrun`` node
  (``LOCAL_WORLD_SIZE``), unless ``OMP_NUM_THREADS`` is set (torchrun sets 1 when it starts several).

OpenMP reads these variables once, when torch loads it, so `configure` must run before ``import torch``.
Every narrowgate entry point does (the ``narrowgate`` command and ``python -m narrowgate.cli`` under
torchrun, the test suite's conftest, the coverage script, the benchmarks). From Python, call it first::

    import narrowgate.threads
    narrowgate.threads.configure()   # before torch (or anything that imports it) is imported
    import narrowgate as ng

or set the variables in the shell (``export OMP_WAIT_POLICY=PASSIVE``). This module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
import warnings

#: Variables through which a user has already chosen how idle OpenMP threads wait.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: libgomp's spin count before an idle thread sleeps (about 0.1 ms; libgomp's default is 300,000). Measured on
#: 2 cores (benchmarks/shared_load.py, 2026-12-04): the engine's ratios R1-R6 as with libgomp's default, and a
#: workload beside two CPU-bound processes 2.4x its time alone (libgomp's default: about 28x).
SPIN_COUNT = "10000"


def usable_cpus() -> int:
    """How many CPUs this process may run on: its affinity mask where the OS has one, else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def settings(environ=None) -> dict[str, str]:
    """The variables `configure` would set in ``environ`` (default ``os.environ``): only those not set there."""
    env = os.environ if environ is None else environ
    out = {}
    if not any(v in env for v in WAIT_VARIABLES):
        out["OMP_WAIT_POLICY"] = "PASSIVE"
        out["GOMP_SPINCOUNT"] = SPIN_COUNT
    if "OMP_NUM_THREADS" not in env:
        try:
            local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            local = 1
        out["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // local))
    return out


def configure(environ=None) -> dict[str, str]:
    """Set the fair-share variables of `settings` that the user has not set; returns what it set.

    Call it before torch is imported. If torch is already loaded, the wait policy can no longer change
    (a warning says so) and only the thread count is applied, through ``torch.set_num_threads``.
    """
    env = os.environ if environ is None else environ
    chosen = settings(env)
    env.update(chosen)
    torch = sys.modules.get("torch")
    if torch is not None and environ is None:
        if "OMP_WAIT_POLICY" in chosen:
            warnings.warn(
                "narrowgate.threads.configure() ran after torch was imported: OpenMP's wait policy is already fixed "
                "(idle threads may spin on cores other processes need). Call it before importing torch, or export "
                "OMP_WAIT_POLICY=PASSIVE in the shell.",
                RuntimeWarning,
                stacklevel=2,
            )
        if "OMP_NUM_THREADS" in chosen:
            torch.set_num_threads(int(chosen["OMP_NUM_THREADS"]))
    return chosen
