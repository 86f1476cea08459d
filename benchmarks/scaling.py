"""Scaling: every analysis at the image sizes real models use, each measured against a plain forward of the same size.

Model: the Chameleon architecture with random weights (tests/fixtures/chameleon.py), the prompt "This animal is
a" after an image of 576, 1,024, 4,096 or 16,384 tokens (crops of 96 to 512 pixels; Chameleon and Emu3 use
1,024, LLaVA-1.5 576, Pixtral-12B up to 4,096, Qwen2-VL up to 16,384). Analyses (JSON names):

  forward                 the plain forward, as ``generate`` runs its prefill: key/value cache kept, last logits only
  ablation                baseline + eoi / image / last_image -> text knocked out (`VLM.forward_conditions`)
  patching                baseline + the [EOI] residual patched at every residual index 0..L-1
  gate_scan               the exact gate scan: every image-side position -> text knocked out alone (mask mode),
                          as `narrowgate run gate-scan` runs it (sparse sources, KL to the baseline pass by pass)
  gate_scan_attribution   the first-order scan (`VLM.attribute`: one suffix forward + backward)
  stats                   the cross-modal attention statistics (`attention_stats=True`)
  generate_knockout       20 new tokens with [EOI] -> text knocked out (`VLM.generate`)
  capture                 residuals of every role present, at every residual index (the overlap capture)

Each size runs in a fresh child process that builds the model in memory. The image is tokenized once by the VQ
encoder and given as token ids (`decoder_only`), so every measured call, the plain forward included, runs the
decoder alone. Time: wall seconds (the fastest of
``--repeats``) after a warm-up of every analysis on a 64-token image; the rows also give the ratio of CPU seconds
(``cpu_time_ratio``), which other load on the machine disturbs less (wall ratios need a quiet machine). Memory: on CPU the rise of the child's peak
RSS above its RSS before the call (VmHWM, reset through /proc/self/clear_refs; before each call glibc returns the
free memory it holds, malloc_trim, and it returns every block of 1 MiB or more as soon as it is freed,
MALLOC_MMAP_THRESHOLD_, so the RSS follows what is live); on a GPU the CUDA allocator's peak above what was
allocated before. Both as ratios to the plain forward of the same size, with the log-log slope
of each analysis's time against the number of image tokens.

Configs (``--config``):
  cpu   (default, <= 15 minutes on 2 quiet cores) two series, depth reduced to 1 decoder layer:
        "real width": hidden 4,096, 32 heads over 8 key/value heads, MLP 11,008, at 576 and 1,024 image tokens;
        "reduced width": hidden 1,024, 8 heads over 2 key/value heads (head size 128, as above), MLP 2,752, at all
        four sizes (4,096 and 16,384 tokens at hidden 4,096 would take hours on 2 cores). The slopes are the
        reduced-width series' (the only one that spans every size).
  7b    (a GPU) the full Chameleon-7B shape in bfloat16: 32 layers, hidden 4,096, 32 heads, MLP 11,008,
        vocabulary 65,536, at all four sizes.
  tiny  a minute: hidden 256, MLP 2,048, 2 layers, 64 and 256 image tokens (the test suite runs it; its ratios
        mean little: fixed costs dominate at this size).

    python benchmarks/scaling.py [--config cpu|7b|tiny] [--json FILE] [--figure FILE.png] [--repeats N]
                                 [--analyses NAME,...] [--sizes N,...]

``--analyses`` measures only these (the plain forward always runs: the ratios are to it), ``--sizes`` only these
image-token counts of the config's series (e.g. ``--analyses gate_scan --sizes 16384``: one row and its forward).

``--json`` writes {"rows": [{"analysis", "image_tokens", "time_ratio", "memory_ratio", ...}], "slopes":
{analysis: slope}, ...}; ``--figure`` draws time and peak memory against image tokens, log-log, one line per
analysis (solid: the series the slopes come from; dashed: the other).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from narrowgate import threads

threads.configure()  # before torch loads: idle OpenMP threads sleep (narrowgate.threads)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANALYSES = (
    "forward",
    "ablation",
    "patching",
    "gate_scan",
    "gate_scan_attribution",
    "stats",
    "generate_knockout",
    "capture",
)
PROMPT = "This animal is a"
NEW_TOKENS = 20
#: glibc: blocks of this size or more are mapped apart and returned at once when freed (RSS follows live memory).
MMAP_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class Series:
    """One model shape measured at several image sizes."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    sizes: tuple[int, ...]
    vocab: int | None = None  # None: the fixture tokenizer's (a few hundred tokens)


