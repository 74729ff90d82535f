"""`hybrid serve openai` against the real CPU pair (synthetic:tiny-gpt2), with the
official `openai` package as the client (streaming and not) and httpx for the error
cases: tokens equal `hybrid generate` through the same pair, usage counts, stop strings,
the checkpoint's chat template, OpenAI error bodies and statuses, API keys, Prometheus
metrics, cancellation on client disconnect, and a serving process without torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from client.launch import ServicePair, free_port, spawn, stop
from client.remote import run_remote
from engine.sampling_params import SamplingParams
from tests.services_util import counters, slots_in_use, wait_until

MODEL = "synthetic:tiny-gpt2"
KEY = "sk-test-123"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def render(messages: list[dict]) -> str:  # TEMPLATE by hand, special tokens of the config
    return "<s>" + "".join(f"<|{m['role']}|>{m['content']}</s>" for m in messages) + "<|assistant|>"


def _start(args: list[str], log: str) -> tuple[object, str]:
    port = free_port()
    proc = spawn(["serve", "openai", "--host", "127.0.0.1", "--port", str(port), *args],
                 log_path=log)
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(proc, base: str, log: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                pytest.fail(f"openai endpoint exited {proc.returncode}: {f.read()[-2000:]}")
        try:
            httpx.get(base + "/health", timeout=5)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail("openai endpoint did not start")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The pair, an endpoint in front of it (API key, checkpoint template, /metrics on the
    API port) and one in front of nothing (metrics on their own port). The endpoints start
    while the pair loads."""
    d = tmp_path_factory.mktemp("openai")
    ckpt = d / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>"}))
    (d / "keys").write_text(f"# API keys\n{KEY}\n")
    # 5 ms a decode step: a 250-token stream is still running when a test hangs up
    pair = ServicePair(model=MODEL, device="cpu", log_dir=str(d),
                       decode_env={"HYBRID_FAULT_TOKEN_DELAY_MS": "5"})
    up_port = free_port()
    up = spawn(["serve", "openai", "--host", "127.0.0.1", "--port", str(up_port),
                "--prefill", pair.prefill, "--decode", pair.decode, "--model-dir", str(ckpt),
                "--api-key-file", str(d / "keys"), "--metrics-port", str(up_port)],
               log_path=str(d / "up.log"))
    metrics_port = free_port()
    down, down_base = _start(["--prefill", f"127.0.0.1:{free_port()}", "--decode",
                              f"127.0.0.1:{free_port()}", "--metrics-port", str(metrics_port)],
                             str(d / "down.log"))
    try:
        pair.start()
        base = f"http://127.0.0.1:{up_port}"
        _wait_up(up, base, str(d / "up.log"))
        _wait_up(down, down_base, str(d / "down.log"))
        # the endpoint's channels failed to connect while the pair loaded; they reconnect
        # within a second of its return (server.RECONNECT)
        assert wait_until(lambda: httpx.get(base + "/v1/models", timeout=5, headers={
            "authorization": f"Bearer {KEY}"}).status_code == 200, 5, 0.05)
        yield {"pair": pair, "base": base, "proc": up, "down": down_base,
               "down_metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:  # all three drain at once
        for proc in (up, down):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        pair.stop()
        stop(up)
        stop(down)


@pytest.fixture(scope="module")
def oa(env):
    return openai.OpenAI(base_url=env["base"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(env, prompt=None, prompt_ids=None, max_new_tokens=12, params=None, stop=()):
    p = env["pair"]
    return run_remote(prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                      params=params or SamplingParams(), stop=stop, prefill=p.prefill, decode=p.decode)


def finish(res) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}[res.finish_reason]


def test_models(oa):
    ids = [m.id for m in oa.models.list().data]
    assert ids == [MODEL]
    assert oa.models.retrieve(MODEL).id == MODEL


def test_completion_greedy_equals_generate(env, oa):
    want = expected(env, "Hello", max_new_tokens=12)
    r = oa.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == finish(want)
    assert r.usage.prompt_tokens == len(want.prompt_ids) == len(b"Hello")
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.id.startswith("cmpl-")


def test_completion_token_ids_prompt(env, oa):
    ids = [5, 17, 42, 99, 7, 3, 250, 11]
    want = expected(env, prompt_ids=ids, max_new_tokens=10)
    r = oa.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)


def test_seeded_stream_equals_hybrid_generate_cli(env, oa):
    """Streaming, sampled with a seed: the same text as the `hybrid generate` command
    through the same pair; the usage chunk at the end (stream_options.include_usage)."""
    from click.testing import CliRunner

    from client.cli import main

    p = env["pair"]
    out = CliRunner().invoke(main, [
        "generate", "Hello there", "--prefill", p.prefill, "--decode", p.decode,
        "--max-new-tokens", "16", "--temperature", "0.9", "--top-p", "0.9", "--seed", "1234",
        "--json"])
    assert out.exit_code == 0, out.output
    want = json.loads(out.stdout.strip().splitlines()[-1])  # (older click mixes in stderr)
    chunks = list(oa.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=16, temperature=0.9, top_p=0.9, seed=1234,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        {"eos": "stop", "stop": "stop", "length": "length"}[want["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["token_ids"])
    assert chunks[-1].usage.prompt_tokens == len(want["prompt_ids"])
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_uses_checkpoint_template(env, oa):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    want = expected(env, render(msgs), max_new_tokens=10)
    r = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(render(msgs).encode())  # the byte tokenizer
    assert r.usage.completion_tokens == len(want.token_ids)
    stream = oa.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10,
                                        temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == finish(want)


@pytest.mark.parametrize("streaming", [False, True])
def test_stop_strings(env, oa, streaming):
    full = expected(env, "Once", max_new_tokens=20).text
    stop = full[4:6]
    want = expected(env, "Once", max_new_tokens=20, stop=[stop])
    assert want.finish_reason == "stop" and want.text == full[:full.find(stop)]
    if streaming:
        chunks = list(oa.completions.create(model=MODEL, prompt="Once", max_tokens=20,
                                            temperature=0, stop=[stop, "\x00never"], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = oa.completions.create(model=MODEL, prompt="Once", max_tokens=20, temperature=0,
                                  stop=stop)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens == len(want.token_ids)
    assert text == want.text and reason == "stop"


def post(base: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes | str):
        return httpx.post(base + path, content=body, headers=headers, timeout=30, **kw)
    return httpx.post(base + path, json=body, headers=headers, timeout=30, **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"stop": [""]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"logprobs": 3}, "logprobs"),
    ({"prompt": list(range(250)), "max_tokens": 10}, "max_tokens"),  # past 256 positions
])
def test_bad_parameters_are_400_before_any_rpc(env, change, param):
    err = error_of(post(env["base"], "/v1/completions", OK | change), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["code"] in ("invalid_value", "unsupported_value")  # ours, not a service's


def test_bad_json_unknown_model_and_route(env):
    assert error_of(post(env["base"], "/v1/completions", b"{nope"), 400)["code"] == "invalid_json"
    assert error_of(post(env["base"], "/v1/chat/completions", b"[1]"), 400)["code"] == "invalid_json"
    err = error_of(post(env["base"], "/v1/completions", OK | {"model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    error_of(post(env["base"], "/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    assert error_of(post(env["base"], "/v1/nothing", OK), 404)["code"] == "not_found"


def test_service_errors_keep_their_status(env):
    """INVALID_ARGUMENT from the services (a token id outside the vocabulary; a text
    prompt too long for the positions) is 400 with the gRPC status as code."""
    err = error_of(post(env["base"], "/v1/completions", OK | {"prompt": [5, 99999]}), 400)
    assert err["code"] == "invalid_argument"
    err = error_of(post(env["base"], "/v1/completions", OK | {"prompt": "x" * 300}), 400)
    assert err["code"] == "invalid_argument"


def test_openai_package_sees_the_error_body(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=MODEL, prompt="Hi", max_tokens=-1)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_api_key(env):
    for key in (None, "sk-wrong"):
        err = error_of(post(env["base"], "/v1/completions", OK, key=key), 401)
        assert err["code"] == "invalid_api_key"
    assert httpx.get(env["base"] + "/v1/models").status_code == 401
    assert httpx.get(env["base"] + "/health").status_code == 200  # probes carry no key


def test_services_down_is_503(env):
    down = env["down"]
    err = error_of(post(down, "/v1/completions", OK), 503)
    assert err["code"] == "unavailable" and err["type"] == "service_unavailable_error"
    error_of(httpx.get(down + "/v1/models"), 503)
    h = httpx.get(down + "/health")
    assert h.status_code == 503 and h.json()["prefill"].startswith("UNREACHABLE")
    text = httpx.get(env["down_metrics"]).text  # metrics on their own port
    assert 'hybrid_openai_requests_total{endpoint="/v1/completions",status="503"}' in text


def test_metrics_after_traffic(env, oa):
    oa.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(env["base"] + "/metrics").text

    def value(line_start: str) -> float:
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line_start))

    assert value('hybrid_openai_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert value('hybrid_openai_requests_total{endpoint="/v1/completions",status="400"}') >= 1
    assert value('hybrid_openai_time_to_first_token_seconds_count{endpoint="/v1/completions"}') >= 1
    assert value('hybrid_openai_request_duration_seconds_count{endpoint="/v1/completions"}') >= 1
    assert value("hybrid_openai_completion_tokens_total") >= 3


def test_disconnect_cancels_the_generation(env):
    """A client that hangs up mid-stream, or before a non-streaming answer, cancels the
    Generate call (decode counts it) and no slot stays held."""
    p = env["pair"]
    before = counters(p.decode, "decode")["cancelled"]
    body = OK | {"max_tokens": 250, "prompt": "a", "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", env["base"] + "/v1/completions", json=body | {"stream": True},
                      headers={"authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    assert wait_until(lambda: counters(p.decode, "decode")["cancelled"] == before + 1, 5)
    assert wait_until(lambda: slots_in_use(p.prefill) == 0, 5)

    before += 1
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.4 s
        httpx.post(env["base"] + "/v1/completions", json=body, timeout=0.4,
                   headers={"authorization": f"Bearer {KEY}"})
    assert wait_until(lambda: counters(p.decode, "decode")["cancelled"] == before + 1, 5)
    assert wait_until(lambda: slots_in_use(p.prefill) == 0, 5)


def test_endpoint_process_has_no_torch(env):
    maps = f"/proc/{env['proc'].pid}/maps"
    if not os.path.exists(maps):
        pytest.skip("no /proc")
    with open(maps) as f:
        assert "libtorch" not in f.read()


def test_compose_openai_service(env, tmp_path):
    """docker-compose.yml's `openai` service: after both services are healthy, port 8000
    on loopback only; its command and environment, run as a local process against the
    pair, pass its healthcheck, serve a completion and /metrics, and exit 0 on SIGTERM."""
    yaml = pytest.importorskip("yaml")
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docker-compose.yml")) as f:
        svc = yaml.safe_load(f)["services"]["openai"]
    assert svc["command"] == ["hybrid", "serve", "openai"]
    assert svc["depends_on"] == {"prefill": {"condition": "service_healthy"},
                                 "decode": {"condition": "service_healthy"}}
    assert svc["ports"] == ["127.0.0.1:8000:8000"] and "deploy" not in svc
    port = free_port()
    cenv = {k: re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: m.group(2) or "", str(v))
            for k, v in svc["environment"].items()}
    assert cenv["HYBRID_PORT"] == cenv["HYBRID_METRICS_PORT"] == "8000"
    p = env["pair"]
    cenv |= {"HYBRID_HOST": "127.0.0.1", "HYBRID_PORT": str(port), "HYBRID_METRICS_PORT":
             str(port), "HYBRID_PREFILL": p.prefill, "HYBRID_DECODE": p.decode}
    log = str(tmp_path / "compose-openai.log")
    proc = spawn(svc["command"][1:], env=cenv, log_path=log)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, base, log)
        check = [sys.executable if c == "python3" else c.replace("localhost:8000", f"127.0.0.1:{port}")
                 for c in svc["healthcheck"]["test"][1:]]
        assert subprocess.run(check, timeout=30).returncode == 0
        r = post(base, "/v1/completions", OK, key=None)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert "hybrid_openai_requests_total" in httpx.get(base + "/metrics").text
    finally:
        assert stop(proc) == 0


# ---- in-process: the chat template rule and the status table -------------------------

def test_default_chat_template():
    from client.openai_api.chat_template import load

    t = load(None)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]},
            {"role": "assistant", "content": None}]
    assert t.render(msgs) == "system: Be brief.\nuser: Hi you\nassistant: \nassistant:"
    from client.openai_api.errors import APIError

    with pytest.raises(APIError) as e:
        t.render([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.value.status == 400 and e.value.param == "messages[0].content"


def test_checkpoint_template_rules(tmp_path):
    from client.openai_api.chat_template import load
    from client.openai_api.errors import APIError

    cfg = {"bos_token": "<s>", "chat_template": [
        {"name": "tool_use", "template": "nope"},
        {"name": "default", "template": "{{ bos_token }}{% for m in messages %}"
         "{% if m.role == 'bad' %}{{ raise_exception('roles must alternate') }}{% endif %}"
         "{{ m.content | tojson }}{% endfor %}{% generation %}!{% endgeneration %}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = load(str(tmp_path))
    assert t.render([{"role": "user", "content": "é"}]) == '<s>"é"!'  # tojson keeps non-ASCII
    with pytest.raises(APIError) as e:
        t.render([{"role": "bad", "content": "x"}])
    assert e.value.status == 400 and "roles must alternate" in e.value.message
    # the tokenizer adds BOS itself: the template's leading bos_token is dropped
    (tmp_path / "tokenizer.json").write_text(json.dumps({"post_processor": {
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}]}}))
    assert load(str(tmp_path)).render([{"role": "user", "content": "a"}]) == '"a"!'
    # a sandbox escape attempt is refused, as transformers' sandbox refuses it
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(APIError):
        load(str(tmp_path)).render([{"role": "user", "content": "a"}])  # chat_template.jinja wins
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match="chat_template.jinja"):
        load(str(tmp_path))


@pytest.mark.parametrize("status, http", [
    ("INVALID_ARGUMENT", 400), ("OUT_OF_RANGE", 400), ("FAILED_PRECONDITION", 400),
    ("NOT_FOUND", 404), ("RESOURCE_EXHAUSTED", 429), ("UNAUTHENTICATED", 401),
    ("PERMISSION_DENIED", 403), ("UNAVAILABLE", 503), ("DEADLINE_EXCEEDED", 504),
    ("ABORTED", 500), ("DATA_LOSS", 500), ("INTERNAL", 500), ("UNKNOWN", 500)])
def test_grpc_status_to_http(status, http):
    import grpc

    from client.api import error_from_rpc
    from client.openai_api.errors import from_hybrid

    class Rpc(grpc.RpcError):
        def code(self):
            return grpc.StatusCode[status]

        def details(self):
            return "why"

    err = from_hybrid(error_from_rpc(Rpc()))  # as client.api raises it
    assert err.status == http and err.code == status.lower()
    assert err.body()["error"]["message"] == f"{status}: why"


def test_bad_start_options_are_one_line(tmp_path):
    from click.testing import CliRunner

    from client.cli import main

    (tmp_path / "empty").write_text("# no key\n")
    for args, msg in ((["--model-dir", str(tmp_path / "nope")], "not a directory"),
                      (["--api-key-file", str(tmp_path / "empty")], "no token in it"),
                      (["--api-key-file", str(tmp_path / "missing")], "--api-key-file"),
                      (["--tls-cert", str(tmp_path / "missing.pem")], "--tls-cert")):
        r = CliRunner().invoke(main, ["serve", "openai", "--port", str(free_port()), *args])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output


def test_api_keys_rotate_without_restart(tmp_path, monkeypatch):
    from client.openai_api import server

    path = tmp_path / "keys"
    path.write_text("old\n")
    keys = server.APIKeys(str(path))
    assert keys.allows("Bearer old") and not keys.allows("Bearer new")
    assert not keys.allows("old") and not keys.allows("Basic old") and not keys.allows(None)
    path.write_text("old  # until Friday\nnew\n")
    keys._checked = 0.0  # (the file is looked at at most once a second)
    assert keys.allows("bearer new") and keys.allows("Bearer old")
    path.write_text("")  # a botched edit keeps the last good keys
    keys._checked = 0.0
    assert keys.allows("Bearer new")
