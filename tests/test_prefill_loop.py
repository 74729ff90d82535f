"""The prefill engine loop (gpu_service/loop.py) with a real tiny model and a real region:
waiting jobs run as one packed batch, each into its own slot; cancels, failures, close
and a dying loop thread settle every job (CPU). The loop is paused while jobs are
queued, so which jobs share a batch never depends on timing. The CUDA shape of ready
marking (copies that complete later, ONE helper thread marking each layer for the
whole batch) runs here with gated copy handles standing in for the layer events."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

import pytest
import torch

from engine import errors
from engine.loader import load_model
from engine.sampling import SamplingParams
from gpu_service.loop import PrefillLoop
from gpu_service.runner import Cancelled, PrefillJob, PrefillRunner, future_notify
from gpu_service.shipping import ReadyPublisher
from kernels.comm import Done, make_layout
from kernels.dense import pack_dense
from kernels.reshape import pack_layer
from transport import servekit as kit
from transport.reader import KvReader
from transport.region import KvRegion

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7], list(range(10, 47))]
SEEDED = SamplingParams(temperature=0.8, top_k=20, seed=11)


@pytest.fixture(scope="module", params=["synthetic:tiny-gpt2", "synthetic:tiny-llama"])
def lm(request):
    return load_model(request.param, "cpu", "float32")


@pytest.fixture
def region(lm):
    r = KvRegion.create(16 << 20, 16, lm.config.n_layers, 5.0)
    yield r
    r.close()


@pytest.fixture
def runner(lm, region):
    return PrefillRunner(lm, region)


@pytest.fixture
def loop(runner):
    lp = PrefillLoop(runner)
    yield lp
    lp.close()


@pytest.fixture
def reader(region):
    r = KvReader.open(region.name)
    yield r
    r.close()


def _alloc(runner, region, ids, layout="dense"):
    n = runner.config.n_layers
    lb = runner.layer_bytes(layout, len(ids))
    return region.alloc(lb * n, n, layout=layout, dtype=runner.slot_dtype(layout),
                        n_tokens=len(ids), n_kv_heads=runner.config.n_kv_heads,
                        head_dim=runner.config.head_dim, checksums=True)


def _submit(loop, runner, region, ids, layout="dense", params: SamplingParams | None = None):
    """A job on a fresh slot; returns (job, the future its outcome lands in)."""
    box: concurrent.futures.Future = concurrent.futures.Future()
    job = PrefillJob(ids, _alloc(runner, region, ids, layout), layout,
                     params or SamplingParams(), future_notify(box))
    loop.submit(job)
    return job, box


def _packed_bytes(lm, prompts, layouts):
    """What each prompt's slot must hold after one packed forward of `prompts`: every
    layer's K, V from the model's own hook, packed in that prompt's layout."""
    out = [[] for _ in prompts]

    def on_layer(layer, i, k, v):
        layout = make_layout(layouts[i], lm.config, "float16" if layouts[i] == "hbm" else "float32")
        pack = pack_dense if layouts[i] == "dense" else pack_layer
        out[i].append(bytes(pack(k, v, layout).numpy()))

    lm.model.prefill_packed([torch.tensor(p) for p in prompts], on_layer=on_layer)
    return out


def _ready(reader, desc, layer) -> bool:
    try:
        reader.wait_layer(desc, layer, 0)
        return True
    except errors.DeadlineExceeded:
        return False


def _wrap_forward(monkeypatch, lm, before_layer):
    """Run `before_layer(layer, i)` ahead of the loop's own per-layer hook."""
    real = lm.model.prefill_packed

    def forward(ids, on_layer=None):
        def hook(layer, i, k, v):
            before_layer(layer, i)
            on_layer(layer, i, k, v)
        return real(ids, on_layer=hook)

    monkeypatch.setattr(lm.model, "prefill_packed", forward)


