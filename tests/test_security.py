"""TLS, mutual TLS and bearer tokens (transport/security.py) on the real service pair.

One pair runs with both services under mutual TLS and tokens (certificates from a
throw-away trustme CA): generation through it equals plaintext generation, including
the decode -> prefill hop (Release, FetchKv) that decode makes as a client; calls
without a valid token get UNAUTHENTICATED, except health; a client without a trusted
certificate cannot connect at all (UNAVAILABLE); reflection is off unless asked for.
Bad option combinations fail at once with one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.api import health
from client.cli import main
from client.launch import free_port, spawn, stop
from client.remote import run_remote
from engine.errors import DeadlineExceeded, HybridError, InvalidArgument, Unavailable
from engine.loader import load_model
from engine.sampling import SamplingParams
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from tests.services_util import local_tokens
from transport import security as sec
from transport import servekit as kit
from transport.security import Security

trustme = pytest.importorskip("trustme")
MODEL = "synthetic:tiny-gpt2"
PROMPT = [5, 17, 42, 99, 7, 3]
# The servers accept both tokens (mid-rotation); decode sends the first to prefill.
SERVER_TOKENS = "# accepted tokens, one a line\n\nold-token-0123456789\nnew-token-9876543210\n"
CLIENT_TOKEN = "new-token-9876543210"


@dataclass(frozen=True)
class Pki:
    """PEM files of a CA, a server cert (localhost, 127.0.0.1, prefill, decode), a client
    cert of the same CA, a client cert of another CA, and token files."""

    d: Path

    def __getattr__(self, name: str) -> str:
        """pki.rogue_ca_pem -> <dir>/rogue-ca.pem (the last '_' is the extension's dot)."""
        if name.startswith("_"):
            raise AttributeError(name)
        stem, _, ext = name.rpartition("_")
        return str(self.d / (f"{stem.replace('_', '-')}.{ext}" if stem else ext))

    def client(self, cert: bool = True, token: str | None = None, **kw) -> Security:
        """A client's Security: the CA, the client cert unless cert=False, the client
        token file unless `token` (a literal, as HYBRID_TOKEN) is given."""
        args = {"tls_ca": self.ca_pem, "token_file": None if token else self.client_token}
        if cert:
            args |= {"tls_cert": self.client_pem, "tls_key": self.client_key}
        return Security(**(args | kw), token=token)

    def server_args(self, token_file: str | None = None) -> list[str]:
        return ["--tls-cert", self.server_pem, "--tls-key", self.server_key,
                "--tls-ca", self.ca_pem, "--token-file", token_file or self.tokens]

    def cli_args(self) -> list[str]:
        return ["--tls-ca", self.ca_pem, "--tls-cert", self.client_pem,
                "--tls-key", self.client_key]


def _write_leaf(cert, d: Path, name: str) -> None:
    cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
    (d / f"{name}.pem").write_bytes(b"".join(c.bytes() for c in cert.cert_chain_pems))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    rogue.cert_pem.write_to_path(str(d / "rogue-ca.pem"))
    _write_leaf(ca.issue_cert("localhost", "127.0.0.1", "prefill", "decode"), d, "server")
    _write_leaf(ca.issue_cert("hybrid-client"), d, "client")
    _write_leaf(rogue.issue_cert("hybrid-client"), d, "rogue")
    (d / "tokens").write_text(SERVER_TOKENS)
    (d / "client.token").write_text(CLIENT_TOKEN + "\n")
    (d / "bad-first.tokens").write_text(f"not-accepted-by-prefill\n{CLIENT_TOKEN}\n")
    (d / "empty.tokens").write_text("# nothing but a comment\n\n")
    (d / "not.pem").write_text("hello\n")
    return Pki(d)


@pytest.fixture(autouse=True)
def _no_security_env(monkeypatch):
    """Options under test come from arguments, never from the runner's environment."""
    for var in (*sec.ENV_OF.values(), sec.TOKEN_ENV, "HYBRID_REFLECTION"):
        monkeypatch.delenv(var, raising=False)


def _start(role: str, port: int, args: list[str], log: Path):
    cmd = ["serve", role, "--model", MODEL, "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), *args]
    env = {k: "" for k in (*sec.ENV_OF.values(), sec.TOKEN_ENV)}
    return spawn(cmd, env=env, log_path=str(log))


def _wait(target: str, proc, security: Security, timeout_s: float = 60.0) -> None:
    """client.launch.wait_serving, over TLS (health needs the CA and client cert)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"service for {target} exited with code {proc.returncode}")
        try:
            if asyncio.run(health(target, timeout_s=1.0, security=security)) == "SERVING":
                return
        except HybridError:
            pass
        time.sleep(0.1)
    raise DeadlineExceeded(f"{target} not SERVING after {timeout_s:.0f}s")


@dataclass
class Pair:
    prefill: str
    decode: str
    logs: Path


@pytest.fixture(scope="module")
def secure_pair(pki, tmp_path_factory):
    """Both services under mutual TLS + tokens; reflection on prefill only."""
    logs = tmp_path_factory.mktemp("logs")
    pport, dport = free_port(), free_port()
    pair = Pair(f"127.0.0.1:{pport}", f"127.0.0.1:{dport}", logs)
    procs = {}
    try:
        procs["prefill"] = _start("prefill", pport, [*pki.server_args(), "--reflection",
                                                     "--region-mb", "32"], logs / "prefill.log")
        procs["decode"] = _start("decode", dport, [*pki.server_args(), "--prefill", pair.prefill],
                                 logs / "decode.log")
        _wait(pair.prefill, procs["prefill"], pki.client())
        _wait(pair.decode, procs["decode"], pki.client())
        yield pair
    finally:
        codes = {n: stop(p) for n, p in reversed(list(procs.items()))}
    assert codes == {"decode": 0, "prefill": 0}


@pytest.fixture(scope="module")
def want(secure_pair):
    """The plaintext result: single-process generation, which the plaintext pair equals
    (tests/test_services_e2e.py)."""
    return local_tokens(load_model(MODEL, "cpu", "float32"), PROMPT, 8, SamplingParams(seed=3))


def _generate(pair: Pair, security: Security, transport: str = "shm") -> list[int]:
    return run_remote(prompt_ids=PROMPT, max_new_tokens=8, params=SamplingParams(seed=3),
                      prefill=pair.prefill, decode=pair.decode, kv_transport=transport,
                      timeout_s=30, security=security).token_ids


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_generate_over_mutual_tls_with_token_equals_plaintext(pki, secure_pair, want, transport):
    """shm: decode renews and releases the slot on prefill over its mTLS + token channel;
    grpc: the whole KV comes through Prefill.FetchKv on that channel."""
    assert _generate(secure_pair, pki.client(), transport) == want


def test_decode_to_prefill_hop_carries_decodes_own_token(pki, secure_pair, tmp_path):
    """A decoder whose first token prefill does not accept: the client's calls pass (decode
    accepts the client's token) but decode's own calls to prefill are refused. Decode
    reports that as UNAVAILABLE naming UNAUTHENTICATED: the client's credentials were
    fine, its decode service cannot use its prefill service."""
    port = free_port()
    proc = _start("decode", port, [*pki.server_args(pki.bad_first_tokens), "--prefill",
                                   secure_pair.prefill, "--no-warm-up"], tmp_path / "decode.log")
    try:
        _wait(f"127.0.0.1:{port}", proc, pki.client())
        bad = Pair(secure_pair.prefill, f"127.0.0.1:{port}", tmp_path)
        with pytest.raises(HybridError) as e:
            _generate(bad, pki.client(), "grpc")
        assert e.value.status in ("UNAVAILABLE", "UNAUTHENTICATED"), e.value
        assert "UNAUTHENTICATED" in str(e.value), e.value
    finally:
        assert stop(proc) == 0


async def _rpc_codes(pair: Pair, security: Security) -> dict[str, str]:
    """The status of Prefill, Generate, both Infos, reflection and both healths."""
    out = {}
    async with security.channel(pair.prefill) as pch, security.channel(pair.decode) as dch:
        calls = {
            "Prefill": lambda: pbg.PrefillServiceStub(pch).Prefill(
                pb.PrefillRequest(prompt_ids=PROMPT), timeout=10).read(),
            "Generate": lambda: pbg.DecodeServiceStub(dch).Generate(
                pb.GenerateRequest(), timeout=10).read(),
            "prefill.Info": lambda: pbg.PrefillServiceStub(pch).Info(pb.InfoRequest(), timeout=10),
            "decode.Info": lambda: pbg.DecodeServiceStub(dch).Info(pb.InfoRequest(), timeout=10),
            "prefill.reflection": lambda: _list_services(pch),
            "decode.reflection": lambda: _list_services(dch),
            "prefill.health": lambda: _health(pch),
            "decode.health": lambda: _health(dch),
        }
        for name, call in calls.items():
            try:
                await call()
                out[name] = "OK"
            except grpc.aio.AioRpcError as e:
                out[name] = e.code().name
    return out


async def _list_services(ch) -> list[str]:
    call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    async for resp in call:
        return [s.name for s in resp.list_services_response.service]
    return []


async def _health(ch) -> None:
    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("token", [None, "wrong-token", CLIENT_TOKEN[:-1]],
                         ids=["missing", "wrong", "prefix-of-valid"])
def test_without_a_valid_token_everything_but_health_is_unauthenticated(pki, secure_pair, token):
    security = pki.client(token_file=None, token=token) if token else Security(
        tls_ca=pki.ca_pem, tls_cert=pki.client_pem, tls_key=pki.client_key)
    codes = asyncio.run(_rpc_codes(secure_pair, security))
    assert codes == {**dict.fromkeys(["Prefill", "Generate", "prefill.Info", "decode.Info",
                                      "prefill.reflection", "decode.reflection"],
                                     "UNAUTHENTICATED"),
                     "prefill.health": "OK", "decode.health": "OK"}


def test_with_a_token_reflection_only_where_asked_for(pki, secure_pair):
    """Every token of the servers' file is accepted (rotation); reflection is on for
    prefill (--reflection) and UNIMPLEMENTED on decode (the default)."""
    for token in ("old-token-0123456789", CLIENT_TOKEN):
        codes = asyncio.run(_rpc_codes(secure_pair, pki.client(token_file=None, token=token)))
        assert codes["prefill.Info"] == codes["decode.Info"] == "OK"
        assert codes["Generate"] == "INVALID_ARGUMENT"  # past the token: the handler's check
        assert codes["prefill.reflection"] == "OK"
        assert codes["decode.reflection"] == "UNIMPLEMENTED"
    names = asyncio.run(_reflect(pki.client(), secure_pair.prefill))
    assert "hybrid.v1.PrefillService" in names


async def _reflect(security: Security, target: str) -> list[str]:
    async with security.channel(target) as ch:
        return await _list_services(ch)


@pytest.mark.parametrize("client", ["no-cert", "other-ca-cert", "plaintext", "untrusted-server"])
def test_mutual_tls_refuses_clients_without_a_trusted_cert(pki, secure_pair, client):
    """The handshake fails, so nothing answers, not even health: UNAVAILABLE."""
    security = {
        "no-cert": pki.client(cert=False),
        "other-ca-cert": pki.client(tls_cert=pki.rogue_pem, tls_key=pki.rogue_key),
        "plaintext": Security(token_file=pki.client_token),
        "untrusted-server": pki.client(tls_ca=pki.rogue_ca_pem),
    }[client]
    with pytest.raises(Unavailable):
        asyncio.run(health(secure_pair.prefill, timeout_s=5, security=security))
    with pytest.raises(Unavailable):
        _generate(secure_pair, security)


def test_cli_generate_health_info_with_tls_options(pki, secure_pair, want):
    run = CliRunner().invoke
    addrs = ["--prefill", secure_pair.prefill, "--decode", secure_pair.decode]
    r = run(main, ["generate", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                   "8", "--seed", "3", "--json", *addrs, *pki.cli_args(),
                   "--token-file", pki.client_token])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["token_ids"] == want
    r = run(main, ["health", *addrs, *pki.cli_args()])  # no token: health is exempt
    assert r.exit_code == 0 and r.output.count("SERVING") == 2, r.output
    r = run(main, ["info", *addrs, *pki.cli_args(), "--json"],
            env={"HYBRID_TOKEN": CLIENT_TOKEN})  # the token from the environment
    assert r.exit_code == 0 and json.loads(r.stdout)["decode"]["model"] == MODEL, r.output
    r = run(main, ["info", *addrs, *pki.cli_args()])
    assert r.exit_code == 1 and "UNAUTHENTICATED" in r.output, r.output


def _compose(name: str) -> dict:
    """A compose file, with the override tags (`!override`, `!reset`) read as plain values."""
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    def plain(loader, node):
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        return loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else None

    for tag in ("!override", "!reset"):
        Loader.add_constructor(tag, plain)
    with open(Path(__file__).parent.parent / name) as f:
        return yaml.load(f, Loader=Loader)  # a SafeLoader plus the two tags


def test_compose_loopback_ports_and_tls_override(pki, secure_pair):
    """docker-compose.yml publishes on loopback only; docker-compose.tls.yml secures every
    service with read-only certs (never the CA key) and the token secret, and its
    healthcheck commands pass mutual TLS against the secured pair without a token."""
    base, tls = _compose("docker-compose.yml"), _compose("docker-compose.tls.yml")
    assert all(p.startswith("127.0.0.1:") for s in base["services"].values() for p in s["ports"])
    assert set(tls["services"]) == set(base["services"])
    assert tls["secrets"]["hybrid_token"]["file"] == "./certs/token"
    for name, svc in tls["services"].items():
        # openai is a client of the pair: its healthcheck stays docker-compose.yml's HTTP
        # /health, which probes the services with this environment (test below)
        env, test = svc["environment"], svc.get("healthcheck", {}).get("test", [])
        mounts = {v.split(":")[1]: v for v in svc["volumes"]}
        assert all(v.endswith(":ro") and "ca.key" not in v for v in mounts.values())
        assert env["HYBRID_TOKEN_FILE"] == "/run/secrets/hybrid_token"
        assert svc["secrets"] == ["hybrid_token"] and "--token-file" not in test
        used = [*(env[k] for k in sec.ENV_OF.values() if k != "HYBRID_TOKEN_FILE"),
                *(a for a in test if a.startswith("/certs/"))]
        assert set(used) <= set(mounts) and ("--tls-ca" in test or name == "openai"), (used, mounts)
    for name, target in (("prefill", secure_pair.prefill), ("decode", secure_pair.decode)):
        argv = [re.sub(r"^localhost:\d+$", target, a.replace("/certs/", f"{pki.d}/"))
                for a in tls["services"][name]["healthcheck"]["test"]]
        assert argv[:2] == ["CMD", "hybrid"], argv
        r = CliRunner().invoke(main, argv[2:])
        assert r.exit_code == 0 and "SERVING" in r.output, r.output


def test_openai_endpoint_with_the_tls_override(pki, secure_pair, tmp_path):
    """docker-compose.tls.yml's `openai` environment (client certificate, CA, token file)
    takes `hybrid serve openai` through mutual TLS and tokens to the secured pair."""
    import httpx

    env = {k: v.replace("/certs/", f"{pki.d}/") for k, v in
           _compose("docker-compose.tls.yml")["services"]["openai"]["environment"].items()}
    env["HYBRID_TOKEN_FILE"] = pki.client_token  # the compose secret
    port = free_port()
    proc = spawn(["serve", "openai", "--host", "127.0.0.1", "--port", str(port), "--prefill",
                  secure_pair.prefill, "--decode", secure_pair.decode], env=env,
                 log_path=str(tmp_path / "openai.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert httpx.get(base + "/health", timeout=5).json()["decode"] == "SERVING"
        r = httpx.post(base + "/v1/completions", timeout=30,
                       json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize("argv, env, message", [
    (["serve", "prefill", "--tls-key", "{server_key}"], {}, "--tls-key (HYBRID_TLS_KEY) needs"),
    (["serve", "decode", "--tls-cert", "{server_pem}"], {}, "--tls-cert (HYBRID_TLS_CERT) needs"),
    (["serve", "prefill", "--tls-ca", "{ca_pem}"], {}, "requires client certificates"),
    (["serve", "prefill", "--tls-cert", "/nonexistent.pem", "--tls-key", "{server_key}"], {},
     "No such file"),
    (["serve", "prefill", "--token-file", "{empty_tokens}"], {}, "no token in it"),
    (["serve", "decode", "--token-file", "{tokens}"], {"HYBRID_TOKEN": "x"}, "not both"),
    (["generate", "--prompt-ids", "1", "--tls-key", "{client_key}"], {}, "needs --tls-cert"),
    (["health", "--tls-ca", "{not_pem}"], {}, "not a PEM file"),
    (["info", "--tls-cert", "{server_key}", "--tls-key", "{server_key}"], {},
     "not a PEM file with a CERTIFICATE block"),
    (["bench", "serve", "--token-file", "{tokens}"], {}, "give --prefill and --decode"),
    (["serve", "prefill", "--tls-cert", "{server_pem}", "--tls-key", "{client_key}"], {},
     "does not go with --tls-cert"),
], ids=["key-without-cert", "cert-without-key", "server-ca-without-cert", "missing-file",
        "empty-token-file", "token-twice", "generate-key-without-cert", "not-pem",
        "key-as-cert", "bench-started-pair", "key-of-another-cert"])
def test_bad_security_options_are_one_line_errors(pki, argv, env, message):
    """Checked before anything loads: one line on stderr, no traceback, non-zero exit."""
    argv = [a.format(**{k: getattr(pki, k) for k in ("server_key", "server_pem", "ca_pem",
                                                      "empty_tokens", "tokens", "client_key",
                                                      "not_pem")}) for a in argv]
    r = CliRunner().invoke(main, argv, env=env)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert "Traceback" not in r.output and len(lines) == 1, r.output


# ---- in process, no service pair -------------------------------------------------------
def test_token_file_parsing_and_rotation_without_restart(tmp_path, monkeypatch):
    """Comments and blank lines ignored; a changed file is re-read (so a token is rotated
    without a restart); a file emptied by mistake keeps the last good tokens."""
    monkeypatch.setattr(sec, "_RELOAD_EVERY_S", 0.0)
    f = tmp_path / "tokens"
    f.write_text("# comment\n\n  tok-a  # trailing comment\ntok-b\n")
    s = Security(token_file=str(f))
    assert s.tokens() == ("tok-a", "tok-b") and "tok-a" not in repr(Security(token="tok-a"))
    f.write_text("tok-c\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert s.tokens() == ("tok-c",)
    f.write_text("# emptied\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert s.tokens() == ("tok-c",)
    assert sec.token_matches("tok-c", s.tokens()) and not sec.token_matches("tok-", s.tokens())
    with pytest.raises(InvalidArgument, match="printable ASCII"):
        sec.parse_tokens("tok with space\n", "x")
    assert Security.from_options() is None
    assert Security.from_options(environ={"HYBRID_TOKEN": "t"}).describe(server=True) == \
        "plaintext + token"


class _Info(pbg.DecodeServiceServicer):
    async def Info(self, request, context):
        return pb.ServiceInfo(model="m")


def test_token_on_plaintext_loopback_and_reflection_flag(tmp_path):
    """make_server: the token check works without TLS (loopback), health stays open;
    reflection only with reflection=True."""
    f = tmp_path / "tokens"
    f.write_text("tok-a\n")

    async def codes(security: Security, reflection: bool) -> tuple[str, str, str]:
        server, hs = kit.make_server(lambda s: pbg.add_DecodeServiceServicer_to_server(
            _Info(), s), ["hybrid.v1.DecodeService"], security=security, reflection=reflection)
        port = kit.add_port(server, "127.0.0.1:0", security)
        await server.start()
        kit.set_health(hs, ["hybrid.v1.DecodeService"], kit.SERVING)
        async with Security(token_file=str(f)).channel(f"127.0.0.1:{port}") as good, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as bare:
            out = await _outcomes((lambda: pbg.DecodeServiceStub(bare).Info(pb.InfoRequest()),
                                   lambda: pbg.DecodeServiceStub(good).Info(pb.InfoRequest()),
                                   lambda: _list_services(good), lambda: _health(bare)))
        await server.stop(0)
        return tuple(out)

    secured = Security(token_file=str(f))
    assert asyncio.run(codes(secured, False)) == ("UNAUTHENTICATED", "OK", "UNIMPLEMENTED", "OK")
    assert asyncio.run(codes(secured, True)) == ("UNAUTHENTICATED", "OK", "OK", "OK")
    assert asyncio.run(codes(None, False)) == ("OK", "OK", "UNIMPLEMENTED", "OK")


async def _outcomes(calls) -> list[str]:
    """"OK" or the status name of each awaited call, in order."""
    out = []
    for call in calls:
        try:
            await call()
            out.append("OK")
        except grpc.aio.AioRpcError as e:
            out.append(e.code().name)
    return out


class _Leases(pbg.PrefillServiceServicer):
    """Answers the lease calls and Attach: the role check runs before any servicer."""

    async def Attach(self, request, context):
        return pb.AttachReply(region="/r")

    async def Release(self, request, context):
        return pb.LeaseReply()

    async def RenewLease(self, request, context):
        return pb.LeaseReply(lease_ms=1)


def test_service_role_guards_the_calls_only_decode_makes(tmp_path):
    """With a token marked `service` in the file, a client's token can prefill and
    release, but not claim or renew slots (it would escape its slot share), reclaim a
    consumer's slots or stream KV: PERMISSION_DENIED. The service token can."""
    f = tmp_path / "tokens"
    f.write_text("client-tok\nsvc-tok service  # the decode service's\n")
    (tmp_path / "client").write_text("client-tok\n")
    (tmp_path / "svc").write_text("svc-tok service\n")

    async def codes(who: str) -> list[str]:
        security = Security(token_file=str(f))
        server, _ = kit.make_server(lambda s: kit.add_service(s, "PrefillService", _Leases()),
                                    ["hybrid.v1.PrefillService"], security=security)
        port = kit.add_port(server, "127.0.0.1:0", security)
        await server.start()
        async with Security(token_file=str(tmp_path / who)).channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.PrefillServiceStub(ch)
            out = await _outcomes((lambda: stub.Release(pb.LeaseRequest()),
                                   lambda: stub.RenewLease(pb.LeaseRequest()),
                                   lambda: stub.Attach(pb.AttachRequest())))
        await server.stop(0)
        return out

    assert asyncio.run(codes("client")) == ["OK", "PERMISSION_DENIED", "PERMISSION_DENIED"]
    assert asyncio.run(codes("svc")) == ["OK", "OK", "OK"]
    with pytest.raises(InvalidArgument, match="role 'service'"):
        sec.parse_token_lines("tok admin\n", "x")
