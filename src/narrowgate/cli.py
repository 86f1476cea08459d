"""The ``narrowgate`` command line.

Imports here stay light (typer, rich): torch and transformers load only inside the commands that
need them, so ``narrowgate --help`` answers at once. Every option is checked before any model
loads. An expected error (a `narrowgate.NarrowgateError`, a bad option, a path that cannot be
read or written) ends the command with its message on one line and exit status 1 (2 for a bad
option); ``--debug`` anywhere on the command line, or ``NARROWGATE_DEBUG=1``, shows its traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .errors import NarrowgateError, OptionError, parse_layer_set

console = Console()

#: Environment errors whose message already names the path: printed alone, like NarrowgateError.
_PATH_ERRORS = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


class _Commands(TyperGroup):
    """The command group; its `main` is the one place where errors become one line and an exit status."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("NARROWGATE_DEBUG", "") not in ("", "0")
        argv = [a for a in argv if a != "--debug"]
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                typer.echo(e.format_message())
                sys.exit(0)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"Error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            typer.echo("Aborted.", err=True)
            sys.exit(130)
        except (NarrowgateError, *_PATH_ERRORS) as e:
            if debug:
                raise
            typer.echo(f"Error: {_one_line(e)}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Commands,
    help="Measure how visual information reaches the text inside vision-language models. "
    "Add --debug (or set NARROWGATE_DEBUG=1) to see the traceback of an error.",
    no_args_is_help=True,
    add_completion=False,
)

MODEL_HELP = "Hub id, checkpoint directory, or a shipped organism: native, non-native."


def _flag(name: str, help: str):
    """A boolean option given as a bare flag (``--sweep``), shown without a value in --help."""
    return typer.Option(False, name, help=help, metavar="")


def _finite(value):
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value


def _positive(value):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number above 0.")
    return value


def _nonempty(value):
    if value is not None and not value.strip():
        raise typer.BadParameter("an empty value names nothing.")
    return value


def _layers(value):
    if value is not None:
        try:
            parse_layer_set(value)
        except OptionError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _roles(values):
    from .roles import RoleError, parse_role

    for v in values or ():
        try:
            parse_role(v)
        except RoleError as e:
            raise typer.BadParameter(str(e)) from None
    return values