CONFIGS = {
    "cpu": (
        Series("real width", 4096, 32, 8, 11008, 1, (576, 1024)),
        Series("reduced width", 1024, 8, 2, 2752, 1, (576, 1024, 4096, 16384)),
    ),
    "7b": (Series("Chameleon-7B", 4096, 32, 32, 11008, 32, (576, 1024, 4096, 16384), vocab=65536),),
    "tiny": (Series("tiny", 256, 4, 2, 2048, 2, (64, 256)),),
}
#: The series whose slopes the summary reports, per config (the one spanning every size).
SLOPE_SERIES = {"cpu": "reduced width", "7b": "Chameleon-7B", "tiny": "tiny"}


def crop_of(image_tokens: int) -> int:
    """The image side in pixels that Chameleon's VQ tokenizer (4x downsampling) turns into ``image_tokens`` tokens."""
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise SystemExit(f"image tokens must be a square number (a square image), got {image_tokens}")
    return 4 * side


# --- the child: one model, one image size, every analysis ---------------------------------------------------------
def _image(side: int):
    from PIL import Image

    return Image.effect_noise((side, side), 64).convert("RGB")


def decoder_only(vlm, batch):
    """``batch`` with its image written as the VQ tokenizer's token ids, without pixels: every measured call runs the
    decoder alone. Chameleon reads its image as tokens of its vocabulary, so the forward is the same (checked on
    the warm-up image); the fixture's VQ encoder downsamples 4x where Chameleon's downsamples 16x, and at 16,384
    tokens its own attention block would hold a 16,384 x 16,384 map that no real checkpoint has."""
    from narrowgate.batch import Batch

    with torch.no_grad():
        tokens = vlm.model.model.get_image_tokens(vlm.model_inputs(batch)["pixel_values"]).cpu()
    ids = batch.input_ids.clone()
    ids[ids == vlm.model.model.vocabulary_mapping.image_token_id] = tokens.flatten().to(ids.dtype)
    inputs = {**{k: v for k, v in batch.inputs.items() if k != "pixel_values"}, "input_ids": ids}
    return Batch(inputs=inputs, layouts=batch.layouts, first=batch.first, bos_id=batch.bos_id)


