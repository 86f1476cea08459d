"""Working memory by design: every split of an analysis's work is chosen from a memory budget.

The budget is the working memory (beyond the weights) one model call may use. By default it is what a
*plain forward of the same batch* needs — the stock forward as ``generate`` runs its prefill: the key/value
cache of every layer, one layer's activations, the last position's logits — estimated from the model's
shape (`plain_forward_bytes`); ``VLM.memory_budget`` (``--memory-budget``, parsed by
`narrowgate.parsing.parse_size`) sets it in bytes instead. From
it the engine chooses

- how many conditions one suffix pass takes (`Budget.conditions_per_pass`): the shared prefix's cache is
  held, and each condition costs its suffix tokens' activations, its masks, its attention scores over the
  prefix (or, in PyTorch's fused CPU kernel, its additive bias) and its logits;
- how many query rows one attention block takes where a whole sequence runs with interventions
  (`Budget.query_rows`): masks, scores and probabilities exist for a block of rows at a time, so no
  T x T (or conditions x T x heads) tensor is ever built whole. Blocks may use a quarter of the budget,
  the rest being the forward's own activations.

Results do not depend on the split (tests). The estimates count tensors, not the allocator's slack; the
benchmark `benchmarks/scaling.py` measures the real peaks against a plain forward's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import compat

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Share of the budget the attention blocks of a whole-sequence call may use (the rest: its activations).
BLOCK_SHARE = 4


@dataclass(frozen=True)
class Shape:
    """What a language model's working memory depends on (from its text config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    element: int  # bytes per activation (the model's dtype)
    softcap: bool = False

    @classmethod
    def of(cls, model: PreTrainedModel) -> Shape:
        """The sizes of ``model``'s text decoder, read from its config."""
        cfg = model.config.get_text_config()

        def size(name: str, default: int) -> int:  # per-layer lists (Gemma 3n's MLP) count at their largest
            value = getattr(cfg, name, None)
            return int(max(value) if isinstance(value, (list, tuple)) else value) if value else default

        hidden = size("hidden_size", 0)
        heads = size("num_attention_heads", 1)
        return cls(
            layers=size("num_hidden_layers", 1),
            hidden=hidden,
            intermediate=size("intermediate_size", 4 * hidden),
            heads=heads,
            kv_heads=size("num_key_value_heads", heads),
            head_dim=size("head_dim", hidden // heads),
            vocab=size("vocab_size", 0),
            element=int(model.dtype.itemsize),
            softcap=getattr(cfg, "attn_logit_softcapping", None) is not None,
        )

    @property
    def per_token(self) -> int:
        """Activation bytes per token in one decoder layer: the MLP's gate, up and product, the residual,
        its norm, the queries and the attention output, the keys and values."""
        kv = self.kv_heads * self.head_dim
        return (3 * self.intermediate + 4 * self.hidden + 2 * kv) * self.element

    def cache(self, rows: int, length: int) -> int:
        """Bytes of the key/value cache of every layer for ``rows`` sequences of ``length`` positions."""
        return self.layers * 2 * rows * length * self.kv_heads * self.head_dim * self.element


def plain_forward_bytes(shape: Shape, rows: int, length: int, keep: int = 1) -> int:
    """Estimated working memory of a plain forward of ``rows`` sequences of ``length`` tokens (weights excluded):
    the key/value cache of every layer, one layer's activations, the logits of the last ``keep`` positions."""
    return shape.cache(rows, length) + rows * length * shape.per_token + rows * keep * shape.vocab * 4


def fused_prefix(
    device: torch.device | str, dtype: torch.dtype, *, probs: bool, zero_in_prefix: bool, grad: bool, softcap: bool
) -> bool:
    """Whether a suffix pass's prefix part runs in PyTorch's fused CPU attention (`attention.with_prefix`), which
    holds an additive bias per entry instead of every head's scores."""
    return (
        compat.flash_cpu is not None
        and torch.device(device).type == "cpu"
        and dtype == torch.promote_types(dtype, torch.float32)
        and not (probs or zero_in_prefix or grad or softcap)
    )


@dataclass(frozen=True)
class Budget:
    """A model's shape and the user's limit (bytes; None = a plain forward's need, per call)."""

    shape: Shape
    limit: int | None = None

    def total(self, rows: int, length: int) -> int:
        """The budget of a call on ``rows`` sequences of ``length`` positions."""
        return self.limit if self.limit is not None else plain_forward_bytes(self.shape, rows, length)

    def per_condition(
        self, rows: int, suffix: int, keys: int, *, fused: bool, probs: bool, grad: bool, knockouts: int, keep: int
    ) -> int:
        """Bytes one condition adds to a suffix pass: ``rows`` examples x ``suffix`` tokens, each query meeting
        ``keys`` keys (prefix + suffix), with ``knockouts`` knockouts, logits of the last ``keep`` positions."""
        s = self.shape
        tokens = rows * suffix
        group = s.heads // s.kv_heads
        entry = 4 + knockouts  # the model's mask, the knockouts' blocks, the allowed entries (booleans)
        if fused:
            entry += 6 * group  # the folded additive bias (float32) and the booleans it is made from
        else:  # scores of every head (float32, a low-precision copy where the model runs in one), where to fill
            entry += s.heads * (4 + (s.element if s.element < 4 else 0)) + s.heads // 2 + 2
        if probs:  # probabilities of every head: built, normalised and concatenated (kept per layer under autograd)
            entry += 20 * s.heads * (s.layers if grad else 1)
        return tokens * (s.per_token + keys * entry) + rows * keep * s.vocab * 8

    def conditions_per_pass(
        self,
        rows: int,
        length: int,
        prefix: int,
        *,
        fused: bool,
        probs: bool = False,
        grad: bool = False,
        knockouts: int = 1,
        keep: int = 1,
    ) -> int:
        """How many conditions one suffix pass over a shared prefix of ``prefix`` positions takes (at least 1):
        as many as fit in the call's budget beside the prefix's key/value cache."""
        free = self.total(rows, length) - self.shape.cache(rows, prefix)
        each = self.per_condition(
            rows, length - prefix, length, fused=fused, probs=probs, grad=grad, knockouts=knockouts, keep=keep
        )
        return max(1, free // max(1, each))

    def query_rows(self, rows: int, length: int, bytes_per_entry: int) -> int:
        """Query rows per attention block of a whole-sequence call (at least 1): each row costs ``bytes_per_entry``
        per key for each of ``rows`` sequences; blocks use `BLOCK_SHARE`'s share of the budget."""
        return max(1, self.total(rows, length) // BLOCK_SHARE // max(1, rows * length * bytes_per_entry))
