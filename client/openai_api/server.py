"""The OpenAI-compatible endpoint: a Starlette app on uvicorn in front of the pair.

    hybrid serve openai --prefill localhost:50051 --decode localhost:50052 --port 8000

Routes (docs/openai.md): GET /v1/models (and /v1/models/{id}), POST /v1/completions,
POST /v1/chat/completions (both streaming as server-sent events with `stream: true`),
GET /health (200 when both services are SERVING, else 503), GET /metrics when
--metrics-port equals --port. Every request goes through ONE HybridClient, created in
the app's lifespan; `--prefill A,B --decode C,D,E` spread requests over several services
(client/router.py, docs/routing.md). A client that hangs up cancels its gRPC calls: a stream is closed
(HybridClient.stream's finally cancels Prefill and Generate and releases the slot), a
non-streaming request's task is cancelled when the HTTP disconnect arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from client.api import HybridClient, RemoteResult, health
from engine.errors import FailedPrecondition, HybridError, InvalidArgument

from . import chat_template, schemas
from .errors import APIError, from_hybrid, invalid
from .metrics import Metrics

if TYPE_CHECKING:
    from transport.security import Security

log = logging.getLogger("hybrid.openai")
MAX_BODY_BYTES = 8 << 20  # the services take 4 MiB messages; a JSON body is larger
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # services' -> OpenAI's
# A long-lived client: after the pair was down (or restarted), reconnect within a second
# of its return, not after gRPC's default backoff of up to 120 s (calls fail with
# UNAVAILABLE at once while a channel waits to reconnect).
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))
_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass(frozen=True)
class OpenAIOptions:
    prefill: str = "localhost:50051"  # or comma-separated lists (client/router.py)
    decode: str = "localhost:50052"
    host: str = "127.0.0.1"
    port: int = 8000
    model_dir: str | None = None      # HF checkpoint dir: its chat template
    api_key_file: str | None = None   # accepted API keys, one a line; None: open
    metrics_port: int | None = None   # == port: /metrics on the app; else its own server
    security: Security | None = None  # TLS / token towards the services
    kv_transport: str = "shm"
    kv_device: bool = True  # GPU to GPU where the decode mapped its prefill's GPU mirror
    timeout_s: float = 120.0          # per request, through both services
    grace_s: float = 10.0             # drain on SIGTERM
    log_level: str = "info"


class APIKeys:
    """The keys of --api-key-file (one a line, `#` comments), re-read when the file
    changes (looked at at most once a second); a file that turns unreadable or empty
    keeps the last good keys. Compared in constant time against every key."""

    def __init__(self, path: str) -> None:
        self.path, self._checked, self._lock = path, 0.0, threading.Lock()
        self._keys, self._stamp = self._load()

    def _load(self):
        from transport.security import parse_tokens

        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                keys = parse_tokens(f.read(), f"--api-key-file {self.path}")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"--api-key-file {self.path}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        return keys, (st.st_mtime_ns, st.st_size)

    def allows(self, authorization: str | None) -> bool:
        from transport.security import token_matches

        if time.monotonic() - self._checked >= 1.0:
            with self._lock:
                self._checked = time.monotonic()
                try:
                    st = os.stat(self.path)
                    if (st.st_mtime_ns, st.st_size) != self._stamp:
                        self._keys, self._stamp = self._load()
                except (OSError, InvalidArgument) as e:
                    log.error("%s; keeping the previous API keys", e)
        scheme, _, key = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and bool(key.strip()) and token_matches(
            key.strip(), self._keys)


def build_app(opts: OpenAIOptions) -> Starlette:
    """The ASGI app. Checks the chat template and API key file now (ValueError /
    InvalidArgument); the HybridClient is opened in the lifespan."""
    template = chat_template.load(opts.model_dir)
    keys = APIKeys(opts.api_key_file) if opts.api_key_file else None
    metrics = Metrics(_ROUTES)
    api = _API(opts, template, keys, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        api.client = HybridClient(opts.prefill, opts.decode, opts.timeout_s, opts.security,
                                  channel_options=RECONNECT)
        try:  # learn the model now if the pair is up; not a condition of starting
            info = await asyncio.wait_for(api.client.decode_info(), 5.0)
            log.info("pair serves %s (%s, decode backend %s)", info.model,
                     info.weights_fingerprint[:12], info.backend)
        except (HybridError, asyncio.TimeoutError) as e:
            log.warning("pair not reachable yet (%s); requests get 503 until it is", e)
        try:
            yield
        finally:
            await api.client.close()

    routes = [
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    if opts.metrics_port is not None and opts.metrics_port == opts.port:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        async def scrape(request: Request) -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

        routes.append(Route("/metrics", scrape, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.api = api
    app.add_middleware(_Middleware, wrap=metrics.middleware)
    return app


class _Middleware:
    """Adapts a function `app -> app` to Starlette's add_middleware."""

    def __init__(self, app, wrap) -> None:
        self._app = wrap(app)

    async def __call__(self, scope, receive, send):
        await self._app(scope, receive, send)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """404 / 405 of the router as OpenAI error bodies."""
    msg = {404: f"no route {request.url.path}", 405: f"{request.method} not allowed on "
           f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
    return APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404
                    else None).response(getattr(exc, "headers", None))


