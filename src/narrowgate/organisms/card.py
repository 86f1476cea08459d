"""The training card saved next to each organism: ``card.json`` (everything) and ``CARD.md`` (readable)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
import transformers

from .common import TASK_MIX, THREADS


def weights_bytes(out_dir) -> int:
    return sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))


def make_card(kind: str, recipe: list[str], info: dict, scores: dict | None, *, seed: int, seconds: float,
              out_dir) -> dict:
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
            "prompts": "the experiments' VQA, caption and class prompts (narrowgate.analyses.prompts)",
        },
        **info,
        "train_seconds": round(seconds, 1),
        "machine": {"cpu_threads": THREADS, "cpus": os.cpu_count(), "platform": platform.platform()},
        "weights_bytes": weights_bytes(out_dir),
        "heldout": scores,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def render_markdown(card: dict) -> str:
    lines = [f"# Model organism: {card['kind']}", "", f"Architecture: {card['architecture']}", "", "## Recipe", ""]
    lines += [f"{i}. {step}" for i, step in enumerate(card["recipe"], 1)]
    lines += ["", "## Training", "", f"Seed {card['seed']}; {card['data']['training_images']} training images "
              f"from {card['data']['training_stream']}; task mix {card['data']['task_mix']}; "
              f"{card['data']['prompts']}.", "",
              "| phase | steps | batch | lr | first loss | final loss | seconds |", "|---|---|---|---|---|---|---|"]
    for name, p in card["phases"].items():
        lines.append(f"| {name} | {p['steps']} | {p['batch_size']} | {p['lr']} | {p['first_loss']} | "
                     f"{p['final_loss']} | {p['seconds']} |")
    lines += ["", f"Parameters: {card['parameters']}; weights {card['weights_bytes'] / 1e6:.2f} MB (safetensors); "
              f"total training time {card['train_seconds']} s on {card['machine']['cpu_threads']} CPU threads "
              f"({card['machine']['cpus']} cores, {card['machine']['platform']}).", ""]
    h = card.get("heldout")
    if h:
        v, c, k = h["vqa"], h["captions"], h["classes"]
        lines += ["## Held-out scores", "", h["data"], "", "| task | metric | score | chance | n |",
                  "|---|---|---|---|---|",
                  f"| VQA | VQAv2 accuracy | {v['accuracy']} | {v['chance']} | {v['n']} |"]
        for kind, s in v["by_kind"].items():
            lines.append(f"| VQA ({kind}) | VQAv2 accuracy | {s['accuracy']} | {s['chance']} | {s['n']} |")
        lines += [f"| captions | CIDEr-D | {c['cider']} | {c['chance']} | {c['n']} |",
                  f"| classes (\"{k['prompt']}\") | top-1 next token | {k['accuracy']} | {k['chance']} | {k['n']} |",
                  "", f"Caption chance: {c['chance_is']}. Captions naming the right attribute: "
                  f"{c['names_attribute']}.", "", "Examples:", ""]
        lines += [f"- {e['question']} -> `{e['prediction']}` (answer: {e['answer']})" for e in v["examples"]]
        lines += [f"- caption -> `{e['prediction']}` (reference: {e['references'][0]})" for e in c["examples"]]
    if card.get("gate"):
        lines += ["", "## Gate checks (stock checkpoint, no intervention unless named)", "", *gate_lines(card["gate"])]
    for attempt in card.get("attempts", ()):
        lines += ["", f"### Attempt {attempt['name']}", "", attempt["recipe"], "", *gate_lines(attempt["gate"]), "",
                  f"Outcome: {attempt['outcome']}"]
    return "\n".join(lines) + "\n"


def gate_lines(gate: dict) -> list[str]:
    """The gate checks as a table: each condition's scores, relative to baseline over chance."""
    lines = [f"Held-out sizes {gate['sizes']}; knockouts in {gate['mode']}; relative = (score - chance) / "
             "(baseline - chance).", "", "| condition | VQA | captions (CIDEr-D) | classes | mean relative |",
             "|---|---|---|---|---|"]
    for name, row in gate["conditions"].items():
        cells = [f"{row[t]['score']} ({row[t]['relative']})" for t in ("vqa", "captions", "classes")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean_relative']} |")
    return lines


def write_card(out_dir, card: dict) -> None:
    out = Path(out_dir)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "CARD.md").write_text(render_markdown(card))
