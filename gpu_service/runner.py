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
  A job cancelled mid-batch stops shipping its layers; the others carry on.
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

from .shipping import ReadyMarker, ShipperPool, ShipStats

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
    """A job's per-batch state: its own copy path and ready flags."""

    job: PrefillJob
    shipper: Any
    marker: ReadyMarker
    dropped: bool = False  # cancelled mid-batch: no more layers shipped


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
        self.shippers = ShipperPool(self.config, lm.device)
        # Fault injection for tests (a prefill slow enough to be killed mid-request).
        self.fault_layer_delay_s = float(os.environ.get("HYBRID_FAULT_LAYER_DELAY_MS", 0)) / 1e3

    def slot_dtype(self, layout: str, requested: str | None = None) -> str:
        """The decoder's element type when it named one (PrefillRequest.kv_dtype); else
        float16 for the HBM image (docs/hbm-layout.md) and our compute dtype for dense."""
        if requested:
            return requested
        return "float16" if layout == "hbm" else self.compute_dtype

    def layer_bytes(self, layout: str, n_tokens: int, dtype: str | None = None) -> int:
        from kernels.comm import make_layout

        layout_spec = make_layout(layout, self.config, self.slot_dtype(layout, dtype))
        return layout_spec.layer_bytes(n_tokens)

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
        lanes: list[_Lane] = []
        try:
            lanes.extend(self._lane(job) for job in jobs)
            tokens, compute_done = self._compute(lanes)
            prefill_ms = (time.perf_counter() - t0) * 1e3
            for lane, token in zip(lanes, tokens, strict=True):
                self._finish(lane, token, compute_done, prefill_ms, t0, len(jobs))
        except BaseException:
            for lane in lanes:
                lane.marker.close()
            raise
        finally:
            for lane in lanes:  # copies still in flight write into the slots: let them land
                lane.shipper.synchronize()
                self.shippers.give(lane.job.layout, lane.job.desc.dtype, lane.shipper)

    def _lane(self, job: PrefillJob) -> _Lane:
        shipper = self.shippers.take(job.layout, job.desc.dtype)
        return _Lane(job, shipper, ReadyMarker(self.region, job.desc))

    def _compute(self, lanes: list[_Lane]) -> tuple[list[int | None], Any]:
        """Forward + first tokens (None for a dropped lane); and the compute-done CUDA
        event (None on CPU) that the hidden/exposed copy figures are measured from."""
        device = self.lm.device
        with torch.inference_mode():
            # One host -> device copy for all prompts; the split views cost nothing.
            flat = torch.tensor([t for lane in lanes for t in lane.job.ids], dtype=torch.long,
                                device=device)
            ids = list(flat.split([len(lane.job.ids) for lane in lanes]))
            logits = self.lm.model.prefill_packed(ids, on_layer=self._on_layer(lanes))
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

    def _on_layer(self, lanes: list[_Lane]) -> Callable[[int, int, torch.Tensor, torch.Tensor], None]:
        def on_layer(layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if i == 0 and self.fault_layer_delay_s:  # once per layer: a slow prefill
                time.sleep(self.fault_layer_delay_s)
            lane = lanes[i]
            if lane.dropped:
                return
            if lane.job.cancel.is_set():
                lane.dropped = True  # its slot gets no more layers; the others go on
                if all(x.dropped or x.job.cancel.is_set() for x in lanes):
                    raise Cancelled("prefill cancelled")  # nobody left: stop computing
                return
            dst = self.region.layer_view(lane.job.desc, layer)
            lane.marker.submit(layer, lane.shipper.ship(layer, k, v, dst), dst.numel())
        return on_layer

    def _finish(self, lane: _Lane, token: int | None, compute_done: Any, prefill_ms: float,
                t0: float, batch: int) -> None:
        """Wait for the lane's copies, publish its first token, settle its job."""
        job = lane.job
        outcome: Outcome
        if lane.dropped or token is None:
            outcome = Cancelled("prefill cancelled")
        else:
            try:
                stats = lane.marker.finish(compute_done, self.copy_timeout_s)
                # The consumer's lease runs from here: it may release the slot as soon as
                # the first token is published, so nothing may touch the slot after that.
                self.region.renew(job.desc)
                self.region.set_first_token(job.desc, token)
                outcome = PrefillResult(token, prefill_ms, stats, (t0 - job.queued_at) * 1e3,
                                        batch)
            except Exception as e:  # this job's copies or slot: the others are unaffected
                outcome = e
        if isinstance(outcome, BaseException):
            lane.marker.close()
            lane.shipper.synchronize()  # the caller frees the slot on an error
        job.settle(outcome)
