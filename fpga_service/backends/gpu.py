"""The `gpu` decode backend: the engine loop (engine/llm_engine.py) on cuda (or cpu).

With it the service pair is also plain GPU-to-GPU disaggregation, and the fast path on
machines without an FPGA. KV arrives in the dense layout in the slot dtype, which must
be this backend's compute dtype (the servicer checks).

Every request is a sequence of ONE DecodeEngine: continuous batching is the only path
(a lone request is a batch of one), decode steps are CUDA graphs per batch-size bucket,
and KV lives in the engine's paged pool. Sessions only hand data to the loop and read
its token queues; no request thread ever issues CUDA work.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future

import numpy as np
import torch

from engine.llm_engine import DecodeEngine
from engine.loader import load_model

from .base import DecodeBackend, DecodeSession, DecodeSpec
from .engine_session import EngineSession

_DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class GpuBackend(DecodeBackend):
    name = "gpu"
    kv_layout = "dense"

    def __init__(self, model_spec: str, device: str = "cuda", dtype: str = "float16",
                 max_batch: int = 64, max_waiting: int | None = None,
                 open_timeout_s: float = 60.0, **_: object) -> None:
        from engine.errors import InvalidArgument

        if max_batch < 1:
            raise InvalidArgument(f"max_batch must be >= 1, got {max_batch}")
        self.lm = load_model(model_spec, device=device, dtype=dtype)
        self.config, self.tokenizer = self.lm.config, self.lm.tokenizer
        self.kv_dtype = _DTYPE_NAME[self.lm.dtype]
        self.max_batch, self.open_timeout_s = max_batch, open_timeout_s
        self.engine = DecodeEngine(self.lm, max_batch=max_batch, max_waiting=max_waiting)

    def device_index(self) -> int | None:
        """The CUDA device the engine runs on (None on CPU): where KV may arrive GPU to
        GPU (transport.device_kv)."""
        d = self.lm.device
        return (d.index if d.index is not None else torch.cuda.current_device()) \
            if d.type == "cuda" else None

    def open_session(self, spec: DecodeSpec) -> DecodeSession:
        return GpuSession(self, spec)

    def info(self) -> dict[str, str]:
        info = {"device": str(self.lm.device), "model": self.lm.spec,
                "fingerprint": self.lm.fingerprint, "dtype": self.kv_dtype,
                "synthetic": str(self.lm.synthetic), "max_batch": str(self.max_batch)}
        if self.engine is not None:
            st = self.engine.stats()
            info.update(sessions_open=str(st["live"]), batch_rows_busy=str(st["running"]),
                        batch_steps=str(st["steps"]), batch_tokens=str(st["rows_computed"]),
                        kv_blocks_free=str(st["blocks_free"]),
                        kv_blocks_total=str(st["blocks_total"]),
                        waiting_for_kv=str(st["waiting"]), waiting_for_row=str(st["ready"]))
            info.update({f"engine_{k}": str(v) for k, v in st.items() if k.startswith("loop_")})
        return info

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()  # fails sequences still decoding with UNAVAILABLE
            self.engine = None
        self.lm = None  # drop the weights; idempotent


class GpuSession(EngineSession):
    """A request on the GPU engine: KV layer by layer as (k, v) tensors, or the whole
    prompt at once through `prompt_buffer` / `ingest_staged` (what the servicer does)."""

    def __init__(self, backend: GpuBackend, spec: DecodeSpec) -> None:
        super().__init__(backend, spec)
        c = backend.config
        self._shape = (c.n_kv_heads, spec.n_prompt, c.head_dim)  # K (and V) of one layer
        self._payload = None  # a staged prompt buffer not yet handed to the engine

    def ingest_layer(self, layer: int, data: memoryview | bytes) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller's buffer may change after the call
        with warnings.catch_warnings():  # bytes are read-only; the engine only reads
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=self.backend.lm.dtype)
        n = flat.numel() // 2
        self.engine.ingest(self.seq, layer, (flat[:n].view(self._shape), flat[n:].view(self._shape)))

    def prompt_buffer(self) -> np.ndarray:
        """Where the caller puts the whole prompt's KV (dense layout, layer after
        layer, each [K][V]) before `ingest_staged`: pinned staging when there is room
        (the engine then DMAs it without waiting), else plain memory."""
        c = self.backend.config
        nbytes = 2 * c.n_layers * c.kv_dim * self.spec.n_prompt * self.backend.lm.dtype.itemsize
        staged = self.engine.runner.stage(nbytes)
        if staged is not None:
            off, view = staged
            self._payload = ("ring", off, nbytes)
            return view
        self._payload = torch.empty(nbytes, dtype=torch.uint8)
        return self._payload.numpy()

    def ingest_device(self, src: torch.Tensor, desc) -> Future:
        """The prompt's KV from the prefill GPU's mirror (`src`: the slot's bytes, opened
        through CUDA IPC): the engine loop copies it (one peer copy, then the scatter into
        the paged pool). The future gets the copy's CUDA event once it is queued (None:
        dropped, nothing read); the slot may be released when that event completed."""
        from engine.errors import InvalidArgument

        c, dt = self.backend.config, self.backend.lm.dtype
        per = 2 * c.n_kv_heads * self.spec.n_prompt * c.head_dim * dt.itemsize
        spans = desc.layers
        stride = spans[1].offset - spans[0].offset if len(spans) > 1 else per
        if len(spans) != c.n_layers or stride % dt.itemsize or spans[0].offset % dt.itemsize \
                or any(r.length != per or r.offset != spans[0].offset + i * stride
                       for i, r in enumerate(spans)):
            raise InvalidArgument("on-device KV must be equal dense layers at a fixed stride")
        fut: Future = Future()
        span = src[spans[0].offset:spans[-1].offset + per]
        self.engine.ingest_prompt(self.seq, ("peer", span, stride, fut))
        return fut

    def ingest_staged(self) -> None:
        payload, self._payload = self._payload, None
        self.engine.ingest_prompt(self.seq, payload)

    def close(self) -> None:
        if self._payload is not None:  # staged, never handed over
            self.engine.runner.discard(self._payload)
            self._payload = None
        super().close()
