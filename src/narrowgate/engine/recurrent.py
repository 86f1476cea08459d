"""Knockouts through the recurrent token mixers of hybrid decoders (docs/hybrid-decoders.md).

Hybrid decoders mix positions in some layers without softmax attention: Qwen 3.5's Gated DeltaNet layers run
a short causal convolution over their query/key/value inputs, then a gated delta-rule recurrence whose state
every position reads. A knockout there means what it means in attention, row by row: each target row computes
the layer on its own *view* of the sequence, which the blocked source positions do not reach —

- ``mask``: the source positions are absent from the view. The convolution window closes over the gap (it
  reads the previous positions that remain) and the state passes them unchanged (no decay, no erasure, no
  write): a target row computes what the layer computes on the sequence with those positions deleted, as
  mask mode in attention does (the softmax renormalises over the keys that remain). Two images give the
  same text after ``image -> (eoi, text)`` at every layer.
- ``zero``: the source positions stay in place but put nothing in: the convolution reads zero there, and
  the recurrence neither writes nor erases there, but the state still decays through them by the layer's
  own gate — as zeroed weights in attention still count in the softmax's normaliser, the rows still feel
  that the positions are there.

A target row always forms its own query from its own input (as in attention, where a row's query is its own
even when its key is blocked). Rows that share a set of blocked positions share one view: one extra pass of
the layer's convolution and recurrence (the model's own chunked kernel) per distinct set, beside the stock
pass that serves every other row. In generation, the prompt's pass leaves the view state of the generated
tokens' rows in the cache, and the stock layer decodes on from it.

The layer is entered through a forward hook on its module (installed with the site hooks, removed on
`VLM.close`); nothing of transformers is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .. import compat
from .protocol import InterventionError
from .state import active_run

if TYPE_CHECKING:
    from transformers import Cache

    from .state import Plan, ResolvedKnockout

#: A transformers recurrent mixer module (e.g. Qwen3_5GatedDeltaNet): its parts are read by attribute name
#: (`Mixer.parts`), which torch's Module typing cannot see.
MixerModule = Any
#: The state a view leaves after its last position: (convolution inputs, recurrent state).
MixerState = tuple[torch.Tensor, torch.Tensor]

#: Sites that need attention heads or probabilities, which a recurrent mixer has not.
ATTENTION_ONLY_SITES = ("head", "pattern")


class Mixer:
    """One kind of recurrent token mixer: how a decoder layer holds it and how views of it are computed.

    A view runs in three steps: `project` (per-position inputs, once for every view of a call), `mix` (the
    convolution and recurrence over a view's whole sequence) and `finish` (per-position output, at the
    positions read). ``carried`` names the projections `mix` reads over the whole sequence, which a shared
    prefix keeps."""

    name: str  # what the kind is, in words (error messages, docs)
    attribute: str  # the decoder layer's attribute holding the module
    parts: tuple[str, ...]  # the module's attributes the view computation uses
    carried: tuple[str, ...]  # projections `mix` reads at every position: [B, T, ...], positions on axis 1

    def find(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        """The layer's mixer module of this kind, or None when it has none (or lacks one of `parts`)."""
        module = getattr(layer, self.attribute, None)
        return module if module is not None and all(hasattr(module, p) for p in self.parts) else None

    def project(self, module: MixerModule, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-position inputs of ``hidden`` [B, T, D] (padding already zeroed): [B, T, ...] each."""
        raise NotImplementedError

    def mix(
        self, module: MixerModule, proj: dict, absent: torch.Tensor, silent: torch.Tensor, want_state: bool
    ) -> tuple[torch.Tensor, MixerState | None]:
        """The mixed values [R, T, ...] of ``R`` views (``proj``: `carried` per view row): ``absent`` [R, T]
        positions deleted, ``silent`` ones putting nothing in. With ``want_state``, also the state each view leaves
        after its last position (for `store`)."""
        raise NotImplementedError

    def finish(self, module: MixerModule, mixed: torch.Tensor, proj: dict) -> torch.Tensor:
        """The module's output [R, n, D] at ``n`` positions from their mixed values and their own projections."""
        raise NotImplementedError

    def store(self, module: MixerModule, cache: Cache, b: int, state: MixerState) -> None:
        """Put a view's final state in row ``b`` of the cache, for the stock layer to decode on from."""
        raise NotImplementedError


class GatedDeltaNet(Mixer):
    """Qwen 3.5's (and Qwen 3.5 MoE's) Gated DeltaNet: a causal depthwise convolution over the concatenated
    query/key/value projections, then the gated delta rule ``S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``,
    read as ``o_t = S_t^T q_t`` (queries and keys L2-normalised), gated by an RMSNorm and projected out."""

    name = "Gated DeltaNet (linear attention)"
    attribute = "linear_attn"
    parts = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "conv1d", "A_log", "dt_bias", "norm", "out_proj")
    carried = ("x", "beta", "g")

    def project(self, module: MixerModule, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The convolution's input ``x``, the write strength ``beta``, the decay ``g`` and the output gate ``z``."""
        return {
            "x": module.in_proj_qkv(hidden),  # the convolution's input
            "beta": module.in_proj_b(hidden).sigmoid(),
            "g": -module.A_log.float().exp() * F.softplus(module.in_proj_a(hidden).float() + module.dt_bias),
            "z": module.in_proj_z(hidden),
        }

    def mix(
        self, module: MixerModule, proj: dict, absent: torch.Tensor, silent: torch.Tensor, want_state: bool
    ) -> tuple[torch.Tensor, MixerState | None]:
        """The view's convolution (`view_conv`), then the model's own chunked delta rule with ``beta`` zeroed at
        absent and silent positions and ``g`` at absent ones."""
        rule = compat.gated_delta_rule(module)
        if rule is None:
            raise InterventionError(
                f"{type(module).__name__}: this transformers release has no torch_chunk_gated_delta_rule beside it, "
                "which narrowgate runs for knockouts through Gated DeltaNet layers; use transformers 5.23 - 5.25."
            )
        x = proj["x"].transpose(1, 2)  # [R, C, T]
        R, T = absent.shape
        weight = module.conv1d.weight[:, 0]
        conv = ACT2FN[module.activation](view_conv(x, weight, module.conv1d.bias, absent, silent)).to(x.dtype)
        q, k, v = torch.split(conv.transpose(1, 2), [module.key_dim, module.key_dim, module.value_dim], -1)
        beta = proj["beta"].masked_fill((absent | silent)[..., None], 0.0)  # nothing written or erased there
        g = proj["g"].masked_fill(absent[..., None], 0.0)  # no decay through an absent position
        core, final = rule(
            q.reshape(R, T, -1, module.head_k_dim),
            k.reshape(R, T, -1, module.head_k_dim),
            v.reshape(R, T, -1, module.head_v_dim),
            g=g,
            beta=beta,
            initial_state=None,
            output_final_state=want_state,
            use_qk_l2norm_in_kernel=True,
        )
        state = (last_inputs(x, absent, silent, weight.shape[1]), final) if want_state else None
        return core, state

    def finish(self, module: MixerModule, mixed: torch.Tensor, proj: dict) -> torch.Tensor:
        """The module's gated RMSNorm (gate ``z``) and output projection."""
        R, n = mixed.shape[:2]
        dv = module.head_v_dim
        gated = module.norm(mixed.reshape(-1, dv), proj["z"].reshape(-1, dv)).reshape(R, n, -1)
        return module.out_proj(gated)

    def store(self, module: MixerModule, cache: Cache, b: int, state: MixerState) -> None:
        """Overwrite row ``b`` of the layer's convolution and recurrent states in the cache."""
        conv, recurrent = compat.recurrent_cache_states(cache, module.layer_idx)
        if conv is None or recurrent is None:
            raise InterventionError(
                f"{type(module).__name__} left no state in the cache after the prompt; narrowgate cannot hand the "
                "generated tokens the knocked-out state."
            )
        conv[b] = state[0].to(conv.dtype)
        recurrent[b] = state[1].to(recurrent.dtype)


#: The recurrent mixers narrowgate knocks out through, tried in order on each decoder layer without attention.
KINDS: tuple[Mixer, ...] = (GatedDeltaNet(),)


def find(layer: torch.nn.Module) -> tuple[Mixer, torch.nn.Module] | None:
    """The recurrent mixer of a decoder layer, with its kind; None when it has none narrowgate knows."""
    for kind in KINDS:
        module = kind.find(layer)
        if module is not None:
            return kind, module
    return None


def describe(layer: torch.nn.Module) -> str:
    """A decoder layer's parts, by name and class, for an error that refuses it."""
    parts = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children())
    return f"{type(layer).__name__} with {parts}"


