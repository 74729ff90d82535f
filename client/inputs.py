"""Request options and input checks shared by `hybrid generate --local` and the
service path. Model-independent checks live here; checks that need the model's config
(vocabulary, positions) are `engine.generate.check_request`, run wherever the model is.

Nothing here imports torch at module import, so `hybrid --help` stays fast.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from engine.errors import HybridError, InvalidArgument, NotFound

if TYPE_CHECKING:  # grpc is imported only where a channel is opened
    from transport.security import Security

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


@dataclass(frozen=True)
class GenerateOptions:
    """One `hybrid generate` invocation, after parsing (what the service path gets)."""

    prompt: str | None
    prompt_ids: tuple[int, ...] | None
    model: str
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    json: bool = False
    local: bool = False
    prefill: str = "localhost:50051"
    decode: str = "localhost:50052"
    kv_transport: str = "shm"
    kv_device: bool = True  # GPU to GPU when the decode mapped its prefill's GPU mirror
    timeout: float = 120.0
    stop: tuple[str, ...] = ()  # stop strings
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    security: Security | None = None  # TLS / token towards the services (None: plaintext)
    # options given on the command line (not defaults): "model", "device", "dtype"
    explicit: frozenset[str] = frozenset()

    def sampling(self):
        from engine.sampling_params import SamplingParams  # torch-free (engine.sampling is not)

        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


def parse_prompt_ids(text: str | None) -> tuple[int, ...] | None:
    """'1, 2,3' -> (1, 2, 3); None stays None; anything else is one clear error."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise InvalidArgument("empty --prompt-ids: give comma-separated token ids, e.g. 1,2,3")
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError:
        bad = next(p for p in parts if not _is_int(p))
        raise InvalidArgument(f"--prompt-ids must be comma-separated integers; {bad!r} is not") from None
    negative = [i for i in ids if i < 0]
    if negative:
        raise InvalidArgument(f"token id {negative[0]} is negative: ids must be >= 0")
    return ids


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def check_options(opts: GenerateOptions) -> None:
    """Model-independent checks of one request."""
    if opts.prompt is not None and opts.prompt_ids is not None:
        raise InvalidArgument("give either a PROMPT or --prompt-ids, not both")
    if opts.prompt_ids is None and not opts.prompt:
        raise InvalidArgument("empty prompt: give a PROMPT or --prompt-ids")
    if opts.max_new_tokens < 1:
        raise InvalidArgument(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    if opts.timeout <= 0:
        raise InvalidArgument(f"--timeout must be > 0, got {opts.timeout}")
    local_only = [f"--{n}" for n in ("device", "dtype") if n in opts.explicit]
    if local_only and not opts.local:
        raise InvalidArgument(
            f"{' and '.join(local_only)} {'apply' if len(local_only) > 1 else 'applies'} to "
            f"--local only: the services run on the device "
            f"and dtype they were started with (`hybrid serve --device/--dtype`)")
    opts.sampling()  # SamplingParams validates temperature / top-k / top-p
    from engine.stop_text import check_stops

    check_stops(opts.stop)


def fail(exc: BaseException) -> None:
    """Print one clear line on stderr and exit: 2 for bad input, 1 otherwise."""
    code = EXIT_BAD_INPUT if isinstance(exc, InvalidArgument | NotFound) else EXIT_FAILURE
    msg = str(exc) if isinstance(exc, HybridError) else f"{type(exc).__name__}: {exc}"
    click.echo(f"error: {msg.splitlines()[0] if msg else type(exc).__name__}", err=True)
    sys.exit(code)
