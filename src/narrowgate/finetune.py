"""``narrowgate finetune``: LoRA fine-tuning with interventions active, and the paper's two recipes.

A run flows: recipe + overrides -> data mixture (seeded; a held-out slice set aside) -> LoRA on
the language model's linear layers (peft) -> held-out scores before -> optimisation (gradient
accumulation, knockouts active through `VLM.intervening`, resumable checkpoints) -> held-out scores
after -> adapter (safetensors), optionally the merged model as a normal checkpoint directory,
and a training card. The run directory follows the experiments' conventions (``manifest.json``,
``failures/``, ``tables/``); rerunning the same command on it resumes from the last checkpoint.

Recipes (the paper's reproducibility sheet, rows "Dataset Splits" and "Experiment Setup"):

- ``understanding`` (Emu3-Gen -> image understanding, SM 7.1): LoRA rank 64, alpha 16, Adam
  without weight decay, cosine from 5e-5, batch 64, one epoch, on 37.5k VQAv2 + MS-COCO-2014
  training samples and 150k LLaVA-Instruct-150K conversations.
- ``remove-gate`` (Chameleon-7B, Emu3): LoRA rank 128, alpha 256, Adam with weight decay 0.1, cosine
  from 2e-5, batch 128, one epoch, on 7.5k LLaVA-Instruct-150K + 7.5k VQAv2 train samples, with the
  [EOI]->text knockout active while training. *Inference:* the sheet gives the data and the
  hyper-parameters but not the training-time intervention; training with [EOI]->text knocked out
  (zero mode, every layer) is our reading of "removing the narrow gate".

Also inferred where the sheet is silent: the 37.5k VQAv2 + COCO samples are split evenly; LoRA
targets every linear layer of the language model, without dropout; "Adam with weight decay" is
AdamW (decoupled, as the Hugging Face trainer uses); gradients are clipped at norm 1 (its default);
the cosine schedule decays to zero with no warm-up.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .analyses.base import Ranks, model_info
from .analyses.prompts import CAPTION, VQA
from .data import BadExample
from .deprecation import dependency_deprecations_hidden
from .engine.interventions import Knockout
from .progress import progress_bar
from .store import RunStore

SOURCES = ("llava-instruct", "vqav2", "coco", "synthetic")


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters and data mixture (examples per source) of one fine-tuning recipe."""

    rank: int
    alpha: int
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int = 1
    mixture: dict = field(default_factory=dict)
    knockouts: tuple[str, ...] = ()


RECIPES = {
    "understanding": Recipe(
        rank=64,
        alpha=16,
        lr=5e-5,
        weight_decay=0.0,
        batch_size=64,
        mixture={"vqav2": 18750, "coco": 18750, "llava-instruct": 150000},
    ),
    "remove-gate": Recipe(
        rank=128,
        alpha=256,
        lr=2e-5,
        weight_decay=0.1,
        batch_size=128,
        mixture={"llava-instruct": 7500, "vqav2": 7500},
        knockouts=("eoi->text",),
    ),
}


@dataclass(frozen=True)
class Item:
    """One training example: where it comes from, its image source, the prompt and the answer to learn."""

    source: str
    example: object
    prompt: str
    answer: str

    @property
    def id(self) -> str:
        return f"{self.source}:{self.example.id}"


# --- data ----------------------------------------------------------------------------------------
def _items(source: str, path: str | None, n: int, seed: int) -> list[Item]:
    """``n`` seeded examples of ``source`` as prompt/answer pairs in the experiments' prompt formats."""
    from . import data
    from .analyses.tasks import _find
    from .data.llava_instruct import load_llava_instruct

    if source == "synthetic":  # a seed stream of its own, apart from the experiments' held-out data
        half = n // 2
        vqa = data.synthetic_vqa(n - half, seed + 1000)
        caps = data.synthetic_captions(half, seed + 2000)
        return [Item(source, e, VQA.format(question=e.question), e.answers[0]) for e in vqa] + [
            Item(source, e, CAPTION, e.references[0]) for e in caps
        ]
    if path is None:
        raise ValueError(f"--data {source} needs a path: --data {source}=DIR.")
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"--data {source}={root}: no such file or directory.")
    if source == "llava-instruct":
        return [Item(source, e, e.prompt, e.answer) for e in load_llava_instruct(root, n=n, seed=seed)]
    if source == "vqav2":
        if root.is_dir() and (any(root.rglob("*.parquet")) or any(root.rglob("*.arrow"))):
            exs = data.load_vqav2_hf(root, split="train", n=n, seed=seed)
        else:
            exs = data.load_vqav2(root, split="train2014", n=n, seed=seed)
        return [
            Item(
                source,
                e,
                VQA.format(question=e.question),
                e.meta.get("multiple_choice_answer") or max(set(e.answers), key=e.answers.count),
            )
            for e in exs
            if e.answers
        ]
    if source == "coco":
        found = _find(root, ("captions_train2014.json", "**/captions_train*.json"), "COCO training caption file")
        return [Item(source, e, CAPTION, e.references[0]) for e in data.load_coco_captions(found, n=n, seed=seed)]
    raise ValueError(f"Unknown data source {source!r}; choose from {', '.join(SOURCES)}.")


