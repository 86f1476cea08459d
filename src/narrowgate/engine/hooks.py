"""Forward hooks on the decoder layers: residual capture and patching.

Hooks are installed once per model and stay; with no active run they return at once. A
pre-hook on layer ``l`` sees residual index ``l``; a hook on the last layer's output sees
index ``n_layers``. Every tensor follows the device of the layer it meets (accelerate
dispatch and disk offload included); captured values are stored on the CPU.
"""

from __future__ import annotations

import torch

from ..compat import layer_cache
from .state import InterventionError, active_run


def _past_length(kwargs, layer: int) -> int:
    cache = layer_cache(kwargs)
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


def _visit(run, index: int, hidden: torch.Tensor, offset: int) -> torch.Tensor:
    """Apply patches at residual ``index`` to ``hidden`` [B, Q, D] (a copy if changed); record captures."""
    if hidden.dim() != 3:
        raise InterventionError(
            f"The residual stream between this model's decoder layers is {hidden.dim()}-D {tuple(hidden.shape)}, not "
            "[batch, tokens, width]: it carries several streams (Gemma 3n's AltUp, HunYuan-V4's hyper-connections), "
            "which narrowgate cannot capture or patch. Knockouts work."
        )
    Q = hidden.shape[1]
    changed = False
    for i, (layer, pos, value) in enumerate(run.plan.patches):
        if layer != index:
            continue
        rel = pos - offset
        ok = (rel >= 0) & (rel < Q)
        if not bool(ok.any()):
            continue
        if not changed:
            hidden = hidden.clone()
            changed = True
        rows = torch.nonzero(ok).flatten()
        hidden[rows.to(hidden.device), rel[rows].to(hidden.device)] = value[rows].to(hidden.device, hidden.dtype)
        run.record.patched.add(i)
    if index in run.plan.capture_resids:
        for name, positions in run.plan.capture_positions.items():
            _accumulate(run.record.captured.setdefault(name, {}), index, hidden, positions, offset)
    return hidden


def _accumulate(store: dict, index: int, hidden: torch.Tensor, positions: list[torch.Tensor], offset: int) -> None:
    """Add the residuals at ``positions`` that fall in this call's window to ``store[index]`` = (sum, count)."""
    B, Q, D = hidden.shape
    total = torch.zeros(B, D, dtype=torch.float32)
    count = torch.zeros(B, dtype=torch.float32)
    hit = False
    for b, pos in enumerate(positions):
        rel = pos - offset
        rel = rel[(rel >= 0) & (rel < Q)]
        if rel.numel():
            total[b] = hidden[b, rel.to(hidden.device)].float().sum(0).cpu()
            count[b] = rel.numel()
            hit = True
    if not hit:
        return
    if index in store:
        s, c = store[index]
        total, count = total + s, count + c
    store[index] = (total, count)


def install(layers: torch.nn.ModuleList) -> list:
    """Install the capture/patch hooks on every decoder layer; returns the handles.

    Once per model: a second `VLM` around the same model reuses the hooks already there (they read the
    active run, not the `VLM`), so captures and patches are never applied twice. Each call counts one
    user; `uninstall` removes the hooks when the last one leaves.
    """
    setattr(layers, "_narrowgate_users", getattr(layers, "_narrowgate_users", 0) + 1)
    installed = getattr(layers, "_narrowgate_hooks", None)
    if installed is not None:
        return installed
    n = len(layers)
    handles = []
    for l, layer in enumerate(layers):

        def pre(module, args, kwargs, l=l):
            run = active_run()
            if run is None or not (run.plan.patches or run.plan.capture_resids):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            run.scratch.offset = _past_length(kwargs, l)
            new = _visit(run, l, hidden, run.scratch.offset)
            if new is hidden:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))

    def post(module, args, kwargs, output):
        run = active_run()
        if run is None or not (run.plan.patches or run.plan.capture_resids):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = _visit(run, n, hidden, run.scratch.offset)
        if new is hidden:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

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
