"""The summarization stage, a batch at a time: prompts -> KV in their region slots, layer
by layer, plus each prompt's first token.

Contract:
- `run_batch(jobs)` does all device work of one batch (one packed forward for every
  prompt, reshape kernels, copies, first-token sampling) in the calling thread. In the
  service that is the PrefillLoop thread (gpu_service/loop.py), the only thread of the
  process that issues CUDA work; `run()` is the same path for one prompt in the
  caller's thread (tests, benchmarks).
- Slots belong to the caller: it allocates them before and frees them after a failure.
  The runner writes each job's layers into its own slot, marks them ready as their
  copies land, and on success renews the lease and publishes the first token: from
  then on the consumer may release the slot, so nothing here touches it again.
- Every job is settled exactly once (`PrefillJob.settle`), and a failed or cancelled
  job only after every copy into its slot has landed, so its slot may be freed at once.
  A job cancelled mid-batch stops shipping its layers; the others carry on. A job whose
  slot cannot take the batch's layers (stale, wrong size) fails alone, as does one
  whose slot fails while its layers are marked ready.
- Shipping costs per LAYER, not per (prompt, layer): the hook collects layer l's K, V of
  every live prompt and ships them in one `BatchShipper.ship` call (one wait of the copy
  stream on the compute stream, each prompt's reshape + D2H into its own slot, ONE
  event); the runner's single `ReadyPublisher` thread marks layer l ready for all of
  them when that event completes. Each prompt's slot views are built once per batch.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import Aborted, InvalidArgument
from engine.generate import check_request
from engine.sampling import SamplingParams, sample

from .shipping import BatchMarks, LaneMarks, ReadyPublisher, ShipperPool, ShipStats

_DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
DEFAULT_MAX_BATCH = 32            # prompts in one packed forward
DEFAULT_MAX_BATCH_TOKENS = 4096   # tokens in one packed forward (activation memory)


class Cancelled(Aborted):
    """The request was cancelled (client gone or server draining) before it completed."""


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    prefill_ms: float       # the batch's compute: forward + first-token sampling
    ship: ShipStats
    queue_ms: float = 0.0   # submitted -> its batch started
    batch: int = 1          # prompts in the batch it ran in


Outcome = PrefillResult | BaseException


@dataclass(eq=False)  # identity semantics: a job is removed from queues by identity
class PrefillJob:
    """One prompt waiting for (or in) a batch. `notify` receives the outcome once."""

    ids: list[int]
    desc: Any
    layout: str
    params: SamplingParams
    notify: Callable[[Outcome], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    settled: bool = False

    def settle(self, outcome: Outcome) -> None:
        """Deliver the outcome; later calls are no-ops (a batch failure settles every job
        of the batch, including ones already settled)."""
        if self.settled:
            return
        self.settled = True
        self.notify(outcome)


def future_notify(box: concurrent.futures.Future) -> Callable[[Outcome], None]:
    """A notify that fills a concurrent Future (for callers that block on a job)."""
    def notify(outcome: Outcome) -> None:
        if isinstance(outcome, BaseException):
            box.set_exception(outcome)
        else:
            box.set_result(outcome)
    return notify


@dataclass(eq=False)
class _Lane:
    """A job's per-batch state: its slot as a copy destination and its ready marks."""

    job: PrefillJob
    target: Any           # kernels.comm.ShipTarget: the slot's layer views, built once
    marks: LaneMarks
    dropped: bool = False  # cancelled or failed mid-batch: no more layers shipped


