# %% [markdown]
# # Find the gate in a model in five minutes
#
# Is there a single position through which the image reaches the text — a *narrow gate* — and where is it?
# The gate scan answers without knowing where to look: it knocks out, one at a time, every image-side
# position → text, and measures how much the next-token distribution moves (the *damage*). A gate is one
# position that does most of what knocking out the whole image does.
#
# This tutorial runs on two shipped model organisms, `gated` (a gate planted at [EOI]) and `native`
# (trained without one), so it runs anywhere in a few minutes on a CPU. With your own model, replace the
# name with a hub id or a checkpoint directory and add `--dtype bfloat16 --device-map auto`.
#
# From the shell, the whole thing is one command per model:
#
# ```bash
# narrowgate run gate-scan --model gated --data synthetic --n-per-class 2 --out runs/scan-gated
# narrowgate run gate-scan --model facebook/chameleon-7b --data imagenet --data-dir /data/imagenet \
#     --n-per-class 5 --dtype bfloat16 --device-map auto --out runs/scan-chameleon-7b
# ```

# %%
import tempfile
from pathlib import Path

import pandas as pd
import torch

import narrowgate as ng
from narrowgate.data.synthetic import make_scenes, render_scene

torch.manual_seed(0)
vlm = ng.load("gated")
images = [render_scene(s) for s in make_scenes(4, seed=1)]
batch = vlm.prepare(images, ["This shape is a"] * len(images))
print(vlm.family.name, "with", vlm.n_layers, "layers;", batch.length, "positions per example")

# %% [markdown]
# ## The scan by hand, on four images
#
# The image is the same in every condition, so it runs once (`share_prefix`); then every knockout is one row
# of a batched suffix pass (`forward_knockouts`): here, each image-side position alone, plus the whole image
# side. `batch.mask("image")` and the `eoi` position give the image-side positions of each example.

# %%
prefix = vlm.share_prefix(batch, length=int(batch.index("eoi").max()) + 1)
side = batch.mask("image") | batch.mask("eoi") | batch.mask("boi", require=False)  # [B, T] bool
positions = side[0].nonzero().flatten().tolist()  # the same layout in every example here
sources = torch.zeros(len(positions) + 1, batch.size, batch.length, dtype=torch.bool)
for c, p in enumerate(positions):
    sources[c, :, p] = True  # one position alone
sources[-1] = side  # the whole image side
base = vlm.forward(batch).logits[:, -1].float()
logits = vlm.forward_knockouts(prefix, sources, mode="mask")  # [C, B, V]
logp_base = torch.log_softmax(base, -1)
kl = (logp_base.exp() * (logp_base - torch.log_softmax(logits, -1))).sum(-1)  # [C, B] damage in nats
damage = kl.mean(1)
whole = float(damage[-1])
top = int(damage[:-1].argmax())
eoi = int(batch.index("eoi")[0])
print(f"whole image side knocked out: {whole:.3f} nats")
print(f"most damaging position: {positions[top]} ({'eoi' if positions[top] == eoi else 'an image token'}), "
      f"{float(damage[top]):.3f} nats = {float(damage[top]) / whole:.2f} of the whole image")
assert positions[top] == eoi and float(damage[top]) / whole > 0.5  # the planted gate, found

# %% [markdown]
# One position does (nearly) everything the whole image does: a narrow gate, at [EOI].
#
# ## The experiment: both organisms, with intervals and a verdict
#
# `narrowgate run gate-scan` does the same over a sample of images, adds a bootstrap interval for the
# *gate index* (damage of the top position ÷ damage of the whole image side), the number of top positions
# needed, together, for 90% of the damage, and a layer-resolved view. From Python it is the same runner:

# %%
from narrowgate.analyses import EXPERIMENTS
from narrowgate.runner import run

out = Path(tempfile.mkdtemp())
gates = {}
for model in ("gated", "native"):
    cfg = dict(model=model, data="synthetic", n_per_class=2, bootstrap=200, out=str(out / model), progress=False)
    store = run(EXPERIMENTS["gate-scan"](), cfg)
    gates[model] = pd.read_csv(store.path / "tables" / "gate.csv").iloc[0]
table = pd.DataFrame(gates).T[["gate_index", "gate_low", "gate_high", "positions_for_90", "top_position"]]
table

# %%
for model, g in gates.items():
    print(f"{model}: {g['verdict']}")
assert gates["gated"]["top_position"] == "eoi" and gates["gated"]["gate_index"] > 0.5
assert gates["native"]["gate_index"] < 0.5  # no gate: the image reaches the text through many tokens

# %% [markdown]
# The run directories also hold `tables/positions.csv` (every position's damage with its interval and its
# place on the image grid), `tables/layers.csv` (the top positions knocked out in layer windows) and
# `figures/gate_scan.png`. On a large model, `--method attribution` estimates every position's damage from one
# forward and one backward pass and checks the estimate exactly on `--check` examples; the
# [gate scan page](../experiments/gate-scan.md) explains every number.
