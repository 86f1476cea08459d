"""``narrowgate finetune``: LoRA fine-tuning with interventions active, and the paper's two recipes.

A run flows: recipe + overrides, checked (`narrowgate.recipes.check`) -> data mixture (seeded; the
held-out examples drawn beyond each source's training sample), read before anything is written ->
the run directory's lock -> the model, its prompts (`templates`) and the held-out scores before ->
manifest (with the base checkpoint's fingerprint) -> LoRA on the language model's linear layers
(peft) -> optimisation (gradient accumulation, knockouts active through `VLM.intervening`,
resumable checkpoints; a bad example is a failure record, `each_micro_batch`) -> held-out scores
after -> adapter (safetensors), optionally the merged model as a normal checkpoint directory,
and a training card. The run directory follows the experiments' conventions (``manifest.json``,
``failures/``, ``tables/``); rerunning the same command on it resumes from the last checkpoint.
docs/finetuning.md says what it guarantees.

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
import logging
import math
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import checkpoint_prompts
from .checkpoint_prompts import DATASETS
from .data import BadExample
from .deprecation import dependency_deprecations_hidden
from .distributed import Ranks
from .engine.interventions import Knockout
from .errors import DataError, OptionError
from .progress import progress_bar
from .recipes import RECIPES, SOURCES, Recipe, check
from .runner import model_info
from .store import RunStore

if TYPE_CHECKING:
    from .vlm import VLM

logger = logging.getLogger("narrowgate.finetune")

#: Beside a saved adapter: the base checkpoint it was trained on and its fingerprint (`load_adapted` checks it).
BASE_FILE = "narrowgate-base.json"

__all__ = ["RECIPES", "SOURCES", "Recipe", "finetune", "heldout_scores", "load_adapted", "render_card"]


@dataclass(frozen=True)
class Item:
    """One training example: its source, image source, prompt kind and the answer to learn.

    ``kind`` is ``vqa`` or ``captions`` (the prompt comes from the run's templates, `with_prompts`) or
    ``instruct`` (the example's own instruction, LLaVA-Instruct).
    """

    source: str
    example: Any  # a VQA, caption or instruct example (`narrowgate.data`), read according to ``kind``
    kind: str
    answer: str
    prompt: str = ""

    @property
    def id(self) -> str:
        return f"{self.source}:{self.example.id}"


#: The dataset whose prompt (narrowgate.json, family preset) each source's VQA / caption examples use.
PROMPT_DATASET = {"vqav2": "vqav2", "coco": "coco", "synthetic": "synthetic"}


# --- data ----------------------------------------------------------------------------------------
def _examples(source: str, path: str | None, n: int, seed: int) -> list[Item]:
    """The first ``n`` of ``source``'s seeded order (a prefix of a larger draw) as prompt kind / answer pairs."""
    from . import data
    from .data.llava_instruct import load_llava_instruct
    from .data.tasks import _find

    if path is None:
        raise DataError(f"--data {source} needs a path: --data {source}=DIR.")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"--data {source}={root}: no such file or directory.")
    if source == "llava-instruct":
        return [Item(source, e, "instruct", e.answer, e.prompt) for e in load_llava_instruct(root, n=n, seed=seed)]
    if source == "vqav2":
        if root.is_dir() and (any(root.rglob("*.parquet")) or any(root.rglob("*.arrow"))):
            exs = data.load_vqav2_hf(root, split="train", n=n, seed=seed)
        else:
            exs = data.load_vqav2(root, split="train2014", n=n, seed=seed)
        return [Item(source, e, "vqa", vqa_answer(e)) for e in exs if e.answers]
    if source == "coco":
        found = _find(root, ("captions_train2014.json", "**/captions_train*.json"), "COCO training caption file")
        return [Item(source, e, "captions", e.references[0]) for e in data.load_coco_captions(found, n=n, seed=seed)]
    raise DataError(f"Unknown data source {source!r}; choose from {', '.join(SOURCES)}.")


def vqa_answer(example) -> str:
    """The answer a VQAv2 example teaches: ``multiple_choice_answer``, else the most common human answer
    (the first given among equally common ones)."""
    return example.meta.get("multiple_choice_answer") or Counter(example.answers).most_common(1)[0][0]


def _items(
    source: str, path: str | None, n: int, held: int, seed: int, allow_fewer: bool
) -> tuple[list[Item], list[Item]]:
    """``n`` training examples of ``source`` and ``held`` held-out ones drawn after them, in the same seeded order:
    the training sample is the one the recipe's count alone draws, and no held-out example is among it.

    Fewer than ``n + held`` examples is an error unless ``allow_fewer`` (then training keeps up to ``n``)."""
    from . import data

    if source == "synthetic":  # a seed stream of its own, apart from the experiments' held-out data
        n_caps, held_caps = n // 2, held // 2
        vqa = [
            Item(source, e, "vqa", e.answers[0]) for e in data.synthetic_vqa(n - n_caps + held - held_caps, seed + 1000)
        ]
        caps = [
            Item(source, e, "captions", e.references[0])
            for e in data.synthetic_captions(n_caps + held_caps, seed + 2000)
        ]
        return vqa[: n - n_caps] + caps[:n_caps], vqa[n - n_caps :] + caps[n_caps:]
    pool = _examples(source, path, n + held, seed)
    if len(pool) < n + held and not allow_fewer:
        raise DataError(
            f"--data {source}={path} has {len(pool)} usable examples; the run needs {n + held} ({n} for training, "
            f"{held} held out beyond them). Give --samples {source}=N with fewer, point --data at a larger copy, or "
            "pass --allow-fewer to train on what there is (the card records the counts)."
        )
    train = pool[:n]
    return train, pool[len(train) : len(train) + held]


def _shares(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """``total`` split over the sources in proportion to ``sizes`` (largest remainder; ties by source name)."""
    weight = sum(sizes.values())
    exact = {s: total * n / weight for s, n in sizes.items()}
    out = {s: int(x) for s, x in exact.items()}
    for s in sorted(exact, key=lambda s: (out[s] - exact[s], s))[: total - sum(out.values())]:
        out[s] += 1
    return out


def mixture(
    paths: dict[str, str | None], sizes: dict[str, int], *, heldout: int, seed: int, allow_fewer: bool = False
) -> tuple[list[Item], list[Item]]:
    """The training pool (``sizes[source]`` examples of each source, shuffled together, seeded) and the held-out
    examples (``heldout`` in all, shared in proportion to ``sizes``, drawn beyond each source's training sample)."""
    train, held = [], []
    for source, share in _shares(heldout, sizes).items():
        t, h = _items(source, paths[source], sizes[source], share, seed, allow_fewer)
        train += t
        held += h
    order = np.random.default_rng(seed).permutation(len(train))
    return [train[i] for i in order], held


def templates(vlm, sources, overrides: dict[str, str | None]) -> dict[tuple[str, str], tuple[str, str]]:
    """(kind, dataset) -> (prompt, where it comes from) for the VQA and caption examples of ``sources``:
    ``overrides`` (``vqa_prompt``, ``caption_prompt``), else the checkpoint's narrowgate.json, else the preset."""
    from .data import prompts

    out = {}
    info = model_info(vlm)
    for source in sources:
        dataset = PROMPT_DATASET.get(source)
        if dataset is None:
            continue
        cfg = {"data": dataset, **{k: v for k, v in overrides.items() if v}}
        used = prompts.sources(cfg, ("vqa", "captions"), info["family"], info["n_layers"], vlm.checkpoint_prompts)
        out[("vqa", dataset)] = used["vqa_prompt"]
        out[("captions", dataset)] = used["caption_prompt"]
    return out


def with_prompts(items: list[Item], chosen: dict[tuple[str, str], tuple[str, str]]) -> list[Item]:
    """``items`` with the prompt of each VQA / caption example filled in from ``chosen`` (`templates`)."""
    from .data.prompts import vqa_prompt

    out = []
    for it in items:
        if it.kind == "instruct":
            out.append(it)
            continue
        text = chosen[(it.kind, PROMPT_DATASET[it.source])][0]
        prompt = vqa_prompt(text, it.example.question) if it.kind == "vqa" else text
        out.append(replace(it, prompt=prompt))
    return out


def trained_prompts(vlm, chosen: dict[tuple[str, str], tuple[str, str]]) -> dict:
    """The narrowgate.json prompts of a model fine-tuned with ``chosen``: those it was trained on, over the
    base checkpoint's own (kind -> prompt, or dataset -> prompt where they differ)."""
    own = dict(vlm.checkpoint_prompts.prompts) if vlm.checkpoint_prompts is not None else {}
    for kind in ("vqa", "captions"):
        per = {d: text for (k, d), (text, _) in chosen.items() if k == kind}
        if not per:
            continue
        base = own.get(kind)
        merged = dict(base) if isinstance(base, dict) else {d: base for d in DATASETS} if base else {}
        merged.update(per)
        own[kind] = next(iter(merged.values())) if len(set(merged.values())) == 1 else merged
    return own


# --- scores ----------------------------------------------------------------------------------------
def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def each_micro_batch(vlm, items: list[Item], size: int, work, failed: list[tuple[str, str]]) -> None:
    """Call ``work(items, training_batch)`` on micro-batches of ``size`` items.

    One bad example costs that example alone: an item whose image does not load is left out, and a
    micro-batch whose preparation or ``work`` raises (e.g. an answer holding the image token) is done
    again one item at a time; each item that still fails is appended to ``failed`` as (id, reason) and
    logged. Out-of-memory is not an example's fault and propagates.
    """

    def attempt(group, images) -> BaseException | None:
        try:
            work(group, vlm.prepare_training(images, [it.prompt for it in group], [" " + it.answer for it in group]))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- any per-example error becomes that example's failure record
            return e
        return None

    for i in range(0, len(items), size):
        good, images = [], []
        for it in items[i : i + size]:
            try:
                images.append(it.example.load_image())
                good.append(it)
            except BadExample as bad:
                failed.append((it.id, bad.reason))
                logger.warning("skipping %s: %s", it.id, bad.reason)
        if not good or attempt(good, images) is None:
            continue
        for it, image in zip(good, images):
            error = attempt([it], [image])
            if error is not None:
                failed.append((it.id, _reason(error)))
                logger.warning("skipping %s: %s", it.id, _reason(error))


@torch.no_grad()
def heldout_scores(vlm, items: list[Item], knockouts=(), micro_batch: int = 8, failed: list | None = None) -> dict:
    """Answer-token loss and teacher-forced top-1 accuracy on ``items``, with ``knockouts`` active.

    Items that cannot be scored are left out and appended to ``failed`` (`each_micro_batch`).
    """
    training = vlm.model.training
    vlm.model.eval()
    sums = {"total": 0.0, "correct": 0, "count": 0}

    def score(_, tb):
        with vlm.intervening(tb.batch, knockouts=knockouts):
            logits, labels = vlm.answer_logits(tb)
        keep = labels != -100
        lp = torch.log_softmax(logits.float(), -1)
        sums["total"] += float(-lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].sum())
        sums["correct"] += int((logits.argmax(-1) == labels)[keep].sum())
        sums["count"] += int(keep.sum())

    each_micro_batch(vlm, items, micro_batch, score, [] if failed is None else failed)
    vlm.model.train(training)
    count = sums["count"]
    if not count:
        raise DataError("No held-out example could be scored; the scores would be meaningless (see the log).")
    return {
        "loss": round(sums["total"] / count, 4),
        "token_accuracy": round(sums["correct"] / count, 4),
        "tokens": count,
    }


def _record(store: RunStore, failed: list[tuple[str, str]]) -> None:
    """Write the failures gathered so far to the run directory (each as its own record) and forget them."""
    for example_id, reason in failed:
        store.fail(example_id, reason)
    failed.clear()


def _heldout(
    vlm, items: list[Item], conditions: dict, micro_batch: int, failed: list, when: str, progress: bool
) -> dict:
    """`heldout_scores` under each condition, all on the same items: those the baseline could score; a
    progress line per condition (a 7B model takes a while)."""
    before = len(failed)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"held-out scores {when} training (conditions)", total=len(conditions))
        out = {"baseline": heldout_scores(vlm, items, conditions["baseline"], micro_batch, failed)}
        bar.advance(task)
        dropped = {i for i, _ in failed[before:]}
        kept = [it for it in items if it.id not in dropped]
        for c, ks in conditions.items():
            if c != "baseline":
                out[c] = heldout_scores(vlm, kept, ks, micro_batch, failed)
                bar.advance(task)
    return out