# --- the view -------------------------------------------------------------------------------------------------
def _order(present: torch.Tensor) -> torch.Tensor:
    """[R, T]: per row, its present positions first, ascending."""
    return torch.argsort((~present).to(torch.int8), dim=1, stable=True)


def _back(order: torch.Tensor, before: torch.Tensor, r: int) -> torch.Tensor:
    """Per row, the ``r``-th present position (``order``: `_order`) before each place that has ``before`` present
    positions before it ([R, n]); -1 where there is none."""
    rank = before - r
    pos = torch.gather(order, 1, rank.clamp(min=0))
    return pos.masked_fill(rank < 0, -1)


def _taps(x: torch.Tensor, pos: torch.Tensor, silent: torch.Tensor) -> torch.Tensor:
    """``x`` [R, C, T] read at ``pos`` ([R, n]; -1 none), zero where there is none or the position is silent."""
    ok = (pos >= 0) & ~torch.gather(silent, 1, pos.clamp(min=0))
    got = torch.gather(x, 2, pos.clamp(min=0)[:, None, :].expand(x.shape[0], x.shape[1], pos.shape[1]))
    return got * ok[:, None, :].to(x.dtype)


def view_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, absent: torch.Tensor, silent: torch.Tensor
) -> torch.Tensor:
    """The causal depthwise convolution (``weight`` [C, K]; tap ``K-1`` on the position itself) of ``x`` [R, C, T],
    before its activation: each position reads its own input and the ``K-1`` previous positions that are not
    ``absent``, a ``silent`` one reading zero. With neither, the stock ``conv1d`` of the layer."""
    x = x.to(weight.dtype)
    K = weight.shape[1]
    present = ~absent
    before = present.cumsum(1) - present.long()  # present positions strictly before each position
    order = _order(present)
    out = x * weight[:, K - 1, None]
    for r in range(1, K):
        out = out + _taps(x, _back(order, before, r), silent) * weight[:, K - 1 - r, None]
    return out if bias is None else out + bias[:, None]


