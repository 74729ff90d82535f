"""TLS, mutual TLS and bearer tokens for both services and every client.

One frozen `Security` describes what a process presents and checks:

- `tls_cert` + `tls_key`: on a server its certificate; on a client the certificate it
  presents for mutual TLS.
- `tls_ca`: on a server, the CA client certificates must chain to (so a CA there means
  mutual TLS is required); on a client, the CA that verifies the server.
- bearer tokens: one per line in `token_file` (blank lines and `#` comments ignored), or
  one token in the environment variable HYBRID_TOKEN. A server accepts every token of
  the file, so a new one can be added before the old one is removed (rotation); a client
  sends the first. The file is re-read when it changes, so rotation needs no restart.
  Tokens never come from argv: they would show in `ps`.

Tokens travel in the `authorization: Bearer <token>` metadata through interceptors,
not call credentials, because gRPC refuses call credentials on plaintext channels and
loopback plaintext plus a token is a legitimate set-up. The health service is exempt
so container and k8s probes need no secret.

The client side imports this module, so it imports grpc and the standard library only
(never torch: tests/test_client_torch_free.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from engine.errors import InvalidArgument

log = logging.getLogger("hybrid.security")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_ENV = "HYBRID_TOKEN"
# option -> environment variable, for messages that name both ways of setting it
ENV_OF = {"--tls-cert": "HYBRID_TLS_CERT", "--tls-key": "HYBRID_TLS_KEY",
          "--tls-ca": "HYBRID_TLS_CA", "--token-file": "HYBRID_TOKEN_FILE"}
_RELOAD_EVERY_S = 1.0  # how often a token file's mtime is looked at (not on every call)
_FIRST_MESSAGE_WAIT_S = 1.0  # a refused call's first message: waited for this long at most


def _named(option: str) -> str:
    return f"{option} ({ENV_OF[option]})"


def _read_pem(path: str, option: str, marker: bytes) -> bytes:
    """The PEM bytes of `path`, or one clear error naming the option and the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgument(f"{_named(option)} {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data or marker not in data:
        raise InvalidArgument(f"{_named(option)} {path}: not a PEM file with a "
                              f"{marker.decode()} block")
    return data


def _check_pair(cert: str, key: str, ca: str | None) -> None:
    """The key must belong to the certificate and the CA must parse: gRPC would only find
    out at the first handshake (every client UNAVAILABLE), the standard library's ssl
    finds out now. An encrypted key is refused (gRPC cannot use one)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        raise InvalidArgument(f"{_named('--tls-key')} {key} does not go with "
                              f"{_named('--tls-cert')} {cert}, or is encrypted: "
                              f"{e.reason or e}") from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise InvalidArgument(f"{_named('--tls-ca')} {ca}: {e.reason or e}") from None


# Calls only a decode service makes: claiming and renewing slots (a client that could
# would escape its slot share), reclaiming a consumer's slots, streaming KV by FetchKv.
SERVICE_METHODS = frozenset(f"/hybrid.v1.PrefillService/{m}"
                            for m in ("Attach", "RenewLease", "FetchKv"))
SERVICE_ROLE = "service"


def parse_token_lines(text: str, where: str) -> tuple[tuple[str, str], ...]:
    """(token, role) of each line of a token file: `<token>` (role "") or `<token>
    service`; blank lines and `#` comments ignored. A token goes into gRPC metadata, so it
    must be printable ASCII without spaces."""
    out = []
    lines = (ln.split("#", 1)[0].split() for ln in text.splitlines())
    for i, words in enumerate((w for w in lines if w), 1):
        tok, role = words[0], " ".join(words[1:])
        if len(words) > 2 or role not in ("", SERVICE_ROLE):
            raise InvalidArgument(f"{where}: token {i} must be printable ASCII without spaces, "
                                  f"optionally followed by the role '{SERVICE_ROLE}'")
        if not (tok.isascii() and tok.isprintable()):
            raise InvalidArgument(f"{where}: token {i} must be printable ASCII without spaces")
        out.append((tok, role))
    if not out:
        raise InvalidArgument(f"{where}: no token in it (one a line; '#' starts a comment)")
    return tuple(out)


def parse_tokens(text: str, where: str) -> tuple[str, ...]:
    """The tokens of a token file, roles left out (parse_token_lines)."""
    return tuple(tok for tok, _ in parse_token_lines(text, where))


class TokenSource:
    """The bearer tokens of a file (re-read when its mtime or size changes, looked at
    at most once a second) or one literal token (HYBRID_TOKEN). A file that becomes
    unreadable or empty keeps the last good tokens: a botched edit must not open the
    service, nor lock every client out."""

    def __init__(self, path: str | None = None, literal: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if path is None:
            self._tokens, self._service = _split(parse_token_lines(literal or "", TOKEN_ENV))
        else:
            self._tokens, self._service = self._load()

    def _load(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        where = _named("--token-file") + f" {self.path}"
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"{where}: {getattr(e, 'strerror', None) or e}") from None
        lines = parse_token_lines(text, where)
        self._stamp = (st.st_mtime_ns, st.st_size)
        return _split(lines)

    def tokens(self) -> tuple[str, ...]:
        if self.path is not None and time.monotonic() - self._checked >= _RELOAD_EVERY_S:
            self._maybe_reload()
        return self._tokens

    def service_tokens(self) -> tuple[str, ...]:
        """Tokens marked `service` (what a decode service sends); empty: no roles, every
        token may make every call."""
        self.tokens()
        return self._service

    def first(self) -> str:
        return self.tokens()[0]

    def _maybe_reload(self) -> None:
        with self._lock:
            self._checked = time.monotonic()
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) == self._stamp:
                    return
                self._tokens, self._service = self._load()
                log.info("token file %s re-read: %d token(s)", self.path, len(self._tokens))
            except (OSError, InvalidArgument) as e:
                log.error("token file %s: %s; keeping the previous tokens", self.path, e)


def _split(lines: tuple[tuple[str, str], ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(t for t, _ in lines), tuple(t for t, r in lines if r == SERVICE_ROLE))


def _bearer(metadata: Iterable) -> str | None:
    """The token of an `authorization: Bearer <token>` entry (scheme case-insensitive)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def token_matches(given: str, tokens: Iterable[str]) -> bool:
    """Constant time in the token's content: every accepted token is compared, with
    hmac.compare_digest, whatever matched earlier."""
    g = given.encode()
    ok = False
    for tok in tokens:
        ok |= hmac.compare_digest(g, tok.encode())
    return ok


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses every RPC without a valid bearer token with UNAUTHENTICATED, except the
    health service (probes carry no secret). `tokens`: the accepted tokens, or a callable
    returning them (a TokenSource's, so rotation needs no restart). When `service_tokens`
    returns any, the SERVICE_METHODS (claiming, renewing and reclaiming slots, FetchKv)
    need one of those: PERMISSION_DENIED for a client's token."""

    def __init__(self, tokens: Iterable[str] | Callable[[], Iterable[str]],
                 service_tokens: Callable[[], Iterable[str]] = tuple) -> None:
        self._service_tokens = service_tokens
        if callable(tokens):
            self._tokens = tokens
        else:
            fixed = tuple(tokens)
            if not fixed:
                raise InvalidArgument("TokenAuth needs at least one token")
            self._tokens = lambda: fixed

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        given = _bearer(handler_call_details.invocation_metadata)
        if given is None or not token_matches(given, self._tokens()):
            why = "missing bearer token" if given is None else "invalid bearer token"
            return _refusal(grpc.StatusCode.UNAUTHENTICATED,
                            f"{why} (send metadata 'authorization: Bearer <token>')",
                            log_as=f"refused {method}: {why}")
        service = tuple(self._service_tokens())
        if method in SERVICE_METHODS and service and not token_matches(given, service):
            return _refusal(grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is for decode services: it needs a token marked "
                            f"'{SERVICE_ROLE}' in the server's token file",
                            log_as=f"refused {method}: not a service token")
        handler = await continuation(handler_call_details)
        if handler is None:  # gRPC's own answer races the same way (see _refusal)
            return _refusal(grpc.StatusCode.UNIMPLEMENTED, f"method {method} not found")
        return handler


def _refusal(code: grpc.StatusCode, message: str, log_as: str | None = None
             ) -> grpc.RpcMethodHandler:
    """A handler that answers `code`. Stream-stream whatever the method's kind, so it
    fits every kind (also methods that do not exist: an unauthenticated caller cannot
    probe which ones do). It takes the first request message (undecoded) before it
    aborts: a streaming client (reflection) still writing that message when the call
    ended got INTERNAL ("Internal error from Core") now and then instead of `code`."""

    async def refuse(requests, context: grpc.aio.ServicerContext) -> None:
        with contextlib.suppress(StopAsyncIteration, asyncio.TimeoutError, grpc.RpcError):
            await asyncio.wait_for(requests.__anext__(), _FIRST_MESSAGE_WAIT_S)
        if log_as:
            log.warning("%s (peer %s)", log_as, context.peer())
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    md = grpc.aio.Metadata(*[(k, v) for k, v in (details.metadata or ())
                             if k != "authorization"], ("authorization", f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, md,
                                      details.credentials, details.wait_for_ready)


class _BearerUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, source: TokenSource) -> None:
        self.source = source

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.source.first()), request)


