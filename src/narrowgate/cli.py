"""The ``narrowgate`` command line.

Imports here stay light (typer, rich): torch and transformers load only inside the commands that
need them, so ``narrowgate --help`` answers at once. Every option is checked before any model
loads. An expected error (a `narrowgate.NarrowgateError`, a bad option, a path that cannot be
read or written) ends the command with its message on one line and exit status 1 (2 for a bad
option); ``--debug`` anywhere on the command line, or ``NARROWGATE_DEBUG=1``, shows its traceback.
Importing this module sets OpenMP's wait policy and thread count for a fair share of the CPU
(`narrowgate.threads.configure`), before anything loads torch.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from . import threads
from .catalog import catalog, family_cards, load_experiment, settings, summary
from .deprecation import dependency_deprecations_hidden
from .errors import NarrowgateError, OptionError
from .parsing import MODEL_HELP, parse_image_size, parse_layer_set, parse_size
from .roles import RoleError, parse_role

threads.configure()

console = Console()

#: Environment errors whose message already names the path: printed alone, like NarrowgateError.
_PATH_ERRORS = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
_ClickException: Any = next(  # click's ClickException, as typer bundles it
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def _one_line(message: object) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


#: Errors of the machine rather than of narrowgate (a full disk, a read-only file system...), and what to do.
_MACHINE = {
    errno.ENOSPC: "free some space, or give --out on another disk; a rerun resumes where this one stopped",
    errno.EDQUOT: "free some of your quota, or give --out elsewhere; a rerun resumes where this one stopped",
    errno.EROFS: "the file system is read-only: give --out on a writable one",
    errno.EEXIST: "a file is in the way of a folder narrowgate needs: give --out a folder",
    errno.ENAMETOOLONG: "give a shorter --out",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def _machine_error(e: OSError) -> str | None:
    """One line for an `OSError` the machine caused (see `_MACHINE`), naming the file; None for any other."""
    if e.errno is None:
        return None
    hint = _MACHINE.get(e.errno)
    if hint is None:
        return None
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write{where}: {e.strerror or os.strerror(e.errno)} ({hint})."


class _BareHelp:
    """``--help`` listed as the bare flag it is (typer 0.29 shows it as ``--help <bool>``, as if it took a value)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_BareHelp, TyperCommand):
    """A command whose help lists ``--help`` bare."""


class _Group(_BareHelp, TyperGroup):
    """A command group whose help lists ``--help`` bare."""


class _Commands(_Group):
    """The command group; its `main` is the one place where errors become one line and an exit status."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line: errors become one line and an exit status (the traceback with ``--debug``)."""
        extra["windows_expand_args"] = windows_expand_args
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("NARROWGATE_DEBUG", "") not in ("", "0")
        argv = [a for a in argv if a != "--debug"]
        if not sys.stderr.isatty():  # transformers' own bars (loading weights) redraw with \r: noise in a log
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            with dependency_deprecations_hidden():
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
        except OSError as e:
            line = _machine_error(e)
            if debug or line is None:
                raise
            typer.echo(f"Error: {_one_line(line)}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Commands,
    help="Measure how visual information reaches the text inside vision-language models. "
    "Add --debug (or set NARROWGATE_DEBUG=1) to see the traceback of an error.",
    no_args_is_help=True,
    add_completion=False,
)


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


def _refusing(parse, error):
    """A typer callback that refuses a value (or any item of a list) ``parse`` rejects with ``error``."""

    def check(value):
        for v in value if isinstance(value, list) else ([] if value is None else [value]):
            try:
                parse(v)
            except error as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return check


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


@app.command(cls=_Command)
def models() -> None:
    """List the supported model families, the checkpoints they were written for, and their [EOI] token."""
    cards = family_cards()  # every family's, plugins' too, read from their sources (no torch)
    table = Table(title="Supported model families")
    table.add_column("family", no_wrap=True)
    table.add_column("model_type")
    table.add_column(
        "checkpoints", no_wrap=True, min_width=max((len(c) for f in cards for c in f.checkpoints), default=0)
    )
    table.add_column("eoi", ratio=1)
    for fam in cards:
        table.add_row(fam.name, ", ".join(fam.model_types), "\n".join(fam.checkpoints), fam.eoi_doc)
    console.print(table)


