"""Shared by the fuzz tests: the refusal every bad input must get."""

from __future__ import annotations

import re

import pytest

from adaround.errors import AdaRoundError

# a message that names the fix says what to do: one of these verbs
FIX = re.compile(r"\b(pass|use|set|choose|swap|drop|upgrade|save|delete|leave|point|"
                 r"normalize|clean|install|lower|run|check|build|write|copy|load)\b", re.I)


def assert_fix(exc: BaseException, cls: type[AdaRoundError], *words: str) -> None:
    """`exc` is a `cls` whose message names the problem (`words`) and a fix."""
    assert isinstance(exc, cls), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert FIX.search(message), f"no fix named in {message!r}"


def refused(cls: type[AdaRoundError], call, *words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AdaRoundError) as info:
        call()
    assert_fix(info.value, cls, *words)
