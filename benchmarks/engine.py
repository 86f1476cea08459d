"""Engine benchmarks: cost of the paper's workloads relative to one plain forward, measured side by side.

Model: the Chameleon architecture with random weights and the real layout (1,024 image tokens from
a 128 x 128 image, ~15 text tokens), sized so a plain forward takes >= 0.5 s on the machine at hand
(use ``--config 7b`` on a GPU for the Chameleon-7B shape in bf16).

Ratios (each timing is the fastest of interleaved repeats, the least disturbed by other load):
  R1  ablation suite (baseline + 3 knockouts) / plain SDPA forward          target <= 1.15, naive >= 4
  R2  [EOI] patching sweep over all L layers for one image / plain forward   target <= 1.3, naive L + 1
  R3  cross-modal attention statistics / plain forward: time and peak memory  targets <= 1.25, <= 1.2
      (naive: eager forward with output_attentions=True)
  R4  20-token generation with a knockout / plain generate                    target <= 1.1
  R5  exact gate scan: every image-side position -> text knocked out alone (mask mode), plus the baseline,
      / plain forward of the same prompt: the scan's own default, the class prompt "This animal is a"
      (exactness costs at least 1 + positions x suffix / sequence forwards by token count; the FLOP count,
      whose suffix tokens attend to the whole prompt, is printed too)  target <= 10, naive ~1,027
      R5_attribution: the first-order scan (one suffix forward + backward) / plain forward   target <= 3
  R6  a `Hook` that only reads (the middle layer, the text positions) / the forward it rides on, at each site
      (resid, attn_out, mlp_out, head, pattern); R6 is the largest                 target <= 1.05

    python benchmarks/engine.py [--json FILE] [--config small|7b|tiny] [--repeats N]

``--config tiny`` (64 image tokens, 2 layers) only checks that every workload runs; its ratios mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from narrowgate import threads

threads.configure()  # before torch loads: idle OpenMP threads sleep (narrowgate.threads)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import narrowgate as ng  # noqa: E402
from narrowgate.engine.shared import Condition  # noqa: E402
from tests.fixtures import chameleon  # noqa: E402

CONFIGS = {
    "small": dict(crop=128, hidden=512, layers=10, heads=8, kv_heads=8),
    "7b": dict(crop=128, hidden=4096, layers=32, heads=32, kv_heads=32),
    "tiny": dict(crop=32, hidden=64, layers=2, heads=4, kv_heads=2),
}
PROMPT = "Answer briefly. This animal is a"
#: The gate scan's own default prompt (`narrowgate run gate-scan` on ImageNet).
SCAN_PROMPT = "This animal is a"
TARGETS = {
    "R1": 1.15,
    "R2": 1.3,
    "R3_time": 1.25,
    "R3_memory": 1.2,
    "R4": 1.1,
    "R5": 10.0,
    "R5_attribution": 3.0,
    "R6": 1.05,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak_memory(fn, device) -> float:
    """Peak memory of one call above the level before it (bytes).

    CUDA: the allocator's peak. CPU: the process's peak RSS (reset through /proc/self/clear_refs), which
    is only meaningful in a fresh process whose allocator has not yet grown — see `probe`.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    status = Path("/proc/self/status")
    Path("/proc/self/clear_refs").write_text("5")
    base = _kib(status, "VmRSS")
    fn()
    return float((_kib(status, "VmHWM") - base) * 1024)


