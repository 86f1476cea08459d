"""Batches shared by the engine tests."""

from __future__ import annotations

import pytest

from tests.conftest import family_params
from tests.fixtures.common import PROMPTS, images


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", family_params())


@pytest.fixture
def mixed(loaded, family):
    """Two examples with different prompt lengths (left padding) and different images."""
    vlm = loaded(family)
    return vlm, vlm.prepare(images(2, seed=1), PROMPTS)


def same_prompt(vlm, seed=2, prompt="Provide a one-sentence caption for the provided image."):
    """Two different images with one prompt: rows differ only in the image."""
    return vlm.prepare(images(2, seed=seed), [prompt, prompt])


def text_rows(batch):
    """[B, T] mask of eoi and text positions."""
    return batch.mask(("eoi", "text"))