class _ClientGone(Exception):
    pass


class _API:
    def __init__(self, opts: OpenAIOptions, template: chat_template.ChatTemplate,
                 keys: APIKeys | None, metrics: Metrics) -> None:
        self.opts, self.template, self.keys, self.metrics = opts, template, keys, metrics
        self.client: HybridClient | None = None
        self.created = int(time.time())

    # ---- helpers -----------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.keys is not None and not self.keys.allows(request.headers.get("authorization")):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                "<key>' with a key of the server's --api-key-file",
                           code="invalid_api_key")

    async def _info(self):
        try:
            return await self.client.decode_info()
        except HybridError as e:
            raise from_hybrid(e) from None

    async def _body(self, request: Request) -> dict:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise invalid(f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object", code="invalid_json")
        return body

    async def _guard(self, request: Request, handler) -> Response:
        try:
            self._authorize(request)
            return await handler()
        except APIError as e:
            return e.response()
        except HybridError as e:
            if isinstance(e, FailedPrecondition):  # e.g. decode restarted with other weights:
                self.client._decode_info = None    # ask Decode.Info again next time
            return from_hybrid(e).response()
        except _ClientGone:
            return Response(status_code=499)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return APIError(500, "internal error (logged by the server)").response()

    # ---- routes ------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        async def run():
            info = await self._info()
            return JSONResponse({"object": "list", "data": [self._model_card(info)]})
        return await self._guard(request, run)

    async def model(self, request: Request) -> Response:
        async def run():
            info = await self._info()
            schemas.check_model({"model": request.path_params["model"]}, info.model)
            return JSONResponse(self._model_card(info))
        return await self._guard(request, run)

    def _model_card(self, info) -> dict:
        return {"id": info.model, "object": "model", "created": self.created,
                "owned_by": "hybrid-llm", "max_model_len": info.max_positions}

    async def health(self, request: Request) -> Response:
        if self.client is not None and self.client.router.polled:
            return self._health_routed()

        async def status(target: str) -> str:
            try:
                return await health(target, timeout_s=2.0, security=self.opts.security)
            except Exception as e:
                return f"UNREACHABLE ({str(e).splitlines()[0] if str(e) else type(e).__name__})"

        p, d = await asyncio.gather(status(self.opts.prefill), status(self.opts.decode))
        ok = p == d == "SERVING"
        return JSONResponse({"status": "ok" if ok else "unavailable", "prefill": p, "decode": d},
                            status_code=200 if ok else 503)

    def _health_routed(self) -> Response:
        """Several services: 200 while the router can pair a SERVING prefill with a
        SERVING decode attached to it (its last poll, at most one interval old); each
        service's state in `services`."""
        from client.router import choose

        r = self.client.router
        try:
            choose(r.instances["prefill"], r.instances["decode"])
            ok, why = True, ""
        except HybridError as e:
            ok, why = False, str(e)

        def role(name: str) -> str:
            n = sum(i.serving for i in r.instances[name])
            return f"SERVING ({n} of {len(r.instances[name])})" if n else "UNAVAILABLE"

        body = {"status": "ok" if ok else "unavailable", "prefill": role("prefill"),
                "decode": role("decode"), "services": r.snapshot()}
        if why:
            body["reason"] = why
        return JSONResponse(body, status_code=200 if ok else 503)

    async def completions(self, request: Request) -> Response:
        return await self._guard(request, lambda: self._generate(request, chat=False))

    async def chat(self, request: Request) -> Response:
        return await self._guard(request, lambda: self._generate(request, chat=True))

    # ---- generation ----------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        body = await self._body(request)
        info = await self._info()
        model = schemas.check_model(body, info.model)
        if chat:
            req = schemas.parse_chat(body, model, info.max_positions, self.template.render)
        else:
            req = schemas.parse_completion(body, model, info.max_positions)
        rid = uuid.uuid4().hex[:24]
        out = _Shape(chat, ("chatcmpl-" if chat else "cmpl-") + rid, model,
                     info.weights_fingerprint, int(time.time()))
        endpoint = request.url.path
        stream = self._timed(self.client.stream(
            req.prompt, prompt_ids=req.prompt_ids, max_new_tokens=req.max_tokens,
            params=req.params, ignore_eos=req.ignore_eos, kv_transport=self.opts.kv_transport,
            kv_device=self.opts.kv_device,
            request_id=rid, stop=req.stop), t0, endpoint)
        headers = {"x-request-id": rid}
        if not req.stream:
            res = await _or_disconnect(request, _last(stream))
            return JSONResponse(out.whole(res), headers=headers)
        try:  # up to the first token: errors still get their HTTP status
            first = await _or_disconnect(request, stream.__anext__())
        except BaseException:
            await stream.aclose()
            raise
        return _EventStream(_events(out, first, stream, req.include_usage),
                            headers=headers | {"cache-control": "no-cache",
                                               "x-accel-buffering": "no"})

    async def _timed(self, stream: AsyncIterator, t0: float, endpoint: str) -> AsyncIterator:
        """`stream`'s items; observes time to first token and token counts."""
        first = True
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, RemoteResult):
                    self.metrics.prompt_tokens.inc(len(item.prompt_ids))
                    self.metrics.completion_tokens.inc(len(item.token_ids))
                elif first and item[0]:
                    first = False
                    self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
                yield item


