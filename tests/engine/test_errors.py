"""An intervention that cannot apply raises; it never silently does nothing."""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from narrowgate.engine.state import InterventionError
from tests.fixtures.common import PROMPTS, images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("llava")


@pytest.fixture(scope="module")
def batch(vlm):
    return vlm.prepare(images(2), PROMPTS)


def test_empty_role_raises(vlm, batch):
    with pytest.raises(InterventionError, match="eol"):
        vlm.forward(batch, knockouts=[ng.Knockout("eol", "text")])
    with pytest.raises(InterventionError, match="boi"):
        vlm.forward(batch, patches=[ng.Patch("boi", 1, torch.zeros(2, vlm.hidden_size))])
    with pytest.raises(InterventionError, match="eol"):
        vlm.forward(batch, capture=ng.Capture("eol"))


def test_layer_out_of_range_raises(vlm, batch):
    L = vlm.n_layers
    with pytest.raises(InterventionError, match="out of range"):
        vlm.forward(batch, knockouts=[ng.Knockout("eoi", "text", layers=(L,))])
    with pytest.raises(InterventionError, match="out of range"):
        vlm.forward(batch, patches=[ng.Patch("eoi", L + 1, torch.zeros(2, vlm.hidden_size))])
    with pytest.raises(InterventionError, match="out of range"):
        vlm.forward(batch, capture=ng.Capture("eoi", resids=(-1,)))


def test_bad_specs_raise():
    with pytest.raises(ng.RoleError, match="Valid roles"):
        ng.Knockout("nope", "text")
    with pytest.raises(ValueError, match="mode"):
        ng.Knockout("eoi", "text", mode="soft")
    with pytest.raises(ValueError, match="single-position"):
        ng.Patch("image", 0, torch.zeros(1, 4))


def test_patch_batch_mismatch_raises(vlm, batch):
    with pytest.raises(InterventionError, match="batch size"):
        vlm.forward(batch, patches=[ng.Patch("eoi", 0, torch.zeros(3, vlm.hidden_size))])


def test_unwrapped_attention_raises(checkpoint_dir):
    """A model whose attention is not sdpa/eager cannot take knockouts: clear error up front."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = checkpoint_dir("llava")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    model.set_attn_implementation({"text_config": "flex_attention"})
    vlm = ng.VLM(model, AutoProcessor.from_pretrained(path))
    b = vlm.prepare(images(2), PROMPTS)
    with pytest.raises(InterventionError, match="flex_attention"):
        vlm.forward(b, knockouts=[ng.Knockout("eoi", "text")])
    with pytest.raises(InterventionError, match="flex_attention"):
        vlm.forward(b, attention_stats=True)


def test_bypassed_attention_is_detected(checkpoint_dir):
    """If something switches the model back to stock attention behind narrowgate's back, it raises."""
    vlm = ng.load(checkpoint_dir("llava"), dtype="float32")
    vlm.model.set_attn_implementation({"text_config": "sdpa"})
    b = vlm.prepare(images(2), PROMPTS)
    with pytest.raises(InterventionError, match="did not apply"):
        vlm.forward(b, knockouts=[ng.Knockout("eoi", "text")])


@pytest.mark.parametrize("shape", [(3, 1, None), (3, None), (None,)], ids=["wrong-batch", "no-condition-axis", "1d"])
def test_knockout_sources_of_the_wrong_shape_are_refused(vlm, shape):
    """Both scan entry points name the shape they need."""
    same = vlm.prepare(images(2), [PROMPTS[0]] * 2)
    prefix = vlm.share_prefix(same, same.layouts[0].eoi + 1)
    sources = torch.zeros(*[same.length if n is None else n for n in shape], dtype=torch.bool)
    need = rf"sources must be \[C, 2, {same.length}\]"
    with pytest.raises(InterventionError, match=need):
        vlm.generate_knockouts(same, sources, max_new_tokens=1)
    with pytest.raises(InterventionError, match=need):
        vlm.forward_knockouts(prefix, sources)


@pytest.mark.parametrize("name", ["s_aux", "sinks"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "sdpa"])
def test_attention_kwargs_the_engine_does_not_implement_are_refused_by_name(vlm, name, eager):
    """Attention sinks would be silently dropped by a by-hand softmax: the call is refused, naming the argument."""
    from narrowgate.engine import attention

    module = vlm.layers[0].self_attn
    q = torch.zeros(1, module.config.num_attention_heads, 3, module.head_dim)
    k = v = torch.zeros(1, module.config.num_key_value_heads, 3, module.head_dim)
    fn = attention._make(eager=eager)
    fn(module, q, k, v, None)  # without it the same call runs
    with pytest.raises(InterventionError, match=name):
        fn(module, q, k, v, None, **{name: torch.zeros(module.config.num_attention_heads)})


def test_a_residual_stream_not_batch_tokens_width_is_refused(vlm, batch):
    """Gemma 3n's AltUp carries [streams, batch, tokens, width] between decoder layers: a capture or patch there
    is refused by name (a hook placed before narrowgate's gives layer 1 such an input here)."""

    def stacked(module, args, kwargs):
        if args:
            return (args[0][None], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"][None]}

    handle = vlm.layers[1].register_forward_pre_hook(stacked, with_kwargs=True, prepend=True)
    try:
        with pytest.raises(InterventionError, match=r"4-D .*several streams .*AltUp"):
            vlm.forward(batch, capture=ng.Capture("last"))
        with pytest.raises(InterventionError, match="cannot capture or patch"):
            vlm.forward(batch, patches=[ng.Patch("last", 1, torch.zeros(2, vlm.hidden_size))])
    finally:
        handle.remove()
    assert vlm.forward(batch, capture=ng.Capture("last")).residuals["last"].shape[:2] == (2, vlm.n_layers + 1)