# --- checkpoints -----------------------------------------------------------------------------------
def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_state(path: Path, model, opt, step: int, losses: list[float | None]) -> None:
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


def _load_state(path: Path, model, opt) -> tuple[int, list[float | None]]:
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
    vqa_prompt: str | None = None,
    caption_prompt: str | None = None,
    allow_fewer: bool = False,
    progress: bool = True,
    vlm=None,
    command: list[str] | None = None,
) -> dict:
    """Fine-tune ``model`` with ``recipe`` on ``data`` (source -> path), writing everything under ``out``.

    ``knockouts`` (e.g. ``["eoi->text"]``) replace the recipe's; ``samples`` (source -> n) its mixture
    (``0`` leaves a recipe source out); ``steps`` stops early (scaled-down runs). ``heldout`` examples are
    drawn beyond the training sample; a source with fewer examples than both need is an error unless
    ``allow_fewer``. VQA and caption examples are asked with ``vqa_prompt`` /
    ``caption_prompt``, else the checkpoint's own (narrowgate.json), else the family preset; the merged
    model's narrowgate.json records them. Returns the training card.
    """
    rec, sizes = check(
        recipe,
        data,
        samples=samples,
        steps=steps,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr,
        heldout=heldout,
        seed=seed,
        save_every=save_every,
        dtype=dtype,
        vqa_prompt=vqa_prompt,
    )
    rec = replace(rec, knockouts=tuple(knockouts) if knockouts is not None else rec.knockouts)
    try:
        kos = [Knockout.parse(k) for k in rec.knockouts]
    except ValueError as e:
        raise OptionError(f"--knockout: {e}") from None
    train, held = mixture(data, sizes, heldout=heldout, seed=seed, allow_fewer=allow_fewer)  # before --out is touched
    if not train or not held:
        raise DataError(
            f"{len(train)} training and {len(held)} held-out examples: nothing to train on or to score; add data."
        )
    per_epoch = math.ceil(len(train) / rec.batch_size)
    if steps is not None and steps > per_epoch * rec.epochs:
        raise OptionError(
            f"--steps {steps} is more than the recipe's {rec.epochs} epoch(s) of {per_epoch} steps over "
            f"{len(train)} training examples at batch {rec.batch_size}: give at most {per_epoch * rec.epochs}."
        )
    ranks = Ranks.from_env()
    ranks.init()
    out = Path(out)
    store = RunStore(out, rank=ranks.rank)
    command_text = shlex.join(command if command is not None else sys.argv)
    ranks.lock(store, command_text)
    try:
        return _finetune_locked(
            model,
            recipe,
            data,
            out,
            rec=rec,
            sizes=sizes,
            kos=kos,
            held=held,
            train=train,
            store=store,
            ranks=ranks,
            command_text=command_text,
            steps=steps,
            micro_batch=micro_batch,
            heldout=heldout,
            seed=seed,
            dtype=dtype,
            device_map=device_map,
            gradient_checkpointing=gradient_checkpointing,
            merge=merge,
            save_every=save_every,
            overrides={"vqa_prompt": vqa_prompt, "caption_prompt": caption_prompt},
            allow_fewer=allow_fewer,
            samples=samples or {},
            progress=progress,
            vlm=vlm,
        )
    finally:
        store.unlock()


