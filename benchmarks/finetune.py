"""Fine-tuning benchmark: step time and peak memory of the `remove-gate` recipe on a Chameleon-shaped model.

The model has random weights and the real layout (1,024 image tokens from a 128 x 128 image); the data
is the synthetic VQA/caption stream, so nothing is downloaded. It runs `narrowgate.finetune` itself (LoRA
rank 128 / alpha 256, [EOI] -> text knocked out while training, gradient accumulation over micro-batches),
a few optimiser steps of ``--batch-size`` examples each, and reports seconds per step, seconds per example
and peak memory (CUDA allocator peak on a GPU, peak RSS rise on a CPU).

    python benchmarks/finetune.py --config 7b [--steps 3] [--batch-size 16] [--micro-batch 4] [--json FILE]

``--config 7b`` is Chameleon-7B's shape (hidden 4,096, 32 layers, 32 heads, MLP 11,008, vocabulary
65,536) in bf16 and needs a GPU (about 15 GB of weights, plus LoRA, optimiser and activations); ``small`` is
the engine benchmark's CPU model; ``tiny`` checks the script itself in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
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
from narrowgate.finetune import finetune  # noqa: E402
from tests.fixtures import chameleon  # noqa: E402

CONFIGS = {
    "tiny": dict(crop=32, hidden=64, layers=2, heads=4, kv_heads=4),
    "small": dict(crop=128, hidden=512, layers=10, heads=8, kv_heads=8),
    "7b": dict(crop=128, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=65536),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps (the first one is timed apart)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimiser step")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples per forward/backward")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.config == "7b" and not cuda:
        parser.error("--config 7b needs a GPU.")
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model, processor = chameleon.make(0, **CONFIGS[args.config])
    torch.set_default_dtype(torch.float32)
    vlm = ng.VLM(model.eval(), processor)
    examples = args.batch_size * args.steps + 8
    with tempfile.TemporaryDirectory() as out:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
        t0 = time.perf_counter()
        card = finetune(
            f"chameleon-{args.config} (random weights)",
            "remove-gate",
            {"synthetic": None},
            out,
            samples={"synthetic": examples},
            steps=args.steps,
            batch_size=args.batch_size,
            micro_batch=args.micro_batch,
            heldout=4,
            gradient_checkpointing=args.gradient_checkpointing,
            progress=False,
            vlm=vlm,
            command=["benchmarks/finetune.py", *(argv or sys.argv[1:])],
        )
        total = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib()
    seconds = card["train_seconds_this_session"]
    result = {
        "config": args.config,
        "shape": CONFIGS[args.config],
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "image_tokens": (CONFIGS[args.config]["crop"] // 4) ** 2,
        "steps": card["steps"],
        "batch_size": args.batch_size,
        "micro_batch": args.micro_batch,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seconds_per_step": round(seconds / card["steps"], 3),
        "seconds_per_example": round(seconds / (card["steps"] * args.batch_size), 4),
        "peak_memory_mib": round(peak, 1),
        "memory_before_training_mib": round(weights, 1),
        "loss_first_final": [card["loss"]["first"], card["loss"]["final"]],
        "wall_seconds_with_heldout_scoring": round(total, 1),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