def mixture(paths: dict[str, str | None], sizes: dict[str, int], seed: int) -> list[Item]:
    """The training pool: ``sizes[source]`` examples of each source, shuffled together (seeded)."""
    pool = []
    for source, path in paths.items():
        if source not in SOURCES:
            raise ValueError(f"Unknown data source {source!r}; choose from {', '.join(SOURCES)}.")
        pool += _items(source, path, sizes[source], seed)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order]


# --- scores ----------------------------------------------------------------------------------------
def _micro_batches(vlm, items: list[Item], size: int, store: RunStore | None):
    """Training batches of ``size`` loadable items; an item whose image fails is recorded and skipped."""
    for i in range(0, len(items), size):
        good, images = [], []
        for it in items[i : i + size]:
            try:
                images.append(it.example.load_image())
                good.append(it)
            except BadExample as bad:
                if store is not None:
                    store.fail(it.id, bad.reason)
        if good:
            yield good, vlm.prepare_training(images, [it.prompt for it in good], [" " + it.answer for it in good])


@torch.no_grad()
def _heldout_all(vlm, items: list[Item], conditions: dict, micro_batch: int, when: str, progress: bool) -> dict:
    """`heldout_scores` under every condition, with a progress line per condition (a 7B model takes a while)."""
    out = {}
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"held-out scores {when} training (conditions)", total=len(conditions))
        for c, ks in conditions.items():
            out[c] = heldout_scores(vlm, items, ks, micro_batch)
            bar.advance(task)
    return out


def heldout_scores(vlm, items: list[Item], knockouts=(), micro_batch: int = 8) -> dict:
    """Answer-token loss and teacher-forced top-1 accuracy on ``items``, with ``knockouts`` active."""
    training = vlm.model.training
    vlm.model.eval()
    total, correct, count = 0.0, 0, 0
    for _, tb in _micro_batches(vlm, items, micro_batch, None):
        with vlm.intervening(tb.batch, knockouts=knockouts):
            logits, labels = vlm.answer_logits(tb)
        keep = labels != -100
        lp = torch.log_softmax(logits.float(), -1)
        total += float(-lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].sum())
        correct += int((logits.argmax(-1) == labels)[keep].sum())
        count += int(keep.sum())
    vlm.model.train(training)
    if not count:
        raise ValueError("No held-out example could be loaded; the scores would be meaningless.")
    return {"loss": round(total / count, 4), "token_accuracy": round(correct / count, 4), "tokens": count}