def checked_knockouts(knockouts) -> list:
    """The knockouts the held-out scores are taken under: each training knockout, and the mask-mode twin of each
    zero-mode one (zero mode leaks through the softmax normaliser, which training can learn to amplify: a gate
    that looks removed in zero mode must also look removed when the keys are masked exactly)."""
    out = list(knockouts)
    out += [replace(k, mode="mask") for k in knockouts if k.mode == "zero" and replace(k, mode="mask") not in out]
    return out


def departures(recipe: str, rec: Recipe, sizes: dict, samples: dict, steps: int | None, knockouts) -> list[str]:
    """Where this run departs from the reproducibility sheet's recipe (a scaled-down or changed run says so)."""
    sheet = RECIPES[recipe]
    out = []
    for source in sorted(set(sheet.mixture) | set(sizes)):
        want, got = sheet.mixture.get(source), sizes.get(source, 0)
        if want != got:
            why = f"left out (--samples {source}=0)" if samples.get(source) == 0 else f"{got} examples"
            out.append(f"{source}: {why}, the sheet's recipe has {want or 'none'}")
    for name, value, default in (("lr", rec.lr, sheet.lr), ("batch size", rec.batch_size, sheet.batch_size)):
        if value != default:
            out.append(f"{name} {value}, the sheet's {default}")
    if steps is not None:
        out.append(f"stopped after {steps} steps, not {sheet.epochs} full epoch(s)")
    if tuple(k.name for k in knockouts) != sheet.knockouts:
        out.append(
            f"knockouts while training: {[k.name for k in knockouts] or 'none'}, the recipe's {list(sheet.knockouts) or 'none'}"
        )
    return out