# ---- batching ---------------------------------------------------------------------
def test_waiting_jobs_run_as_one_batch(lm, runner, region, loop, reader):
    layouts = ["dense", "hbm", "dense"]
    loop.pause()
    jobs = [_submit(loop, runner, region, p, lay) for p, lay in zip(PROMPTS, layouts, strict=True)]
    assert loop.waiting == 3
    loop.resume()
    results = [box.result(30) for _, box in jobs]
    assert [r.batch for r in results] == [3, 3, 3]
    assert dict(loop.stats) == {"prefill_batches": 1, "prefill_batched_prompts": 3}
    want = _packed_bytes(lm, PROMPTS, layouts)
    for i, ((job, _), res) in enumerate(zip(jobs, results, strict=True)):
        for layer in range(lm.config.n_layers):  # ready, checksummed, its own prompt's KV
            assert reader.read_layer(job.desc, layer, 1.0) == want[i][layer]
        assert reader.wait_first_token(job.desc, 1.0) == res.first_token
        assert res.ship.kv_bytes == job.desc.nbytes and res.queue_ms >= 0


def test_batched_slots_match_one_prompt_runs(lm, runner, region, loop, reader):
    """Each slot of a batch holds what a one-prompt run writes (fp32 within 1e-5: the
    packed GEMMs may round differently) and the same first token, greedy and seeded."""
    params = [SamplingParams(), SEEDED, SamplingParams()]
    singles = []
    for ids, p in zip(PROMPTS, params, strict=True):
        desc = _alloc(runner, region, ids)
        singles.append((desc, runner.run(ids, desc, "dense", p, threading.Event())))
    loop.pause()
    jobs = [_submit(loop, runner, region, ids, "dense", p)
            for ids, p in zip(PROMPTS, params, strict=True)]
    loop.resume()
    for (job, box), (desc, single) in zip(jobs, singles, strict=True):
        assert box.result(30).first_token == single.first_token
        assert single.batch == 1
        for layer in range(lm.config.n_layers):
            got = torch.frombuffer(bytearray(reader.read_layer(job.desc, layer, 1.0)), dtype=torch.float32)
            ref = torch.frombuffer(bytearray(reader.read_layer(desc, layer, 1.0)), dtype=torch.float32)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_limits_split_the_queue_oldest_first(runner, region):
    loop = PrefillLoop(runner, max_batch=2, max_batch_tokens=10)
    try:
        loop.pause()
        lens = [4, 4, 4, 12, 1, 1]  # [4, 4] | [4] (12 would pass 10) | [12] alone | [1, 1]
        jobs = [_submit(loop, runner, region, list(range(1, n + 1))) for n in lens]
        loop.resume()
        assert [box.result(30).batch for _, box in jobs] == [2, 2, 1, 1, 2, 2]
        assert loop.stats["prefill_batches"] == 4
    finally:
        loop.close()


def test_a_job_whose_slot_is_gone_fails_alone(lm, runner, region, loop, reader):
    loop.pause()
    a, box_a = _submit(loop, runner, region, PROMPTS[0])
    b, box_b = _submit(loop, runner, region, PROMPTS[1])
    region.free(b.desc)  # e.g. its lease expired while it waited for a batch
    loop.resume()
    with pytest.raises(errors.Aborted):
        box_b.result(30)
    assert box_a.result(30).batch == 1
    assert reader.read_layer(a.desc, lm.config.n_layers - 1, 1.0)


# ---- ready marking: one helper thread for the loop, per layer for the whole batch ----
class _Gated:
    """A copy handle that completes when its gate opens (a CUDA layer event's stand-in:
    the bytes are already in the slots, the layer must not be marked before)."""

    def __init__(self, done: Done, gate: threading.Event) -> None:
        self.done, self.gate, self.event = done, gate, None

    def query(self) -> bool:
        return self.gate.is_set()

    def wait(self, timeout_s: float | None = None) -> None:
        assert self.gate.wait(30), "gate never opened"

    def elapsed_ms(self) -> float:
        return self.done.ms


class _GatedShipper:
    """Wraps the runner's (CPU) BatchShipper: layer l's handle completes at gates[l]."""

    def __init__(self, real, gates) -> None:
        self.real, self.gates, self.calls = real, gates, []

    def ship(self, layer, parts, compute_stream=None):
        self.calls.append((layer, len(parts)))
        return _Gated(self.real.ship(layer, parts), self.gates[layer])

    def synchronize(self) -> None:
        pass


