"""Every family, and float64 stock models with plain PyTorch hooks as the independent reference."""

from __future__ import annotations

import pytest

from tests.conftest import FAMILIES
from tests.engine import hook_reference


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", FAMILIES)


@pytest.fixture(scope="module")
def stock(checkpoint_dir):
    """``stock(family, by_hand=False)`` -> a float64 stock model (SDPA, or the by-hand float64 eager attention)."""
    cache = {}

    def get(family, by_hand=False):
        if (family, by_hand) not in cache:
            cache[family, by_hand] = hook_reference.stock_model(checkpoint_dir(family), "sdpa", pattern=by_hand)
        return cache[family, by_hand]

    return get
