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


def test_offline_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(ng.LoadError, match="offline mode is on") as e:
        ng.load("narrowgate-test/no-such-model")
    assert "narrowgate-test/no-such-model" in str(e.value) and "--local-dir DIR" in str(e.value)


# With the network unreachable, a hub id not in the cache fails at once (huggingface_hub alone retries ~40 s).
# A fresh process, timed around `load` alone (imports excluded); the bound is generous for a busy machine.
_PROBE = """
import sys, time
from narrowgate.loading import LoadError, load
start = time.perf_counter()
try:
    load("narrowgate-test/not-in-any-cache")
except LoadError as e:
    print(f"{time.perf_counter() - start:.3f}")
    print(e)
    sys.exit(0)
sys.exit("no LoadError")
"""


def _unshare_works() -> bool:
    import shutil
    import subprocess

    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-n", "true"]).returncode == 0


@pytest.mark.slow
def test_unreachable_hub_fails_fast_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path)  # an empty cache
    cmd = [sys.executable, "-c", _PROBE]
    if _unshare_works():  # a network namespace with no interface up: the real "no network"
        cmd = ["unshare", "-n", *cmd]
    else:  # a closed port on this machine as the proxy: every connection is refused
        env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seconds, message = done.stdout.split("\n", 1)
    assert float(seconds) < 5, done.stdout
    assert message.strip().count("\n") == 0  # one line
    assert "'narrowgate-test/not-in-any-cache' is not in the local Hugging Face cache" in message
    assert "--local-dir DIR" in message and "give DIR instead of the id" in message


def test_organisms_load_by_name():
    from narrowgate import organisms
    from narrowgate.loading import ORGANISMS, resolve

    assert ORGANISMS == organisms.KINDS
    for kind in ORGANISMS:
        assert resolve(kind) == str(organisms.path(kind))
    assert ng.load("gated").family.name == "chameleon"


def test_a_run_directory_named_after_an_organism_does_not_hide_it(tmp_path, monkeypatch):
    """`narrowgate run X --out native --model native`: the run directory exists before the model is loaded."""
    from narrowgate import organisms
    from narrowgate.loading import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "native" / "tables").mkdir(parents=True)
    assert resolve("native") == str(organisms.path("native"))
    assert ng.load("native").family.name == "chameleon"
    (tmp_path / "gated").mkdir()
    (tmp_path / "gated" / "config.json").write_text("{}")  # a checkpoint of that name here is the user's
    assert resolve("gated") == "gated"


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
