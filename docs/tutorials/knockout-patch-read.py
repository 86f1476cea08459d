# %% [markdown]
# # Knock out, patch and read any position from Python
#
# Everything the experiments do is a few calls on a `VLM`: find positions by *role*, read the residual
# stream there (`Capture`), block attention edges (`Knockout`), overwrite a residual (`Patch`), and do all of
# it while generating or over many conditions at once. This tutorial runs each on the shipped `non-native`
# organism (a tiny LLaVA) and checks the results against what they must be. Replace `"non-native"` with a hub
# id or a checkpoint directory to do the same on your model.

# %%
import random

import torch

import narrowgate as ng
from narrowgate.data.synthetic import make_scene, render_scene

vlm = ng.load("non-native", dtype="float32")
rng = random.Random(0)
scenes = [make_scene(rng, shape=s, color=c) for s, c in (("circle", "red"), ("square", "blue"), ("star", "green"))]
images = [render_scene(s) for s in scenes]
batch = vlm.prepare(images, ["This shape is a"] * len(images))
print(f"{vlm.family.name}: {vlm.n_layers} decoder layers, residual width {vlm.hidden_size}")

# %% [markdown]
# ## Roles: where things are
#
# Every position has a role: `bos`, `image` (the whole image span), `image[k]` (its k-th content token),
# `eoi` (the first token after the image — the family's end-of-image token where it has one), `text` and
# `last`. `narrowgate roles MODEL` prints the same table from the shell.

# %%
for role in ("image", "image[0]", "eoi", "text", "last"):
    print(f"{role:>9}: positions {batch.positions(role)[0].tolist()[:6]}{' ...' if len(batch.positions(role)[0]) > 6 else ''}")
assert int(batch.index("eoi")[0]) == int(batch.positions("image")[0].max()) + 1

# %% [markdown]
# ## Read: residuals and cross-modal attention
#
# `Capture` reads the residual stream at roles, at every *residual index* (0 = embeddings, `n_layers` = the
# last layer's output): the same numbers as the model's own `output_hidden_states`.
# `attention_stats=True` adds the share of the text's attention to the image that each position receives,
# per decoder layer, computed from the text rows only.

# %%
base = vlm.forward(batch, capture=ng.Capture(("eoi", "last")), attention_stats=True)
print("residuals at eoi:", tuple(base.residuals["eoi"].shape), "= [examples, n_layers + 1, width]")
with torch.no_grad():
    hs = vlm.model(**vlm.model_inputs(batch), output_hidden_states=True).hidden_states
eoi = batch.index("eoi")
rows = torch.arange(batch.size)
assert torch.allclose(base.residuals["eoi"][:, 3], hs[3][rows, eoi], atol=1e-5)
share = base.cross_modal_attention.share("eoi")
print("share of text->image attention on [EOI], per layer (example 0):", [round(x, 3) for x in share[0].tolist()])

# %% [markdown]
# ## Knock out: `zero` (the paper's) and `mask` (exactly blind)
#
# `Knockout(source, target)` stops `target` positions from attending to `source` positions, in every decoder
# layer unless `layers=` says which. `mode="zero"` sets those attention weights to zero without
# renormalising, as the paper does; `mode="mask"` removes them before the softmax, so the text is *exactly*
# blind. With the image knocked out in mask mode, two different images give identical text logits:

# %%
blind = ng.Knockout("image", ("eoi", "text"), mode="mask")
zero = ng.Knockout("image", ("eoi", "text"), mode="zero")
out_mask = vlm.forward(batch, knockouts=[blind]).logits[:, -1]
out_zero = vlm.forward(batch, knockouts=[zero]).logits[:, -1]
print("mask mode, max difference between images:", float((out_mask[0] - out_mask[1]).abs().max()))
print("zero mode, max difference between images:", float((out_zero[0] - out_zero[1]).abs().max()))
assert torch.equal(out_mask[0], out_mask[1])  # exactly blind
early = vlm.forward(batch, knockouts=[ng.Knockout("image", ("eoi", "text"), layers=range(0, 2), mode="mask")])
print("image knocked out in decoder layers 0-1 only, top tokens:", early.logits[:, -1].argmax(-1).tolist())

# %% [markdown]
# ## Patch: move information between examples
#
# `Patch(role, resid, value)` overwrites the residual stream at one role's position at residual index `resid`
# (the input of decoder layer `resid`); only later layers see it. Giving every example its neighbour's [EOI]
# at every depth from the start makes the model answer as if it saw the neighbour's image wherever [EOI] is what
# carries it — in this non-native model, which reads the image tokens directly, far less so:

# %%
donor = base.residuals["eoi"].roll(1, dims=0)
patched = vlm.forward(batch, patches=[ng.Patch("eoi", resid=1, value=donor[:, 1])]).logits[:, -1]
same_as_own = (patched.argmax(-1) == base.logits[:, -1].argmax(-1)).float().mean().item()
print(f"next token unchanged after patching [EOI] at resid 1: {same_as_own:.2f}")
self_patch = vlm.forward(batch, patches=[ng.Patch("eoi", resid=1, value=base.residuals["eoi"][:, 1])]).logits
assert torch.allclose(self_patch, base.logits, atol=1e-5)  # patching a residual with itself changes nothing

# %% [markdown]
# ## Generate with interventions, and many conditions in one pass
#
# `generate` takes the same knockouts and patches; generated tokens count as `text`. `forward_conditions`
# runs named conditions together: the image (the shared prefix) runs once, every condition's text as batch
# rows of one pass — the results equal separate forwards.

# %%
tokens = vlm.generate(batch, knockouts=[blind], max_new_tokens=3)
print("completions with the image knocked out:", vlm.decode(tokens, batch))
print("completions:", vlm.decode(vlm.generate(batch, max_new_tokens=3), batch))
conditions = {
    "baseline": {},
    "eoi->text": {"knockouts": [ng.Knockout("eoi", "text")]},
    "image->text (mask)": {"knockouts": [blind]},
}
outs = vlm.forward_conditions(batch, conditions)
for name, o in outs.items():
    print(f"{name:>20}: top next tokens {vlm.family.tokenizer.convert_ids_to_tokens(o.last_logits.argmax(-1).tolist())}")
assert torch.allclose(outs["image->text (mask)"].last_logits, out_mask.float(), atol=1e-4)

# %% [markdown]
# ## When something cannot be done, it says so
#
# An intervention never silently does nothing: a role absent from the batch, a layer beyond the model, an
# empty layer set — each is refused with one line saying why.

# %%
try:
    vlm.forward(batch, knockouts=[ng.Knockout("eoi", "text", layers=[99])])
except ng.InterventionError as e:
    print("refused:", e)
try:
    ng.Knockout("eoi", "text", layers=())
except ValueError as e:
    print("refused:", e)
vlm.close()  # gives the model back as it was found (attention implementation, hooks)
