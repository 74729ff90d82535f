"""Bounds on what a request may carry, checked before any work proportional to it.

Everything here comes off the network. gRPC itself refuses a message over the server's
receive limit before it is parsed (RESOURCE_EXHAUSTED); the checks below bound the
fields inside a message that fits. Both services import this module; it is torch-free.
"""

from __future__ import annotations

import re
import uuid

from engine.errors import InvalidArgument

# Largest request message either service accepts (PrefillRequest with a long prompt, a
# GenerateRequest whose handle lists the prompt ids): a 128k-token prompt is ~0.7 MB.
# Larger input is refused by the gRPC core before it is parsed or buffered twice.
MAX_REQUEST_BYTES = 4 << 20
MAX_REQUEST_ID = 64
MAX_STOP_IDS = 1024
MIN_CHUNK_BYTES = 64 << 10          # FetchKv: 1-byte chunks would be a message per byte
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id(raw: str) -> str:
    """The caller's request id, or a fresh one when empty. Ids end up in log lines and
    metric labels, so only a short run of plain characters is accepted: no newline can
    forge a log line, and no megabyte id makes a megabyte line."""
    if not raw:
        return uuid.uuid4().hex[:16]
    if not _ID_RE.match(raw):
        raise InvalidArgument(f"request_id must be 1-{MAX_REQUEST_ID} characters of "
                              f"[A-Za-z0-9._:-], got {printable(raw)}")
    return raw


def printable(raw: str, limit: int = 40) -> str:
    """A string from the network made safe for one log line or error message: escaped
    (no newlines or terminal control codes) and cut to `limit` characters."""
    cut = raw[:limit]
    text = cut.encode("unicode_escape", "backslashreplace").decode("ascii")
    return repr(text) + (f"... ({len(raw)} chars)" if len(raw) > limit else "")


# A text prompt longer than this many characters per position cannot fit: real tokens
# are far shorter (BPE vocabularies top out around 16-20 characters).
MAX_CHARS_PER_POSITION = 64
ENCODE_INLINE_CHARS = 16 << 10  # longer prompts are tokenized off the event loop


def request_bytes(max_positions: int | None) -> int:
    """The largest request a model of `max_positions` can need: a prompt of that many
    positions as text (MAX_CHARS_PER_POSITION characters of up to 4 UTF-8 bytes each),
    or as ids in a handle, plus stop lists. Anything larger cannot be valid, so the
    gRPC core refuses it before it is parsed: four refused 4 MiB prompts used to leave
    prefill ~165 MB larger. MAX_REQUEST_BYTES when the model is not known up front."""
    if not max_positions:
        return MAX_REQUEST_BYTES
    return max(256 << 10, max_positions * MAX_CHARS_PER_POSITION * 4 + (64 << 10))


def prompt_size(n_ids: int, n_chars: int, max_positions: int) -> None:
    """Refuse a prompt that cannot fit the model before it is copied or tokenized."""
    if n_ids > max_positions:
        raise InvalidArgument(f"prompt of {n_ids} token ids exceeds the model's "
                              f"{max_positions} positions")
    if n_chars > max_positions * MAX_CHARS_PER_POSITION:
        raise InvalidArgument(f"prompt of {n_chars} characters cannot fit the model's "
                              f"{max_positions} positions")


def stop_ids(ids: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    if len(ids) > MAX_STOP_IDS:
        raise InvalidArgument(f"at most {MAX_STOP_IDS} stop_ids, got {len(ids)}")
    return tuple(ids)


def chunk_bytes(n: int, default: int, top: int) -> int:
    if n == 0:
        return default
    if not MIN_CHUNK_BYTES <= n <= top:
        raise InvalidArgument(f"chunk_bytes must be 0 (default {default}) or "
                              f"{MIN_CHUNK_BYTES}..{top}, got {n}")
    return n
