"""The `gpu` decode backend: the engine's decode loop on cuda (or cpu).

With it the service pair is also plain GPU-to-GPU disaggregation, and the fast path on
machines without an FPGA. KV arrives in the dense layout in the slot dtype, which must
be this backend's compute dtype (the servicer checks).

`max_batch` > 1 turns on continuous batching (fpga_service.backends.batching): sessions
that get a row of the shared batch cache decode together, one step for all; the others
(all rows busy) run the per-request loop below on a private cache, so overload never
blocks or fails a request. The default, 1, is the per-request loop with CUDA graphs.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator

import torch

from engine.generate import decode_tokens, graph_pool, is_stop, new_cache
from engine.loader import load_model

from .base import DecodeBackend, DecodeSession, DecodeSpec
from .batching import DONE, BatchRow, BatchScheduler

_DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class GpuBackend(DecodeBackend):
    name = "gpu"
    kv_layout = "dense"

    def __init__(self, model_spec: str, device: str = "cuda", dtype: str = "float16",
                 max_batch: int = 1, **_: object) -> None:
        from engine.errors import InvalidArgument

        if max_batch < 1:
            raise InvalidArgument(f"max_batch must be >= 1, got {max_batch}")
        self.lm = load_model(model_spec, device=device, dtype=dtype)
        self.config, self.tokenizer = self.lm.config, self.lm.tokenizer
        self.kv_dtype = _DTYPE_NAME[self.lm.dtype]
        self.sessions_open = 0
        self._count_lock = threading.Lock()  # sessions open and close on pool threads
        self.max_batch = max_batch
        # no scheduler (and no thread) at max_batch 1: exactly the unbatched service
        self.scheduler = self._scheduler(max_batch) if max_batch > 1 else None

    def _scheduler(self, max_batch: int) -> BatchScheduler:
        try:  # the batch cache is max_batch x max_positions tokens, allocated up front
            return BatchScheduler(self.lm, max_batch)
        except torch.OutOfMemoryError as e:
            from engine.errors import ResourceExhausted

            raise ResourceExhausted(f"no device memory for a batch cache of {max_batch} rows "
                                    f"x {self.config.max_positions} positions: {e}") from None

    def count_session(self, delta: int) -> None:
        with self._count_lock:
            self.sessions_open += delta

    def open_session(self, spec: DecodeSpec) -> DecodeSession:
        row = self.scheduler.acquire() if self.scheduler is not None else None
        if row is not None:
            return BatchedSession(self, spec, row)
        return GpuSession(self, spec)  # unbatched, or every batch row is busy

    def info(self) -> dict[str, str]:
        info = {"device": str(self.lm.device), "model": self.lm.spec,
                "fingerprint": self.lm.fingerprint, "dtype": self.kv_dtype,
                "synthetic": str(self.lm.synthetic), "sessions_open": str(self.sessions_open),
                "max_batch": str(self.max_batch)}
        if self.scheduler is not None:
            sch = self.scheduler
            info.update(batch_rows_busy=str(sch.rows_busy()), batch_steps=str(sch.steps),
                        batch_tokens=str(sch.tokens))
        return info

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()  # stops the thread; fails sessions still decoding
            self.scheduler = None
        self.lm = None  # drop the weights; idempotent


class GpuSession(DecodeSession):
    def __init__(self, backend: GpuBackend, spec: DecodeSpec) -> None:
        try:
            # greedy on CUDA: a captured decode graph's own cache (engine.cuda_graph)
            cache, graph = new_cache(backend.lm, spec.n_prompt + spec.max_new_tokens,
                                     spec.sampling.greedy)
        except torch.OutOfMemoryError as e:
            from engine.errors import ResourceExhausted

            raise ResourceExhausted(f"no device memory for the KV cache: {e}") from None
        self._attach(backend, spec, cache, graph)

    def _attach(self, backend: GpuBackend, spec: DecodeSpec, cache, graph) -> None:
        """The session's state on its KV cache (own, a graph's, or a batch row's)."""
        self.backend, self.spec = backend, spec
        self.cache, self.graph = cache, graph
        c = backend.lm.config
        self._shape = (c.n_kv_heads, spec.n_prompt, c.head_dim)  # K (and V) of one layer
        self._decode_ms = 0.0
        self._n = 0
        self._closed = False
        backend.count_session(+1)

    def ingest_layer(self, layer: int, data: memoryview) -> None:
        with warnings.catch_warnings():  # the region mapping is read-only; we only read
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=self.backend.lm.dtype)
        n = flat.numel() // 2
        k = flat[:n].view(self._shape)  # [n_kv_heads, T, head_dim]
        v = flat[n:].view(self._shape)
        self.cache.write_layer(layer, k, v)  # host -> device copy, cast on write

    def decode(self, first_token: int) -> Iterator[int]:
        s = self.spec
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for tok in decode_tokens(
                        self.backend.lm, self.cache, first_token, s.n_prompt, s.max_new_tokens,
                        s.sampling, stop_ids=s.stop_ids, ignore_eos=s.ignore_eos,
                        graph=self.graph):
                    self._n += 1
                    yield tok
        finally:
            self._decode_ms = (time.perf_counter() - t0) * 1e3

    def timings(self) -> dict[str, float]:
        return {"decode_ms": self._decode_ms,
                "decode_ms_per_token": self._decode_ms / max(1, self._n)}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.cache = None
            if self.graph is not None:
                graph_pool(self.backend.lm).release(self.graph)
                self.graph = None
            self.backend.count_session(-1)


class BatchedSession(GpuSession):
    """A session whose KV lives in a row of the backend's batch cache; the scheduler's
    thread decodes it together with the other rows."""

    def __init__(self, backend: GpuBackend, spec: DecodeSpec, row: BatchRow) -> None:
        self.row, self.scheduler = row, backend.scheduler
        self._attach(backend, spec, self.scheduler.cache.rows(row.index, 1), None)

    def decode(self, first_token: int) -> Iterator[int]:
        s = self.spec
        eos = self.scheduler.eos
        if s.max_new_tokens <= 1 or is_stop(first_token, eos, s.stop_ids, s.ignore_eos):
            return
        t0 = time.perf_counter()
        self.scheduler.submit(self.row, s, first_token)
        try:
            while (item := self.row.out.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                self._n += 1
                yield item
        finally:
            # an abandoned iterator (cancelled client) must stop its row at once
            self.scheduler.release(self.row)
            self._decode_ms = (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.release(self.row)
            self.cache = None
            self.backend.count_session(-1)
