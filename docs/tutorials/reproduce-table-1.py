# %% [markdown]
# # Reproduce the paper's Table 1 on your own checkpoint
#
# Table 1 of the paper asks whether the text still understands the image when [EOI] cannot pass anything on:
# for each model, the task scores with attention knocked out from [EOI] to the text, and from every image token
# to [EOI] and the text, relative to the baseline — VQA accuracy on VQAv2, CIDEr on COCO and Flickr30k, and the
# neighbourhood overlap of the last position with the ImageNet class. In native models (Chameleon, Emu3),
# knocking out [EOI] alone collapses every task; in LLaVA-like models it costs almost nothing.
#
# ## On a GPU, with the real data
#
# The four runs for one checkpoint (2,000 examples each, the paper's default; every run is resumable: rerun the
# same command after an interruption). The data directories hold the datasets as they are distributed:
#
# ```bash
# M=facebook/chameleon-7b   # or your fine-tune: a checkpoint directory
# OPTS="--dtype bfloat16 --device-map auto --batch-size 16"
# # VQAv2: v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json, val2014/*.jpg
# narrowgate run ablation --model $M --data vqav2 --data-dir /data/vqav2 $OPTS --out runs/t1-vqav2
# # COCO: Karpathy's dataset_coco.json (or captions_*.json) beside val2014/
# narrowgate run ablation --model $M --data coco --data-dir /data/coco $OPTS --out runs/t1-coco
# # Flickr30k: results_20130124.token beside flickr30k-images/
# narrowgate run ablation --model $M --data flickr30k --data-dir /data/flickr30k $OPTS --out runs/t1-flickr30k
# # ImageNet: train/<wnid>/*.JPEG (the paper's 100 animal classes ship with narrowgate)
# narrowgate run ablation --model $M --data imagenet --data-dir /data/imagenet --n-per-class 100 $OPTS \
#     --out runs/t1-imagenet
# ```
#
# Add `--mode mask` for the exactly blind variant, and the same commands under
# `torchrun --nproc-per-node 8 -m narrowgate.cli run ...` to use eight GPUs ([scale-out](../scale-out.md)).
# Where narrowgate's defaults differ from the paper's, an option restores them
# ([differences from the paper](../paper-differences.md)).
#
# ## Here: the same pipeline on an organism and miniature copies of the datasets
#
# This page runs the identical code path — the real loaders reading the real on-disk layouts — on the shipped
# `gated` organism and on miniature copies of the four datasets that the test suite builds
# (`tests/data/layouts.py`: a handful of 8 × 8 pixel images in each dataset's layout). The organism was trained on
# synthetic shapes, not photographs, so its scores on these images mean nothing; what matters is that every step a
# GPU user runs is exercised here, end to end.

# %%
import sys
import tempfile
from pathlib import Path

import pandas as pd

import narrowgate
from narrowgate.analyses import EXPERIMENTS
from narrowgate.errors import BaselineAtChance
from narrowgate.runner import run
from narrowgate.store import RunStore

# The checkout holding the test suite's dataset builders: this directory or one above it, or the one narrowgate
# is installed from (an editable install).
places = (Path.cwd(), *Path.cwd().parents, *Path(narrowgate.__file__).parents)
root = next(p for p in places if (p / "tests" / "data" / "layouts.py").is_file())
sys.path.insert(0, str(root))
from tests.data import layouts  # noqa: E402

work = Path(tempfile.mkdtemp())
data = {
    "vqav2": layouts.vqav2(work / "vqav2"),
    "coco": layouts.coco_karpathy(work / "coco"),
    "flickr30k": layouts.flickr30k(work / "flickr30k"),
    "imagenet": layouts.imagenet(work / "imagenet"),
}
for name, path in data.items():
    print(f"{name:>9}: {sorted(p.name for p in path.iterdir())[:4]}")

# %% [markdown]
# The four runs, from Python (the same settings as the command line's options, as a dict). The miniature copies
# are small, so the sample sizes are too; on the ImageNet copy (two images per class) the overlap uses k = 1.

# %%
settings = {
    "vqav2": dict(n=8, max_new_tokens=3),
    "coco": dict(n=4, max_new_tokens=8),
    "flickr30k": dict(n=8, max_new_tokens=8),
    "imagenet": dict(n_per_class=2, n=200, k=1),
}
runs, refused = {}, {}
for name, extra in settings.items():
    cfg = dict(model="gated", data=name, data_dir=str(data[name]), out=str(work / f"t1-{name}"), batch_size=8)
    runs[name] = Path(cfg["out"])
    try:
        run(EXPERIMENTS["ablation"](), {**cfg, **extra, "progress": False})
        print(name, "->", runs[name])
    except BaselineAtChance as e:  # the records are written; only the relative scores are refused
        refused[name] = str(e).split(", so")[0]
        print(name, "-> refused:", refused[name])

# %% [markdown]
# ## Table 1
#
# Each run's `tables/ablation.csv` holds the score of every condition and its value relative to the baseline;
# the table of the paper is their relative scores side by side. The organism has never seen photographs, so on
# these stand-ins its baseline is at chance on most datasets: a score relative to a baseline at chance is
# undefined, so narrowgate stops that run once its records are written (`BaselineAtChance`, exit status 1 on the
# command line) instead of printing a ratio. On your checkpoint and the real data, every row is filled.

# %%
rows = []
for name, path in runs.items():
    if name in refused:
        rows.append({"dataset": name, "refused": refused[name]})
        continue
    t = pd.read_csv(path / "tables" / "ablation.csv").set_index("condition")
    rows.append(
        {
            "dataset": name,
            "metric": t["metric"].iloc[0],
            "baseline": t.loc["baseline", "score"],
            "[EOI] -> text (relative)": t.loc["eoi->text", "relative"],
            "image -> text (relative)": t.loc["image->text", "relative"],
        }
    )
table1 = pd.DataFrame(rows).set_index("dataset")
table1

# %% [markdown]
# Every run, refused or not, kept what it computed: one record per example, and a manifest naming the data it
# read.

# %%
assert list(table1.index) == ["vqav2", "coco", "flickr30k", "imagenet"]
for name, path in runs.items():
    if name not in refused:  # relative = score / baseline score, for every condition
        t = pd.read_csv(path / "tables" / "ablation.csv").set_index("condition")
        assert ((t["relative"] - t["score"] / t.loc["baseline", "score"]).abs() < 1e-9).all(), name
    manifest = pd.read_json(path / "manifest.json", typ="series")
    records = len(RunStore(path).records().rows)
    examples = manifest["data"]["actual"]["examples"]
    print(f"{name}: {records} records of {examples} examples read from {manifest['data']['data_dir']}")
    assert manifest["data"]["dataset"] == name and records > 0

# %% [markdown]
# For your model, `narrowgate compare runs/t1-vqav2 runs/other-model-vqav2` overlays runs, and each run's
# `report.html` has its figures. What the score columns mean and every option of the ablation:
# [the ablation page](../experiments/ablation.md).
