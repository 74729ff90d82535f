"""`hybrid generate` without --local: one request through the service pair, blocking.

`generate_remote(opts, printer)` is the contract client/cmd_generate.py calls: it returns
the same JSON keys as the local path plus the service timings, and feeds `printer`
through a tokenizer stand-in whose stream decoder replays the text pieces the decode
service produced (the client holds no model files).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from engine import errors
from engine.sampling_params import SamplingParams

from .api import HybridClient, RemoteResult

if TYPE_CHECKING:
    from transport.security import Security


def run_remote(
    prompt: str | None = None, *, prompt_ids: Iterable[int] | None = None,
    max_new_tokens: int, params: SamplingParams = SamplingParams(),  # noqa: B008 - frozen
    prefill: str | Sequence[str] = "localhost:50051",
    decode: str | Sequence[str] = "localhost:50052", kv_transport: str = "shm", stop_ids: Iterable[int] = (), ignore_eos: bool = False,
    stop: Iterable[str] = (), on_chunk: Callable[[list[int], str], None] | None = None,
    timeout_s: float = 120.0, security: Security | None = None, model: str | None = None,
    kv_device: bool = True,
) -> RemoteResult:
    """Generate through the services; each (ids, text piece) goes to `on_chunk` as it
    arrives. Raises the engine.errors class of the gRPC status (one clear message).
    `prefill`, `decode`: an address each, or comma-separated lists / lists of addresses
    (client/router.py: the least-loaded SERVING pair serves the request).
    `security`: TLS / mutual TLS / bearer token for every channel (None: plaintext).
    `model`: the model the caller asked for; InvalidArgument when the pair serves another."""

    async def run() -> RemoteResult:
        async with HybridClient(prefill, decode, timeout_s, security=security) as client:
            if model is not None:
                served = (await client.decode_info()).model  # cached: generate reuses it
                if not same_model(model, served):
                    raise errors.InvalidArgument(
                        f"--model {model} does not match the services' model {served} "
                        f"(decode at {decode}): leave --model out, or start the pair with "
                        f"--model {model}")
            return await client.generate(
                prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, params=params,
                stop_ids=stop_ids, ignore_eos=ignore_eos, kv_transport=kv_transport,
                stop=stop, on_chunk=on_chunk, kv_device=kv_device)

    return asyncio.run(run())


def same_model(asked: str, served: str) -> bool:
    """Whether `asked` (a --model spec) names the model a service was started with:
    the same spec; synthetic:<preset> and synthetic:<preset>:0 alike (seed 0 is the
    default); the same directory; or, when the service's directory does not exist here
    (a container sees the host's ./models/x as /models/x), one of the same name."""
    asked, served = asked.strip(), served.strip()
    if asked == served:
        return True
    syn = "synthetic:"
    if asked.startswith(syn) and served.startswith(syn):
        def norm(spec: str) -> tuple[str, str]:
            name, _, seed = spec[len(syn):].partition(":")
            return name, str(int(seed)) if seed.strip().isdigit() else (seed or "0")
        return norm(asked) == norm(served)

    def is_path(spec: str) -> bool:
        return spec.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(spec))

    if is_path(asked) and is_path(served):
        a, b = (os.path.realpath(os.path.expanduser(x)) for x in (asked, served))
        return a == b or (not os.path.exists(b) and os.path.basename(a) == os.path.basename(b))
    return False


def generate_remote(opts: Any, printer: Any) -> dict:
    """client.cmd_generate's service path: GenerateOptions -> the --json dict."""
    text = _ServerText()
    printer.start(text)

    def on_chunk(ids: list[int], piece: str) -> None:
        text.arrived(ids, piece)
        for i in ids:
            printer.on_token(i)

    res = run_remote(
        opts.prompt, prompt_ids=opts.prompt_ids, max_new_tokens=opts.max_new_tokens,
        params=opts.sampling(), prefill=opts.prefill, decode=opts.decode,
        kv_transport=opts.kv_transport, stop=opts.stop, stop_ids=opts.stop_ids,
        ignore_eos=opts.ignore_eos, on_chunk=on_chunk, timeout_s=opts.timeout,
        security=opts.security, model=opts.model if "model" in opts.explicit else None,
        kv_device=opts.kv_device)
    if res.synthetic:  # as the local path does: never mistake synthetic output for a model's
        print(f"note: {res.model}: synthetic weights or byte tokenizer (served)", file=sys.stderr)
    out = res.to_json()
    # times in ms to 3 decimals; counts (kv_bytes) stay integers
    out["timings"] = {k: v if isinstance(v, int) else round(float(v), 3)
                      for k, v in res.timings.items()}
    out.update(synthetic_tokenizer=res.synthetic, path="remote")
    return out


class _ServerText:
    """Tokenizer stand-in for TokenPrinter: `stream().push(id)` returns the text the
    decode service sent for that token (it ran the real stream decoder)."""

    def __init__(self) -> None:
        self._pieces: deque[str] = deque()
        self._tail = ""

    def arrived(self, ids: list[int], piece: str) -> None:
        if not ids:  # the decoder's final flush
            self._tail += piece
            return
        self._pieces.extend([""] * (len(ids) - 1) + [piece])

    def stream(self) -> _ServerText:
        return self

    def push(self, token_id: int) -> str:
        return self._pieces.popleft() if self._pieces else ""

    def flush(self) -> str:
        tail, self._tail = self._tail, ""
        return tail