def _device_map(value):
    if value is None or not value.strip().startswith("{"):
        return _nonempty(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not valid JSON ({e}).") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("a JSON device map must be an object of module -> device.")
    return value


@app.command()
def models() -> None:
    """List the supported model families, the checkpoints they were written for, and their [EOI] token."""
    from .families import FAMILIES

    table = Table(title="Supported model families")
    table.add_column("family")
    table.add_column("model_type")
    table.add_column("checkpoints", no_wrap=True, min_width=max(len(c) for f in FAMILIES for c in f.checkpoints))
    table.add_column("eoi", ratio=1)
    for fam in FAMILIES:
        table.add_row(fam.name, ", ".join(fam.model_types), "\n".join(fam.checkpoints), fam.eoi_doc)
    console.print(table)


@app.command()
def roles(
    model: str = typer.Argument(..., help=MODEL_HELP, callback=_nonempty),
    prompt: str = typer.Option("Provide a one-sentence caption for the provided image.", help="Prompt text."),
    text_first: bool = _flag("--text-first", "Put the text before the image."),
) -> None:
    """Show where every role sits in one example prompt of MODEL (a blank grey image)."""
    from PIL import Image

    from .loading import load
    from .roles import ROLE_NAMES

    vlm = load(model)
    batch = vlm.prepare([Image.new("RGB", (224, 224), (128, 128, 128))], [prompt], image_first=not text_first)
    tok = vlm.family.tokenizer
    table = Table(title=f"{vlm.family.name}: {batch.length} tokens", caption=vlm.family.eoi_doc)
    table.add_column("role")
    table.add_column("positions")
    table.add_column("tokens")
    for name in ROLE_NAMES:
        pos = batch.positions(name)[0].tolist()
        shown = pos if len(pos) <= 6 else pos[:3] + ["..."] + pos[-2:]
        toks = tok.convert_ids_to_tokens(batch.input_ids[0, pos[:3]].tolist()) if pos else []
        table.add_row(name, f"{shown} ({len(pos)})", " ".join(toks) + (" ..." if len(pos) > 3 else ""))
    console.print(table)


EXPERIMENT_HELP = (
    "modality-gap (Sec. 4.1), cross-attention (Sec. 4.2, Eq. 1), overlap (Sec. 4.2, Eq. 2), "
    "ablation (Sec. 4.3), patching (Sec. 4.4, Eq. 3), steering (Sec. 4.4, generated text), "
    "gate-scan (every image-side position knocked out alone)"
)


@app.command()
def run(
    experiment: str = typer.Argument(..., help=EXPERIMENT_HELP),
    model: str = typer.Option(..., "--model", help=MODEL_HELP, callback=_nonempty),
    data: str = typer.Option(..., "--data", help="vqav2, coco, flickr30k, imagenet or synthetic (no files needed)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Where the dataset's files are on disk.", callback=_nonempty),
    n: int = typer.Option(None, "--n", "-n", min=1, help="Examples to sample (seeded; default 2,000, ImageNet: 100 per class). Under torchrun write -n: torchrun takes --n for its own options."),
    n_per_class: int = typer.Option(None, "--n-per-class", min=1, help="Images per class for ImageNet/synthetic classes (patching: per pair class)."),
    out: str = typer.Option(None, "--out", help="Run directory (default runs/<experiment>-<model>-<time>); rerun to resume.", callback=_nonempty),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Examples per forward (halved automatically on OOM)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device_map: str = typer.Option(None, "--device-map", help="accelerate device map: auto, balanced, or a JSON dict.", callback=_device_map),
    seed: int = typer.Option(42, "--seed", min=0, help="Sampling seed."),
    prompt: str = typer.Option(None, "--prompt", help="Class prompt (default 'This animal is a' / 'This shape is a').", callback=_nonempty),
    task: str = typer.Option(None, "--task", help="ablation on synthetic data: vqa, captions or classes."),
    mode: str = typer.Option(None, "--mode", help="ablation/overlap/gate-scan: knockout mode, zero or mask (ablation, overlap: zero, as the paper; gate-scan: mask)."),
    layers: str = typer.Option(None, "--layers", help="ablation: decoder layers of the knockouts, e.g. 0-31 or 3,5,7; steering: residual indices patched.", callback=_layers),
    sweep: bool = _flag("--sweep", "ablation: growing layer windows from the last layer (SM 6.3); overlap: growing early-layer windows 0..w-1 of image->eoi+text (the authors' overlap-with-ablation)."),
    sweep_step: int = typer.Option(1, "--sweep-step", min=1, help="ablation/overlap: window growth per step with --sweep."),
    knockout: list[str] = typer.Option(None, "--knockout", help="ablation: extra source role to knock out (repeatable).", callback=_roles),
    k: int = typer.Option(None, "--k", min=1, help="overlap/ablation: neighbours for the neighbourhood overlap (30)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="ablation, gate-scan --score: new tokens (VQA 20, captions 60); steering: 10."),
    threshold: float = typer.Option(None, "--threshold", min=0.0, max=1.0, callback=_finite, help="cross-attention: share above which a position is shown."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="cross-attention: most positions shown on their own (9)."),
    image_index: int = typer.Option(None, "--image-index", min=0, help=escape("overlap: the k of image[k] (default 31).")),
    outputs_only: bool = _flag("--outputs-only", "overlap/modality-gap: layer outputs only (resid 1..L, the paper's x axis), not the embeddings."),
    normalise: str = typer.Option(None, "--normalise", help="cross-attention: per-example (shares averaged, default) or after-mean (the authors': raw attention averaged, then normalised)."),
    z: float = typer.Option(None, "--z", callback=_positive, help="modality-gap: ADP clustering confidence Z, above 0 (1.2)."),
    min_cluster_size: int = typer.Option(None, "--min-cluster-size", min=1, help="modality-gap: drop smaller ADP clusters."),
    allow_fewer: bool = _flag("--allow-fewer", "Run on fewer examples than asked when the data has fewer (recorded in the manifest)."),
    vqa_prompt: str = typer.Option(None, "--vqa-prompt", help="VQA prompt with {question} (default: the family's preset, see README).", callback=_nonempty),
    caption_prompt: str = typer.Option(None, "--caption-prompt", help="Caption prompt (default: the paper's).", callback=_nonempty),
    direction: str = typer.Option(None, "--direction", help="patching: paper (base <- target as published) or both."),
    span: str = typer.Option(None, "--span", help="patching: single (patch resid l, Fig. 5) or from (resid l..L-1, the authors' 2nd variant)."),
    cider_tokenize: str = typer.Option(None, "--cider-tokenize", help="ablation: ptb (official COCO tokenisation) or raw (the authors' raw strings)."),
    method: str = typer.Option(None, "--method", help="gate-scan: exact (default) or attribution (first-order, one forward + backward)."),
    check: int = typer.Option(None, "--check", min=1, help="gate-scan --method attribution: examples also scanned exactly for the rank correlation (8)."),
    top: int = typer.Option(None, "--top", min=1, help="gate-scan: top positions per example resolved over layer windows (3)."),
    windows: int = typer.Option(None, "--windows", min=1, help="gate-scan: number of layer windows (4)."),
    per_example: bool = _flag("--per-example", "gate-scan: also write tables/positions_by_example."),
    score: bool = _flag("--score", "gate-scan on VQA/captions: also the task-score drop of every position (one generation per position and example)."),
    retry_failed: bool = _flag("--retry-failed", "Process again the examples recorded as failures (e.g. after fixing their images)."),
    quiet: bool = _flag("--quiet", "No progress bar."),
) -> None:
    """Run (or resume) one of the paper's experiments; writes tables, figures and report.html to --out."""
    from .analyses import EXPERIMENTS
    from .analyses.base import run as run_experiment
    from .analyses.tasks import DATASETS, TASK_DATASETS
    from .engine.interventions import KNOCKOUT_MODES

    for value, allowed, option in ((experiment, tuple(EXPERIMENTS), "EXPERIMENT"), (data, DATASETS, "--data"),
                                   (dtype, ("auto", "float32", "bfloat16", "float16"), "--dtype"),
                                   (mode, (None, *KNOCKOUT_MODES), "--mode"), (task, (None, *TASK_DATASETS), "--task"),
                                   (method, (None, "exact", "attribution"), "--method"),
                                   (direction, (None, "paper", "both"), "--direction"),
                                   (span, (None, "single", "from"), "--span"),
                                   (normalise, (None, "per-example", "after-mean"), "--normalise"),
                                   (cider_tokenize, (None, "ptb", "raw"), "--cider-tokenize")):
        if value not in allowed:
            raise typer.BadParameter(f"unknown value {value!r}; choose one of {', '.join(a for a in allowed if a)}.",
                                     param_hint=option)
    dmap = json.loads(device_map) if device_map and device_map.strip().startswith("{") else device_map
    cfg = dict(model=model, data=data, data_dir=data_dir, n=n, n_per_class=n_per_class, out=out,
               batch_size=batch_size, dtype=dtype, device_map=dmap, seed=seed, prompt=prompt, task=task,
               mode=mode, layers=layers, sweep=sweep or None, sweep_step=sweep_step if sweep else None,
               knockout=list(knockout) if knockout else None, k=k, max_new_tokens=max_new_tokens,
               threshold=threshold, max_tokens=max_tokens, image_index=image_index,
               outputs_only=outputs_only or None, normalise=normalise, Z=z, min_cluster_size=min_cluster_size,
               allow_fewer=allow_fewer or None, vqa_prompt=vqa_prompt, caption_prompt=caption_prompt,
               direction=direction, span=span, cider_tokenize=cider_tokenize,
               method=method, check=check, top=top, windows=windows, per_example=per_example or None, score=score or None,
               retry_failed=retry_failed or None, progress=not quiet)
    store = run_experiment(EXPERIMENTS[experiment](), cfg, command=["narrowgate", *sys.argv[1:]])
    if int(os.environ.get("RANK", "0")) != 0:
        return
    console.print(f"[green]done:[/green] {store.path}  (report: {store.path / 'report.html'})")
    for name, df in store.tables().items():
        if name != "failures" and len(df) <= 40:
            console.print(f"[bold]{name}[/bold]")
            console.print(df.to_string(index=False))
    failures = store.failures()
    if len(failures):
        console.print(f"[yellow]{len(failures)} example(s) skipped[/yellow]; see {store.path / 'tables/failures.csv'}")


@app.command()
def compare(
    runs: list[str] = typer.Argument(..., help="Run directories of one experiment (several models)."),
    out: str = typer.Option("runs/compare", "--out", help="Where to write the overlay figures."),
) -> None:
    """Overlay several runs of one experiment in one figure, on relative depth (as the paper does)."""
    from pathlib import Path

    from .plots import compare as draw_compare
    from .store import RunStore

    loaded = []
    for d in runs:
        path = Path(d)
        if not (path / "manifest.json").exists():
            raise typer.BadParameter(f"{d} is not a narrowgate run directory (no manifest.json).")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except json.JSONDecodeError as e:
            raise OptionError(f"{path / 'manifest.json'} is not valid JSON ({e}); the run directory is damaged.") from e
        loaded.append((f"{manifest['model']['family']} ({path.name})", RunStore(path).tables(), manifest))
    kinds = {m["experiment"] for _, _, m in loaded}
    if len(kinds) != 1:
        raise typer.BadParameter(f"runs of different experiments cannot be overlaid: {sorted(kinds)}")
    for p in draw_compare(loaded, out):
        console.print(p)


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Where the runs and report.html go."),
    scale: float = typer.Option(1.0, "--scale", callback=_positive, help="Multiply every sample size, above 0 (e.g. 0.25 for a quick look)."),
    quiet: bool = _flag("--quiet", "No progress bars."),
) -> None:
    """Run every experiment on the two shipped model organisms (native and non-native) and compare them."""
    from .demo import demo as run_demo

    run_demo(out, scale=scale, progress=not quiet, console=console)


@app.command("train-organism")
def train_organism(
    kind: str = typer.Argument(..., help="native (Chameleon-style, early fusion), non-native (LLaVA-style) or gated (native with a planted [EOI] gate)."),
    out: str = typer.Option(None, "--out", help="Checkpoint directory (default: runs/organism-<kind>)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Training seed."),
) -> None:
    """Train a model organism from scratch on synthetic images, reproducing the shipped one from its seed."""
    from rich.markdown import Markdown

    from . import organisms
    from .organisms.card import render_markdown

    if kind not in organisms.KINDS:
        raise typer.BadParameter(f"unknown organism {kind!r}; choose one of {', '.join(organisms.KINDS)}.",
                                 param_hint="KIND")

    target = out or f"runs/organism-{kind}"
    card = organisms.train(kind, target, seed=seed)
    console.print(Markdown(render_markdown(card)))
    console.print(f"[green]saved:[/green] {target} (card: {target}/CARD.md)")


@app.command()
def finetune(
    model: str = typer.Option(..., "--model", help="Hub id or checkpoint directory."),
    recipe: str = typer.Option(..., "--recipe", help="understanding (SM 7.1) or remove-gate (the paper's gate removal)."),
    data: list[str] = typer.Option(..., "--data", help="SOURCE=PATH (repeatable): llava-instruct, vqav2, coco; or synthetic."),
    out: str = typer.Option(..., "--out", help="Run directory; rerun the same command to resume."),
    knockout: list[str] = typer.Option(None, "--knockout", help="SRC->TGT[@LAYERS][:MODE] active while training (repeatable; replaces the recipe's; 'none' for none)."),
    samples: list[str] = typer.Option(None, "--samples", help="SOURCE=N: examples of a source (default: the recipe's mixture)."),
    steps: int = typer.Option(None, "--steps", help="Stop after this many optimizer steps (default: the recipe's epochs)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples per optimizer step (default: the recipe's)."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Examples per forward; gradients accumulate up to --batch-size."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: the recipe's)."),
    heldout: int = typer.Option(64, "--heldout", help="Examples set aside for the before/after scores."),
    seed: int = typer.Option(42, "--seed", help="Data sampling and order seed."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32 or bfloat16."),
    device_map: str = typer.Option(None, "--device-map", help="accelerate device map: auto, balanced, or a JSON dict."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in the backward pass."),
    merge: bool = typer.Option(False, "--merge", help="Also save the merged model as a normal checkpoint (OUT/merged)."),
    save_every: int = typer.Option(50, "--save-every", help="Optimizer steps between resumable checkpoints."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """LoRA fine-tuning with knockouts active (the paper's two recipes); adapter, card and held-out scores in --out."""
    import json
    import sys

    from .finetune import finetune as run_finetune
    from .finetune import render_card

    def pairs(items, what):
        out_ = {}
        for item in items or ():
            key, eq, value = item.partition("=")
            if what == "--samples" and not eq:
                raise typer.BadParameter(f"{what} {item!r}: write SOURCE=N.")
            out_[key.strip()] = value.strip() or None
        return out_

    dmap = json.loads(device_map) if device_map and device_map.strip().startswith("{") else device_map
    kos = None if not knockout else [k for k in knockout if k.lower() != "none"]
    try:
        card = run_finetune(model, recipe, pairs(data, "--data"), out, knockouts=kos,
                            samples={k: int(v) for k, v in pairs(samples, "--samples").items()}, steps=steps,
                            batch_size=batch_size, micro_batch=micro_batch, lr=lr, heldout=heldout, seed=seed,
                            dtype=dtype, device_map=dmap, gradient_checkpointing=gradient_checkpointing, merge=merge,
                            save_every=save_every, progress=not quiet, command=["narrowgate", *sys.argv[1:]])
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    console.print(render_card(card))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