def inferences(recipe: str, rec: Recipe, data: dict, chosen: dict, knockouts) -> list[str]:
    """Every choice of this run the reproducibility sheet is silent on, so a reader can tell ours from the paper's."""
    out = [
        "Loss on the answer tokens only (the prompt and the image are context), each answer closed by EOS.",
        "LoRA on every linear layer of the language model's decoder layers, no dropout; the vision side is frozen.",
        "'Adam with weight decay' is AdamW (decoupled); gradients clipped at norm 1; cosine decay to 0, no warm-up.",
        "Held-out examples (for the before/after scores) are drawn beyond each source's training sample, in "
        "proportion to the mixture, so the training counts are the sheet's.",
    ]
    if recipe == "understanding" and {"vqav2", "coco"} & set(data):
        out.append("The sheet's 37.5k VQAv2 + MS-COCO-2014 samples are split evenly (18,750 each).")
    if recipe == "remove-gate" and knockouts:
        out.append(
            "Removing the gate is read as training with [EOI]->text knocked out (zero mode, every layer): the sheet "
            "gives the data and hyper-parameters, not the training-time intervention."
        )
    if "llava-instruct" in data:
        out.append("LLaVA-Instruct-150K: each conversation's first question and answer; later turns are left out.")
    if "coco" in data:
        out.append("COCO captions: the first caption of each image (annotation-id order) is the answer.")
    if "vqav2" in data:
        out.append("VQAv2: the answer taught is multiple_choice_answer (else the most common human answer).")
    for (kind, dataset), (text, where) in sorted(chosen.items()):
        out.append(f"{kind} prompt on {dataset} examples: {json.dumps(text)} (from {where}).")
    return out


