"""Stop strings: whatever the text's chunking, the let-out text is the text up to the
stop string that completes first, and nothing let out is ever taken back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidArgument
from engine.stop_text import MAX_STOP_CHARS, MAX_STOPS, StopText, check_stops

ALPHABET = "abc\u00e9"  # few letters: stop strings overlap and recur often


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Scan the whole text end by end: the first end where a stop string completes."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))], True
    return text, False


def run(text: str, cuts: list[int], stops: list[str]) -> tuple[str, bool]:
    st_ = StopText(stops)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece, hit = st_.push(text[a:b])
        out.append(piece)
        if hit:
            return "".join(out), True
    return "".join(out) + st_.flush(), False


@settings(max_examples=400, deadline=None)
@given(text=st.text(ALPHABET, max_size=40),
       cuts=st.lists(st.integers(0, 40), max_size=12),
       stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=4))
def test_any_chunking_matches_the_whole_text_scan(text, cuts, stops):
    assert run(text, cuts, stops) == reference(text, stops)


def test_earliest_completed_stop_wins_over_an_earlier_starting_one():
    s = StopText(["abcd", "bc"])
    assert s.push("xab") == ("x", False)  # "ab" could still become either stop
    assert s.push("cd") == ("a", True)    # "bc" completes before "abcd" would
    assert s.push("more") == ("", True) and s.flush() == ""


def test_no_stops_passes_text_through():
    s = StopText(())
    assert s.push("abc") == ("abc", False) and s.flush() == ""


@pytest.mark.parametrize("stops, match", [
    ([""], "empty"),
    (["x"] * (MAX_STOPS + 1), f"at most {MAX_STOPS}"),
    (["x" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters"),
])
def test_bad_stops_are_invalid_argument(stops, match):
    with pytest.raises(InvalidArgument, match=match):
        check_stops(stops)


def test_flush_after_a_hit_lets_nothing_out():
    s = StopText(["ab"])
    assert s.push("xaby") == ("x", True)
    assert s.flush() == ""
