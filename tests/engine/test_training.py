"""Interventions under autograd: training-mode gradients agree with an independent float64 eager reference,
mask mode cuts every gradient path from the blocked positions, and gradient checkpointing re-applies them."""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from tests.engine import reference
from tests.fixtures.common import PROMPTS, images

ANSWERS = [" a red circle", " blue"]
KNOCKOUTS = {
    "eoi-zero": [ng.Knockout("eoi", "text")],
    "image-mask": [ng.Knockout("image", ("eoi", "text"), mode="mask")],
    "mixed": [ng.Knockout("eoi", "text", layers=(0,)), ng.Knockout("last_image", "text", mode="mask", layers=(1, 2))],
}


def _training_vlm(checkpoint_dir, family, attn="sdpa", dtype="float64"):
    vlm = ng.load(checkpoint_dir(family), dtype=dtype, attn_implementation=attn)
    vlm.model.train()
    return vlm


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _engine_grads(vlm, tb, knockouts, patches=()):
    vlm.model.zero_grad(set_to_none=True)
    with vlm.intervening(tb.batch, knockouts=knockouts, patches=patches):
        loss = vlm.answer_loss(tb)
    loss.backward()
    return float(loss.detach()), _grads(vlm.model)


def _reference_grads(ref, vlm, tb, knockouts):
    """The same loss on a separately loaded float64 model whose eager attention edits the entries by hand."""
    b = tb.batch
    reference.EDITS.update(mask=[], zero=[])
    for k in knockouts:
        reference.EDITS[k.mode].append((k.layers, b.mask(k.targets), b.mask(k.sources)))
    try:
        ref.zero_grad(set_to_none=True)
        logits = ref(**vlm.model_inputs(b), use_cache=False).logits
        labels = tb.labels
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
    finally:
        reference.EDITS.update(mask=[], zero=[])
    return float(loss.detach()), _grads(ref)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(KNOCKOUTS))
def test_parameter_gradients_match_float64_reference(checkpoint_dir, family, attn, name):
    vlm = _training_vlm(checkpoint_dir, family, attn)
    tb = vlm.prepare_training(images(2, seed=1), PROMPTS, ANSWERS)
    kos = KNOCKOUTS[name]
    loss, ours = _engine_grads(vlm, tb, kos)
    ref = reference.reference_model(
        checkpoint_dir(family), vlm.family.decoder_layers, dtype=torch.float64, vision_attn=attn
    ).train()
    ref_loss, theirs = _reference_grads(ref, vlm, tb, kos)
    _, plain = _engine_grads(vlm, tb, ())
    assert abs(loss - ref_loss) <= 1e-9 * abs(ref_loss)
    assert set(ours) == set(theirs) and len(ours) > 0
    # Relative to each tensor's norm; gradients that vanish analytically (e.g. key biases, to which the softmax
    # is invariant) are rounding noise in both models and are compared on the scale of the whole gradient.
    floor = 1e-4 * max(float(g.norm()) for g in theirs.values())
    for n in theirs:
        assert float((ours[n] - theirs[n]).norm()) <= 1e-6 * max(float(theirs[n].norm()), floor), n
    moved = max(_rel(plain[n], theirs[n]) for n in theirs if theirs[n].norm() > 0)
    assert moved > 1e-4, "the knockout must change the gradients"


def _residual_zero_grad(vlm, tb, knockouts):
    """Gradient of the answer loss w.r.t. the decoder's input (residual index 0), [B, T, D]."""
    seen = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        seen["h"] = hidden

    handle = vlm.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with vlm.intervening(tb.batch, knockouts=knockouts):
            loss = vlm.answer_loss(tb)
        loss.backward()
    finally:
        handle.remove()
    return seen["h"].grad


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_knockout_cuts_the_gradient_to_blocked_positions(checkpoint_dir, family, attn):
    vlm = _training_vlm(checkpoint_dir, family, attn, dtype="float32")
    tb = vlm.prepare_training(images(2, seed=1), PROMPTS, ANSWERS)
    image = tb.batch.mask("image")
    text = tb.labels != -100
    mask_grad = _residual_zero_grad(vlm, tb, [ng.Knockout("image", ("eoi", "text"), mode="mask")])
    assert torch.count_nonzero(mask_grad[image]) == 0
    assert mask_grad[text].abs().max() > 0
    zero_grad = _residual_zero_grad(vlm, tb, [ng.Knockout("image", ("eoi", "text"), mode="zero")])
    assert zero_grad[image].abs().max() > 0, "zero mode leaks through the normaliser, so its gradient does too"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gradient_checkpointing_reapplies_interventions(checkpoint_dir, family, attn):
    vlm = _training_vlm(checkpoint_dir, family, attn)
    tb = vlm.prepare_training(images(2, seed=1), PROMPTS, ANSWERS)
    kos = KNOCKOUTS["image-mask"]
    patch = ng.Patch("eoi", resid=1, value=torch.randn(2, vlm.hidden_size, dtype=torch.float64))
    _, plain = _engine_grads(vlm, tb, kos, [patch])
    vlm.enable_gradient_checkpointing()
    _, ckpt = _engine_grads(vlm, tb, kos, [patch])
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12)


def test_foreign_gradient_checkpointing_is_refused(checkpoint_dir):
    vlm = _training_vlm(checkpoint_dir, "llava")
    vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tb = vlm.prepare_training(images(2, seed=1), PROMPTS, ANSWERS)
    with pytest.raises(ng.InterventionError, match="enable_gradient_checkpointing"):
        with vlm.intervening(tb.batch, knockouts=KNOCKOUTS["eoi-zero"]):
            pass


def test_patch_gradient_flows_to_the_value_not_the_overwritten_residual(checkpoint_dir):
    vlm = _training_vlm(checkpoint_dir, "chameleon")
    tb = vlm.prepare_training(images(2, seed=1), PROMPTS, ANSWERS)
    value = torch.randn(2, vlm.hidden_size, dtype=torch.float64, requires_grad=True)
    seen = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        seen["h"] = hidden

    handle = vlm.layers[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        with vlm.intervening(tb.batch, patches=[ng.Patch("eoi", resid=0, value=value)]):
            loss = vlm.answer_loss(tb)
        loss.backward()
    finally:
        handle.remove()
    eoi = tb.batch.index("eoi")
    rows = torch.arange(2)
    assert torch.count_nonzero(seen["h"].grad[rows, eoi]) == 0
    assert value.grad.abs().min() > 0
