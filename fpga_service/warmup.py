"""Warm-up of a decode backend before the service reports SERVING.

One short request through the backend's own interface (open_session, ingest_layer,
decode, close) with an all-zero KV cache: kernels get compiled (CuPy/NVRTC), libraries
initialised (cuBLAS), the smallest CUDA-graph bucket captured, device buffers made, and
for the FPGA backends the weights' datapath views built; the first real request then
does not pay for them. Zero K/V is a valid cache (uniform attention), so nothing special
is needed on any backend.
"""

from __future__ import annotations

import time

from engine.sampling import SamplingParams
from kernels.comm import make_layout

from .backends.base import DecodeBackend, DecodeSpec


def warm_up(backend: DecodeBackend, n_prompt: int = 16, n_new: int = 4) -> float:
    """Run the short request; returns its wall time in ms. Leaves no session open."""
    t0 = time.perf_counter()
    cfg = backend.config
    layer = bytes(make_layout(backend.kv_layout, cfg, backend.kv_dtype).layer_bytes(n_prompt))
    spec = DecodeSpec("warm-up", n_prompt, n_new, SamplingParams(), ignore_eos=True)
    session = backend.open_session(spec)
    try:
        for i in range(cfg.n_layers):
            session.ingest_layer(i, memoryview(layer))
        for _ in session.decode(1):
            pass
    finally:
        session.close()
    return (time.perf_counter() - t0) * 1e3
