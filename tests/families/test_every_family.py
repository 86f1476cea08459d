"""What every family must do: load from its saved directory, run forward and generate, see the image."""

from __future__ import annotations

import pytest

from tests.conftest import family_params
from tests.families.checks import check_forward_and_generate
from tests.fixtures.common import PROMPTS, images


@pytest.mark.parametrize("family", family_params())
def test_forward_and_generate(loaded, family):
    vlm = loaded(family)
    check_forward_and_generate(vlm, vlm.prepare(images(2), PROMPTS), min_new_tokens=4)


@pytest.mark.parametrize("family", family_params())
def test_the_image_reaches_the_logits(loaded, family):
    vlm = loaded(family)
    batch = vlm.prepare(images(2, seed=3), [PROMPTS[0]] * 2)
    logits = vlm.forward(batch).logits
    assert (logits[0, -1] - logits[1, -1]).abs().max() > 1e-4
