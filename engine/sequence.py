"""One decoding request as the engine loop sees it.

Fields marked (loop) are written only by the engine thread; `cancelled` may be set by
any thread (a plain bool store: the loop reads it once per step). Tokens and the end of
the stream reach the request's consumer through `out`, a thread-safe queue.
"""

from __future__ import annotations

import enum
import itertools
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.sampling import SamplingParams

DONE = object()  # `out` sentinel: the sequence ended normally
_ids = itertools.count(1)


class SeqState(enum.Enum):
    WAITING = "waiting"        # admitted to the queue, no KV blocks yet
    INGESTING = "ingesting"    # blocks held, KV arriving layer by layer
    READY = "ready"            # first token known, waiting for a batch row
    RUNNING = "running"        # in the decode batch
    FINISHED = "finished"      # blocks freed; `out` has its end marker


@dataclass(frozen=True)
class DecodeRequest:
    """What a decode needs besides its KV."""

    n_prompt: int                     # positions [0, n_prompt) hold the prompt's KV
    max_new_tokens: int               # generated tokens in all, prefill's first included
    params: SamplingParams = field(default_factory=SamplingParams)  # seeded when sampling
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    request_id: str = ""


@dataclass(eq=False)
class Sequence:
    req: DecodeRequest
    seq_id: int = field(default_factory=lambda: next(_ids))
    state: SeqState = SeqState.WAITING
    blocks: list[int] = field(default_factory=list)
    admitted: threading.Event = field(default_factory=threading.Event)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    token: int = 0       # (loop) input token of the next step
    position: int = 0    # (loop) where that token's K/V goes
    step: int = 1        # (loop) generated index the next step produces (0 = prefill's)
    n_out: int = 0       # (loop) tokens delivered, the first included
    cancelled: bool = False
    error: BaseException | None = None  # why admission failed (set before `admitted`)
    inflight: int = 0          # (loop) launched steps whose token is not read back yet
    release_later: bool = False  # (loop) finished with a step in flight: free after it
    memory: Any = None         # the runner's handle on this sequence's KV (e.g. HBM area)
    device_stats: dict = field(default_factory=dict)  # (loop) runner figures, e.g. modeled ms
    prompt_slots: Any = None   # (loop) pool slots of the prompt's positions, made once
    kv_ready: Any = None       # (loop) CUDA event: the prompt's KV writes are done

    @property
    def n_reserve(self) -> int:
        """Positions whose KV blocks this sequence holds: its prompt, every generated
        token but the last (which is never fed back), and one lookahead slot for a
        step that runs before the host has seen the sequence's EOS."""
        return self.req.n_prompt + self.req.max_new_tokens + 1


def eos_id(tokenizer, config) -> int | None:
    """The id that ends a sequence: the tokenizer's, else the model config's."""
    eos = getattr(tokenizer, "eos_id", None)
    return eos if eos is not None else config.eos_token_id


def is_stop(token: int, eos: int | None, stop_ids: Iterable[int], ignore_eos: bool) -> str | None:
    """Why `token` ends its sequence ("eos" | "stop"), or None."""
    if token == eos and not ignore_eos:
        return "eos"
    if token in stop_ids:
        return "stop"
    return None
