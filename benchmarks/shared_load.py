"""Fair share under load: a fixed command-line workload alone, then beside two CPU-bound processes.

The workload is an ablation run on the shipped native organism (``narrowgate run ablation --model native
--data synthetic --task vqa``: a prefix pass, then 20-token generations under four knockout conditions
per example — many short parallel regions, the case idle spinning hurts most), run as a user runs it, in a
fresh process. It runs alone, then while two processes spin on the CPU (pure Python loops, one core each);
the ratio of the two wall times is printed. On two cores three processes sharing fairly give the workload
about a third of the machine instead of all of it: the goal is a ratio of at most 3 (with GNU OpenMP's
default spinning it was about 28).

    python benchmarks/shared_load.py [-n 40] [--repeats 2] [--json FILE]    narrowgate's policy (what users get)
    python benchmarks/shared_load.py --policy default|passive              for comparison: GNU OpenMP's default,
                                                                           or idle threads sleeping at once
    python benchmarks/shared_load.py --engine [--json FILE]                R1-R6 of benchmarks/engine.py, quiet,
                                                                           under each of the three policies

``--policy default`` sets ``GOMP_SPINCOUNT=300000`` (libgomp's own default spin count), which narrowgate
respects as the user's choice; ``--policy passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` alone (spin count 0,
narrowgate's choice before 2026-12-04); ``--policy narrowgate`` (the default) leaves every wait and thread variable
unset, so the command makes its own choice (`narrowgate.threads`). Each timing is the fastest of
``--repeats``; the machine must otherwise be quiet for the numbers to mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Every variable through which a wait policy or thread count could reach the workload from this shell.
CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")
POLICIES = {"narrowgate": {}, "default": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
HOGS = 2
GOAL = 3.0


def environment(policy: str) -> dict[str, str]:
    """This process's environment without any wait or thread choice, plus the policy's own variables."""
    env = {k: v for k, v in os.environ.items() if k not in CHOICES}
    return {**env, **POLICIES[policy]}


def workload(n: int, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "narrowgate.cli",
        "run",
        "ablation",
        "--model",
        "native",
        "--data",
        "synthetic",
        "--task",
        "vqa",
        "-n",
        str(n),
        "--out",
        str(out),
        "--quiet",
    ]


def timed_run(cmd: list[str], env: dict) -> float:
    """Wall seconds of one fresh run of ``cmd`` (its run directory removed first, so nothing is resumed)."""
    out = Path(cmd[cmd.index("--out") + 1])
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def with_hogs(fn, hogs: int = HOGS):
    """``fn()`` while ``hogs`` single-threaded processes spin on the CPU; they are stopped afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(hogs)]
    try:
        time.sleep(1.0)  # let them reach the scheduler's steady state
        return fn()
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def load_ratio(policy: str, n: int, repeats: int) -> dict:
    env = environment(policy)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = workload(n, Path(tmp) / "run")
        timed_run(cmd, env)  # warm-up: file caches, the organism's weights
        alone, loaded = [], []
        for _ in range(repeats):  # interleaved, so slow drift hits both alike
            alone.append(timed_run(cmd, env))
            loaded.append(with_hogs(lambda: timed_run(cmd, env)))
    result = {
        "policy": policy,
        "alone_s": min(alone),
        "loaded_s": min(loaded),
        "ratio": min(loaded) / min(alone),
        "goal": GOAL,
        "hogs": HOGS,
        "command": " ".join(cmd[1:]).replace(str(Path(tmp)), "TMP"),
    }
    print(
        f"{policy} policy: alone {result['alone_s']:.1f} s, beside {HOGS} CPU-bound processes "
        f"{result['loaded_s']:.1f} s: ratio {result['ratio']:.2f} (goal <= {GOAL:g})"
    )
    return result


def engine_with_and_without(repeats: int) -> dict:
    """benchmarks/engine.py's ratios under each policy (narrowgate's, GNU OpenMP's default, idle threads sleeping at
    once), one after the other."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in POLICIES:
            path = Path(tmp) / f"{policy}.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--json", str(path)]
            cmd += ["--repeats", str(repeats)]
            subprocess.run(cmd, env=environment(policy), check=True)
            out[policy] = json.loads(path.read_text())
    keys = [k for k in out["narrowgate"] if k.startswith("R") and isinstance(out["narrowgate"][k], float)]
    print(f"{'ratio':<16}" + "".join(f"{policy:>12}" for policy in POLICIES))
    for k in keys:
        print(f"{k:<16}" + "".join(f"{out[policy][k]:12.2f}" for policy in POLICIES))
    for policy in POLICIES:
        print(f"plain forward ({policy}): {out[policy]['plain_forward_s']:.3f} s")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", choices=sorted(POLICIES), default="narrowgate")
    parser.add_argument("-n", type=int, default=40, help="VQA examples of the workload (default 40)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine", action="store_true", help="R1-R5 with and without the policy instead")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if args.engine:
        result = {"engine": engine_with_and_without(args.repeats), "machine": machine}
    else:
        result = {**load_ratio(args.policy, args.n, args.repeats), "machine": machine}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
