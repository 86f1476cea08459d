"""The training card saved next to each organism: ``card.json`` (everything) and ``CARD.md`` (readable)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
import transformers

from .common import TASK_MIX, THREADS

#: How far a retrained organism's held-out scores may lie from the shipped card's (absolute). Weights are
#: bit-identical only on the same CPU model, thread count and versions; on another machine floating-point
#: reductions run in another order and the weights differ, but the recipe's scores stay within these bounds
#: (one retraining of the native organism on another machine moved CIDEr-D 5.70 -> 5.48, classes
#: 0.775 -> 0.817, VQA not at all).
TOLERANCE = {"vqa": 0.05, "captions": 0.5, "classes": 0.1}


def heldout_scores(card: dict) -> dict[str, float]:
    """The three headline held-out scores of a card: VQA accuracy, CIDEr-D, class top-1."""
    h = card["heldout"]
    return {"vqa": h["vqa"]["accuracy"], "captions": h["captions"]["cider"], "classes": h["classes"]["accuracy"]}


def outside_tolerance(reference: dict, card: dict) -> dict[str, tuple[float, float]]:
    """Scores of ``card`` further from ``reference``'s than `TOLERANCE` allows: {task: (reference, got)}."""
    ref, got = heldout_scores(reference), heldout_scores(card)
    return {t: (ref[t], got[t]) for t in TOLERANCE if abs(ref[t] - got[t]) > TOLERANCE[t]}


def cpu_model() -> str:
    """The CPU's model name (bit-identical retraining needs the same one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weights_bytes(out_dir: str | Path) -> int:
    """The size of the organism's weight files in ``out_dir`` (the card records it)."""
    return sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))


def make_card(
    kind: str, recipe: list[str], info: dict, scores: dict | None, *, seed: int, seconds: float, out_dir
) -> dict:
    """The card of an organism trained in ``out_dir``: recipe, data, what training reports (``info``, whose
    ``architecture`` is taken out of it), held-out ``scores``, and the machine and versions it was trained on."""
    return {
        "kind": kind,
        "architecture": info.pop("architecture"),
        "recipe": recipe,
        "seed": seed,
        "data": {
            "training_images": info["config"]["n_images"],
            "training_stream": f"narrowgate.organisms.common.training_scenes(n, seed={seed}) "
            "(64x64 synthetic scenes: shape x colour x 3x3 position)",
            "task_mix": TASK_MIX,
            "prompts": "the experiments' VQA, caption and class prompts (narrowgate.data.prompts)",
        },
        **info,
        "train_seconds": round(seconds, 1),
        "machine": {
            "cpu_threads": THREADS,
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
        },
        "weights_bytes": weights_bytes(out_dir),
        "heldout": scores,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def render_markdown(card: dict) -> str:
    """``CARD.md``: the card for a reader: recipe, training phases, held-out scores, gate checks and attempts."""
    lines = [f"# Model organism: {card['kind']}", "", f"Architecture: {card['architecture']}", "", "## Recipe", ""]
    lines += [f"{i}. {step}" for i, step in enumerate(card["recipe"], 1)]
    lines += [
        "",
        "## Training",
        "",
        f"Seed {card['seed']}; {card['data']['training_images']} training images "
        f"from {card['data']['training_stream']}; task mix {card['data']['task_mix']}; "
        f"{card['data']['prompts']}.",
        "",
        "Config: " + ", ".join(f"{k} {v}" for k, v in card["config"].items()) + ".",
        "",
        "| phase | steps | batch | lr | first loss | final loss | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in card["phases"].items():
        lines.append(
            f"| {name} | {p['steps']} | {p['batch_size']} | {p['lr']} | {p['first_loss']} | "
            f"{p['final_loss']} | {p['seconds']} |"
        )
    lines += [
        "",
        f"Parameters: {card['parameters']}; weights {card['weights_bytes'] / 1e6:.2f} MB (safetensors); "
        f"total training time {card['train_seconds']} s on {card['machine']['cpu_threads']} CPU threads "
        f"({card['machine']['cpus']} cores, {card['machine']['platform']}).",
        "",
    ]
    h = card.get("heldout")
    if h:
        v, c, k = h["vqa"], h["captions"], h["classes"]
        lines += [
            "## Held-out scores",
            "",
            h["data"],
            "",
            "| task | metric | score | chance | n |",
            "|---|---|---|---|---|",
            f"| VQA | VQAv2 accuracy | {v['accuracy']} | {v['chance']} | {v['n']} |",
        ]
        for kind, s in v["by_kind"].items():
            lines.append(f"| VQA ({kind}) | VQAv2 accuracy | {s['accuracy']} | {s['chance']} | {s['n']} |")
        lines += [
            f"| captions | CIDEr-D | {c['cider']} | {c['chance']} | {c['n']} |",
            f'| classes ("{k["prompt"]}") | top-1 next token | {k["accuracy"]} | {k["chance"]} | {k["n"]} |',
            "",
            f"Caption chance: {c['chance_is']}. Captions naming the right attribute: {c['names_attribute']}.",
            "",
            "Examples:",
            "",
        ]
        lines += [f"- {e['question']} -> `{e['prediction']}` (answer: {e['answer']})" for e in v["examples"]]
        lines += [f"- caption -> `{e['prediction']}` (reference: {e['references'][0]})" for e in c["examples"]]
    if card.get("gate"):
        lines += ["", "## Gate checks (stock checkpoint, no intervention unless named)", "", *gate_lines(card["gate"])]
    for attempt in card.get("attempts", ()):
        lines += [
            "",
            f"### Attempt {attempt['name']}",
            "",
            attempt["recipe"],
            "",
            *gate_lines(attempt["gate"]),
            "",
            f"Outcome: {attempt['outcome']}",
        ]
    return "\n".join(lines) + "\n"


def gate_lines(gate: dict) -> list[str]:
    """The gate checks as a table: each condition's scores, relative to baseline over chance."""
    lines = [
        f"Held-out sizes {gate['sizes']}; knockouts in {gate['mode']}; relative = (score - chance) / "
        "(baseline - chance).",
        "",
        "| condition | VQA | captions (CIDEr-D) | classes | mean relative |",
        "|---|---|---|---|---|",
    ]
    for name, row in gate["conditions"].items():
        cells = [f"{row[t]['score']} ({row[t]['relative']})" for t in ("vqa", "captions", "classes")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean_relative']} |")
    return lines


def write_card(out_dir: str | Path, card: dict) -> None:
    """Write ``card.json`` and ``CARD.md`` into ``out_dir``."""
    out = Path(out_dir)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "CARD.md").write_text(render_markdown(card))
