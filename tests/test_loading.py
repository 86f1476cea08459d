"""Loading: the real AutoProcessor/AutoModel path on saved directories, and one clear error per bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GotOcr2Config,
    GotOcr2ForConditionalGeneration,
    GotOcr2ImageProcessorPil,
    GotOcr2Processor,
    HYV4VLConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    Qwen2Config,
)

import narrowgate as ng
from tests.fixtures.common import make_tokenizer, text_config


def test_load_from_directory_and_wrap_in_memory(checkpoint_dir):
    path = checkpoint_dir("llava")
    vlm = ng.load(path, dtype="float32")
    assert vlm.family.name == "llava" and vlm.model.dtype == torch.float32
    wrapped = ng.VLM(AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path))
    assert wrapped.family.name == "llava" and wrapped.n_layers == vlm.n_layers
    assert ng.load(path, dtype="bfloat16").model.dtype == torch.bfloat16


def test_missing_directory(tmp_path):
    with pytest.raises(ng.LoadError, match="does not exist"):
        ng.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ng.LoadError, match="config.json"):
        ng.load(tmp_path)


def test_directory_without_processor(checkpoint_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint_dir("llava"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ng.LoadError, match="processor"):
        ng.load(tmp_path)


def test_unsupported_model(tmp_path):
    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    with pytest.raises(ng.LoadError, match="Supported families: chameleon"):
        ng.load(tmp_path)


def test_offline_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: no network wait
    with pytest.raises(ng.LoadError, match="offline"):
        ng.load("narrowgate-test/no-such-model")


def test_bad_dtype(checkpoint_dir):
    with pytest.raises(ng.LoadError, match="dtype"):
        ng.load(checkpoint_dir("llava"), dtype="float7")


def test_sdpa_on_the_language_model_where_another_part_has_none(tmp_path):
    """GOT-OCR 2's class refuses SDPA (its SAM vision tower has none): the decoder still gets it (the engine routes
    it), the tower keeps eager, and the default attn_implementation loads; the model class's own refusal stands."""
    tok = make_tokenizer(["<img>", "</img>", "<imgpad>", "<|im_start|>", "<|im_end|>"])
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, mlp_dim=64)
    config = GotOcr2Config(
        vision_config=vision,
        text_config=Qwen2Config(**text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<imgpad>"),
    )
    GotOcr2ForConditionalGeneration(config).save_pretrained(tmp_path)
    GotOcr2Processor(image_processor=GotOcr2ImageProcessorPil(), tokenizer=tok).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa")
    vlm = ng.load(tmp_path, dtype="float32")
    assert vlm.attn_implementation == "narrowgate_sdpa"
    assert vlm.model.config.text_config._attn_implementation == "narrowgate_sdpa"
    assert vlm.model.config.vision_config._attn_implementation == "eager"
    assert ng.load(tmp_path, dtype="float32", attn_implementation="eager").attn_implementation == "narrowgate_eager"


@pytest.mark.parametrize(
    "config, want",
    [
        (LlavaConfig(), "sdpa"),  # SDPA everywhere
        (GotOcr2Config(), {"text_config": "sdpa"}),  # the SAM tower has none: SDPA on the decoder alone
        (HYV4VLConfig(), {"text_config": "eager"}),  # the decoder has none: eager, which the engine routes as well
    ],
)
def test_the_attention_each_part_is_loaded_with(config, want):
    from narrowgate.loading import _attention

    assert _attention(config, "sdpa") == want
    assert _attention(config, "eager") == "eager"
