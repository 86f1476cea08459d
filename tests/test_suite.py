"""The suite's own machinery: what several tests share is built once, whichever test process asks."""

from __future__ import annotations

import pytest


def test_built_once_builds_a_name_once_and_remembers_a_failure(built_once):
    calls = []
    first = built_once("suite-check", lambda out: (calls.append(out), (out / "x").write_text("1")))
    again = built_once("suite-check", lambda out: calls.append(out))
    assert first == again and calls == [first] and (first / "x").read_text() == "1"

    def broken(out):
        raise AssertionError("the build broke")

    with pytest.raises(AssertionError, match="the build broke"):
        built_once("suite-broken", broken)
    with pytest.raises(pytest.fail.Exception, match="the build broke"):  # not run a second time
        built_once("suite-broken", lambda out: calls.append(out))
    assert calls == [first]
