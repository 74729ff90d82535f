"""The service pair end to end: real processes on loopback, a tiny GPT-2 checkpoint.

Tokens through the pair must equal single-process generation; the KV must provably go
through the shared region (or the FetchKv stream when asked); 64 concurrent requests
must all come back right with no slot leaked."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from client.api import HybridClient
from client.launch import ServicePair
from client.remote import run_remote
from engine.loader import load_model
from engine.sampling import SamplingParams
from tests.helpers import make_tiny_gpt2
from tests.services_util import counters, local_tokens, slots_in_use, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_tiny_gpt2(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def pair(ckpt, tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("logs"))
    with ServicePair(model=ckpt, device="cpu", log_dir=logs,
                     prefill_args=["--max-active", "64"]) as p:
        yield p


@pytest.fixture(scope="module")
def lm(ckpt):
    return load_model(ckpt, "cpu", "float32")


PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=1234),
    SamplingParams(temperature=1.3, seed=7),
], ids=["greedy", "topk-topp-seeded", "seeded"])
@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_pair_tokens_equal_local(pair, lm, params, transport):
    want = local_tokens(lm, PROMPT, 20, params)
    res = run_remote(prompt_ids=PROMPT, max_new_tokens=20, params=params, prefill=pair.prefill,
                     decode=pair.decode, kv_transport=transport, timeout_s=30)
    assert res.token_ids == want
    assert res.text == lm.tokenizer.decode(want)
    assert res.weights_fingerprint == lm.fingerprint
    assert res.prompt_ids == PROMPT
    t = res.timings
    assert t["kv_bytes"] == lm.config.n_layers * 2 * lm.config.kv_dim * len(PROMPT) * 4
    assert t["ttft_ms"] > 0 and t["total_ms"] >= t["ttft_ms"]
    assert t["exposed_transfer_ms"] >= 0 and t["transfer_ms"] > 0


def test_text_prompt_tokenized_by_server(pair, lm):
    ids = lm.tokenizer.encode("hello there")
    want = local_tokens(lm, ids, 6, SamplingParams())
    res = run_remote("hello there", max_new_tokens=6, prefill=pair.prefill, decode=pair.decode)
    assert res.prompt_ids == ids and res.token_ids == want


def test_kv_went_through_the_region(pair):
    """shm: the decode service read the KV bytes from the mapped region and the prefill
    service streamed none; grpc: the bytes came through FetchKv instead."""
    p0, d0 = counters(pair.prefill, "prefill"), counters(pair.decode, "decode")
    res = run_remote(prompt_ids=PROMPT, max_new_tokens=3, prefill=pair.prefill, decode=pair.decode)
    p1, d1 = counters(pair.prefill, "prefill"), counters(pair.decode, "decode")
    kv = res.timings["kv_bytes"]
    assert kv > 0
    assert d1["shm-kv-bytes"] - d0["shm-kv-bytes"] == kv
    assert d1["grpc-kv-bytes"] == d0["grpc-kv-bytes"]
    assert p1["fetch-bytes"] == p0["fetch-bytes"]
    res = run_remote(prompt_ids=PROMPT, max_new_tokens=3, prefill=pair.prefill,
                     decode=pair.decode, kv_transport="grpc")
    p2, d2 = counters(pair.prefill, "prefill"), counters(pair.decode, "decode")
    assert p2["fetch-bytes"] - p1["fetch-bytes"] == kv
    assert d2["grpc-kv-bytes"] - d1["grpc-kv-bytes"] == kv
    assert d2["shm-kv-bytes"] == d1["shm-kv-bytes"]
    # Decode released each slot once ingested: nothing held, nothing left to reap.
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, 5)
    assert p2["slots-reaped"] == 0


def test_sixty_four_concurrent_requests(pair, lm):
    """64 clients at once: no error, every request's tokens equal its single-process
    tokens (greedy and seeded, shm and FetchKv), and both engine loops really batched."""
    n = 64
    prompts = [[(7 * i + j) % 290 + 1 for j in range(3 + i % 9)] for i in range(n)]
    params = [SamplingParams() if i % 2 else SamplingParams(temperature=0.9, seed=i)
              for i in range(n)]
    want = [local_tokens(lm, p, 8, s) for p, s in zip(prompts, params, strict=True)]
    d0, p0 = counters(pair.decode, "decode"), counters(pair.prefill, "prefill")

    async def run_all():
        async with HybridClient(pair.prefill, pair.decode, timeout_s=120) as c:
            return await asyncio.gather(*[
                c.generate(prompt_ids=p, max_new_tokens=8, params=s,
                           kv_transport="grpc" if i % 5 == 0 else "shm")
                for i, (p, s) in enumerate(zip(prompts, params, strict=True))])

    results = asyncio.run(run_all())
    assert [r.token_ids for r in results] == want
    assert len({r.request_id for r in results}) == n
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, 5)
    d, p = counters(pair.decode, "decode"), counters(pair.prefill, "prefill")
    assert d["batch-tokens"] - d0["batch-tokens"] > d["batch-steps"] - d0["batch-steps"]
    batches = p["prefill-batches"] - p0["prefill-batches"]
    assert p["prefill-batched-prompts"] - p0["prefill-batched-prompts"] == n > batches


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env=os.environ | {"PYTHONPATH": ROOT})


def test_cli_generate_remote_equals_local(pair, ckpt):
    common = ["--prompt-ids", "5,17,42", "--max-new-tokens", "10", "--temperature", "0.7",
              "--seed", "3", "--json"]
    local = _cli("generate", "--local", "--model", ckpt, *common)
    remote = _cli("generate", "--prefill", pair.prefill, "--decode", pair.decode, *common)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    lj, rj = json.loads(local.stdout), json.loads(remote.stdout)
    assert rj["token_ids"] == lj["token_ids"] and rj["text"] == lj["text"]
    assert rj["weights_fingerprint"] == lj["weights_fingerprint"]
    for key in ("ttft_ms", "kv_bytes", "transfer_ms", "exposed_transfer_ms",
                "decode_ms_per_token", "prefill_ms", "decode_ms", "total_ms"):
        assert key in rj["timings"], key


def test_cli_health_and_info(pair, lm):
    h = _cli("health", "--prefill", pair.prefill, "--decode", pair.decode)
    assert h.returncode == 0, h.stdout + h.stderr
    assert h.stdout.count("SERVING") == 2
    i = _cli("info", "--json", "--prefill", pair.prefill, "--decode", pair.decode)
    assert i.returncode == 0, i.stderr
    info = json.loads(i.stdout)
    assert info["prefill"]["weights_fingerprint"] == info["decode"]["weights_fingerprint"] \
        == lm.fingerprint
    assert info["decode"]["backend"] == "gpu" and info["decode"]["kv_layout"] == "KV_LAYOUT_DENSE"
    assert info["prefill"]["region"].startswith("/hybrid-kv")
    for role in ("prefill", "decode"):  # ServiceInfo.counters, as numbers
        c = info[role]["counters"]
        assert {"active", "waiting"} <= c.keys() and all(isinstance(v, int) for v in c.values())
    assert "slots-in-use" in info["prefill"]["counters"]
    down = _cli("health", "--service", "decode", "--decode", "127.0.0.1:1")
    assert down.returncode == 1 and "UNREACHABLE" in down.stdout


def test_cli_generate_remote_errors_are_one_line(pair):
    down = _cli("generate", "hi", "--prefill", pair.prefill, "--decode", "127.0.0.1:1",
                "--timeout", "5")
    assert down.returncode == 1 and down.stderr.startswith("error: UNAVAILABLE")
    assert len(down.stderr.strip().splitlines()) == 1
    assert "hybrid serve" in down.stderr and "127.0.0.1:1" in down.stderr  # says what to do
    bad = _cli("generate", "--prompt-ids", "1,2", "--max-new-tokens", "500",
               "--prefill", pair.prefill, "--decode", pair.decode)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "positions" in bad.stderr


def test_llama_gqa_pair_equals_local(tmp_path_factory):
    """Llama family (RoPE, grouped-query attention: 2 KV heads for 4 query heads)."""
    from tests.helpers import make_tiny_llama

    ckpt = str(make_tiny_llama(tmp_path_factory.mktemp("llama")))
    lm = load_model(ckpt, "cpu", "float32")
    ids = [7, 21, 3, 99, 150, 4]
    with ServicePair(model=ckpt, device="cpu", log_dir=str(tmp_path_factory.mktemp("llogs"))) as p:
        for params, transport in ((SamplingParams(), "shm"),
                                  (SamplingParams(temperature=0.9, top_p=0.8, seed=5), "grpc")):
            res = run_remote(prompt_ids=ids, max_new_tokens=12, params=params, prefill=p.prefill,
                             decode=p.decode, kv_transport=transport)
            assert res.token_ids == local_tokens(lm, ids, 12, params)
            c = lm.config
            assert res.timings["kv_bytes"] == c.n_layers * 2 * c.n_kv_heads * c.head_dim * len(ids) * 4


def test_stop_string_remote_equals_local(pair, lm, ckpt):
    """The decode service ends at the stop string as the engine does: same tokens, same
    text (cut before the string), finish "stop"; the CLI prints that text."""
    from engine.generate import generate

    full = generate(lm, PROMPT, 30, ignore_eos=True).text
    stop = full[len(full) // 2:][:2]
    want = generate(lm, PROMPT, 30, ignore_eos=True, stop=[stop])
    assert want.finish_reason == "stop" and len(want.token_ids) < 30
    stopped = counters(pair.decode, "decode")["finish-stop"]
    res = run_remote(prompt_ids=PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop],
                     prefill=pair.prefill, decode=pair.decode, timeout_s=30)
    assert (res.token_ids, res.text, res.finish_reason) == (
        want.token_ids, want.text, want.finish_reason)
    assert counters(pair.decode, "decode")["finish-stop"] == stopped + 1
    args = ["generate", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "30",
            "--ignore-eos", "--stop", stop, "--prefill", pair.prefill, "--decode", pair.decode]
    printed = _cli(*args)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == want.text + "\n"
    local = _cli(*args[:-4], "--local", "--model", ckpt)
    assert local.stdout == want.text + "\n"


def test_cli_stop_id_remote_equals_local(pair, ckpt):
    common = ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--json"]
    full = json.loads(_cli("generate", "--local", "--model", ckpt, *common).stdout)["token_ids"]
    k = max(i for i, t in enumerate(full) if t not in full[:i])  # last first-occurrence
    stop = ["--stop-id", str(full[k])]
    local = json.loads(_cli("generate", "--local", "--model", ckpt, *common, *stop).stdout)
    remote = _cli("generate", "--prefill", pair.prefill, "--decode", pair.decode, *common, *stop)
    assert remote.returncode == 0, remote.stderr
    r = json.loads(remote.stdout)
    assert r["token_ids"] == local["token_ids"] == full[: k + 1]
    assert r["finish_reason"] == local["finish_reason"] == "stop"