@dataclass(frozen=True)
class _Shape:
    """OpenAI's response and chunk objects for one request."""

    chat: bool
    id: str
    model: str
    fingerprint: str
    created: int = 0

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def whole(self, res: RemoteResult) -> dict:
        finish = _FINISH.get(res.finish_reason, "stop")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": res.text, "logprobs": None, "finish_reason": finish}
        return self._base("chat.completion" if self.chat else "text_completion") | {
            "choices": [choice], "usage": usage(res)}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False,
              with_usage: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = [choice]
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, res: RemoteResult) -> dict:
        return self._base("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [], "usage": usage(res)}


def usage(res: RemoteResult) -> dict:
    """prompt tokens: the handle's prompt_ids (what prefill tokenized); completion tokens:
    every generated token (a stop string's tokens included, as the services count)."""
    p, c = len(res.prompt_ids), len(res.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def _events(out: _Shape, first, stream: AsyncIterator, include_usage: bool):
    """The SSE body: chunks as tokens arrive, the finish chunk, the usage chunk when asked,
    `data: [DONE]`. An error after the first token is one `data: {"error": ...}` event."""
    async with contextlib.aclosing(stream):
        try:
            if out.chat:
                yield _sse(out.chunk(None, role=True, with_usage=include_usage))
            item = first
            while not isinstance(item, RemoteResult):
                if item[1]:
                    yield _sse(out.chunk(item[1], with_usage=include_usage))
                item = await stream.__anext__()
            yield _sse(out.chunk(None, _FINISH.get(item.finish_reason, "stop"),
                                 with_usage=include_usage))
            if include_usage:
                yield _sse(out.usage_chunk(item))
        except HybridError as e:
            yield _sse(from_hybrid(e).body())
        except StopAsyncIteration:
            yield _sse(APIError(500, "the generation ended without a result").body())
        except Exception:
            log.exception("stream %s failed", out.id)
            yield _sse(APIError(500, "internal error (logged by the server)").body())
        yield _sse("[DONE]")


class _EventStream(StreamingResponse):
    """text/event-stream that closes its body however the response ends (a client that
    hangs up cancels the send; closing the generators cancels the gRPC calls)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _last(stream: AsyncIterator) -> RemoteResult:
    async with contextlib.aclosing(stream):
        async for item in stream:
            if isinstance(item, RemoteResult):
                return item
    raise HybridError("the generation ended without a result")


async def _or_disconnect(request: Request, awaitable):
    """Await `awaitable` unless the client hangs up first: then cancel it (its finally
    blocks cancel the gRPC calls) and raise _ClientGone."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone()
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def serve(opts: OpenAIOptions) -> None:
    """Run the endpoint in the foreground until SIGTERM/SIGINT (uvicorn drains for
    `grace_s`). Bad options: InvalidArgument before anything binds."""
    import uvicorn

    try:
        app = build_app(opts)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    logging.basicConfig(level=opts.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api: _API = app.state.api
    if opts.metrics_port is not None and opts.metrics_port != opts.port:
        from prometheus_client import start_http_server

        try:
            start_http_server(opts.metrics_port, addr=opts.host, registry=api.metrics.registry)
        except OSError as e:
            raise InvalidArgument(f"--metrics-port {opts.metrics_port}: {e.strerror or e}") from None
    sec = opts.security.describe(server=False) if opts.security else "plaintext"
    log.info("OpenAI endpoint http://%s:%d -> prefill %s, decode %s (%s); chat template: %s; "
             "API keys: %s; metrics: %s", opts.host, opts.port, opts.prefill, opts.decode, sec,
             api.template.source, "on" if api.keys else "off",
             "off" if opts.metrics_port is None else f"port {opts.metrics_port} /metrics")
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains, restores this handler and raises the signal again: exit 0 after
        # a drained SIGTERM, as the services do (SIG_DFL would make it -15)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.Server(uvicorn.Config(
        app, host=opts.host, port=opts.port, log_level=opts.log_level.lower(),
        timeout_graceful_shutdown=opts.grace_s, lifespan="on")).run()