def _record_marks(monkeypatch, region):
    """(thread name, slot, layer) of every mark_ready, in call order."""
    marks = []
    real = region.mark_ready

    def mark_ready(desc, layer, *a, **kw):
        marks.append((threading.current_thread().name, desc.slot, layer))
        return real(desc, layer, *a, **kw)

    monkeypatch.setattr(region, "mark_ready", mark_ready)
    return marks


def _helpers():
    return [t for t in threading.enumerate() if t.name == "prefill-ready"]


def test_cpu_batches_mark_inline_without_a_helper_thread(monkeypatch, lm, runner, region,
                                                         loop):
    marks = _record_marks(monkeypatch, region)
    loop.pause()
    jobs = [_submit(loop, runner, region, p) for p in PROMPTS]
    loop.resume()
    for _, box in jobs:
        box.result(30)
    assert {name for name, _, _ in marks} == {"prefill-loop"} and not _helpers()
    slots = [job.desc.slot for job, _ in jobs]
    assert [(s, la) for _, s, la in marks] == [
        (s, la) for la in range(lm.config.n_layers) for s in slots]


def test_layer_marked_ready_for_all_prompts_in_order_by_one_helper(monkeypatch, lm, runner,
                                                                   region, loop, reader):
    """Copies that complete later (CUDA): per layer ONE ship call for the whole batch and
    ONE helper thread (not one per prompt) that marks layer l ready for every prompt of
    the batch once l's copy is done, layer after layer; the same thread serves the next
    batch. Slot bytes are those of the packed forward."""
    n = lm.config.n_layers
    layouts = ["dense", "hbm", "dense"]
    marks = _record_marks(monkeypatch, region)
    real = runner.shippers.take()
    for round_ in range(2):
        gates = [threading.Event() for _ in range(n)]
        shipper = _GatedShipper(real, gates)
        monkeypatch.setattr(runner.shippers, "take", lambda s=shipper: s)
        monkeypatch.setattr(runner.shippers, "give", lambda s: None)
        del marks[:]
        loop.pause()
        jobs = [_submit(loop, runner, region, p, lay)
                for p, lay in zip(PROMPTS, layouts, strict=True)]
        threads_before = threading.active_count()
        loop.resume()
        for layer in range(n):
            assert not any(_ready(reader, job.desc, la) for job, _ in jobs
                           for la in range(layer, n))
            gates[layer].set()
            for job, _ in jobs:  # all prompts of the batch get layer l
                reader.wait_layer(job.desc, layer, 5.0)
            helpers = _helpers()
            assert len(helpers) == 1  # one for the loop, not one per prompt
            # besides the helper only its bounded checksum pool, never a thread per prompt
            hashers = [t for t in threading.enumerate() if "-xxh3" in t.name]
            assert len(hashers) <= ReadyPublisher.HASH_THREADS
            assert threading.active_count() - len(hashers) <= threads_before + 1
            if round_ == 0:
                helper = helpers[0]
            assert helpers[0] is helper  # the next batch reuses it
        results = [box.result(30) for _, box in jobs]
        assert shipper.calls == [(layer, 3) for layer in range(n)]  # one ship per layer
        slots = [job.desc.slot for job, _ in jobs]
        assert marks == [("prefill-ready", s, layer) for layer in range(n) for s in slots]
        want = _packed_bytes(lm, PROMPTS, layouts)
        for i, ((job, _), res) in enumerate(zip(jobs, results, strict=True)):
            assert res.batch == 3 and res.ship.kv_bytes == job.desc.nbytes
            assert 0 < res.ship.exposed_transfer_ms == res.ship.transfer_ms
            assert reader.wait_first_token(job.desc, 1.0) == res.first_token
            for layer in range(n):
                assert reader.read_layer(job.desc, layer, 1.0) == want[i][layer]
        for job, _ in jobs:
            region.free(job.desc)
    loop.close()  # stops the helper too
    assert not _helpers()


