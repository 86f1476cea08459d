"""The ``narrowgate`` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Measure how visual information reaches the text inside vision-language models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def models() -> None:
    """List the supported model families, the checkpoints they were written for, and their [EOI] token."""
    from .families import FAMILIES

    table = Table(title="Supported model families")
    table.add_column("family")
    table.add_column("model_type")
    table.add_column("checkpoints")
    table.add_column("eoi")
    for fam in FAMILIES:
        table.add_row(fam.name, ", ".join(fam.model_types), "\n".join(fam.checkpoints), fam.eoi_doc)
    console.print(table)


@app.command()
def roles(
    model: str = typer.Argument(..., help="Hub id or checkpoint directory."),
    prompt: str = typer.Option("Provide a one-sentence caption for the provided image.", help="Prompt text."),
    text_first: bool = typer.Option(False, "--text-first", help="Put the text before the image."),
) -> None:
    """Show where every role sits in one example prompt of MODEL (a blank grey image)."""
    from PIL import Image

    from .loading import load
    from .roles import ROLE_NAMES

    vlm = load(model)
    batch = vlm.prepare([Image.new("RGB", (224, 224), (128, 128, 128))], [prompt], image_first=not text_first)
    tok = vlm.family.tokenizer
    table = Table(title=f"{vlm.family.name}: {batch.length} tokens")
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
    "ablation (Sec. 4.3), patching (Sec. 4.4, Eq. 3)"
)


@app.command()
def run(
    experiment: str = typer.Argument(..., help=EXPERIMENT_HELP),
    model: str = typer.Option(..., "--model", help="Hub id or checkpoint directory."),
    data: str = typer.Option(..., "--data", help="vqav2, coco, flickr30k, imagenet or synthetic (no files needed)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Where the dataset's files are on disk."),
    n: int = typer.Option(None, "--n", "-n", help="Examples to sample (seeded; default 2,000, ImageNet: 100 per class). Under torchrun write -n: torchrun takes --n for its own options."),
    n_per_class: int = typer.Option(None, "--n-per-class", help="Images per class for ImageNet/synthetic classes."),
    out: str = typer.Option(None, "--out", help="Run directory (default runs/<experiment>-<model>-<time>); rerun to resume."),
    batch_size: int = typer.Option(1, "--batch-size", help="Examples per forward (halved automatically on OOM)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device_map: str = typer.Option(None, "--device-map", help="accelerate device map: auto, balanced, or a JSON dict."),
    seed: int = typer.Option(42, "--seed", help="Sampling seed."),
    prompt: str = typer.Option(None, "--prompt", help="Class prompt (default 'This animal is a' / 'This shape is a')."),
    task: str = typer.Option(None, "--task", help="ablation on synthetic data: vqa, captions or classes."),
    mode: str = typer.Option("zero", "--mode", help="ablation: knockout mode, zero (paper) or mask."),
    layers: str = typer.Option(None, "--layers", help="ablation: decoder layers of the knockouts, e.g. 0-31."),
    sweep: bool = typer.Option(False, "--sweep", help="ablation: growing layer windows from the last layer (SM 6.3)."),
    sweep_step: int = typer.Option(1, "--sweep-step", help="ablation: window growth per step with --sweep."),
    knockout: list[str] = typer.Option(None, "--knockout", help="ablation: extra source role to knock out (repeatable)."),
    k: int = typer.Option(None, "--k", help="overlap/ablation: neighbours for the neighbourhood overlap (30)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="ablation: new tokens (VQA 20, captions 60)."),
    threshold: float = typer.Option(None, "--threshold", help="cross-attention: share above which a position is shown."),
    image_index: int = typer.Option(None, "--image-index", help="overlap: the k of image[k] (default 31)."),
    z: float = typer.Option(None, "--z", help="modality-gap: ADP clustering confidence Z (1.2)."),
    min_cluster_size: int = typer.Option(None, "--min-cluster-size", help="modality-gap: drop smaller ADP clusters."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run (or resume) one of the paper's experiments; writes tables, figures and report.html to --out."""
    import json
    import os
    import sys

    from .analyses import EXPERIMENTS
    from .analyses.base import run as run_experiment

    if experiment not in EXPERIMENTS:
        raise typer.BadParameter(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    dmap = device_map
    if device_map and device_map.strip().startswith("{"):
        dmap = json.loads(device_map)
    cfg = dict(model=model, data=data, data_dir=data_dir, n=n, n_per_class=n_per_class, out=out,
               batch_size=batch_size, dtype=dtype, device_map=dmap, seed=seed, prompt=prompt, task=task,
               mode=mode, layers=layers, sweep=sweep or None, sweep_step=sweep_step if sweep else None,
               knockout=list(knockout) if knockout else None, k=k, max_new_tokens=max_new_tokens,
               threshold=threshold, image_index=image_index, Z=z, min_cluster_size=min_cluster_size,
               progress=not quiet)
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
    import json
    from pathlib import Path

    from .plots import compare as draw_compare
    from .store import RunStore

    loaded = []
    for d in runs:
        path = Path(d)
        if not (path / "manifest.json").exists():
            raise typer.BadParameter(f"{d} is not a narrowgate run directory (no manifest.json).")
        manifest = json.loads((path / "manifest.json").read_text())
        loaded.append((f"{manifest['model']['family']} ({path.name})", RunStore(path).tables(), manifest))
    kinds = {m["experiment"] for _, _, m in loaded}
    if len(kinds) != 1:
        raise typer.BadParameter(f"runs of different experiments cannot be overlaid: {sorted(kinds)}")
    for p in draw_compare(loaded, out):
        console.print(p)


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Where the runs and report.html go."),
    scale: float = typer.Option(1.0, "--scale", help="Multiply every sample size (e.g. 0.25 for a quick look)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Run every experiment on the two shipped model organisms (native and non-native) and compare them."""
    from .demo import demo as run_demo

    run_demo(out, scale=scale, progress=not quiet, console=console)


@app.command("train-organism")
def train_organism(
    kind: str = typer.Argument(..., help="native (Chameleon-style, early fusion), non-native (LLaVA-style) or gated (native with a planted [EOI] gate)."),
    out: str = typer.Option(None, "--out", help="Checkpoint directory (default: runs/organism-<kind>)."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
) -> None:
    """Train a model organism from scratch on synthetic images, reproducing the shipped one from its seed."""
    from rich.markdown import Markdown

    from . import organisms
    from .organisms.card import render_markdown

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