def probe(kind: str, model_dir: str) -> float:
    """Peak memory of one forward of ``kind`` (plain, stats, naive) in this fresh process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    dmap = str(device) if device.type == "cuda" else None
    vlm = ng.load(model_dir, dtype=dtype, device_map=dmap, attn_implementation="eager" if kind == "naive" else "sdpa")
    batch = vlm.prepare([_image()], [PROMPT])
    inputs = vlm.model_inputs(batch)
    fns = {
        "plain": lambda: vlm.model(**inputs),
        "stats": lambda: vlm.forward_conditions(batch, [Condition("baseline")], attention_stats=True),
        "naive": lambda: vlm.model(**inputs, output_attentions=True),
    }
    with torch.no_grad():
        return peak_memory(fns[kind], device)


def _image():
    from PIL import Image

    return Image.effect_noise((128, 128), 64).convert("RGB")


def _probe_in_subprocess(kind: str, model_dir: str) -> float:
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--probe", kind, "--model-dir", model_dir],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _kib(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in {status}")


def _scan_floor_flops(vlm, T: int, P: int, conditions: int) -> float:
    """What an exact scan must compute, in plain forwards of its prompt, counting matmul FLOPs: the prefix once,
    then every condition's T - P suffix tokens through every layer, each attending to the whole prompt (a plain
    forward's token attends to (T + 1) / 2 positions on average)."""
    cfg = vlm.model.config.get_text_config()
    h, m = cfg.hidden_size, cfg.intermediate_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    linear = 2 * (2 * h * h + 2 * h * kv + 3 * h * m)  # q, o; k, v; gated MLP

    def per_token(keys: float) -> float:
        return linear + 4 * h * keys  # scores and weighted values

    plain = T * per_token((T + 1) / 2)
    suffix = conditions * (T - P) * per_token(T)
    return (P * per_token((P + 1) / 2) + suffix) / plain