def test_helper_error_on_one_slot_fails_only_that_job(monkeypatch, lm, runner, region, loop,
                                                      reader):
    n = lm.config.n_layers
    gates = [threading.Event() for _ in range(n)]
    shipper = _GatedShipper(runner.shippers.take(), gates)
    monkeypatch.setattr(runner.shippers, "take", lambda: shipper)
    monkeypatch.setattr(runner.shippers, "give", lambda s: None)
    loop.pause()
    jobs = [_submit(loop, runner, region, p) for p in PROMPTS]
    loop.resume()
    gates[0].set()
    for job, _ in jobs:
        reader.wait_layer(job.desc, 0, 5.0)
    region.free(jobs[1][0].desc)  # its consumer went away mid-prefill
    for g in gates[1:]:
        g.set()
    with pytest.raises(errors.Aborted):
        jobs[1][1].result(30)
    for i in (0, 2):
        job, box = jobs[i]
        assert box.result(30).batch == 3
        assert _ready(reader, job.desc, n - 1)


# ---- cancels ----------------------------------------------------------------------
def test_job_cancelled_while_queued_never_runs(lm, runner, region, loop, reader):
    loop.pause()
    a, box_a = _submit(loop, runner, region, PROMPTS[0])
    b, box_b = _submit(loop, runner, region, PROMPTS[1])
    c, box_c = _submit(loop, runner, region, PROMPTS[2])
    loop.cancel(b)  # through the loop: settled at once
    with pytest.raises(Cancelled):
        box_b.result(0)
    c.cancel.set()  # only its event: dropped when the loop picks its batch
    loop.resume()
    assert box_a.result(30).batch == 1
    with pytest.raises(Cancelled):
        box_c.result(30)
    assert dict(loop.stats) == {"prefill_batches": 1, "prefill_batched_prompts": 1}
    for job in (b, c):
        assert not any(_ready(reader, job.desc, layer) for layer in range(lm.config.n_layers))


def test_job_cancelled_mid_batch_leaves_the_others(monkeypatch, lm, runner, region, loop, reader):
    jobs: list = []

    def cancel_b_after_layer_0(layer, i):
        if (layer, i) == (1, 0):
            jobs[1][0].cancel.set()

    _wrap_forward(monkeypatch, lm, cancel_b_after_layer_0)
    loop.pause()
    jobs.extend(_submit(loop, runner, region, p) for p in PROMPTS)
    loop.resume()
    with pytest.raises(Cancelled):
        jobs[1][1].result(30)
    b = jobs[1][0]
    assert _ready(reader, b.desc, 0) and not _ready(reader, b.desc, 1)  # stopped shipping
    monkeypatch.undo()
    want = _packed_bytes(lm, PROMPTS, ["dense"] * 3)
    for i in (0, 2):
        job, box = jobs[i]
        assert box.result(30).batch == 3
        assert reader.read_layer(job.desc, 1, 1.0) == want[i][1]


def test_all_cancelled_mid_batch_stops_the_forward(monkeypatch, lm, runner, region, loop):
    calls = []
    jobs: list = []

    def cancel_all(layer, i):
        calls.append((layer, i))
        for job, _ in jobs:
            job.cancel.set()

    _wrap_forward(monkeypatch, lm, cancel_all)
    loop.pause()
    jobs.extend(_submit(loop, runner, region, p) for p in PROMPTS[:2])
    loop.resume()
    for _, box in jobs:
        with pytest.raises(Cancelled):
            box.result(30)
    assert calls == [(0, 0)]  # no later layer was computed


# ---- failures ---------------------------------------------------------------------
def test_failed_batch_fails_only_its_jobs(monkeypatch, lm, runner, region, loop, caplog):
    real = lm.model.prefill_packed
    failures = [RuntimeError("boom")]

    def flaky(ids, on_layer=None):
        if failures:
            raise failures.pop()
        return real(ids, on_layer=on_layer)

    monkeypatch.setattr(lm.model, "prefill_packed", flaky)
    loop.pause()
    first = [_submit(loop, runner, region, p) for p in PROMPTS[:2]]
    with caplog.at_level(logging.ERROR, logger="hybrid.prefill"):
        loop.resume()
        for _, box in first:
            with pytest.raises(RuntimeError, match="boom"):
                box.result(30)
    assert "prefill batch of 2 failed" in caplog.text
    _, box = _submit(loop, runner, region, PROMPTS[2])
    assert box.result(30).batch == 1 and loop.alive


