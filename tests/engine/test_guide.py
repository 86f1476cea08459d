"""The guide docs/contributing/intervention.md: its example runs, and means what it says (factor 0 is a zero-mode knockout)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import narrowgate as ng
from tests.engine.conftest import same_prompt

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "contributing" / "intervention.md"


@pytest.fixture(scope="module")
def guide() -> dict:
    """The guide's first code block, executed: the names it defines."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    names: dict = {}
    exec(compile(blocks[0], str(GUIDE), "exec"), names)  # noqa: S102  # the guide's own example
    return names


def test_the_guide_example_is_a_zero_mode_knockout_at_factor_zero(loaded, family, guide):
    DampenImage = guide["DampenImage"]
    vlm = loaded(family)
    batch = vlm.prepare(*_inputs())
    layer = 1
    got = vlm.forward(batch, interventions=[DampenImage(layer, 0.0)]).logits
    want = vlm.forward(batch, knockouts=[ng.Knockout("image", "text", layers=(layer,))]).logits
    plain = vlm.forward(batch).logits
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=0)
    assert (got[keep] - plain[keep]).abs().max() > 1e-4
    same = vlm.forward(batch, interventions=[DampenImage(layer, 1.0)]).logits
    torch.testing.assert_close(same[keep], plain[keep], atol=1e-5, rtol=0)


def test_the_guide_example_in_conditions_and_generation(loaded, guide):
    DampenImage = guide["DampenImage"]
    vlm = loaded("chameleon")
    batch = same_prompt(vlm)
    ko = ng.Knockout("image", "text", layers=(1,))
    shared = vlm.forward_conditions(batch, {"half": [DampenImage(1, 0.5)], "none": [DampenImage(1, 0.0)]})
    half = vlm.forward(batch, interventions=[DampenImage(1, 0.5)]).logits[:, -1]
    torch.testing.assert_close(shared["half"].last_logits, half, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        shared["none"].last_logits, vlm.forward(batch, knockouts=[ko]).logits[:, -1], atol=1e-5, rtol=0
    )
    got = vlm.generate(batch, interventions=[DampenImage(1, 0.0)], max_new_tokens=5)
    assert torch.equal(got, vlm.generate(batch, knockouts=[ko], max_new_tokens=5))


def _inputs():
    from tests.fixtures.common import PROMPTS, images

    return images(2, seed=1), PROMPTS
