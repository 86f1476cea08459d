"""Forward hooks on the decoder layers and their attention and MLP modules: the ``resid``, ``attn_out`` and
``mlp_out`` sites (patches, captures, hooks), and knockouts through recurrent mixers (`recurrent.hook`).

Hooks are installed once per model and stay; with no active run they return at once. A pre-hook on
layer ``l`` sees residual index ``l`` (and notes the call's window offset); a hook on the last layer's
output sees index ``n_layers``; hooks on layer ``l``'s attention and MLP modules see their outputs.
Every tensor follows the device of the layer it meets (accelerate dispatch and disk offload included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..compat import layer_cache, past_length
from . import sites
from .state import InterventionError, active_run

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .state import Run


def _past_length(kwargs: dict[str, Any], layer: int, previous: int) -> int:
    """Where the current call's window starts; ``previous``: what an earlier layer of the call read (a recurrent
    layer's cache holds no positions)."""
    cache = layer_cache(kwargs)
    if cache is None:
        return 0
    got = past_length(cache, layer)
    return previous if got is None else got


def _replace_output(output: Any, new: torch.Tensor) -> Any:
    """A module's ``output`` with its hidden states (the first element of a tuple, or the whole) replaced."""
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _resid(run: Run, at: int, hidden: torch.Tensor) -> torch.Tensor:
    """The ``resid`` site's interventions at residual index ``at`` applied to ``hidden`` [B, Q, D]; a residual
    stream of another shape (several streams) is refused where something acts on it."""
    if hidden.dim() != 3 and run.plan.at_site("resid", at):
        raise InterventionError(
            f"The residual stream between this model's decoder layers is {hidden.dim()}-D {tuple(hidden.shape)}, not "
            "[batch, tokens, width]: it carries several streams (Gemma 3n's AltUp, HunYuan-V4's hyper-connections), "
            "which narrowgate cannot capture or patch. Knockouts work."
        )
    return sites.visit(run, "resid", at, hidden, run.scratch.offset)[0]


def install(
    layers: torch.nn.ModuleList,
    modules: list[tuple[torch.nn.Module, torch.nn.Module | None]],
    mixers: dict[int, Callable[..., Any]] | None = None,
) -> list[RemovableHandle]:
    """Install the site hooks on every decoder layer (``modules``: per layer its attention module, or its recurrent
    mixer, and its MLP module, None where it has none); returns the handles. ``mixers``: per recurrent layer the
    hook that knocks out through it (`recurrent.hook`), which runs before the layer's ``attn_out`` site.

    Once per model: a second `VLM` around the same model reuses the hooks already there (they read the
    active run, not the `VLM`), so interventions are never applied twice. Each call counts one user;
    `uninstall` removes the hooks when the last one leaves.
    """
    setattr(layers, "_narrowgate_users", getattr(layers, "_narrowgate_users", 0) + 1)
    installed = getattr(layers, "_narrowgate_hooks", None)
    if installed is not None:
        return installed
    n = len(layers)
    handles = []
    for l, (layer, (attn, mlp)) in enumerate(zip(layers, modules)):

        def pre(
            module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], l: int = l
        ) -> tuple[tuple, dict[str, Any]] | None:
            run = active_run()
            if run is None or not run.plan.edits:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            run.scratch.offset = _past_length(kwargs, l, run.scratch.offset)
            new = _resid(run, l, hidden)
            if new is hidden:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        def out_hook(site: str, l: int) -> Callable[[torch.nn.Module, tuple, Any], Any]:
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
                run = active_run()
                if run is None or site not in run.plan.sites:
                    return None
                hidden = output[0] if isinstance(output, tuple) else output
                new, _ = sites.visit(run, site, l, hidden, run.scratch.offset)
                return None if new is hidden else _replace_output(output, new)

            return hook

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        if mixers and l in mixers:
            handles.append(attn.register_forward_hook(mixers[l], with_kwargs=True))
        handles.append(attn.register_forward_hook(out_hook("attn_out", l)))
        if mlp is not None:
            handles.append(mlp.register_forward_hook(out_hook("mlp_out", l)))

    def post(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        run = active_run()
        if run is None or not run.plan.edits:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = _resid(run, n, hidden)
        return None if new is hidden else _replace_output(output, new)

    handles.append(layers[n - 1].register_forward_hook(post, with_kwargs=True))
    setattr(layers, "_narrowgate_hooks", handles)
    return handles


def uninstall(layers: torch.nn.ModuleList) -> bool:
    """One user of the hooks leaves; the last one removes them. Returns whether they were removed."""
    users = getattr(layers, "_narrowgate_users", 0) - 1
    if users > 0:
        setattr(layers, "_narrowgate_users", users)
        return False
    for handle in getattr(layers, "_narrowgate_hooks", ()):
        handle.remove()
    for name in ("_narrowgate_hooks", "_narrowgate_users"):
        if hasattr(layers, name):
            delattr(layers, name)
    return True
