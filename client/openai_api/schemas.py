"""Request bodies of /v1/completions and /v1/chat/completions -> one `GenRequest`, checked
before any gRPC call (a bad parameter is 400 naming it in `param`; docs/openai.md).

Supported: `model`, `prompt` (a string or token ids; a list of one of them) or
`messages`, `max_tokens` (chat also `max_completion_tokens`), `temperature` (default 1,
as OpenAI's), `top_p` (0 means greedy), `seed`, `stop`, `stream`,
`stream_options.include_usage`, `n` (1 only), `user` (ignored); extensions as vLLM has
them: `top_k` (0 or -1 = off), `ignore_eos`. Parameters whose non-default values this
server cannot honour (`echo`, `suffix`, `logprobs`, `best_of`, penalties, `logit_bias`,
`tools`, non-text `response_format`) are 400 rather than silently ignored; unknown
fields are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidArgument
from engine.sampling_params import SamplingParams

from .errors import APIError, invalid

COMPLETION_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 1024         # chat: at most this, and what fits the context
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class GenRequest:
    model: str
    prompt: str | None
    prompt_ids: tuple[int, ...] | None
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def check_model(body: dict, model_id: str) -> str:
    """The request's `model` must be the pair's (absent: the pair's). 404 otherwise."""
    model = body.get("model")
    if model is None:
        return model_id
    if not isinstance(model, str):
        raise invalid("model must be a string", "model")
    if model != model_id:
        raise APIError(404, f"The model `{model}` does not exist; this server serves "
                            f"`{model_id}` (GET /v1/models)", param="model",
                       code="model_not_found")
    return model


def parse_completion(body: dict, model_id: str, max_positions: int) -> GenRequest:
    _unsupported(body, chat=False)
    prompt, ids = _prompt(body.get("prompt"))
    max_tokens = _max_tokens(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, max_positions)
    if ids is not None and len(ids) + max_tokens > max_positions:
        raise invalid(f"the prompt's {len(ids)} tokens plus max_tokens {max_tokens} exceed "
                      f"the model's {max_positions} positions", "max_tokens")
    return _request(body, model_id, prompt, ids, max_tokens)


def parse_chat(body: dict, model_id: str, max_positions: int, render) -> GenRequest:
    """`render(messages) -> str`: the chat template (chat_template.ChatTemplate.render)."""
    _unsupported(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of {role, content}", "messages",
                      "missing_required_parameter" if messages is None else "invalid_value")
    prompt = render(messages)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # default: what is left of the context after the prompt (its UTF-8 length bounds its
    # token count, + 1 for a BOS the tokenizer may add), at most CHAT_DEFAULT_MAX_TOKENS
    room = max(1, min(CHAT_DEFAULT_MAX_TOKENS, max_positions - len(prompt.encode()) - 1))
    max_tokens = _max_tokens(body, key, room, max_positions)
    return _request(body, model_id, prompt, None, max_tokens)


def _request(body: dict, model_id: str, prompt: str | None, ids: tuple[int, ...] | None,
             max_tokens: int) -> GenRequest:
    stream = _opt_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid("only n=1 is supported", "n", "unsupported_value")
    return GenRequest(model=model_id, prompt=prompt, prompt_ids=ids, max_tokens=max_tokens,
                      params=_sampling(body), stop=_stop(body.get("stop")), stream=stream,
                      include_usage=include_usage, ignore_eos=_opt_bool(body, "ignore_eos"))


def _prompt(p: Any) -> tuple[str | None, tuple[int, ...] | None]:
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise invalid("prompt must not be empty", "prompt")
        return p, None
    if isinstance(p, list) and p and all(_is_int(i) for i in p):
        if any(i < 0 for i in p):
            raise invalid("token ids in prompt must be >= 0", "prompt")
        return None, tuple(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, str | list) for x in p):
        raise invalid("one prompt per request (send several requests)", "prompt",
                      "unsupported_value")
    raise invalid("prompt must be a non-empty string or a non-empty list of token ids",
                  "prompt", "missing_required_parameter" if p is None else "invalid_value")


def _max_tokens(body: dict, key: str, default: int, max_positions: int) -> int:
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v) or v < 1:
        raise invalid(f"{key} must be an integer >= 1, got {v!r}", key)
    if v > max_positions:
        raise invalid(f"{key} {v} exceeds the model's {max_positions} positions", key)
    return v


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise invalid(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 <= top_p <= 1.0:
        raise invalid(f"top_p must be in [0, 1], got {top_p}", "top_p")
    if top_p == 0.0:  # only the most likely token: greedy
        temperature, top_p = 0.0, 1.0
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:
        top_k = 0
    elif not _is_int(top_k) or top_k < 0:
        raise invalid(f"top_k must be an integer >= 0 (or -1: off), got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -(1 << 63) <= seed <= _MASK64:
            raise invalid("seed must be a 64-bit integer", "seed")
        seed &= _MASK64
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except InvalidArgument as e:
        raise invalid(str(e)) from None


def _stop(stop: Any) -> tuple[str, ...]:
    from engine.stop_text import check_stops

    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings", "stop")
    try:
        return check_stops(stops)
    except InvalidArgument as e:
        raise invalid(str(e), "stop") from None


def _unsupported(body: dict, chat: bool) -> None:
    def refuse(key: str, what: str) -> None:
        raise invalid(f"{key}: {what} is not supported by this server", key, "unsupported_value")

    if body.get("echo"):
        refuse("echo", "echo")
    if body.get("suffix"):
        refuse("suffix", "suffix")
    if body.get("best_of") not in (None, 1):
        refuse("best_of", "best_of other than 1")
    if (body.get("logprobs") not in (None, False)) or body.get("top_logprobs") is not None:
        refuse("logprobs", "logprobs")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0) != 0.0:
            refuse(key, "a non-zero penalty")
    if body.get("logit_bias"):
        refuse("logit_bias", "logit_bias")
    if chat:
        for key in ("tools", "functions"):
            if body.get(key):
                refuse(key, "tool calling")
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            refuse("response_format", "a response_format other than text")


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise invalid(f"{key} must be a number, got {v!r}", key)
    return float(v)


def _opt_bool(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(f"{key} must be true or false", key)
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
