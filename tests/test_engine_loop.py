"""The decode engine loop on the CPU: batching equals one-at-a-time generation,
admission by KV blocks, bounded queues, cancellation, failing steps, a dying loop, and
no block leak over many requests. No timing: every wait is on the engine's own events."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.errors import ResourceExhausted, Unavailable
from engine.llm_engine import DecodeEngine, StepFailed
from engine.loader import load_model
from engine.sampling import SamplingParams
from tests.engine_helpers import open_and_ingest, prefill_kv


@pytest.fixture(scope="module", params=["synthetic:tiny-gpt2:3", "synthetic:tiny-llama:5"])
def lm(request):
    return load_model(request.param, device="cpu", dtype="float32")


def solo(lm, prompt, n, params=SamplingParams()):  # noqa: B008
    """Tokens of the request alone in a fresh engine (batch of one)."""
    eng = DecodeEngine(lm, max_batch=1)
    try:
        return list(eng.submit(prompt, n, params, ignore_eos=True))
    finally:
        eng.close()


def requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 250) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(0.9, 20, 0.95, seed=i) if i % 5 == 0 else SamplingParams()
        out.append((prompt, rng.randrange(1, 24), params))
    return out


def test_64_concurrent_requests_equal_their_solo_tokens(lm):
    """Rows join and leave every step (lengths differ); fp32 tokens, greedy and
    sampled, equal each request's tokens alone."""
    reqs = requests(64)
    eng = DecodeEngine(lm, max_batch=16)
    try:
        with ThreadPoolExecutor(64) as pool:
            got = list(pool.map(lambda r: list(eng.submit(*r[:2], r[2], ignore_eos=True)), reqs))
        st = eng.stats()
    finally:
        eng.close()
    for (prompt, n, params), tokens in zip(reqs, got, strict=True):
        assert tokens == solo(lm, prompt, n, params)
    assert st["rows_computed"] > st["steps"]  # steps really were shared
    assert st["blocks_free"] == st["blocks_total"] and st["live"] == 0


def small_engine(lm, blocks_for_requests: int, **kw) -> DecodeEngine:
    """A pool that holds `blocks_for_requests` blocks besides scratch."""
    return DecodeEngine(lm, max_batch=4, n_blocks=blocks_for_requests + 1, **kw)


def test_admission_waits_for_blocks_in_order_and_bounds_the_queue(lm):
    n_new = lm.config.max_positions - 10
    need = -(-(10 + n_new + 1) // 16)  # prompt + new tokens + one lookahead slot
    eng = small_engine(lm, need, max_waiting=1)  # one such request at a time
    try:
        a = open_and_ingest(eng, lm, list(range(1, 11)), n_new)  # takes every block
        with pytest.raises(ResourceExhausted, match="within"):
            eng.open(_req(2, 3), timeout_s=0.05)
        assert eng.stats()["waiting"] == 0  # the timed-out one left the queue
        with ThreadPoolExecutor(2) as pool:
            b = pool.submit(eng.open, _req(2, 3), 30.0)
            _wait_until(lambda: eng.stats()["waiting"] == 1)
            with pytest.raises(ResourceExhausted, match="queue full"):
                eng.open(_req(2, 3), timeout_s=30.0)
            eng.cancel(a)  # frees the pool: b is admitted
            seq_b = b.result(timeout=30)
        assert seq_b.blocks
        eng.cancel(seq_b)
        _wait_until(lambda: eng.stats()["live"] == 0)
        assert eng.stats()["blocks_free"] == need
    finally:
        eng.close()


def test_request_that_can_never_fit_is_refused_at_once(lm):
    eng = small_engine(lm, 2)
    try:
        with pytest.raises(ResourceExhausted, match="the pool has 2"):
            eng.open(_req(40, 8))
    finally:
        eng.close()


def test_cancel_mid_batch_leaves_the_others_exact(lm):
    reqs = requests(6, seed=1)
    eng = DecodeEngine(lm, max_batch=8)
    try:
        victim = eng.submit([7, 7, 7], 200, ignore_eos=True)
        it = iter(victim)
        head = [next(it) for _ in range(3)]
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(lambda r: list(eng.submit(r[0], r[1], r[2], ignore_eos=True)), r)
                    for r in reqs]
            victim.cancel()
            got = [f.result(timeout=60) for f in futs]
        assert head == solo(lm, [7, 7, 7], 3)
        rest = list(it)  # ends (no hang) with at most the tokens made before the cancel
        assert len(head) + len(rest) < 200
        for (prompt, n, params), tokens in zip(reqs, got, strict=True):
            assert tokens == solo(lm, prompt, n, params)
        _wait_until(lambda: eng.stats()["live"] == 0)
        st = eng.stats()
        assert st["blocks_free"] == st["blocks_total"]
    finally:
        eng.close()


def test_a_failing_step_fails_only_its_sequences(lm, monkeypatch):
    eng = DecodeEngine(lm, max_batch=4)
    try:
        real = eng.runner.model.launch
        calls = []

        def broken(rows, rewrite):
            calls.append(len(rows))
            if len(calls) == 1:
                raise RuntimeError("injected")
            return real(rows, rewrite)

        monkeypatch.setattr(eng.runner.model, "launch", broken)
        with pytest.raises(StepFailed, match="injected"):
            list(eng.submit([1, 2, 3], 5, ignore_eos=True))
        assert list(eng.submit([1, 2, 3], 5, ignore_eos=True)) == solo(lm, [1, 2, 3], 5)
        st = eng.stats()
        assert st["blocks_free"] == st["blocks_total"] and st["live"] == 0
    finally:
        eng.close()


def test_a_dying_loop_fails_everyone_with_unavailable(lm, monkeypatch):
    eng = DecodeEngine(lm, max_batch=2)
    seq = open_and_ingest(eng, lm, [1, 2, 3], 50)

    def die():
        raise SystemError("loop bug")

    monkeypatch.setattr(eng, "_schedule", die)
    eng.start(seq, 5)
    with pytest.raises(Unavailable, match="loop bug"):
        list(eng.tokens(seq, timeout_s=30))
    with pytest.raises(Unavailable):
        eng.open(_req(2, 2))
    eng.close()


def test_ten_thousand_requests_leak_no_block(lm):
    eng = DecodeEngine(lm, max_batch=32, n_blocks=200)
    total = eng.stats()["blocks_total"]
    rng = random.Random(3)
    try:
        def one(i):
            return len(list(eng.submit([1 + i % 200, 2], rng.randrange(1, 3), ignore_eos=True)))

        with ThreadPoolExecutor(32) as pool:
            n = sum(pool.map(one, range(10_000)))
        st = eng.stats()
        assert st["finished"] == 10_000 and n >= 10_000
        assert st["blocks_free"] == total and st["live"] == 0
    finally:
        eng.close()


def test_ingested_kv_decodes_like_local_prefill(lm):
    """The service path: KV ingested layer by layer, then start() with prefill's token."""
    prompt = [4, 8, 15, 16, 23, 42]
    _, first = prefill_kv(lm, prompt)
    eng = DecodeEngine(lm, max_batch=2)
    try:
        seq = open_and_ingest(eng, lm, prompt, 12, ignore_eos=True)
        eng.start(seq, first)
        assert [first, *eng.tokens(seq)] == solo(lm, prompt, 12)
    finally:
        eng.close()


def _req(n_prompt: int, max_new: int):
    from engine.sequence import DecodeRequest

    return DecodeRequest(n_prompt, max_new)


def _wait_until(cond, timeout_s: float = 30.0) -> None:
    """Poll a condition on the engine's state (a hand-shake, not a guess at timing)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)