def last_inputs(x: torch.Tensor, absent: torch.Tensor, silent: torch.Tensor, K: int) -> torch.Tensor:
    """The convolution state a view leaves ([R, C, K]): the inputs of its last ``K`` present positions, oldest first
    (zero where silent, or before the start), as the stock layer caches its last ``K`` inputs."""
    present = ~absent
    n = present.sum(1, keepdim=True)
    order = _order(present)
    pos = torch.cat([_back(order, n, r) for r in range(K, 0, -1)], dim=1)
    return _taps(x, pos, silent)


# --- the hook ---------------------------------------------------------------------------------------------------
#: Elements of one view chunk's convolution input (rows x positions x channels); more rows run in several chunks.
VIEW_BUDGET = 1 << 25


def hook(kind: Mixer, layer: int) -> Callable[..., Any]:
    """The forward hook on decoder layer ``layer``'s mixer. In a prefix pass it keeps the prefix's projections; in a
    suffix pass over a shared prefix every row gets its view's output (the stock layer saw no prefix); otherwise
    the target rows of the active run's knockouts get their views' outputs. With no active run, or nothing to do at
    this layer, the stock output stands."""

    def knockouts(module: MixerModule, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        run = active_run()
        if run is None:
            return None
        plan = run.plan
        active = plan.knockouts_at(layer)
        prefix = None if plan.mixer_prefix is None else plan.mixer_prefix[layer]
        if not (active or prefix is not None or plan.record_mixers):
            return None
        if active:
            run.record.attention_calls.add(layer)
        cache = compat.mixer_cache(kwargs)
        if cache is not None and run.scratch.mixed.get(layer) is cache:
            return None  # a decoding step, on the view state this run's prompt pass left in the cache
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        pad = kwargs.get("attention_mask")
        if isinstance(pad, torch.Tensor) and pad.dim() == 2:  # as the layer zeroes padding before it mixes
            hidden = (hidden * pad[:, :, None]).to(hidden.dtype)
        proj = kind.project(module, hidden)
        if plan.record_mixers:
            run.record.mixer_prefix[layer] = {k: proj[k].detach() for k in kind.carried}
        out = output[0] if isinstance(output, tuple) else output
        new = apply(kind, module, proj, out, active, cache, prefix)
        if cache is not None:
            run.scratch.mixed[layer] = cache
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return knockouts


def _codes(masks: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Which of the knockouts' masks hold each place, as an integer per place (bit ``i``: mask ``i``)."""
    if len(masks) > 62:
        raise InterventionError(
            f"{len(masks)} knockouts act at one recurrent layer; narrowgate groups the rows of at most 62."
        )
    code = torch.zeros(like.shape, dtype=torch.long, device=like.device)
    for i, m in enumerate(masks):
        code |= m.long() << i
    return code


def apply(
    kind: Mixer,
    module: MixerModule,
    proj: dict,
    out: torch.Tensor,
    active: list[ResolvedKnockout],
    cache: Cache | None,
    prefix: dict | None,
) -> torch.Tensor | None:
    """``out`` (the stock output [B, Q, D] of a call over positions P..P+Q-1) with rows replaced by their views'
    outputs: the target rows of ``active`` knockouts, and, over a shared ``prefix`` (the carried projections of
    positions 0..P-1, per example; rows condition-major), every row. With a ``cache`` (a prompt pass before
    generation), each example's generated tokens' view state goes into the cache. None when nothing changes."""
    B, Q = out.shape[:2]
    dev = out.device
    P = 0 if prefix is None else prefix[kind.carried[0]].shape[1]
    T = P + Q
    code = _codes([k.target.window(P, T, dev) for k in active], out[..., 0])  # [B, Q]
    gen = None
    if cache is not None and prefix is None:
        gen = _codes(
            [torch.as_tensor(k.target.generated, device=dev).reshape(-1).expand(B) for k in active], out[:, 0, 0]
        )
    groups = set(code.unique().tolist()) | (set(gen.unique().tolist()) if gen is not None else set())
    if prefix is None:
        groups.discard(0)  # rows that block nothing read the stock output
    if not groups:
        return None
    sources = [k.source.window(0, T, dev) for k in active]
    rows, absent, silent, group_of = [], [], [], []
    for u in sorted(groups):
        mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
        zero = torch.zeros_like(mask)
        for i, k in enumerate(active):
            if u >> i & 1:
                if k.mode == "mask":
                    mask |= sources[i]
                else:
                    zero |= sources[i]
        needed = (code == u).any(1) | (gen == u if gen is not None else False)
        for b in needed.nonzero().flatten().tolist():
            rows.append(b)
            absent.append(mask[b])
            silent.append(zero[b] & ~mask[b])
            group_of.append(u)
    views, states = _views(kind, module, proj, prefix, rows, torch.stack(absent), torch.stack(silent), gen is not None)
    which = torch.full((B, Q), -1, dtype=torch.long, device=dev)  # the view row each place reads, -1: stock
    for r, (b, u) in enumerate(zip(rows, group_of)):
        which[b][code[b] == u] = r
        if gen is not None and int(gen[b]) == u:
            assert cache is not None and states is not None  # ``gen`` exists with a cache, and asks for the states
            kind.store(module, cache, b, (states[0][r], states[1][r]))
    picked = views[which.clamp(min=0), torch.arange(Q, device=dev)[None, :]]
    return torch.where((which >= 0)[..., None], picked.to(out.dtype), out)


def _views(
    kind: Mixer,
    module: MixerModule,
    proj: dict,
    prefix: dict | None,
    rows: list[int],
    absent: torch.Tensor,
    silent: torch.Tensor,
    want_state: bool,
) -> tuple[torch.Tensor, MixerState | None]:
    """The outputs [R, Q, D] of the views of ``rows`` (row ``rows[r]`` of ``proj``, after its example's ``prefix``),
    in chunks of `VIEW_BUDGET`; with ``want_state``, their final states."""
    R, T = absent.shape
    x = proj[kind.carried[0]]
    per_row = max(1, T * x.shape[-1])
    step = max(1, VIEW_BUDGET // per_row)
    index = torch.tensor(rows, device=x.device)
    outs: list[torch.Tensor] = []
    states: list[MixerState | None] = []
    for s in range(0, R, step):
        own = index[s : s + step]
        if prefix is None:
            full = {k: proj[k][own] for k in kind.carried}
        else:
            ex = own % prefix[kind.carried[0]].shape[0]  # rows are condition-major: row c * B + b reads example b
            full = {k: torch.cat([prefix[k][ex].to(proj[k].dtype), proj[k][own]], 1) for k in kind.carried}
        mixed, state = kind.mix(module, full, absent[s : s + step], silent[s : s + step], want_state)
        outs.append(kind.finish(module, mixed[:, T - x.shape[1] :], {k: v[own] for k, v in proj.items()}))
        states.append(state)
    if not want_state:
        return torch.cat(outs), None
    kept = [st for st in states if st is not None]  # every one, with ``want_state``
    return torch.cat(outs), (torch.cat([st[0] for st in kept]), torch.cat([st[1] for st in kept]))


# --- what the engine refuses on hybrid models ------------------------------------------------------------------
def refuse(plan: Plan, mixers: dict, attention_layers: list[int], family: str) -> None:
    """Refuse, by name, interventions that need attention where a layer has a recurrent mixer instead."""
    for r in plan.edits:
        if r.site not in ATTENTION_ONLY_SITES:
            continue
        bad = sorted(r.expected_layers(plan.n_layers) & set(mixers))
        if bad:
            kind, module = mixers[bad[0]]
            raise InterventionError(
                f"{r.name}: site {r.site!r} needs attention heads and probabilities, and decoder layers {bad} of this "
                f"{family} model are {kind.name} ({type(module).__name__}), which has neither; its attention layers "
                f"are {attention_layers}."
            )


def refuse_generation(plan: Plan, mixers: dict, family: str) -> None:
    """Refuse knockouts at recurrent layers whose source takes in generated tokens: the state the layer caches
    has already taken them in when a later token reads it."""
    for k in plan.knockouts:
        layers = set(mixers) if k.layers is None else set(k.layers) & set(mixers)
        if layers and bool(torch.as_tensor(k.source.generated).any()):
            kind, module = mixers[min(layers)]
            raise InterventionError(
                f"{k.name}: its source takes in generated tokens, which the state of decoder layer {min(layers)} of "
                f"this {family} model ({kind.name}, {type(module).__name__}) has already taken in when later tokens "
                "read it; generate with sources in the prompt, or restrict layers= to the attention layers."
            )
