"""Several images and video in one prompt, on the tiny checkpoints of every family that takes them: each image's
and each frame's roles against the model's own features and positions, per-image and per-frame knockouts and
patches against independent references (tests/families/several_checks.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import narrowgate as ng
from narrowgate.families import LayoutError
from tests.families import several_checks as checks

#: Families with a tiny checkpoint in tests/fixtures that lay out several images in one prompt.
IMAGES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "idefics3", "smolvlm", "chameleon", "llava", "llava_next"]
IMAGES += ["pixtral", "janus", "llava_next_video"]
#: Model types served by the generic adapter, built by the coverage matrix's builder (Mistral 3, Gemma 3).
GENERIC = ["mistral3", "gemma3"]
#: Families whose processor takes video.
VIDEO = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next_video"]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "coverage.py"


@pytest.fixture(scope="module")
def generic_checkpoint(tmp_path_factory):
    """``generic_checkpoint(model_type)`` -> a tiny checkpoint built by scripts/coverage.py's builder."""
    spec = importlib.util.spec_from_file_location("narrowgate_coverage", SCRIPT)
    coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coverage)
    built = {}

    def get(model_type):
        if model_type not in built:
            path = tmp_path_factory.mktemp(f"ckpt-{model_type}")
            coverage.build(model_type, path)
            built[model_type] = path
        return built[model_type]

    return get


@pytest.fixture(params=IMAGES + GENERIC)
def model(request, loaded, checkpoint_dir, generic_checkpoint):
    import narrowgate as ng

    if request.param in GENERIC:
        path = generic_checkpoint(request.param)
        return ng.load(
            path, dtype="float32", attn_implementation="eager" if request.param == "gemma3" else "sdpa"
        ), path
    return loaded(request.param), checkpoint_dir(request.param)


def test_each_images_roles_hold_its_features(model):
    checks.check_image_roles(model[0])


def test_per_image_knockouts_and_patches_equal_the_references(model):
    checks.check_image_interventions(*model)


def test_first_image_knocked_out_leaves_the_text_blind_to_it(model):
    checks.check_image_blind(model[0])


@pytest.mark.parametrize("family", VIDEO)
def test_frames_are_the_models_frames(loaded, family):
    checks.check_frames(loaded(family))


@pytest.mark.parametrize("family", VIDEO)
def test_frame_knockouts_and_scan_equal_the_references(loaded, checkpoint_dir, family):
    checks.check_video_interventions(loaded(family), checkpoint_dir(family))


@pytest.mark.parametrize("family", VIDEO)
def test_first_frame_knocked_out_leaves_the_text_blind_to_it(loaded, family):
    checks.check_video_blind(loaded(family))


#: The llava-hf OneVision template: a message's images first, back to back, then its text.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + part['text'] }}"
    "{% endfor %}<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


def test_images_written_back_to_back_are_told_apart_by_their_lengths(loaded, monkeypatch):
    """The real OneVision template writes several images with no token between them: the layout cuts the run at
    each image's length (its base features and newline), image 1 gets no eoi (the next token is image 2's) and
    each image's tokens hold its own features."""
    vlm = loaded("llava_onevision")
    monkeypatch.setattr(vlm.processor, "chat_template", ONEVISION_TEMPLATE)
    examples = checks.two_images()
    batch = vlm.prepare(examples, checks.PROMPTS)
    hs0 = checks.hidden(vlm, batch)[0]
    for b in range(2):
        one, two = batch.visuals(b)
        assert two.start == one.end + 1 and one.eoi is None and two.eoi == two.end + 1
        assert batch.positions("eoi@1")[b].numel() == 0 and batch.positions("eoi")[b].tolist() == [two.eoi]
        for n, lay in ((1, one), (2, two)):
            alone = vlm.prepare([examples[b][n - 1]], [checks.PROMPTS[b]])
            mine = alone.positions("image_content")[0][: len(lay.content)]
            checks.close(hs0[b, lay.content], checks.hidden(vlm, alone)[0][0, mine], f"image {n}'s features")
    with pytest.raises(ng.InterventionError, match="eoi@1 is empty in every example"):
        vlm.forward(batch, knockouts=[ng.Knockout("eoi@1", "text")])


def test_images_back_to_back_without_their_lengths_are_refused(loaded, monkeypatch):
    """A family that cannot tell the lengths (LLaVA-1.5) refuses two images written back to back, by name."""
    vlm = loaded("llava")
    template = ONEVISION_TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "")
    monkeypatch.setattr(vlm.processor, "chat_template", template)
    with pytest.raises(LayoutError, match="back to back cannot be told apart"):
        vlm.prepare(checks.two_images(), checks.PROMPTS)