def test_close_fails_pending_jobs_unavailable(runner, region):
    loop = PrefillLoop(runner)
    loop.pause()
    pending = [_submit(loop, runner, region, p) for p in PROMPTS[:2]]
    loop.close()
    assert not loop.alive
    for _, box in pending:
        with pytest.raises(errors.Unavailable):
            box.result(0)
    _, late = _submit(loop, runner, region, PROMPTS[2])
    with pytest.raises(errors.Unavailable):
        late.result(0)


def test_a_dying_loop_fails_everything_unavailable(monkeypatch, runner, region, caplog):
    class Fatal(BaseException):
        pass

    def die(jobs):
        raise Fatal("loop bug")

    loop = PrefillLoop(runner)
    try:
        monkeypatch.setattr(runner, "run_batch", die)
        with caplog.at_level(logging.CRITICAL, logger="hybrid.prefill"):
            _, running = _submit(loop, runner, region, PROMPTS[0])
            with pytest.raises(errors.Unavailable, match="loop bug"):
                running.result(30)
        assert "prefill loop died" in caplog.text
        loop._thread.join(5)
        assert not loop.alive
        _, later = _submit(loop, runner, region, PROMPTS[1])
        with pytest.raises(errors.Unavailable):
            later.result(0)
    finally:
        loop.close()


# ---- through the servicer ---------------------------------------------------------
def test_servicer_requests_share_a_batch_and_report_it(lm, runner, region, reader):
    from gpu_service.servicer import PrefillServicer

    servicer = PrefillServicer(runner, region, kit.Admission(8, 8), lease_s=5.0)
    fields = [{} for _ in PROMPTS]

    async def one(i, ids):
        msgs = [m async for m in servicer._prefill(f"r{i}", "test", ids, "dense", None,
                                                     SamplingParams(), 1.5, fields[i])]
        return msgs[0].handle, msgs[1].done

    async def go():
        servicer.loop.pause()
        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(PROMPTS)]
        while servicer.loop.waiting < len(PROMPTS):  # each handler has queued its job
            await asyncio.sleep(0)
        servicer.loop.resume()
        return await asyncio.gather(*tasks)

    try:
        done = asyncio.run(go())
        from transport.descriptor import KvDescriptor

        for (handle, fin), f in zip(done, fields, strict=True):
            assert f["batch"] == 3 and fin.timings.queue_ms >= 1.5
            assert reader.wait_first_token(KvDescriptor.from_proto(handle.kv), 1.0) == fin.first_token
        m = servicer.metrics()
        assert m["prefill_batches"] == 1 and m["prefill_batched_prompts"] == 3
        assert m["prefills_done"] == 3
    finally:
        servicer.close()


def test_servicer_warm_up_runs_on_the_loop_and_leaves_nothing(runner, region):
    from gpu_service.servicer import PrefillServicer

    servicer = PrefillServicer(runner, region, kit.Admission(8, 8), lease_s=5.0)
    try:
        assert servicer.warm_up() > 0
        m = servicer.metrics()
        assert m["slots_in_use"] == 0 and m["prefill_batches"] == 0
        assert "slots_allocated" not in m
    finally:
        servicer.close()


def test_servicer_cancel_while_queued_frees_the_slot_without_running(runner, region):
    from gpu_service.servicer import PrefillServicer

    servicer = PrefillServicer(runner, region, kit.Admission(8, 8), lease_s=5.0)

    async def go():
        servicer.loop.pause()
        gen = servicer._prefill("r", "test", PROMPTS[0], "dense", None, SamplingParams(), 0.0, {})
        await gen.__anext__()  # the handle: the slot is allocated
        task = asyncio.create_task(gen.__anext__())
        while servicer.loop.waiting < 1:
            await asyncio.sleep(0)
        task.cancel()  # the client went away while its job waited for a batch
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(go())
        m = servicer.metrics()
        assert servicer.loop.waiting == 0 and m["slots_in_use"] == 0 and m["slots_failed"] == 1
        servicer.loop.resume()
        assert m["prefill_batches"] == 0 and "prefills_done" not in m
    finally:
        servicer.close()
    assert servicer.loop.stats["prefill_batches"] == 0
