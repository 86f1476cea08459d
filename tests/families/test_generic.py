"""The generic adapter: the roles dedicated adapters give, found from processor and config alone, and clear refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, MllamaConfig, T5Gemma2Config

from narrowgate.families import Generic, LayoutError, UnsupportedModelError, detect
from tests.fixtures.common import PROMPTS, images

#: Fixture families whose layout the generic adapter reproduces (their adapters stay for prompts and positions).
SAME_ROLES = ["chameleon", "janus", "llava", "pixtral", "qwen2_vl"]


@pytest.mark.parametrize("family", SAME_ROLES)
@pytest.mark.parametrize("image_first", [True, False])
def test_generic_roles_equal_dedicated_roles(checkpoint_dir, family, image_first):
    path = checkpoint_dir(family)
    config, processor = AutoConfig.from_pretrained(path), AutoProcessor.from_pretrained(path)
    dedicated, generic = detect(config)(processor, config), Generic(processor, config)
    assert type(dedicated) is not Generic
    assert (generic.content_ids, generic.boi_id, generic.eoi_id, generic.eol_ids) == (
        dedicated.content_ids,
        dedicated.boi_id,
        dedicated.eoi_id,
        dedicated.eol_ids,
    )
    inputs = dedicated.encode(images(2), [dedicated.prompt(p, image_first) for p in PROMPTS])
    for b in range(2):
        row = inputs["input_ids"][b].tolist()
        first = int(torch.nonzero(inputs["attention_mask"][b]).min())
        layout = generic.layout(row, first)
        generic.check_layout(row, layout)
        assert layout == dedicated.layout(row, first)


def test_eoi_doc_says_how_eoi_was_found(checkpoint_dir):
    for family, doc in (("llava", "No end-of-image token"), ("janus", "<end_of_image>")):
        path = checkpoint_dir(family)
        generic = Generic(AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path))
        assert doc in generic.eoi_doc and generic.name == family


def test_unknown_type_without_dedicated_adapter_gets_generic(checkpoint_dir):
    config = AutoConfig.from_pretrained(checkpoint_dir("llava"))
    config.model_type = "some_new_vlm"
    assert detect(config) is Generic


@pytest.mark.parametrize("config, why", [(MllamaConfig(), "cross-attention"), (T5Gemma2Config(), "encoder-decoder")])
def test_refuses_models_without_image_tokens_in_the_decoder(config, why):
    with pytest.raises(UnsupportedModelError, match=why):
        detect(config)


def test_refuses_a_processor_naming_a_token_its_tokenizer_lacks(checkpoint_dir):
    path = checkpoint_dir("llava")
    processor, config = AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)
    processor.image_end_token = "<no_such_token>"
    with pytest.raises(LayoutError, match="<no_such_token>.*end-of-image"):
        Generic(processor, config)


def test_refuses_without_an_image_token(checkpoint_dir):
    path = checkpoint_dir("llava")
    processor = AutoProcessor.from_pretrained(path)
    processor.image_token = processor.image_token_id = None
    processor.tokenizer.image_token = None
    with pytest.raises(LayoutError, match="no image_token"):
        Generic(processor, SimpleNamespace(model_type="some_new_vlm"))


def test_the_raw_prompt_holds_the_processors_image_placeholder_token(checkpoint_dir):
    """A processor whose prompts carry a placeholder other than the token it expands it to (Qianfan-OCR writes
    ``<image>``, expanded to ``<IMG_CONTEXT>`` tokens) names it ``image_placeholder_token``; the content id stays
    the image token's."""
    path = checkpoint_dir("llava")
    processor, config = AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)
    processor.chat_template = None
    plain = Generic(processor, config)
    assert plain.image_token == processor.image_token and plain.prompt("hi").startswith(processor.image_token)
    processor.image_placeholder_token = "<ph>"
    generic = Generic(processor, config)
    assert generic.image_token == "<ph>" and generic.prompt("hi") == "<ph>hi"
    assert generic.prompt("hi", image_first=False) == "hi<ph>"
    assert generic.content_ids == plain.content_ids == {processor.image_token_id}
