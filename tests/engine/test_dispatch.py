"""Interventions on a model dispatched by accelerate (one decoder layer offloaded to disk)."""

from __future__ import annotations

import torch

import narrowgate as ng
from tests.fixtures.common import PROMPTS, images


def _device_map(vlm, offload_layer: int) -> dict:
    """Every module on the CPU except one decoder layer, which goes to disk."""
    names = {id(m): n for n, m in vlm.model.named_modules()}
    layers_name = names[id(vlm.layers)]
    out = {}

    def walk(prefix, module):
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            out[f"{prefix}{name}"] = "cpu"
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == layers_name:
                for i in range(len(child)):
                    out[f"{full}.{i}"] = "disk" if i == offload_layer else "cpu"
            elif layers_name.startswith(full + "."):
                walk(full + ".", child)
            else:
                out[full] = "cpu"

    walk("", vlm.model)
    return out


def test_dispatched_model_gives_same_results(loaded, checkpoint_dir, family, tmp_path):
    plain = loaded(family)
    dmap = _device_map(plain, offload_layer=1)
    disp = ng.load(checkpoint_dir(family), dtype="float32", device_map=dmap, offload_folder=tmp_path)
    assert any(p.device.type == "meta" for p in disp.layers[1].parameters()), "layer 1 must be offloaded"
    batch = plain.prepare(images(2, seed=4), PROMPTS)
    base = plain.forward(batch, capture=ng.Capture("eoi"))
    kw = dict(
        knockouts=[ng.Knockout("image", "text", mode="mask", layers=(0, 1)), ng.Knockout("eoi", "text", layers=(2,))],
        patches=[ng.Patch("eoi", 1, base.residuals["eoi"].flip(0)[:, 1])],
        capture=ng.Capture(("eoi", "last")),
        attention_stats=True,
    )
    a, b = plain.forward(batch, **kw), disp.forward(batch, **kw)
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(a.logits[keep], b.logits[keep], atol=1e-5, rtol=0)
    for role in ("eoi", "last"):
        torch.testing.assert_close(a.residuals[role], b.residuals[role], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        a.cross_modal_attention.fractions, b.cross_modal_attention.fractions, atol=1e-5, rtol=0, equal_nan=True
    )
    kos = kw["knockouts"]
    assert torch.equal(
        plain.generate(batch, knockouts=kos, max_new_tokens=4), disp.generate(batch, knockouts=kos, max_new_tokens=4)
    )