@app.command(cls=_Command)
def roles(
    model: str = typer.Argument(..., help=MODEL_HELP, callback=_nonempty),
    prompt: str = typer.Option(
        None,
        help="Prompt text (default: the caption prompt of the checkpoint's narrowgate.json, else the paper's).",
        callback=_nonempty,
    ),
    text_first: bool = _flag("--text-first", "Put the text before the image."),
) -> None:
    """Show where every role sits in one example prompt of MODEL (a blank grey image)."""
    from PIL import Image

    from .data.prompts import sources
    from .loading import load
    from .roles import ROLE_NAMES

    vlm = load(model)
    if prompt is None:
        cfg = {"data": None}
        prompt = sources(cfg, ("captions",), vlm.family.name, vlm.n_layers, vlm.checkpoint_prompts)["caption_prompt"][0]
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


PARSERS = {
    "layers": _refusing(parse_layer_set, OptionError),
    "image_size": _refusing(parse_image_size, OptionError),
    "roles": _refusing(parse_role, RoleError),
    "device_map": _device_map,
    "size": _refusing(parse_size, OptionError),
    "finite": _finite,
    "positive": _positive,
    "nonempty": _nonempty,
}


def _cli_type(hint):
    """The command-line type of a settings field's type hint (``int | None`` -> int, ``list[str]`` -> list)."""
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for t in (bool, int, float, str):
        if t in args:
            return t
    return list[str] if any(typing.get_origin(a) is list for a in args) else str