class _BearerUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, source: TokenSource) -> None:
        self.source = source

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.source.first()), request)


class _BearerStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, source: TokenSource) -> None:
        self.source = source

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.source.first()), request_iterator)


class _BearerStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, source: TokenSource) -> None:
        self.source = source

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.source.first()), request_iterator)


def bearer_interceptors(source: TokenSource) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding `authorization: Bearer <token>` to every call of a channel
    (the source's first token, looked up per call so a rotated file takes effect). One
    per call kind: grpc.aio files an interceptor under the first kind it implements
    only, so one class implementing all four left streaming calls without the token."""
    return [cls(source) for cls in (_BearerUnaryUnary, _BearerUnaryStream,
                                    _BearerStreamUnary, _BearerStreamStream)]


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    """What a server or client presents and checks (module docstring). Every field
    None = plaintext without tokens, as before. Files are read and checked when the
    object is made, so a bad option fails at start with one line, not at the first call."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    token_file: str | None = None
    token: str | None = field(default=None, repr=False)  # HYBRID_TOKEN's value; not in repr
    _pem: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _source: TokenSource | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tls_key and not self.tls_cert:
            raise InvalidArgument(f"{_named('--tls-key')} needs {_named('--tls-cert')}")
        if self.tls_cert and not self.tls_key:
            raise InvalidArgument(f"{_named('--tls-cert')} needs {_named('--tls-key')}")
        if self.token_file and self.token:
            raise InvalidArgument(f"give {_named('--token-file')} or {TOKEN_ENV}, not both")
        for name, path, marker in (("--tls-cert", self.tls_cert, b"CERTIFICATE"),
                                   ("--tls-key", self.tls_key, b"PRIVATE KEY"),
                                   ("--tls-ca", self.tls_ca, b"CERTIFICATE")):
            if path:
                self._pem[name] = _read_pem(path, name, marker)
        if self.tls_cert:
            _check_pair(self.tls_cert, self.tls_key, self.tls_ca)
        if self.token_file or self.token:
            object.__setattr__(self, "_source", TokenSource(self.token_file, self.token))

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_options(cls, tls_cert: str | None = None, tls_key: str | None = None,
                     tls_ca: str | None = None, token_file: str | None = None,
                     environ: Mapping[str, str] | None = None) -> Security | None:
        """The CLI's options (click already read HYBRID_TLS_* / HYBRID_TOKEN_FILE) plus
        HYBRID_TOKEN from the environment; None when nothing is set (plaintext)."""
        env = os.environ if environ is None else environ
        token = env.get(TOKEN_ENV, "").strip() or None
        if not any((tls_cert, tls_key, tls_ca, token_file, token)):
            return None
        return cls(tls_cert or None, tls_key or None, tls_ca or None, token_file or None, token)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Security | None:
        """HYBRID_TLS_CERT, HYBRID_TLS_KEY, HYBRID_TLS_CA, HYBRID_TOKEN_FILE and
        HYBRID_TOKEN; None when none is set."""
        env = os.environ if environ is None else environ
        get = {opt: env.get(var, "").strip() or None for opt, var in ENV_OF.items()}
        return cls.from_options(get["--tls-cert"], get["--tls-key"], get["--tls-ca"],
                                get["--token-file"], environ=env)

    # ---- what is on ------------------------------------------------------------------
    @property
    def client_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    @property
    def has_token(self) -> bool:
        return self._source is not None

    def tokens(self) -> tuple[str, ...]:
        return self._source.tokens() if self._source else ()

    def describe(self, server: bool) -> str:
        """For the start-up log line: 'mutual TLS + token', 'TLS', 'plaintext', ..."""
        if server:
            tls = "mutual TLS" if self.tls_ca else "TLS" if self.tls_cert else "plaintext"
        else:
            tls = "mutual TLS" if self.tls_cert else "TLS" if self.tls_ca else "plaintext"
        return tls + (" + token" if self.has_token else "")

    # ---- server side -----------------------------------------------------------------
    def check_server(self) -> None:
        """A server's TLS needs its own certificate and key; a CA alone makes no sense."""
        if self.tls_ca and not self.tls_cert:
            raise InvalidArgument(f"a server's {_named('--tls-ca')} requires client "
                                  f"certificates (mutual TLS) and needs "
                                  f"{_named('--tls-cert')} and {_named('--tls-key')}")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials (client certs required when tls_ca is set); None: plaintext."""
        self.check_server()
        if not self.tls_cert:
            return None
        return grpc.ssl_server_credentials(
            [(self._pem["--tls-key"], self._pem["--tls-cert"])],
            root_certificates=self._pem.get("--tls-ca"),
            require_client_auth=bool(self.tls_ca))

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if not self._source:
            return []
        return [TokenAuth(self._source.tokens, self._source.service_tokens)]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address` with TLS when configured, else plaintext; returns the port."""
        creds = self.server_credentials()
        log.info("%s: %s", address, self.describe(server=True))
        if creds is None:
            if self.has_token and not _is_loopback(address):
                log.warning("%s: bearer tokens over plaintext: anyone on the path can read "
                            "them; add --tls-cert/--tls-key", address)
            return server.add_insecure_port(address)
        return server.add_secure_port(address, creds)

    # ---- client side -----------------------------------------------------------------
    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.client_tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self._pem.get("--tls-ca"),
                                            private_key=self._pem.get("--tls-key"),
                                            certificate_chain=self._pem.get("--tls-cert"))

    def channel(self, target: str, options: Sequence[tuple[str, object]] | None = None
                ) -> grpc.aio.Channel:
        """A grpc.aio channel to `target`: TLS when a CA or client cert is set, the
        bearer token on every call when one is set."""
        interceptors = bearer_interceptors(self._source) if self._source else None
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)


def open_channel(target: str, options: Sequence[tuple[str, object]] | None = None,
                 security: Security | None = None) -> grpc.aio.Channel:
    """`security.channel(...)`, or a plaintext channel when security is None."""
    return (security or Security()).channel(target, options)