class _LayerHook:
    """The forward's on_layer(layer, i, k, v): collects layer l's K, V of the live
    prompts and ships them in ONE call once the last prompt's arrive (the packed forward
    calls the hook for every prompt of a layer before the layer's attention), so the
    copy stream waits on the compute stream once per layer. A layer left incomplete (a
    forward that skipped a prompt's hook) is shipped when the next layer starts, or by
    `flush()` after the forward."""

    def __init__(self, lanes: list[_Lane], shipper: Any, marks: BatchMarks,
                 delay_s: float) -> None:
        self.lanes, self.shipper, self.marks, self.delay_s = lanes, shipper, marks, delay_s
        self.last = len(lanes) - 1
        self.layer = -1
        self.parts: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self.live: list[LaneMarks] = []

    def __call__(self, layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer != self.layer:
            self.flush()
            self.layer = layer
        if i == 0 and self.delay_s:  # once per layer: a slow prefill (fault injection)
            time.sleep(self.delay_s)
        lane = self.lanes[i]
        if not lane.dropped:
            if lane.job.cancel.is_set() or lane.marks.error is not None:
                lane.dropped = True  # its slot gets no more layers; the others go on
                if all(x.dropped or x.job.cancel.is_set() for x in self.lanes):
                    raise Cancelled("prefill cancelled")  # nobody left: stop computing
            else:
                self.parts.append((lane.target, k, v))
                self.live.append(lane.marks)
        if i == self.last:
            self.flush()

    def flush(self) -> None:
        """Ship the layer collected so far (if any) and hand it to the ready marking."""
        if not self.parts:
            return
        parts, live = self.parts, self.live
        self.parts, self.live = [], []
        handle = self.shipper.ship(self.layer, parts)
        for (target, _, _), lane in zip(parts, live, strict=True):
            lane.stats.kv_bytes += target.nbytes
            lane.shipped += 1
        self.marks.submit(self.layer, handle, live)


class PrefillRunner:
    """Owns the model on its device and knows how big a slot each layout needs."""

    def __init__(self, lm: Any, region: Any, copy_timeout_s: float = 60.0,
                 max_batch: int = DEFAULT_MAX_BATCH,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        if max_batch < 1 or max_batch_tokens < 1:
            raise InvalidArgument(f"max_batch ({max_batch}) and max_batch_tokens "
                                  f"({max_batch_tokens}) must be >= 1")
        self.lm, self.region = lm, region
        self.config = lm.config
        self.copy_timeout_s = copy_timeout_s
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.compute_dtype = _DTYPE_NAME[lm.dtype]
        self.shippers = ShipperPool(lm.device)
        # ONE helper thread marks layers ready for every batch (CUDA; none on CPU).
        self.publisher = ReadyPublisher(region)
        self._layouts: dict[tuple[str, str], Any] = {}
        # Fault injection for tests (a prefill slow enough to be killed mid-request).
        self.fault_layer_delay_s = float(os.environ.get("HYBRID_FAULT_LAYER_DELAY_MS", 0)) / 1e3

    def close(self) -> None:
        """Stop the ready helper thread (it starts again if another batch runs)."""
        self.publisher.close()

    def slot_dtype(self, layout: str, requested: str | None = None) -> str:
        """The decoder's element type when it named one (PrefillRequest.kv_dtype); else
        float16 for the HBM image (docs/hbm-layout.md) and our compute dtype for dense."""
        if requested:
            return requested
        return "float16" if layout == "hbm" else self.compute_dtype

    def layer_bytes(self, layout: str, n_tokens: int, dtype: str | None = None) -> int:
        return self._layout(layout, self.slot_dtype(layout, dtype)).layer_bytes(n_tokens)

    def _layout(self, kind: str, dtype: str) -> Any:
        key = (kind, dtype)
        layout = self._layouts.get(key)
        if layout is None:
            from kernels.comm import make_layout

            layout = self._layouts[key] = make_layout(kind, self.config, dtype)
        return layout

    def check_prompt(self, ids: list[int], max_new_tokens: int) -> None:
        """The engine's own request checks (max_new_tokens 0 = only the first token)."""
        check_request(self.config, ids, max(1, max_new_tokens))

    def run(self, ids: list[int], desc: Any, layout: str, params: SamplingParams,
            cancel: threading.Event) -> PrefillResult:
        """Prefill one prompt into slot `desc` through the batch path, in the caller's
        thread (the service goes through PrefillLoop instead). Raises the job's error."""
        box: concurrent.futures.Future = concurrent.futures.Future()
        job = PrefillJob(ids, desc, layout, params, future_notify(box), cancel)
        try:
            self.run_batch([job])
        except Exception as e:  # the whole batch failed: copies have landed by now
            job.settle(e)
        return box.result()

    # ---- one batch -----------------------------------------------------------------
    def run_batch(self, jobs: list[PrefillJob]) -> None:
        """One packed forward for `jobs`; settles each job. Raises only when the batch as
        a whole failed (the forward, or every job cancelled): the caller then settles
        the unsettled jobs with that error, after every copy has landed (done here)."""
        t0 = time.perf_counter()
        lanes = self._lanes(jobs)
        if not lanes:  # every job's slot was refused (each settled with its error)
            return
        shipper = self.shippers.take()
        marks = BatchMarks(self.publisher)
        try:
            tokens, compute_done = self._compute(lanes, shipper, marks)
            prefill_ms = (time.perf_counter() - t0) * 1e3
            try:  # every layer marked ready (or its lane stopped by an error)
                marks.finish(self.copy_timeout_s)
                copies: BaseException | None = None
            except Exception as e:  # the copies did not complete: fail every job
                marks.abort()
                shipper.synchronize()
                copies = e
            for lane, token in zip(lanes, tokens, strict=True):
                self._finish(lane, token, compute_done, prefill_ms, t0, len(lanes), copies)
        except BaseException:
            marks.abort()
            shipper.synchronize()  # copies still in flight write into the slots: let them land
            for lane in lanes:  # a lane stopped by its own slot's error fails with that error
                if (e := lane.marks.failure()) is not None:
                    lane.job.settle(e)
            raise
        finally:
            shipper.synchronize()
            self.shippers.give(shipper)

    def _lanes(self, jobs: list[PrefillJob]) -> list[_Lane]:
        """A lane per job whose slot takes this batch's layers; a job whose slot does not
        (stale, wrong geometry) is settled with that error and left out of the forward."""
        lanes = []
        for job in jobs:
            try:
                lanes.append(self._lane(job))
            except Exception as e:  # that slot only: no copy was issued into it
                job.settle(e)
        return lanes

    def _lane(self, job: PrefillJob) -> _Lane:
        layout = self._layout(job.layout, job.desc.dtype)
        return _Lane(job, self._target(job.desc, layout, len(job.ids)), LaneMarks(job.desc))

    def _target(self, desc: Any, layout: Any, n_tokens: int) -> Any:
        """The slot's layer views, once per batch: one region.layer_view and a few tensor
        ops when the layers lie back to back with equal sizes (they do for every slot the
        service allocates); else a view per layer."""
        from kernels.comm import ShipTarget

        n = self.config.n_layers
        if desc.n_layers != n:
            raise InvalidArgument(f"slot has {desc.n_layers} layers, the model {n}")
        nbytes = layout.layer_bytes(n_tokens)
        first = self.region.layer_view(desc, 0)
        spans = desc.layers
        if all(r.length == nbytes and r.offset == spans[0].offset + i * nbytes
               for i, r in enumerate(spans)):
            # The whole slot, from its first layer's view (same storage: the region).
            slot = first.as_strided((n * nbytes,), (1,), first.storage_offset())
            return ShipTarget.from_slot(layout, n_tokens, slot, n)
        views = [first] + [self.region.layer_view(desc, i) for i in range(1, n)]
        return ShipTarget(layout, n_tokens, views)

    def _compute(self, lanes: list[_Lane], shipper: Any,
                 marks: BatchMarks) -> tuple[list[int | None], Any]:
        """Forward + first tokens (None for a dropped lane); and the compute-done CUDA
        event (None on CPU) that the hidden/exposed copy figures are measured from."""
        device = self.lm.device
        with torch.inference_mode():
            # One host -> device copy for all prompts; the split views cost nothing.
            flat = torch.tensor([t for lane in lanes for t in lane.job.ids], dtype=torch.long,
                                device=device)
            ids = list(flat.split([len(lane.job.ids) for lane in lanes]))
            hook = _LayerHook(lanes, shipper, marks, self.fault_layer_delay_s)
            logits = self.lm.model.prefill_packed(ids, on_layer=hook)
            hook.flush()  # normally a no-op: the last prompt's hook shipped the layer
            compute_done = None
            if device.type == "cuda":  # on the compute stream, after the last layer's work
                compute_done = torch.cuda.Event(enable_timing=True)
                compute_done.record()
            return self._sample(lanes, logits), compute_done

    @staticmethod
    def _sample(lanes: list[_Lane], logits: torch.Tensor) -> list[int | None]:
        """Each live prompt's first token with its own params (step 0); one device sync."""
        picks = [sample(logits[i], lane.job.params, 0)
                 for i, lane in enumerate(lanes) if not lane.dropped]
        values = iter(torch.cat(picks).tolist() if picks else [])
        return [None if lane.dropped else next(values) for lane in lanes]

    def _finish(self, lane: _Lane, token: int | None, compute_done: Any, prefill_ms: float,
                t0: float, batch: int, copies: BaseException | None) -> None:
        """Publish the lane's first token and settle its job; every copy of the batch has
        landed (marks.finish, or the shipper synchronized after a failure)."""
        job, marks = lane.job, lane.marks
        outcome: Outcome
        # Its own slot's or copy's error first, then the batch's copies, then the guard.
        failure = marks.failure() or copies or marks.incomplete()
        if failure is not None:
            outcome = failure
        elif lane.dropped or token is None:
            outcome = Cancelled("prefill cancelled")
        else:
            try:
                stats = marks.stats
                if compute_done is not None and marks.last is not None:
                    stats.exposed_transfer_ms = max(
                        0.0, compute_done.elapsed_time(marks.last.event))
                else:  # CPU: each copy ran inline in the compute thread, none was hidden
                    stats.exposed_transfer_ms = stats.transfer_ms
                # The consumer's lease runs from here: it may release the slot as soon as
                # the first token is published, so nothing may touch the slot after that.
                self.region.renew(job.desc)
                self.region.set_first_token(job.desc, token)
                outcome = PrefillResult(token, prefill_ms, stats, (t0 - job.queued_at) * 1e3,
                                        batch)
            except Exception as e:  # this job's slot: the others are unaffected
                outcome = e
        job.settle(outcome)
