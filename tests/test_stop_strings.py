"""The stop-string matcher on its own: every way text can arrive in pieces around a stop."""

from __future__ import annotations

import pytest

from litestar_llm.engine.stops import StopStringMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "stopped"),
    [
        (["END"], ["abc", "dEN", "Dxyz"], "abcd", True),  # split across pieces
        (["END"], ["abcEND"], "abc", True),  # inside one piece
        (["END"], ["abc", "EN", "x"], "abcENx", False),  # a false start is released
        (["END"], ["ab", "E"], "abE", False),  # held text comes out at the end
        (["a", "bc"], ["xxb", "c"], "xx", True),  # earliest stop wins
        (["\n\n"], ["one\n", "\ntwo"], "one", True),
        ([], ["free", " text"], "free text", False),
        ([""], ["x"], "x", False),  # an empty stop means nothing
    ],
)
def test_matcher(stops: list[str], pieces: list[str], text: str, stopped: bool) -> None:
    out, was_stopped = run(stops, pieces)
    assert "".join(out) == text
    assert was_stopped is stopped


def test_partial_stop_never_reaches_the_stream() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abcST") == "abc"
    assert matcher.feed("O") == ""
    assert matcher.feed("P and more") == ""
    assert matcher.stopped