def _finetune_locked(
    model,
    recipe: str,
    data: dict,
    out: Path,
    *,
    rec: Recipe,
    sizes: dict[str, int],
    kos: list,
    held: list[Item],
    train: list[Item],
    store: RunStore,
    ranks: Ranks,
    command_text: str,
    steps: int | None,
    micro_batch: int,
    heldout: int,
    seed: int,
    dtype: str,
    device_map,
    gradient_checkpointing: bool,
    merge: bool,
    save_every: int,
    overrides: dict,
    allow_fewer: bool,
    samples: dict[str, int],
    progress: bool,
    vlm,
) -> dict:
    """`finetune` once the run directory is locked: load, check the manifest, train, score, save."""
    from peft import LoraConfig, get_peft_model

    from .loading import fingerprint, load

    vlm = vlm or load(model, dtype=dtype, device_map=device_map)
    beyond = [k.name for k in kos if k.layers and max(k.layers) >= vlm.n_layers]
    if beyond:
        raise OptionError(
            f"--knockout {beyond[0]}: the model has {vlm.n_layers} decoder layers (0..{vlm.n_layers - 1})."
        )
    base = fingerprint(model, model_info(vlm)["revision"])
    chosen = templates(vlm, data, overrides)
    config = {
        "model": str(model),
        "recipe": recipe,
        "hyper_parameters": asdict(rec) | {"mixture": sizes},
        "data": {s: str(p) for s, p in data.items()},
        "steps": steps,
        "heldout": heldout,
        "allow_fewer": allow_fewer,
        "seed": seed,
        "micro_batch": micro_batch,
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "prompts": {f"{kind} ({dataset})": text for (kind, dataset), (text, _) in sorted(chosen.items())},
    }
    held, train = with_prompts(held, chosen), with_prompts(train, chosen)
    conditions = {"baseline": ()} | {k.name: (k,) for k in checked_knockouts(kos)}
    scores_path = out / "heldout-before.json"
    failed: list[tuple[str, str]] = []
    if scores_path.exists():
        before = json.loads(scores_path.read_text())
    else:  # before the manifest: a held-out set that cannot be scored leaves --out free for the corrected command
        before = _heldout(vlm, held, conditions, micro_batch, failed, "before", progress and ranks.rank == 0)
    config = json.loads(json.dumps(config))  # as the manifest stores it, so a resume compares like with like
    store.open_manifest(
        {
            "experiment": "finetune",
            "config": config,
            "fingerprint": base,
            "command": command_text,
            "model": model_info(vlm),
            "prompt_sources": {f"{k} ({d})": where for (k, d), (_, where) in sorted(chosen.items())},
            "checkpoint_prompts": vlm.checkpoint_prompts.as_json() if vlm.checkpoint_prompts else None,
        },
        key_fields=("experiment", "config", "fingerprint"),
        work=(scores_path.name, "checkpoint", "adapter", "card.json"),
    )
    if not scores_path.exists() and ranks.rank == 0:
        scores_path.write_text(json.dumps(before, indent=1))
    _record(store, failed)

    lora = LoraConfig(r=rec.rank, lora_alpha=rec.alpha, lora_dropout=0.0, target_modules=lora_targets(vlm))
    torch.manual_seed(seed)  # LoRA's initialisation: the same command gives the same run
    with dependency_deprecations_hidden():  # peft reads transformers' deprecated is_gradient_checkpointing
        peft_model = get_peft_model(vlm.model, lora)
    if gradient_checkpointing:
        vlm.enable_gradient_checkpointing()
    params = [p for _, p in _trainable(peft_model)]
    opt = torch.optim.AdamW(params, lr=rec.lr, weight_decay=rec.weight_decay)
    per_epoch = math.ceil(len(train) / rec.batch_size)
    total = steps or per_epoch * rec.epochs
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
            parts: list[torch.Tensor] = []

            def learn(good, tb, share=max(1, len(mine)), parts=parts):
                with vlm.intervening(tb.batch, knockouts=kos):
                    loss = vlm.answer_loss(tb) * (len(good) / share)
                loss.backward()
                parts.append(loss.detach().float().cpu())

            each_micro_batch(vlm, mine, micro_batch, learn, failed)
            _record(store, failed)
            step_loss = torch.stack(parts).sum() if parts else torch.zeros(())
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
            losses.append(round(float(step_loss), 5) if parts or ranks.world > 1 else None)  # None: all failed
            bar.update(task, advance=1, loss="-" if losses[-1] is None else f"{losses[-1]:.4f}")
            if ranks.rank == 0 and ((step + 1) % save_every == 0 or step + 1 == total):
                _save_state(ckpt, peft_model, opt, step + 1, losses)
    seconds = time.perf_counter() - t0
    measured = [x for x in losses if x is not None]
    vlm.model.eval()
    after = _heldout(vlm, held, conditions, micro_batch, failed, "after", progress and ranks.rank == 0)
    _record(store, failed)
    failures = store.failures()
    rec_sheet = RECIPES[recipe]
    failed_by_source = failures["example_id"].str.split(":").str[0].value_counts().to_dict()
    card = {
        "recipe": recipe,
        "model": str(model),
        "hyper_parameters": config["hyper_parameters"],
        "knockouts": [k.name for k in kos],
        "steps": total,
        "steps_per_epoch": per_epoch,
        "micro_batch": micro_batch,
        "prompts": config["prompts"],
        "data": {
            s: {
                "recipe": rec_sheet.mixture.get(s),
                "requested": sizes[s],
                "train": sum(it.source == s for it in train),
                "heldout": sum(it.source == s for it in held),
                "failures": int(failed_by_source.get(s, 0)),
                "path": data[s],
            }
            for s in data
        },
        "sources_left_out": {s: n for s, n in rec_sheet.mixture.items() if samples.get(s) == 0},
        "departures": departures(recipe, rec, sizes, samples, steps, kos),
        "inferences": inferences(recipe, rec, data, chosen, kos),
        "train_examples": len(train),
        "heldout_examples": len(held),
        "loss": {
            "first": measured[0] if measured else None,
            "final": float(np.mean(measured[-max(1, len(measured) // 5) :])) if measured else None,
        },
        "heldout": {"before": before, "after": after},
        "failures": {
            "examples": len(failures),
            "by_source": {s: int(n) for s, n in sorted(failed_by_source.items())},
            "table": str(out / "failures"),
        },
        "train_seconds_this_session": round(seconds, 1),
        "adapter": str(out / "adapter"),
        "merged": str(out / "merged") if merge else None,
    }
    if ranks.rank == 0:
        peft_model.save_pretrained(str(out / "adapter"))
        (out / "adapter" / BASE_FILE).write_text(json.dumps({"model": str(model), "fingerprint": base}, indent=2))
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
            merged.save_pretrained(out / "merged")  # type: ignore[operator]  # peft types it as a Module; a PreTrainedModel
            vlm.processor.save_pretrained(out / "merged")
            checkpoint_prompts.write(out / "merged", trained_prompts(vlm, chosen))
        (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (out / "CARD.md").write_text(render_card(card))
    ranks.barrier()
    return card


def render_card(card: dict) -> str:
    """The card as Markdown (``CARD.md``)."""
    hp, failed = card["hyper_parameters"], card["failures"]
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
        "Prompts: " + "; ".join(f"{k}: `{json.dumps(v)}`" for k, v in card["prompts"].items()) + ".",
        "",
        f"Loss: first step {card['loss']['first']}, last fifth {card['loss']['final']}.",
        "",
        "## Data",
        "",
        "| source | the sheet's recipe | asked | trained on | held out | failures |",
        "|---|---|---|---|---|---|",
        *(
            f"| {s} | {d['recipe'] or '-'} | {d['requested']} | {d['train']} | {d['heldout']} | {d['failures']} |"
            for s, d in card["data"].items()
        ),
        *(f"| {s} | {n} | 0 (left out) | 0 | 0 | 0 |" for s, n in card["sources_left_out"].items()),
        "",
        f"Failures: {failed['examples']} example(s) left out"
        + (f" (see `{failed['table']}`)" if failed["examples"] else "")
        + ".",
        "",
        f"## Held-out answers ({card['heldout_examples']} examples, teacher-forced)",
        "",
        "Each training knockout in zero mode is also scored in mask mode (zero mode leaks through the softmax "
        "normaliser, which training can amplify).",
        "",
        "| condition | loss before | loss after | token accuracy before | token accuracy after |",
        "|---|---|---|---|---|",
    ]
    b, a = card["heldout"]["before"], card["heldout"]["after"]
    for c in b:
        lines.append(f"| {c} | {b[c]['loss']} | {a[c]['loss']} | {b[c]['token_accuracy']} | {a[c]['token_accuracy']} |")
    lines += ["", "## Departures from the sheet's recipe", ""]
    lines += [f"- {d}" for d in card["departures"]] or ["None."]
    lines += ["", "## Inferences (choices the reproducibility sheet is silent on)", ""]
    lines += [f"- {i}" for i in card["inferences"]]
    lines += [
        "",
        f"Adapter: `{card['adapter']}`" + (f"; merged checkpoint: `{card['merged']}`" if card["merged"] else ""),
    ]
    return "\n".join(lines) + "\n"


def load_adapted(base: str | Path, adapter: str | Path, **load_kwargs: Any) -> VLM:
    """`narrowgate.load` ``base`` with a saved LoRA ``adapter`` merged in: a `VLM` every experiment accepts.

    Refuses (`LoadError`) an adapter trained on another model: one whose recorded base fingerprint
    (``narrowgate-base.json``, written by `finetune`) differs from ``base``'s, or whose weights do not
    all find their place in ``base`` (peft itself would only warn and return the unmodified base).
    """
    from peft import PeftConfig, PeftModel

    from .loading import LoadError, fingerprint, load

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise LoadError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json).")
    vlm = load(base, **load_kwargs)
    recorded = adapter / BASE_FILE
    if recorded.is_file():
        trained_on = json.loads(recorded.read_text())
        now = fingerprint(base, model_info(vlm)["revision"])
        if trained_on.get("fingerprint") != now:
            raise LoadError(
                f"{adapter} was trained on {trained_on.get('model')}, and {base} is another checkpoint (its "
                f"fingerprint differs: {_difference(trained_on.get('fingerprint'), now)}). Load it on the base "
                "it was trained on."
            )
    try:
        peft_model = PeftModel(vlm.model, PeftConfig.from_pretrained(str(adapter)))
        result = peft_model.load_adapter(str(adapter), "default")
    except (ValueError, RuntimeError, KeyError) as e:
        raise LoadError(
            f"{adapter} does not fit {base} ({' '.join(str(e).split())[:300]}): it was trained on another model."
        ) from e
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise LoadError(
            f"{adapter} does not fit {base}: {len(result.unexpected_keys)} of its weights have no place in it and "
            f"{len(missing)} of its layers get no weight (e.g. {(result.unexpected_keys or missing)[0]}): it was "
            "trained on another model."
        )
    peft_model.merge_and_unload()  # merges into vlm.model's own modules
    return vlm


def _difference(there, now) -> str:
    """Which files (or hub fields) of two fingerprints differ."""
    there, now = there or {}, now or {}
    a, b = there.get("files", there), now.get("files", now)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(keys[:5]) or "its form"
