"""The summarization stage: one prompt -> KV in a region slot, layer by layer, plus the
first token. Runs in a worker thread (never on the event loop)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import Aborted
from engine.generate import check_request
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams, sample

from .shipping import ReadyMarker, ShipperPool, ShipStats

_DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class Cancelled(Aborted):
    """The request was cancelled (client gone or server draining) mid-prefill."""


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    prefill_ms: float
    ship: ShipStats


class PrefillRunner:
    """Owns the model on its device and knows how big a slot each layout needs."""

    def __init__(self, lm: Any, region: Any, copy_timeout_s: float = 60.0) -> None:
        self.lm, self.region = lm, region
        self.config = lm.config
        self.copy_timeout_s = copy_timeout_s
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
        """Prefill `ids` into slot `desc` (layers marked ready as their copies land),
        then sample and publish the first token."""
        slot_dtype = desc.dtype
        shipper = self.shippers.take(layout, slot_dtype)
        try:
            return self._run(ids, desc, params, cancel, shipper)
        finally:
            # Copies still in flight write into the slot: they must land before the
            # caller frees it (failure/cancel) or the shipper is reused.
            shipper.synchronize()
            self.shippers.give(layout, slot_dtype, shipper)

    def _run(self, ids, desc, params, cancel, shipper) -> PrefillResult:
        marker = ReadyMarker(self.region, desc)
        cache = KVCache(self.config, 1, len(ids), self.lm.device, self.lm.dtype)

        on_cuda = self.lm.device.type == "cuda"

        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if cancel.is_set():
                raise Cancelled("prefill cancelled")
            if self.fault_layer_delay_s:
                time.sleep(self.fault_layer_delay_s)
            dst = self.region.layer_view(desc, layer)
            marker.submit(layer, shipper.ship(layer, k, v, dst), dst.numel())

        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                x = torch.tensor(ids, dtype=torch.long, device=self.lm.device)
                logits = self.lm.model.prefill(x, cache, on_layer=on_layer)
                compute_done = None
                if on_cuda:  # on the compute (current) stream, after the last layer's work
                    compute_done = torch.cuda.Event(enable_timing=True)
                    compute_done.record()
                first = int(sample(logits, params, 0)[0])  # syncs the compute stream
        except BaseException:
            marker.close()
            raise
        prefill_ms = (time.perf_counter() - t0) * 1e3
        stats = marker.finish(compute_done, self.copy_timeout_s)
        # The consumer's lease runs from here: it may release the slot as soon as the
        # first token is published, so nothing may touch the slot after that.
        self.region.renew(desc)
        self.region.set_first_token(desc, first)
        return PrefillResult(first, prefill_ms, stats)