def workloads(vlm, batch) -> dict:
    """The analyses on ``batch`` as functions of nothing (what they need beforehand is prepared here)."""
    import narrowgate as ng
    from narrowgate.analyses.gate_scan import side_positions, sources
    from narrowgate.engine.shared import Condition
    from narrowgate.metrics.scores import kl
    from narrowgate.roles import ROLE_NAMES

    lay = batch.layouts[0]
    inputs = vlm.model_inputs(batch)
    L = vlm.n_layers
    knockouts = [ng.Knockout("eoi", "text"), ng.Knockout("image", "text"), ng.Knockout("last_image", "text")]
    suite = [Condition("baseline")] + [Condition(k.name, knockouts=(k,)) for k in knockouts]
    donor = vlm.forward(batch, capture=ng.Capture("eoi")).residuals["eoi"].flip(-1)  # another residual, same scale
    sweep = [Condition("baseline")] + [
        Condition(f"patch@{l}", patches=(ng.Patch("eoi", l, donor[:, l]),)) for l in range(L)
    ]
    roles = tuple(r for r in ROLE_NAMES if all(len(p) for p in batch.positions(r)))
    positions = [p for p, _, _ in side_positions(lay)]

    @torch.no_grad()
    def forward():
        vlm.model(**inputs, use_cache=True, **vlm._keep_last())

    def gate_scan():
        prefix = vlm.share_prefix(batch, lay.eoi + 1)
        base = vlm.forward_knockouts(prefix, sources([[]], batch.length))[0, 0]
        own = int(base.argmax())
        vlm.forward_knockouts(
            prefix,
            sources([[p] for p in positions], batch.length),
            reduce=lambda x: torch.stack([kl(base, x[:, 0]), x[:, 0].log_softmax(-1)[:, own]], 1),
        )

    return {
        "forward": forward,
        "ablation": lambda: vlm.forward_conditions(batch, suite),
        "patching": lambda: vlm.forward_conditions(batch, sweep),
        "gate_scan": gate_scan,
        "gate_scan_attribution": lambda: vlm.attribute(vlm.share_prefix(batch, lay.eoi + 1)),
        "stats": lambda: vlm.forward_conditions(batch, [Condition("baseline")], attention_stats=True),
        "generate_knockout": lambda: vlm.generate(
            batch, knockouts=[knockouts[0]], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        ),
        "capture": lambda: vlm.forward_conditions(batch, [Condition("baseline")], capture=ng.Capture(roles)),
    }


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_free_memory() -> None:
    """Give the free memory glibc still holds back to the OS (``malloc_trim``), so that a call reusing it counts."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def measure(fn, device) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the process, peak bytes above the level before the call) of one call of ``fn``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        torch.cuda.synchronize()
        peak = float(torch.cuda.max_memory_allocated() - before)
        return time.perf_counter() - start, time.process_time() - cpu, peak
    _release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = _status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, float((_status_kib("VmHWM") - before) * 1024)


def child(spec: dict) -> dict:
    """Build the model of ``spec``, warm every analysis up on a small image, then measure each at the real size."""
    import narrowgate as ng
    from tests.fixtures import chameleon

    cuda = torch.cuda.is_available() and spec["device"] == "cuda"
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    crop = crop_of(spec["image_tokens"])
    shape = dict(hidden=spec["hidden"], layers=spec["layers"], heads=spec["heads"], kv_heads=spec["kv_heads"])
    shape.update(intermediate=spec["intermediate"], vocab=spec["vocab"])
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model, processor = chameleon.make(0, crop=crop, **shape)
        _, small = chameleon.make(0, crop=min(crop, 32), hidden=16, layers=1, heads=2, kv_heads=1)
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    vlm = ng.VLM(model.eval(), processor)
    batch = decoder_only(vlm, vlm.prepare([_image(crop)], [PROMPT]))
    warm = ng.VLM(model, small)  # the same model read through a processor for a 64-token image
    pixels = warm.prepare([_image(min(crop, 32))], [PROMPT])
    tokens = decoder_only(warm, pixels)
    with torch.no_grad():
        same = [warm.model(**warm.model_inputs(b)).logits[:, -1] for b in (pixels, tokens)]
    if not torch.allclose(*same, atol=1e-4, rtol=1e-4):
        raise SystemExit("the image as token ids does not give the forward of the image as pixels")
    chosen = spec.get("analyses") or ANALYSES
    for name, fn in workloads(warm, tokens).items():
        if name in chosen:
            fn()
    warm.close()
    runs = {name: fn for name, fn in workloads(vlm, batch).items() if name in chosen}
    out = {name: {"seconds": math.inf, "cpu_seconds": math.inf, "peak_bytes": 0.0} for name in runs}
    for _ in range(spec["repeats"]):
        for name, fn in runs.items():
            seconds, cpu, peak = measure(fn, device)
            out[name]["seconds"] = min(out[name]["seconds"], seconds)
            out[name]["cpu_seconds"] = min(out[name]["cpu_seconds"], cpu)
            out[name]["peak_bytes"] = max(out[name]["peak_bytes"], peak)
    from narrowgate.analyses.gate_scan import side_positions

    return {
        "analyses": out,
        "sequence_length": batch.length,
        "scan_positions": len(side_positions(batch.layouts[0])),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


# --- the parent: every size in its own process, then ratios and slopes ------------------------------------------
def run_child(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["device"] == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"the {spec['image_tokens']}-token measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def rows_of(series: Series, size: int, measured: dict) -> list[dict]:
    plain = measured["analyses"]["forward"]
    rows = []
    for name in (a for a in ANALYSES if a in measured["analyses"]):
        m = measured["analyses"][name]
        rows.append(
            {
                "analysis": name,
                "image_tokens": size,
                "time_ratio": m["seconds"] / plain["seconds"],
                "memory_ratio": m["peak_bytes"] / plain["peak_bytes"] if plain["peak_bytes"] > 0 else math.nan,
                "seconds": m["seconds"],
                "cpu_time_ratio": m["cpu_seconds"] / plain["cpu_seconds"],
                "peak_mib": m["peak_bytes"] / 2**20,
                "series": series.name,
                "hidden": series.hidden,
                "heads": series.heads,
                "kv_heads": series.kv_heads,
                "layers": series.layers,
                "sequence_length": measured["sequence_length"],
                "scan_positions": measured["scan_positions"],
            }
        )
    return rows


def print_table(rows: list[dict], series: Series) -> None:
    mine = [r for r in rows if r["series"] == series.name]
    if not mine:
        return
    sizes = sorted({r["image_tokens"] for r in mine})
    plain = {r["image_tokens"]: r for r in mine if r["analysis"] == "forward"}
    print(
        f"\n{series.name}: hidden {series.hidden}, {series.heads} heads / {series.kv_heads} key-value heads, "
        f"MLP {series.intermediate}, {series.layers} layer(s)"
    )
    print(
        "plain forward: "
        + ", ".join(f"{s} tokens {plain[s]['seconds']:.2f} s, {plain[s]['peak_mib']:.0f} MiB" for s in sizes)
    )
    print(f"{'analysis':<22}" + "".join(f"{f'{s} time / mem':>22}" for s in sizes))
    for name in (a for a in ANALYSES if any(r["analysis"] == a for r in mine)):
        cells = {r["image_tokens"]: r for r in mine if r["analysis"] == name}
        print(
            f"{name:<22}"
            + "".join(f"{cells[s]['time_ratio']:>13.2f} / {cells[s]['memory_ratio']:<6.2f}" for s in sizes)
        )
    scan = {r["image_tokens"]: r for r in mine if r["analysis"] == "gate_scan"}
    if scan:
        print(
            "gate scan, ms per position: "
            + ", ".join(f"{s}: {1000 * scan[s]['seconds'] / scan[s]['scan_positions']:.2f}" for s in sizes)
        )


def figure(rows: list[dict], slopes_from: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(ANALYSES):
        for series in sorted({r["series"] for r in rows}):
            pts = sorted((r["image_tokens"], r) for r in rows if r["analysis"] == name and r["series"] == series)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            style = "-o" if series == slopes_from else "--s"
            label = name if series == slopes_from else None
            a.plot(xs, [r["seconds"] for _, r in pts], style, color=colors(i), ms=4, label=label)
            b.plot(xs, [r["peak_mib"] for _, r in pts], style, color=colors(i), ms=4, label=label)
    a.set(xscale="log", yscale="log", xlabel="image tokens", ylabel="seconds", title="time")
    b.set(xscale="log", yscale="log", xlabel="image tokens", ylabel="peak working memory (MiB)", title="memory")
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[tuple[str, ...], set[int]]:
    """The analyses (the plain forward always among them) and image sizes that ``--analyses`` / ``--sizes`` ask for."""
    analyses = ANALYSES
    if args.analyses:
        asked = {a.strip() for a in args.analyses.split(",") if a.strip()}
        unknown = sorted(asked - set(ANALYSES))
        if unknown:
            parser.error(f"--analyses: unknown {', '.join(unknown)}; choose from {', '.join(ANALYSES)}.")
        analyses = tuple(a for a in ANALYSES if a == "forward" or a in asked)
    offered = sorted({n for series in CONFIGS[args.config] for n in series.sizes})
    if not args.sizes:
        return analyses, set(offered)
    try:
        sizes = {int(n) for n in args.sizes.split(",") if n.strip()}
    except ValueError:
        parser.error(f"--sizes takes comma-separated image-token counts, got {args.sizes!r}.")
    if not sizes or not sizes <= set(offered):
        parser.error(f"--sizes: config {args.config} measures {', '.join(map(str, offered))} image tokens.")
    return analyses, sizes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--figure", help="draw time and memory against image tokens (log-log) into this file")
    parser.add_argument("--repeats", type=int, default=1, help="runs per analysis; the fastest counts")
    parser.add_argument(
        "--analyses", help=f"comma-separated, of {', '.join(ANALYSES)} (default: all; forward always runs)"
    )
    parser.add_argument("--sizes", help="comma-separated image-token counts of the config's series (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.config == "7b" and device != "cuda":
        parser.error("--config 7b needs a GPU.")
    analyses, sizes = selection(parser, args)
    start = time.perf_counter()
    rows, infos = [], []
    for series in CONFIGS[args.config]:
        for size in (n for n in series.sizes if n in sizes):
            spec = {**asdict(series), "image_tokens": size, "repeats": args.repeats, "device": device}
            spec["analyses"] = list(analyses)
            spec.pop("name"), spec.pop("sizes")
            measured = run_child(spec)
            rows += rows_of(series, size, measured)
            infos.append(measured)
            print(
                f"measured {series.name}, {size} image tokens ({time.perf_counter() - start:.0f} s so far)", flush=True
            )
    name = SLOPE_SERIES[args.config]
    slopes_by_series = {}
    for series in CONFIGS[args.config]:
        if len({r["image_tokens"] for r in rows if r["series"] == series.name}) > 1:
            slopes_by_series[series.name] = {
                a: slope(
                    [r["image_tokens"] for r in rows if r["series"] == series.name and r["analysis"] == a],
                    [r["seconds"] for r in rows if r["series"] == series.name and r["analysis"] == a],
                )
                for a in analyses
            }
    total = time.perf_counter() - start
    machine = (
        f"{infos[0]['device']}, {os.cpu_count()} CPUs, {infos[0]['threads']} threads, torch {torch.__version__}, "
        f"{infos[0]['dtype']}"
    )
    result = {
        "rows": rows,
        "slopes": slopes_by_series.get(name, {}),
        "slopes_series": name,
        "slopes_by_series": slopes_by_series,
        "config": args.config,
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "total_seconds": total,
    }
    print(f"\nmachine: {machine}; {result['date']}; {total:.0f} s in all")
    for series in CONFIGS[args.config]:
        print_table(rows, series)
    if result["slopes"]:
        print(f"\nlog-log slope of time against image tokens ({name}):")
        for a in analyses:
            print(f"  {a:<22} {result['slopes'][a]:.2f}")
    worst = max(rows, key=lambda r: -1.0 if math.isnan(r["memory_ratio"]) else r["memory_ratio"])
    print(
        f"largest memory ratio: {worst['memory_ratio']:.2f} ({worst['analysis']}, {worst['image_tokens']} tokens, "
        f"{worst['series']}); goal <= 1.5"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.figure:
        figure(rows, name, args.figure, f"{machine}, {result['date']}")
    return result


if __name__ == "__main__":
    main()
