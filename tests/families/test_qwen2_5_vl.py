"""Qwen2.5-VL: the Qwen2-VL adapter on the Qwen2.5-VL architecture (same checks as test_qwen2_vl.py)."""

from __future__ import annotations

import pytest

from tests.families.test_qwen2_vl import check_adapter, check_raw_prompt, check_roles


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("qwen2_5_vl")


def test_adapter(vlm):
    check_adapter(vlm, "qwen2_5_vl")


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    check_roles(vlm, image_first)


def test_raw_prompt(vlm, monkeypatch):
    check_raw_prompt(vlm, monkeypatch)