def main(argv=None) -> dict:  # noqa: C901  # one flat sequence of measurements and their report
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--probe", choices=("plain", "stats", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-budget", help="the engine's memory budget (VLM.memory_budget, e.g. 4GiB; default: a plain forward's)"
    )
    args = parser.parse_args(argv)
    if args.probe:
        print(probe(args.probe, args.model_dir))
        return {}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    chameleon.build(tmp.name, **CONFIGS[args.config])
    vlm = ng.load(tmp.name, dtype=dtype, device_map=str(device) if device.type == "cuda" else None)
    vlm.memory_budget = args.memory_budget
    eager = ng.load(
        tmp.name, dtype=dtype, attn_implementation="eager", device_map=str(device) if device.type == "cuda" else None
    )
    batch = vlm.prepare([_image()], [PROMPT])
    L = vlm.n_layers
    inputs = vlm.model_inputs(batch)
    eager_inputs = eager.model_inputs(batch)
    knockouts = [ng.Knockout("eoi", "text"), ng.Knockout("image", "text"), ng.Knockout("last_image", "text")]
    suite = [Condition("baseline")] + [Condition(k.name, knockouts=(k,)) for k in knockouts]
    donor = vlm.forward(batch, capture=ng.Capture("eoi")).residuals["eoi"]
    sweep = [Condition("baseline")] + [
        Condition(f"patch@{l}", patches=(ng.Patch("eoi", l, donor[:, l]),)) for l in range(L)
    ]

    scan_batch = vlm.prepare([_image()], [SCAN_PROMPT])
    scan_inputs = vlm.model_inputs(scan_batch)
    lay = scan_batch.layouts[0]
    side = [p for p in ([lay.boi] if lay.boi is not None else []) + list(range(lay.start, lay.end + 1)) + [lay.eoi]]
    scan_sources = torch.zeros(len(side) + 1, 1, scan_batch.length, dtype=torch.bool)
    for i, p in enumerate(side):
        scan_sources[i + 1, 0, p] = True

    def scan():
        vlm.forward_knockouts(vlm.share_prefix(scan_batch, lay.eoi + 1), scan_sources, mode="mask")

    def scan_attribution():
        vlm.attribute(vlm.share_prefix(scan_batch, lay.eoi + 1))

    @torch.no_grad()
    def plain_scan_prompt():
        vlm.model(**scan_inputs)

    @torch.no_grad()
    def plain():
        vlm.model(**inputs)

    @torch.no_grad()
    def naive_eager_attentions():
        eager.model(**eager_inputs, output_attentions=True)

    def read(value):
        return None

    def forward_with(hook):
        return lambda: vlm.forward(batch, interventions=[hook])

    readers = {f"R6_{site}": forward_with(ng.Hook(site, L // 2, "text", read)) for site in ng.SITES}

    def naive_suite():
        for c in suite:
            vlm.forward(batch, knockouts=c.knockouts)

    def naive_sweep():
        for c in sweep:
            vlm.forward(batch, patches=c.patches)

    @torch.no_grad()
    def plain_generate():
        vlm.model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    work = {
        "plain": plain,
        "R1": lambda: vlm.forward_conditions(batch, suite),
        "R1_naive": naive_suite,
        "R2": lambda: vlm.forward_conditions(batch, sweep),
        "R2_naive": naive_sweep,
        "R3": lambda: vlm.forward_conditions(batch, [Condition("baseline")], attention_stats=True),
        "R3_naive": naive_eager_attentions,
        "plain_generate": plain_generate,
        "R4": lambda: vlm.generate(
            batch, knockouts=[knockouts[0]], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens
        ),
        "plain_scan_prompt": plain_scan_prompt,
        "R5": scan,
        "R5_attribution": scan_attribution,
        "forward": lambda: vlm.forward(batch),
        **readers,
    }
    for fn in work.values():  # warm-up
        fn()
    times = {k: [] for k in work}
    for _ in range(args.repeats):
        for k, fn in work.items():
            times[k].append(timed(fn, device))
    med = {k: min(v) for k, v in times.items()}
    if device.type == "cuda":
        mem_plain = peak_memory(plain, device)
        mem_stats = peak_memory(work["R3"], device)
        mem_naive = peak_memory(naive_eager_attentions, device)
    else:
        mem_plain, mem_stats, mem_naive = (_probe_in_subprocess(k, tmp.name) for k in ("plain", "stats", "naive"))
    tmp.cleanup()

    result = {
        "R1": med["R1"] / med["plain"],
        "R2": med["R2"] / med["plain"],
        "R3_time": med["R3"] / med["plain"],
        "R3_memory": mem_stats / mem_plain,
        "R4": med["R4"] / med["plain_generate"],
        "R5": med["R5"] / med["plain_scan_prompt"],
        "R5_attribution": med["R5_attribution"] / med["plain_scan_prompt"],
        "R6": max(med[k] for k in readers) / med["forward"],
        "R6_sites": {k[3:]: med[k] / med["forward"] for k in readers},
        "scan_positions": len(side),
        "scan_suffix_tokens": scan_batch.length - lay.eoi - 1,
        "R5_floor": 1 + (len(side) + 1) * (scan_batch.length - lay.eoi - 1) / scan_batch.length,
        "R5_floor_flops": _scan_floor_flops(vlm, scan_batch.length, lay.eoi + 1, len(side) + 1),
        "scan_positions_per_s": len(side) / med["R5"],
        "naive": {
            "R1": med["R1_naive"] / med["plain"],
            "R2": med["R2_naive"] / med["plain"],
            "R3_time": med["R3_naive"] / med["plain"],
            "R3_memory": mem_naive / mem_plain,
            "R5": float(
                len(side) + 1
            ),  # one forward per position and the baseline (not run: it is that by construction)
        },
        "plain_forward_s": med["plain"],
        "engine_forward_s": med["forward"],
        "plain_generate_s": med["plain_generate"],
        "sequence_length": batch.length,
        "n_layers": L,
        "config": args.config,
        "memory_budget": args.memory_budget or "auto",
        "dtype": dtype,
        "targets": dict(TARGETS),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
    }
    print(
        f"machine: {result['machine']}; sequence {batch.length} tokens, {L} layers, plain forward "
        f"{med['plain']:.3f} s, plain generate {med['plain_generate']:.3f} s"
    )
    print(f"{'ratio':<10} {'measured':>9} {'target':>8} {'naive':>8}")
    for k, target in TARGETS.items():
        naive = result["naive"].get(k)
        naive_text = f"{naive:8.2f}" if naive is not None else "       -"
        flag = "ok" if result[k] <= target else "MISSED"
        print(f"{k:<10} {result[k]:9.2f} {target:8.2f} {naive_text}  {flag}")
    print("R6 per site: " + ", ".join(f"{k} {v:.3f}" for k, v in result["R6_sites"].items()))
    print(
        f"gate scan: {len(side)} image-side positions, {result['scan_suffix_tokens']} text tokens after [EOI] "
        f"(floor {result['R5_floor']:.2f} forwards by tokens, {result['R5_floor_flops']:.2f} by FLOPs), "
        f"{result['scan_positions_per_s']:.1f} positions/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
