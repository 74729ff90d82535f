"""Continuous batching in the `gpu` decode backend (GpuBackend(max_batch > 1)), on the CPU
in fp32: batched sessions must give exactly the tokens of single-process generation,
whatever their mix of prompt lengths, lengths, greedy and seeded sampling; a session
closed mid-decode frees its row; overload falls back to the unbatched loop; errors and
backend close end the iterators instead of hanging them."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine.errors import Unavailable
from engine.generate import generate
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams, sample
from fpga_service.backends.base import DecodeSpec
from fpga_service.backends.gpu import BatchedSession, GpuBackend, GpuSession
from kernels.dense import DenseLayout, pack_dense
from tests.helpers import make_tiny_gpt2, make_tiny_llama
from tests.services_util import wait_until

SEEDED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=1234)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def backend(request, tmp_path_factory):
    make = make_tiny_gpt2 if request.param == "gpt2" else make_tiny_llama
    path = make(tmp_path_factory.mktemp(request.param), init_std=0.1)
    # HYBRID_TEST_DEVICE=cuda runs the same checks on a GPU (CI has none)
    device = os.environ.get("HYBRID_TEST_DEVICE", "cpu")
    b = GpuBackend(str(path), device=device, dtype="float32", max_batch=4)
    yield b
    b.close()


def _request(i: int) -> tuple[list[int], int, SamplingParams]:
    prompt = [(13 * i + 7 * j) % 290 + 1 for j in range(3 + 2 * i)]
    params = SamplingParams() if i % 2 else SamplingParams(temperature=0.9, seed=100 + i)
    return prompt, 6 + 5 * i, params


def _prefill_dense(lm, prompt: list[int], params: SamplingParams) -> tuple[int, list[bytes]]:
    """Engine prefill with each layer's K, V in the dense slot form (what ingest gets)."""
    layout = DenseLayout.for_model(lm.config, "float32")
    layers: list[bytes] = []

    def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        layers.append(pack_dense(k, v, layout).cpu().numpy().tobytes())

    cache = KVCache(lm.config, 1, len(prompt), lm.device, lm.dtype)
    logits = lm.model.prefill(torch.tensor(prompt, device=lm.device), cache, on_layer=on_layer)
    return int(sample(logits, params, 0)[0]), layers


def _open(backend, prompt, n, params, stop_ids=()):
    """Open + ingest (the servicer's first half); returns (session, first token)."""
    first, layers = _prefill_dense(backend.lm, prompt, params)
    s = backend.open_session(DecodeSpec("r", len(prompt), n, params, tuple(stop_ids)))
    for layer, data in enumerate(layers):
        s.ingest_layer(layer, memoryview(data))
    return s, first


def _finish(session, first: int) -> list[int]:
    try:
        return [first, *session.decode(first)]
    finally:
        session.close()


def _want(lm, prompt, n, params, stop_ids=()) -> list[int]:
    return generate(lm, prompt, n, params, stop_ids=stop_ids).token_ids


def _hold_first_step(scheduler, monkeypatch, ready=lambda: True, delay_s: float = 0.0,
                     timeout_s: float = 30.0) -> None:
    """The scheduler's first step waits until `ready()` holds, and every step takes at
    least `delay_s`. Concurrency checks then do not depend on how the OS happens to
    schedule the threads: on a loaded CI machine each session could otherwise finish
    before the next one starts, and no step would be shared."""
    step, held = scheduler._step, [True]

    def gated(rows):
        if held[0]:
            held[0] = False
            if not wait_until(ready, timeout_s, 0.002):
                raise AssertionError("the held first step's condition never held")
        if delay_s:
            time.sleep(delay_s)
        return step(rows)

    monkeypatch.setattr(scheduler, "_step", gated)


def _active_rows(scheduler) -> int:
    with scheduler._cond:
        return len(scheduler._active)


