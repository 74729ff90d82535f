"""Stop strings: end a generation when its text contains one of them.

Streaming semantics, as serving systems have them: the generation ends at the first
point where a stop string is complete (the one that ends earliest; of two ending at the
same character, the longer), and the text returned stops just before it (the stop
string itself is not returned; its tokens are). Text is let out as it arrives except for
the longest tail that could still grow into a stop string, so no streamed piece ever
has to be taken back.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.errors import InvalidArgument

MAX_STOPS = 16
MAX_STOP_CHARS = 256


def check_stops(stops: Iterable[str]) -> tuple[str, ...]:
    """The stop strings as a tuple; InvalidArgument for empty ones or too many/long."""
    out = tuple(stops)
    if len(out) > MAX_STOPS:
        raise InvalidArgument(f"at most {MAX_STOPS} stop strings, got {len(out)}")
    for s in out:
        if not s:
            raise InvalidArgument("a stop string must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"a stop string is at most {MAX_STOP_CHARS} characters, "
                                  f"got {len(s)}")
    return out


class StopText:
    """Feed text pieces in order with `push`; each call returns (text to let out, hit).
    After a hit nothing more is let out. `flush` lets out the held tail at the end."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = check_stops(stops)
        self.hit = False
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = self._first_stop(buf)
        if cut is not None:
            self.hit, self._held = True, ""
            return buf[:cut], True
        keep = self._open_tail(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = ("" if self.hit else self._held), ""
        return held

    def _first_stop(self, buf: str) -> int | None:
        """Start of the stop string that ends first in buf (longest on a tie), or None.
        The held tail contains no whole stop string, so this is the first in the text."""
        best: tuple[int, int] | None = None  # (end, -length)
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best):
                best = (i + len(s), -len(s))
        return None if best is None else best[0] + best[1]

    def _open_tail(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of a stop string."""
        for n in range(min(len(buf), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = buf[len(buf) - n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


class StopStream:
    """A tokenizer's stream decoder followed by StopText: token ids in, (text, hit) out."""

    def __init__(self, tokenizer, stops: Iterable[str]) -> None:
        self.decoder, self.text = tokenizer.stream(), StopText(stops)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self.text.push(self.decoder.push(token_id))

    def flush(self) -> tuple[str, bool]:
        """The rest at the end: bytes the decoder held, then the held tail; after a hit,
        ("", True), so callers need not check `hit` first."""
        piece, hit = self.text.push(self.decoder.flush())
        return piece + self.text.flush(), hit