# --- checkpoints -----------------------------------------------------------------------------------
def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_state(path: Path, model, opt, step: int, losses: list[float]) -> None:
    """Adapter weights, optimizer moments and progress, all safetensors/JSON (no pickle)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    params = _trainable(model)
    save_file({n: p.detach().cpu().contiguous() for n, p in params}, str(tmp / "weights.safetensors"))
    moments = {}
    for i, (_, p) in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            moments[f"{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    if path.exists():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    tmp.rename(path)


def _load_state(path: Path, model, opt) -> tuple[int, list[float]]:
    params = _trainable(model)
    weights = load_file(str(path / "weights.safetensors"))
    with torch.no_grad():
        for n, p in params:
            p.copy_(weights[n])
    moments = load_file(str(path / "optimizer.safetensors"))
    for i, (_, p) in enumerate(params):
        state = {k.split(".", 1)[1]: v.to(p.device) for k, v in moments.items() if k.split(".", 1)[0] == str(i)}
        if state:
            opt.state[p] = state
    state = json.loads((path / "state.json").read_text())
    return state["step"], state["losses"]


# --- the run ---------------------------------------------------------------------------------------
def lora_targets(vlm) -> list[str]:
    """Full names of every linear layer inside the language model's decoder layers."""
    ids = {id(m) for layer in vlm.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    return [n for n, m in vlm.model.named_modules() if id(m) in ids]


def finetune(
    model: str,
    recipe: str,
    data: dict[str, str | None],
    out: str | Path,
    *,
    knockouts=None,
    samples: dict[str, int] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    micro_batch: int = 4,
    lr: float | None = None,
    heldout: int = 64,
    seed: int = 42,
    dtype: str = "auto",
    device_map=None,
    gradient_checkpointing: bool = False,
    merge: bool = False,
    save_every: int = 50,
    progress: bool = True,
    vlm=None,
    command: list[str] | None = None,
) -> dict:
    """Fine-tune ``model`` with ``recipe`` on ``data`` (source -> path), writing everything under ``out``.

    ``knockouts`` (e.g. ``["eoi->text"]``) replace the recipe's; ``samples`` (source -> n) its mixture;
    ``steps`` stops early (scaled-down runs). Returns the training card.
    """
    from peft import LoraConfig, get_peft_model

    from .loading import load

    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
    if not data:
        raise ValueError("Give at least one --data SOURCE=PATH (or --data synthetic).")
    rec = RECIPES[recipe]
    rec = replace(
        rec,
        batch_size=batch_size or rec.batch_size,
        lr=lr or rec.lr,
        knockouts=tuple(knockouts) if knockouts is not None else rec.knockouts,
    )
    kos = [Knockout.parse(k) for k in rec.knockouts]
    sizes = {s: (samples or {}).get(s) or rec.mixture.get(s) for s in data}
    missing = [s for s, n in sizes.items() if not n]
    if missing:
        raise ValueError(f"The {recipe} recipe has no size for {missing}; give --samples {missing[0]}=N.")
    ranks = Ranks.from_env()
    ranks.init()
    out = Path(out)
    store = RunStore(out, rank=ranks.rank)
    vlm = vlm or load(model, dtype=dtype, device_map=device_map)
    config = {
        "model": str(model),
        "recipe": recipe,
        "hyper_parameters": asdict(rec) | {"mixture": sizes},
        "data": {s: str(p) for s, p in data.items()},
        "steps": steps,
        "heldout": heldout,
        "seed": seed,
        "micro_batch": micro_batch,
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
    }
    config = json.loads(json.dumps(config))  # as the manifest stores it, so a resume compares like with like
    store.open_manifest(
        {
            "experiment": "finetune",
            "config": config,
            "command": shlex.join(command if command is not None else sys.argv),
            "model": model_info(vlm),
        }
    )

    pool = mixture(data, sizes, seed)
    if len(pool) <= heldout:
        raise ValueError(f"Only {len(pool)} examples for {heldout} held-out ones; lower --heldout or add data.")
    held, train = pool[:heldout], pool[heldout:]
    conditions = {"baseline": ()} | {k.name: (k,) for k in kos}
    scores_path = out / "heldout-before.json"
    if scores_path.exists():
        before = json.loads(scores_path.read_text())
    else:
        before = _heldout_all(vlm, held, conditions, micro_batch, "before", progress and ranks.rank == 0)
        if ranks.rank == 0:
            scores_path.write_text(json.dumps(before, indent=1))

    lora = LoraConfig(r=rec.rank, lora_alpha=rec.alpha, lora_dropout=0.0, target_modules=lora_targets(vlm))
    torch.manual_seed(seed)  # LoRA's initialisation: the same command gives the same run
    with dependency_deprecations_hidden():  # peft reads transformers' deprecated is_gradient_checkpointing
        peft_model = get_peft_model(vlm.model, lora)
    if gradient_checkpointing:
        vlm.enable_gradient_checkpointing()
    params = [p for _, p in _trainable(peft_model)]
    opt = torch.optim.AdamW(params, lr=rec.lr, weight_decay=rec.weight_decay)
    per_epoch = math.ceil(len(train) / rec.batch_size)
    total = min(steps or per_epoch * rec.epochs, per_epoch * rec.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ckpt = out / "checkpoint"
    start, losses = _load_state(ckpt, peft_model, opt) if (ckpt / "state.json").exists() else (0, [])
    for _ in range(start):
        sched.step()

    t0 = time.perf_counter()
    vlm.model.eval()  # the frozen vision side encodes deterministically; only the decoder layers train
    for layer in vlm.layers:
        layer.train()
    with progress_bar("loss {task.fields[loss]}", disable=not progress or ranks.rank != 0) as bar:
        task = bar.add_task(f"finetune {recipe}", total=total, completed=start, loss="-")
        for step in range(start, total):
            epoch, i = divmod(step, per_epoch)
            order = np.random.default_rng(seed + epoch).permutation(len(train))
            mine = [train[j] for j in order[i * rec.batch_size : (i + 1) * rec.batch_size]][ranks.rank :: ranks.world]
            n = max(1, len(mine))
            step_loss = torch.zeros(())
            for good, tb in _micro_batches(vlm, mine, micro_batch, store):
                with vlm.intervening(tb.batch, knockouts=kos):
                    loss = vlm.answer_loss(tb) * (len(good) / n)
                loss.backward()
                step_loss += loss.detach().float().cpu()
            if ranks.world > 1:
                import torch.distributed as dist

                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= ranks.world
                dist.all_reduce(step_loss)
                step_loss /= ranks.world
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(step_loss), 5))
            bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
            if ranks.rank == 0 and ((step + 1) % save_every == 0 or step + 1 == total):
                _save_state(ckpt, peft_model, opt, step + 1, losses)
    seconds = time.perf_counter() - t0
    vlm.model.eval()
    after = _heldout_all(vlm, held, conditions, micro_batch, "after", progress and ranks.rank == 0)
    card = {
        "recipe": recipe,
        "model": str(model),
        "hyper_parameters": config["hyper_parameters"],
        "knockouts": [k.name for k in kos],
        "steps": total,
        "steps_per_epoch": per_epoch,
        "micro_batch": micro_batch,
        "train_examples": len(train),
        "heldout_examples": heldout,
        "loss": {
            "first": losses[0] if losses else None,
            "final": float(np.mean(losses[-max(1, len(losses) // 5) :])) if losses else None,
        },
        "heldout": {"before": before, "after": after},
        "train_seconds_this_session": round(seconds, 1),
        "adapter": str(out / "adapter"),
        "merged": str(out / "merged") if merge else None,
    }
    if ranks.rank == 0:
        peft_model.save_pretrained(out / "adapter")
        store.write_table("loss", pd.DataFrame({"step": np.arange(1, len(losses) + 1), "loss": losses}))
        store.write_table(
            "heldout",
            pd.DataFrame(
                [
                    {"when": w, "condition": c, **s}
                    for w, d in (("before", before), ("after", after))
                    for c, s in d.items()
                ]
            ),
        )
        if merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            vlm.processor.save_pretrained(out / "merged")
        (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (out / "CARD.md").write_text(render_card(card))
    ranks.barrier()
    return card


def render_card(card: dict) -> str:
    hp = card["hyper_parameters"]
    lines = [
        f"# Fine-tuning card: {card['recipe']}",
        "",
        f"Model: `{card['model']}`",
        "",
        f"LoRA rank {hp['rank']}, alpha {hp['alpha']}; AdamW lr {hp['lr']} (cosine), weight decay "
        f"{hp['weight_decay']}; batch {hp['batch_size']} (micro-batch {card['micro_batch']}); "
        f"{card['steps']} steps ({card['steps_per_epoch']} per epoch); mixture {hp['mixture']}.",
        "",
        f"Knockouts active while training: {', '.join(card['knockouts']) or 'none'}.",
        "",
        f"Loss: first step {card['loss']['first']}, last fifth {card['loss']['final']}.",
        "",
        f"## Held-out answers ({card['heldout_examples']} examples, teacher-forced)",
        "",
        "| condition | loss before | loss after | token accuracy before | token accuracy after |",
        "|---|---|---|---|---|",
    ]
    b, a = card["heldout"]["before"], card["heldout"]["after"]
    for c in b:
        lines.append(f"| {c} | {b[c]['loss']} | {a[c]['loss']} | {b[c]['token_accuracy']} | {a[c]['token_accuracy']} |")
    lines += [
        "",
        f"Adapter: `{card['adapter']}`" + (f"; merged checkpoint: `{card['merged']}`" if card["merged"] else ""),
    ]
    return "\n".join(lines) + "\n"


def load_adapted(base: str | Path, adapter: str | Path, **load_kwargs):
    """`narrowgate.load` ``base`` with a saved LoRA ``adapter`` merged in: a `VLM` every experiment accepts."""
    from peft import PeftModel

    from .loading import load

    vlm = load(base, **load_kwargs)
    PeftModel.from_pretrained(vlm.model, str(adapter)).merge_and_unload()  # merges into vlm.model's own modules
    return vlm