def test_six_concurrent_sessions_equal_generate(backend, monkeypatch):
    reqs = [_request(i) for i in range(6)]
    reqs[2] = (reqs[2][0], 30, SEEDED)
    want = [_want(backend.lm, *r) for r in reqs]
    stop = (want[3][3],)  # one request ends early on a stop id
    want[3] = _want(backend.lm, *reqs[3], stop_ids=stop)
    steps0 = backend.scheduler.steps
    opened = [_open(backend, *r, stop_ids=stop if i == 3 else ())
              for i, r in enumerate(reqs)]
    kinds = [type(s) for s, _ in opened]
    assert kinds.count(BatchedSession) == 4 and kinds.count(GpuSession) == 2
    # every batched session that decodes past its first token joins the first shared step
    # (with the tiny GPT-2, request 3's first token is already its stop id)
    joiners = sum(k is BatchedSession and len(w) > 1 for k, w in zip(kinds, want, strict=True))
    _hold_first_step(backend.scheduler, monkeypatch,
                     lambda: _active_rows(backend.scheduler) == joiners)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda sf: _finish(*sf), opened))
    assert got == want
    batched = sum(len(t) - 1 for t, k in zip(got, kinds, strict=True) if k is BatchedSession)
    assert backend.scheduler.steps - steps0 < batched  # rows really shared steps
    assert backend.scheduler.rows_busy() == 0 and backend.sessions_open == 0


def test_close_mid_decode_frees_the_row(backend, monkeypatch):
    # 5 ms a step: the victim's 120 steps take >= 0.6 s, so the close lands mid-decode
    _hold_first_step(backend.scheduler, monkeypatch, delay_s=0.005)
    reqs = [(_request(i)[0], n, p) for i, (n, p) in enumerate(
        [(60, SamplingParams()), (120, SEEDED), (60, SamplingParams())])]
    want = [_want(backend.lm, *r) for r in reqs]
    opened = [_open(backend, *r) for r in reqs]
    victim, first = opened[1]
    it = victim.decode(first)
    got_victim = [next(it), next(it)]
    assert got_victim == want[1][1:3]
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(_finish, *opened[i]) for i in (0, 2)]
        threading.Thread(target=victim.close).start()  # close from another thread
        assert wait_until(lambda: victim.row.freed, 5, 0.005)
        rest = list(it)  # tokens queued before the close, then the end: no hang
        n = len(got_victim) + len(rest)
        assert n < 119 and got_victim + rest == want[1][1:1 + n]
        assert [f.result(30) for f in others] == [want[0], want[2]]
    # the freed row (stale KV in it) serves a new request correctly
    again = _open(backend, *reqs[1])
    assert isinstance(again[0], BatchedSession) and _finish(*again) == want[1]
    assert backend.scheduler.rows_busy() == 0


def test_overload_beyond_max_batch_completes(backend, monkeypatch):
    reqs = [_request(i % 5) for i in range(9)]
    want = [_want(backend.lm, *r) for r in reqs]
    kinds: list[type] = []
    # no row comes back before all nine have opened: five must fall back, whatever the timing
    _hold_first_step(backend.scheduler, monkeypatch, lambda: len(kinds) == 9)

    def one(r):
        s, first = _open(backend, *r)
        kinds.append(type(s))
        return _finish(s, first)

    with ThreadPoolExecutor(9) as pool:
        assert list(pool.map(one, reqs)) == want
    assert kinds.count(BatchedSession) == 4 and kinds.count(GpuSession) == 5
    assert backend.scheduler.rows_busy() == 0


def test_step_error_fails_the_iterators(backend, monkeypatch):
    s, first = _open(backend, *_request(1))
    assert isinstance(s, BatchedSession)

    def boom(*_a, **_k):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(backend.lm.model, "decode_step", boom)
    with pytest.raises(RuntimeError, match="fell over"):
        _finish(s, first)
    monkeypatch.undo()
    assert _finish(*_open(backend, *_request(1))) == _want(backend.lm, *_request(1))


