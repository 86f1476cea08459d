"""Every family, and float64 stock models with plain PyTorch hooks as the independent reference."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.conftest import family_params
from tests.engine import hook_reference


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", family_params())


@pytest.fixture(scope="module")
def stock(checkpoint_dir):
    """``stock(family, by_hand=False)`` -> a float64 stock model (SDPA, or the by-hand float64 eager attention)."""
    cache = {}

    def get(family, by_hand=False):
        if (family, by_hand) not in cache:
            cache[family, by_hand] = hook_reference.stock_model(checkpoint_dir(family), "sdpa", pattern=by_hand)
        return cache[family, by_hand]

    return get


@contextlib.contextmanager
def windows(model):
    """While open, ``state["offset"]`` is the first absolute position of the model call in progress (its attention
    mask covers the cached positions too, its tokens only the new ones)."""
    state = {"offset": 0}

    def call(module, args, kwargs):
        state["offset"] = kwargs["attention_mask"].shape[1] - kwargs["input_ids"].shape[1]

    handle = model.register_forward_pre_hook(call, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def role_window(mask: torch.Tensor, generated: bool, offset: int, q: int) -> torch.Tensor:
    """[B, q]: which of the absolute positions offset..offset+q-1 belong to a role (``mask`` over the prompt;
    positions past the prompt belong to it when ``generated``)."""
    B, T = mask.shape
    inside = mask[:, offset : min(offset + q, T)]
    extra = q - inside.shape[1]
    return torch.cat([inside, torch.full((B, extra), generated)], 1) if extra > 0 else inside
