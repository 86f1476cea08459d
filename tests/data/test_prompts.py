"""Per-family presets of a run's inputs: the image size (Pixtral 512 x 512 as the authors) and the Chameleon-34B
ImageNet prompt, resolved into the manifest, overridable, and applied to every experiment that reads them."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from narrowgate.analyses import EXPERIMENTS
from narrowgate.cli import app
from narrowgate.data.prompts import LONG_CLASS, resize, resolve, resolve_image_size
from narrowgate.errors import BaselineAtChance, OptionError
from narrowgate.parsing import parse_image_size
from narrowgate.runner import run


def test_image_size_parses_width_by_height_or_the_processor():
    assert parse_image_size("512x512") == (512, 512) and parse_image_size(" 640X480 ") == (640, 480)
    assert parse_image_size("processor") is None
    for bad in ("512", "0x5", "ax5", "512x", "-5x5", "99999x2", "5x5x5"):
        with pytest.raises(OptionError, match="--image-size"):
            parse_image_size(bad)


def test_image_size_presets_follow_the_authors_and_are_overridden():
    assert resolve_image_size({}, "pixtral", generates=False)["image_size"] == "512x512"
    assert resolve_image_size({}, "pixtral", generates=True)["image_size"] == "processor"  # their VQA/caption scripts
    assert resolve_image_size({}, "chameleon", generates=False)["image_size"] == "processor"
    assert resolve_image_size({"image_size": "336X336"}, "pixtral", generates=False)["image_size"] == "336x336"
    assert resolve_image_size({"image_size": "processor"}, "pixtral", generates=False)["image_size"] == "processor"


def test_resize_is_the_authors_torchvision_resize():
    from torchvision.transforms.functional import resize as tv_resize

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    ours = resize(image, (512, 256))
    assert ours.size == (512, 256)
    assert np.array_equal(np.asarray(ours), np.asarray(tv_resize(image, [256, 512])))  # torchvision takes [h, w]
    assert resize(image, None) is image


def test_chameleon_34b_long_prompt_on_every_imagenet_input():
    for kinds in (("class",), ("class_patching",)):
        assert resolve({"data": "imagenet"}, kinds, "chameleon", 48)["prompt"] == LONG_CLASS
    assert resolve({"data": "imagenet"}, ("class",), "chameleon", 32)["prompt"] == "This animal is a"
    # the experiments that read ImageNet through the class prompt all ask for it
    for name in ("cross-attention", "overlap", "logit-lens", "patching", "steering"):
        kinds = EXPERIMENTS[name]().prompt_kinds(EXPERIMENTS[name].config(data="imagenet"))
        assert resolve({"data": "imagenet"}, kinds, "chameleon", 48)["prompt"] == LONG_CLASS, name
    for name in ("ablation", "gate-scan"):
        kinds = EXPERIMENTS[name]().prompt_kinds(EXPERIMENTS[name].config(data="imagenet", task=None))
        assert resolve({"data": "imagenet"}, kinds, "chameleon", 48)["prompt"] == LONG_CLASS, name


def test_pixtral_runs_record_the_preset_and_resize_every_image(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("pixtral")
    base = dict(model=str(checkpoint_dir("pixtral")), data="synthetic", n_per_class=1, progress=False, batch_size=6)
    store = run(EXPERIMENTS["cross-attention"](), {**base, "out": str(tmp_path / "preset")}, vlm=vlm, command=["t"])
    manifest = json.loads(store.manifest_path.read_text())
    assert manifest["config"]["image_size"] == "512x512"
    # the tiny Pixtral's processor fits images in 32 x 32 with 8-pixel patches: 512 x 512 -> 4 x 4 tokens
    assert set(store.records().rows["n_content"]) == {16}
    # 16 x 8 pixels is below the processor's limit: 2 patches wide, 1 high
    small = {**base, "out": str(tmp_path / "small"), "image_size": "16x8"}
    store = run(EXPERIMENTS["cross-attention"](), small, vlm=vlm, command=["t"])
    assert set(store.records().rows["n_content"]) == {2}
    assert json.loads(store.manifest_path.read_text())["config"]["image_size"] == "16x8"
    gen = {**base, "out": str(tmp_path / "vqa"), "task": "vqa", "n": 2, "max_new_tokens": 2}
    with contextlib.suppress(BaselineAtChance):  # a random-weight Pixtral answers at chance: no relative scores
        run(EXPERIMENTS["ablation"](), gen, vlm=vlm, command=["t"])
    manifest = json.loads((tmp_path / "vqa" / "manifest.json").read_text())
    assert manifest["config"]["image_size"] == "processor"


def test_bad_image_size_is_one_line_before_anything_loads(tmp_path):
    out = tmp_path / "run"
    args = ["run", "overlap", "--model", str(tmp_path / "none"), "--data", "synthetic", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--image-size", "512"])
    assert result.exit_code == 2 and "--image-size" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