def test_backend_close_ends_waiting_iterators(tmp_path, monkeypatch):
    b = GpuBackend(str(make_tiny_gpt2(tmp_path, init_std=0.1)), device="cpu",
                   dtype="float32", max_batch=2)
    step = b.lm.model.decode_step

    def slow(*a):  # keeps the request decoding until the close
        time.sleep(0.01)
        return step(*a)

    monkeypatch.setattr(b.lm.model, "decode_step", slow)
    s, first = _open(b, [5, 6, 7], 100, SamplingParams())
    it = s.decode(first)
    next(it)
    thread = b.scheduler._thread
    b.close()
    assert not thread.is_alive()
    with pytest.raises(Unavailable):
        list(it)  # tokens already queued may come first; then the close error
    s.close()


def test_scheduler_thread_failure_ends_iterators_and_refuses_new_work(tmp_path, monkeypatch):
    """A failure outside a step (here: delivering tokens) kills the scheduler thread; its
    sessions must end with an error, not wait forever (what a bad CUDA device index did
    on a GPU); later sessions decode unbatched, as under overload."""
    from fpga_service.backends.batching import BatchScheduler

    def broken(self, rows, tokens):
        raise RuntimeError("deliver fell over")

    monkeypatch.setattr(BatchScheduler, "_deliver", broken)
    b = GpuBackend(str(make_tiny_gpt2(tmp_path, init_std=0.1)), device="cpu",
                   dtype="float32", max_batch=2)
    s, first = _open(b, [5, 6, 7], 20, SamplingParams())
    with pytest.raises(Unavailable, match="deliver fell over"):
        list(s.decode(first))
    s.close()
    assert not b.scheduler._thread.is_alive()
    s2, first2 = _open(b, [5, 6, 7], 20, SamplingParams())
    assert not isinstance(s2, BatchedSession)
    assert _finish(s2, first2) == _want(b.lm, [5, 6, 7], 20, SamplingParams())
    b.close()


def test_max_batch_one_has_no_scheduler(tmp_path):
    b = GpuBackend(str(make_tiny_gpt2(tmp_path)), device="cpu", dtype="float32")
    assert b.scheduler is None and b.info()["max_batch"] == "1"
    b.close()


def test_service_pair_with_max_batch_equals_local(tmp_path):
    """8 concurrent requests through the services with `--max-batch 4`: tokens equal
    `--local`, and the decode counters show steps shared by several rows."""
    import asyncio

    from client.api import HybridClient
    from client.launch import ServicePair
    from engine.loader import load_model
    from tests.services_util import counters, slots_in_use

    ckpt = str(make_tiny_gpt2(tmp_path, init_std=0.1))
    lm = load_model(ckpt, "cpu", "float32")
    reqs = [_request(i % 6) for i in range(8)]
    reqs = [(p, min(n, 20), s) for p, n, s in reqs]
    want = [_want(lm, *r) for r in reqs]

    async def run_all(pair):
        async with HybridClient(pair.prefill, pair.decode, timeout_s=60) as c:
            return await asyncio.gather(*[
                c.generate(prompt_ids=p, max_new_tokens=n, params=s) for p, n, s in reqs])

    with ServicePair(model=ckpt, device="cpu", log_dir=str(tmp_path),
                     prefill_args=["--max-active", "8"],
                     decode_args=["--max-batch", "4"],
                     # 5 ms a step: the eight requests overlap even if their prefills
                     # come one by one on a loaded machine
                     decode_env={"HYBRID_FAULT_STEP_DELAY_MS": "5"}) as pair:
        assert [r.token_ids for r in asyncio.run(run_all(pair))] == want
        d = counters(pair.decode, "decode")
        assert 0 < d["batch-steps"] < d["batch-tokens"]
        assert d["batch-rows-busy"] == 0 and d["sessions-open"] == 0
        assert wait_until(lambda: slots_in_use(pair.prefill) == 0, 5)