def _experiment_command(name: str):
    """The click command ``narrowgate run NAME``: its options come from the experiment's settings dataclass,
    read without importing the experiment (`narrowgate.catalog.settings`), which loads torch only once the
    options are read and checked."""
    import inspect
    import typing
    from dataclasses import MISSING, fields

    config, namespace = settings(name)
    hints = typing.get_type_hints(config, globalns=namespace)
    params, choices = [], {}
    for f in fields(config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind = _cli_type(hints[f.name])
        flag = meta.get("flag") or f"--{f.name.replace('_', '-')}"
        default = None if f.default is MISSING else f.default
        if kind is bool:
            opt = _flag(flag, meta["help"])
        else:
            help_text = meta["help"] + (
                "" if default in (None, False) or kind is list[str] else f" [default: {default}]"
            )
            opt = typer.Option(
                ... if meta.get("required") else None,
                flag,
                *([meta["short"]] if meta.get("short") else []),
                help=escape(help_text),
                min=meta.get("min"),
                max=meta.get("max"),
                callback=PARSERS.get(meta["parse"]) if "parse" in meta else None,
                show_default=False,
            )
        if meta.get("choices"):
            choices[f.name] = (meta["choices"], flag)
        annotation = kind if kind is bool or meta.get("required") else kind | None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
    params.append(
        inspect.Parameter(
            "quiet", inspect.Parameter.KEYWORD_ONLY, default=_flag("--quiet", "No progress bar."), annotation=bool
        )
    )

    def command(**kw):
        for key, (allowed, flag) in choices.items():
            if kw.get(key) is not None and kw[key] not in allowed:
                raise typer.BadParameter(
                    f"unknown value {kw[key]!r}; choose one of {', '.join(allowed)}.", param_hint=flag
                )
        cfg = {k: (v if v is not False else None) for k, v in kw.items() if k != "quiet"}
        device_map = cfg.get("device_map")
        if isinstance(device_map, str) and device_map.strip().startswith("{"):
            cfg["device_map"] = json.loads(device_map)
        cfg["progress"] = not kw["quiet"]
        experiment = load_experiment(name)()  # a plugin that cannot be imported fails here, before torch loads
        from .runner import run

        store = run(experiment, cfg, command=["narrowgate", *sys.argv[1:]])
        if int(os.environ.get("RANK", "0")) == 0:
            _print_run(store)

    setattr(command, "__signature__", inspect.Signature(params))
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = summary(name)
    sub = typer.Typer(add_completion=False)
    sub.command(name, cls=_Command)(command)
    return typer.main.get_command(sub)


def _print_run(store) -> None:
    console.print(f"[green]done:[/green] {store.path}  (report: {store.path / 'report.html'})")
    for name, df in store.tables().items():
        if name != "failures" and len(df) <= 40:
            console.print(f"[bold]{name}[/bold]")
            console.print(df.to_string(index=False))
    failures = store.failures()
    if len(failures):
        console.print(f"[yellow]{len(failures)} example(s) skipped[/yellow]; see {store.path / 'tables/failures.csv'}")


class _Experiments(_Group):
    """``narrowgate run``: one command per registered experiment, built only when it is called."""

    def list_commands(self, ctx):
        return list(catalog())

    def get_command(self, ctx, name):
        return _experiment_command(name) if name in catalog() else None

    def resolve_command(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in catalog():
            raise typer.BadParameter(
                f"no experiment {args[0]!r}; choose one of {', '.join(catalog())}.", ctx=ctx, param_hint="EXPERIMENT"
            )
        return super().resolve_command(ctx, args)

    def format_help(self, ctx, formatter):
        """Plain help listing the experiments from `catalog` (building their commands would load torch)."""
        self.format_usage(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text(self.help or "")
        with formatter.section("Experiments"):
            formatter.write_dl(list(catalog().items()))


run_app = typer.Typer(
    cls=_Experiments,
    help="Run (or resume) an experiment; writes tables, figures and report.html to --out. "
    "'narrowgate run EXPERIMENT --help' lists its options.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(run_app, name="run")


@app.command(cls=_Command)
def compare(
    runs: list[str] = typer.Argument(..., help="Run directories of one experiment (several models)."),
    out: str = typer.Option("runs/compare", "--out", help="Where to write the overlay figures."),
) -> None:
    """Overlay several runs of one experiment in one figure, on relative depth (as the paper does)."""
    from pathlib import Path

    from .analyses import EXPERIMENTS
    from .plots import write_compare
    from .store import RunStore

    _folder(out, "--out")
    loaded = []
    labels = _labels([Path(d) for d in runs])
    for d, label in zip(runs, labels):
        path = Path(d)
        if not (path / "manifest.json").is_file():
            raise typer.BadParameter(f"{d} is not a narrowgate run directory (no manifest.json).")
        try:
            manifest = json.loads((path / "manifest.json").read_bytes())
        except (ValueError, RecursionError) as e:
            raise OptionError(f"{path / 'manifest.json'} is not valid JSON ({e}); the run directory is damaged.") from e
        family = manifest.get("model", {}).get("family") if isinstance(manifest, dict) else None
        if not isinstance(family, str) or not isinstance(manifest.get("experiment"), str):
            raise OptionError(
                f"{path / 'manifest.json'} names no model family or experiment (edited, or the run never started): "
                "rerun it, or leave it out of the comparison."
            )
        tables = RunStore(path).tables() if (path / "tables").is_dir() else {}
        if not any(name != "failures" for name in tables):
            raise OptionError(f"{d} has no tables yet (the run did not finish): finish it (rerun its command) first.")
        loaded.append((f"{family} ({label})", tables, manifest))
    kinds = {m["experiment"] for _, _, m in loaded}
    if len(kinds) != 1:
        raise typer.BadParameter(f"runs of different experiments cannot be overlaid: {sorted(kinds)}")
    (name,) = kinds
    for p in write_compare(EXPERIMENTS[name]().compare(loaded), name, out):
        console.print(p)


def _labels(paths: list[Path]) -> list[str]:
    """Each run's shortest trailing part of its path that tells it from the others (``a/x`` and ``b/x``)."""
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise OptionError("The same run directory is given twice: give each run once.")
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]


def _folder(path: str, option: str) -> None:
    """Refuse an output folder that is an existing file (``--out /etc/passwd``), before anything runs."""
    if Path(path).exists() and not Path(path).is_dir():
        raise OptionError(f"{option} {path} is a file, not a folder: give a folder to write into.")


@app.command(cls=_Command)
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Where the runs and report.html go."),
    scale: float = typer.Option(
        1.0, "--scale", callback=_positive, help="Multiply every sample size, above 0 (e.g. 0.25 for a quick look)."
    ),
    quiet: bool = _flag("--quiet", "No progress bars."),
) -> None:
    """Run every experiment on the three shipped model organisms (native, non-native, gated) and the gated one with its gate removed, and compare them."""
    from .demo import demo as run_demo

    run_demo(out, scale=scale, progress=not quiet, console=console)


study_app = typer.Typer(
    cls=_Group,
    help="Studies: many models trained and measured with the experiments to answer one question "
    "(each registered in docs/study-*.md before it ran).",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(study_app, name="study")


@study_app.command("emergence", cls=_Command)
def study_emergence(
    out: str = typer.Option(
        "studies/emergence",
        "--out",
        callback=_nonempty,
        help="Small files: results.csv, emergence.png, verdict.json, the cards; rerun to resume.",
    ),
    work: str = typer.Option(
        "runs/emergence",
        "--work",
        callback=_nonempty,
        help="The trained organisms and their measurement runs (large: keep out of git). Every run rebuilds "
        "results.csv's rows from here; a deleted measurement run is measured again.",
    ),
    scale: float = typer.Option(
        1.0,
        "--scale",
        callback=_positive,
        help="Multiply the training steps and every sample size (e.g. 0.1 for a quick look); one scale per --out.",
    ),
    only: list[str] = typer.Option(
        None,
        "--only",
        help="KEY=V[,V...] (repeatable; KEY share, tokens, layers or seed): only the grid points matching every one.",
    ),
    quiet: bool = _flag("--quiet", "No progress bars."),
) -> None:
    """When does a narrow gate emerge? Native organisms trained over generation share x image length x depth (28 models), each measured with the gate scan, the ablation and the cross-attention (docs/study-emergence.md)."""
    from .studies.emergence import parse_only, run_study

    run_study(
        out,
        work,
        scale=scale,
        only=parse_only(only),
        progress=not quiet,
        console=console,
        command=["narrowgate", *sys.argv[1:]],
    )


@app.command("train-organism", cls=_Command)
def train_organism(
    kind: str = typer.Argument(
        ...,
        help="native (Chameleon-style, early fusion), non-native (LLaVA-style) or gated (native with a planted [EOI] gate).",
    ),
    out: str = typer.Option(None, "--out", help="Checkpoint directory (default: runs/organism-<kind>)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Training seed."),
    force: bool = _flag("--force", "Overwrite what --out holds (a checkpoint trained before, or other files)."),
) -> None:
    """Train a model organism from scratch on synthetic images, reproducing the shipped one from its seed."""
    from rich.markdown import Markdown

    from . import organisms
    from .organisms.card import render_markdown

    if kind not in organisms.KINDS:
        raise typer.BadParameter(
            f"unknown organism {kind!r}; choose one of {', '.join(organisms.KINDS)}.", param_hint="KIND"
        )

    target = out or f"runs/organism-{kind}"
    card = organisms.train(kind, target, seed=seed, overwrite=force)
    console.print(Markdown(render_markdown(card)))
    console.print(f"[green]saved:[/green] {target} (card: {target}/CARD.md)")


@app.command(cls=_Command)
def finetune(
    model: str = typer.Option(..., "--model", help=MODEL_HELP, callback=_nonempty),
    recipe: str = typer.Option(
        ..., "--recipe", help="understanding (SM 7.1) or remove-gate (the paper's gate removal)."
    ),
    data: list[str] = typer.Option(
        ..., "--data", help="SOURCE=PATH (repeatable): llava-instruct, vqav2, coco; or synthetic."
    ),
    out: str = typer.Option(..., "--out", help="Run directory; rerun the same command to resume.", callback=_nonempty),
    knockout: list[str] = typer.Option(
        None,
        "--knockout",
        help="SRC->TGT[@LAYERS][:MODE] active while training (repeatable; replaces the recipe's; 'none' for none).",
    ),
    samples: list[str] = typer.Option(
        None,
        "--samples",
        help="SOURCE=N: training examples of a source (default: the recipe's mixture; 0 leaves a recipe source out).",
    ),
    steps: int = typer.Option(
        None, "--steps", min=1, help="Stop after this many optimizer steps (default: the recipe's epochs)."
    ),
    batch_size: int = typer.Option(
        None, "--batch-size", min=1, help="Examples per optimizer step (default: the recipe's)."
    ),
    micro_batch: int = typer.Option(
        4, "--micro-batch", min=1, help="Examples per forward; gradients accumulate up to --batch-size."
    ),
    lr: float = typer.Option(None, "--lr", callback=_positive, help="Peak learning rate (default: the recipe's)."),
    heldout: int = typer.Option(64, "--heldout", min=1, help="Examples set aside for the before/after scores."),
    seed: int = typer.Option(42, "--seed", min=0, help="Data sampling and order seed."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device_map: str = typer.Option(
        None, "--device-map", callback=_device_map, help="accelerate device map: auto, balanced, or a JSON dict."
    ),
    gradient_checkpointing: bool = _flag("--gradient-checkpointing", "Recompute activations in the backward pass."),
    merge: bool = _flag("--merge", "Also save the merged model as a normal checkpoint (OUT/merged)."),
    save_every: int = typer.Option(50, "--save-every", min=1, help="Optimizer steps between resumable checkpoints."),
    vqa_prompt: str = typer.Option(
        None,
        "--vqa-prompt",
        help="VQA prompt with {question} (default: the checkpoint's narrowgate.json, else the family preset).",
        callback=_nonempty,
    ),
    caption_prompt: str = typer.Option(
        None,
        "--caption-prompt",
        help="Caption prompt (default: the checkpoint's narrowgate.json, else the family preset).",
        callback=_nonempty,
    ),
    allow_fewer: bool = _flag(
        "--allow-fewer", "Train on fewer examples than asked when a source has fewer (the card records the counts)."
    ),
    quiet: bool = _flag("--quiet", "No progress bar."),
) -> None:
    """LoRA fine-tuning with knockouts active (the paper's two recipes); adapter, card and held-out scores in --out."""
    from . import recipes

    settings: dict[str, Any] = dict(
        knockouts=None if not knockout else [k for k in knockout if k.strip().lower() != "none"],
        samples=recipes.parse_samples(samples),
        steps=steps,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr,
        heldout=heldout,
        seed=seed,
        dtype=dtype,
        device_map=json.loads(device_map) if device_map and device_map.strip().startswith("{") else device_map,
        gradient_checkpointing=gradient_checkpointing,
        merge=merge,
        save_every=save_every,
        vqa_prompt=vqa_prompt,
        caption_prompt=caption_prompt,
        allow_fewer=allow_fewer,
    )
    sources = recipes.parse_data(data)
    checked = ("samples", "steps", "batch_size", "micro_batch", "lr", "heldout", "seed", "save_every", "dtype")
    recipes.check(recipe, sources, **{k: settings[k] for k in checked}, vqa_prompt=vqa_prompt)  # before torch loads

    from .finetune import finetune as run_finetune
    from .finetune import render_card

    card = run_finetune(
        model, recipe, sources, out, **settings, progress=not quiet, command=["narrowgate", *sys.argv[1:]]
    )
    console.print(render_card(card))
    if card["failures"]["examples"]:
        console.print(
            f"[yellow]{card['failures']['examples']} example(s) skipped[/yellow]; see {card['failures']['table']}"
        )


def commands() -> list[list[str]]:
    """Every command's path (``[]`` for ``narrowgate`` itself, ``["study", "emergence"]``, ...), in the order the
    help lists them: what the command-line reference documents."""
    root = typer.main.get_command(app)

    def walk(command: Any, path: list[str]) -> list[list[str]]:
        if not hasattr(command, "list_commands"):
            return [path]
        ctx = command.context_class(command)
        subs = [walk(command.get_command(ctx, name), [*path, name]) for name in command.list_commands(ctx)]
        return [path, *(p for sub in subs for p in sub)]

    return walk(root, [])


def main() -> None:
    """Run the ``narrowgate`` command line (``python -m narrowgate.cli``)."""
    app()


if __name__ == "__main__":
    main()
