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
