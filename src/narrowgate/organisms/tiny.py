"""The two pieces every small VLM of this repository is built from: a BPE tokenizer trained on a given
corpus, and a tiny LLaVA. The organisms and the tests' random-weight checkpoints both use them."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)


def bpe_tokenizer(
    corpus: list[str],
    special_tokens: list[str],
    *,
    vocab_size: int,
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    unk: str = "<unk>",
    add_bos: bool = True,
    **extra,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` (deterministic), prepending BOS when ``add_bos``, with the
    family's ``special_tokens`` added; ``extra`` goes to `PreTrainedTokenizerFast` (e.g. ``sep_token``)."""
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[t for t in (pad, unk, bos, eos) if t],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if bos and add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, **extra
    )
    fast.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return fast


def tiny_llava(
    tok: PreTrainedTokenizerFast,
    vision_config,
    text_config: dict,
    image_processor,
    *,
    patch: int,
    feature_layer: int,
    chat_template: str,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA-1.5 (``vision_config`` a CLIP vision config, a Llama decoder from
    ``text_config``) and its processor; ``<image>`` in ``tok`` is the placeholder."""
    image_id = tok.convert_tokens_to_ids("<image>")
    assert isinstance(image_id, int)  # one token asked, one id back
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**text_config),
        image_token_index=image_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    return LlavaForConditionalGeneration(config), processor
