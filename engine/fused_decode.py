"""GPT-2's batch-1 decode step on the fused CuPy kernels of kernels/decode_cuda.py.

`FusedGPT2Step(model)(tokens, positions, cache)` has GPT2.decode_step's contract for
batch 1 (logits [1, vocab] fp32; this token's K/V written at `positions[0]`) in
2 + 5 * n_layers launches (+1 for `greedy()`) instead of ~17 per layer. It is meant to
be captured in a CUDA graph (engine/cuda_graph.py), where its Python launch cost is paid
once; every input it reads (token, position, weights, cache) is a fixed device address.

The output buffer is reused by every call. Llama and batched decode stay on the torch
path. HYBRID_FUSED_DECODE=0 turns this path off.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import torch

from engine.kv_cache import KVCache
from kernels.cuda_launch import current_stream_ptr

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def fused_step_for(model: torch.nn.Module) -> FusedGPT2Step | None:
    """A fused step for `model` when it applies (GPT-2, CUDA, fp16/bf16, CuPy present,
    shapes the kernels take, not turned off), else None. Kernels that fail to compile
    are reported as a RuntimeWarning and the torch ops serve instead."""
    if os.environ.get("HYBRID_FUSED_DECODE", "1") == "0":
        return None
    cfg = getattr(model, "config", None)
    weight = getattr(getattr(model, "wte", None), "weight", None)
    if cfg is None or cfg.family != "gpt2" or weight is None or not weight.is_cuda \
            or weight.dtype not in _DTYPES or cfg.d_model % 8 or cfg.head_dim % 8 \
            or 32 % (cfg.head_dim // 8) or (4 * cfg.d_ff > 48 * 1024):   # x in shared memory
        return None
    from kernels.decode_cuda import attn_split
    from kernels.reshape import cupy_available

    if attn_split(cfg.max_positions, cfg.head_dim)[1] > 256:   # one merging thread per chunk
        return None
    if not cupy_available():   # an install without the [gpu] extra: torch ops, no noise
        return None
    try:
        return FusedGPT2Step(model)
    except Exception as exc:   # NVRTC cannot target this GPU, ...
        warnings.warn(f"fused decode kernels unavailable, using torch ops: "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        return None


class FusedGPT2Step:
    """Batch-1 GPT-2 decode step on fused kernels (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from kernels import decode_cuda as dc

        cfg = model.config
        self.model, self.cfg, self.dc = model, cfg, dc
        dev = model.wte.weight.device
        self.device = dev
        self.launch = dc.Launcher(_DTYPES[model.wte.weight.dtype], dev.index)
        # Contiguous [out, in] weights (views of the model's own tensors when already so).
        self._keep: list[torch.Tensor] = []
        self.wte, self.wpe = self._ptr(model.wte.weight), self._ptr(model.wpe.weight)
        self.ln_f = (self._ptr(model.ln_f.weight), self._ptr(model.ln_f.bias))
        self.layers = [self._layer(blk) for blk in model.h]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.eps = cfg.norm_eps
        self._buffers()

    def _buffers(self) -> None:
        cfg, dev, dt = self.cfg, self.device, self.model.wte.weight.dtype
        self.x = torch.empty(cfg.d_model, dtype=dt, device=dev)
        self.qkv = torch.empty(3 * cfg.d_model, dtype=dt, device=dev)
        self.attn = torch.empty(cfg.d_model, dtype=dt, device=dev)
        self.hidden = torch.empty(self.model.h[0].mlp.c_fc.out_features, dtype=dt, device=dev)
        self.logits = torch.empty(1, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.amax = torch.zeros(1, dtype=torch.int64, device=dev)    # argmax key (uint64)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self._last: torch.Tensor | None = None
        _, splits = self.dc.attn_split(cfg.max_positions, cfg.head_dim)
        # attention partials: per (head, chunk) D outputs + max + sum, for the most chunks
        # any cache length of this model needs
        self.work = torch.zeros(cfg.n_heads * splits * (cfg.head_dim + 2),
                                dtype=torch.float32, device=dev)
        self.counters = torch.zeros(cfg.n_heads, dtype=torch.int32, device=dev)  # CTAs done

    def fork(self) -> FusedGPT2Step:
        """The same weights with buffers of its own: one per captured graph, so graphs
        replayed on different streams never share scratch memory."""
        other = copy.copy(self)
        other._buffers()
        return other

    def _ptr(self, t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.detach().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _layer(self, blk) -> dict[str, int | tuple[int, int]]:
        return {"ln1": (self._ptr(blk.ln_1.weight), self._ptr(blk.ln_1.bias)),
                "qkv": (self._ptr(blk.attn.c_attn.weight), self._ptr(blk.attn.c_attn.bias)),
                "o": (self._ptr(blk.attn.c_proj.weight), self._ptr(blk.attn.c_proj.bias)),
                "ln2": (self._ptr(blk.ln_2.weight), self._ptr(blk.ln_2.bias)),
                "fc": (self._ptr(blk.mlp.c_fc.weight), self._ptr(blk.mlp.c_fc.bias)),
                "proj": (self._ptr(blk.mlp.c_proj.weight), self._ptr(blk.mlp.c_proj.bias))}

    def _gemv(self, s: int, x: torch.Tensor, w: tuple[int, int], n: int, out: torch.Tensor,
              ln: tuple[int, int] = (0, 0), act: int = 0, res: torch.Tensor | None = None,
              f32: bool = False) -> None:
        dc, k = self.dc, x.numel()
        grid, rpw = dc.gemv_grid(n)
        args = (x.data_ptr(), ln[0], ln[1], dc.F32(self.eps), w[0], w[1],
                0 if res is None else res.data_ptr(), 0 if f32 else out.data_ptr(),
                out.data_ptr() if f32 else 0, self.amax.data_ptr() if f32 else 0,
                dc.I32(k), dc.I32(n), dc.I32(act), dc.I32(rpw))
        self.launch("ln_gemv", grid, args, s, smem=4 * k)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 batch=None) -> torch.Tensor:
        if batch is not None:  # a paged cache (engine/paged_kv.py): the engine's path
            return self._paged(tokens, positions, cache, batch)
        if tokens.shape[0] != 1 or cache.batch != 1 or cache.k.dtype != self.x.dtype \
                or not cache.k.is_contiguous() or cache.max_len > self.cfg.max_positions:
            self._last = self.model.decode_step(tokens, positions, cache)
            return self._last
        self._last = self.logits
        cfg, dc = self.cfg, self.dc
        d, h, hkv, hd, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cache.max_len
        s = current_stream_ptr(self.device.index)
        tokens, positions = tokens.contiguous(), positions.contiguous()
        self.launch("embed", max(1, d // dc.THREADS),
                    (tokens.data_ptr(), positions.data_ptr(), self.wte, self.wpe,
                     self.x.data_ptr(), dc.I32(d), self.amax.data_ptr()), s)
        _, splits = dc.attn_split(L, hd)
        for i, p in enumerate(self.layers):
            self._gemv(s, self.x, p["qkv"], 3 * d, self.qkv, ln=p["ln1"])
            self.launch("attn_partial", (h, splits),
                        (self.qkv.data_ptr(), cache.k[i, 0].data_ptr(), cache.v[i, 0].data_ptr(),
                         positions.data_ptr(), self.work.data_ptr(), self.counters.data_ptr(),
                         self.attn.data_ptr(), dc.I32(h), dc.I32(hkv), dc.I32(hd), dc.I32(L),
                         dc.F32(self.scale), dc.I32(0), dc.I32(d), dc.I32(2 * d)), s)
            self._gemv(s, self.attn, p["o"], d, self.x, res=self.x)
            self._gemv(s, self.x, p["fc"], self.hidden.numel(), self.hidden, ln=p["ln2"], act=1)
            self._gemv(s, self.hidden, p["proj"], d, self.x, res=self.x)
        self._gemv(s, self.x, (self.wte, 0), cfg.vocab_size, self.logits, ln=self.ln_f, f32=True)
        return self.logits

    def takes(self, cache, n_rows: int) -> bool:
        """Whether the paged step runs fused for n_rows rows of `cache`: one row, the
        activation dtype, and the paged attention kernel present."""
        return n_rows == 1 and cache.k.dtype == self.x.dtype \
            and getattr(cache, "attention_kernel", None) is not None

    def _paged(self, tokens, positions, cache, batch) -> torch.Tensor:
        """Batch 1 over the paged pool: the fused GEMVs, the engine's paged attention
        (the new K/V written at batch.slots, attention through the block table)."""
        if not self.takes(cache, tokens.shape[0]):
            self._last = self.model.decode_step(tokens, positions, cache, batch)
            return self._last
        self._last = self.logits
        cfg, dc = self.cfg, self.dc
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        s = current_stream_ptr(self.device.index)
        tokens, positions = tokens.contiguous(), positions.contiguous()
        self.launch("embed", max(1, d // dc.THREADS),
                    (tokens.data_ptr(), positions.data_ptr(), self.wte, self.wpe,
                     self.x.data_ptr(), dc.I32(d), self.amax.data_ptr()), s)
        q, k, v = self.qkv[:d].view(1, h, hd), self.qkv[d:2 * d], self.qkv[2 * d:]
        for i, p in enumerate(self.layers):
            self._gemv(s, self.x, p["qkv"], 3 * d, self.qkv, ln=p["ln1"])
            y = cache.attend(q, k.view(1, h, hd), v.view(1, h, hd), batch, i)  # [1, d]
            self._gemv(s, y[0], p["o"], d, self.x, res=self.x)
            self._gemv(s, self.x, p["fc"], self.hidden.numel(), self.hidden, ln=p["ln2"], act=1)
            self._gemv(s, self.hidden, p["proj"], d, self.x, res=self.x)
        self._gemv(s, self.x, (self.wte, 0), cfg.vocab_size, self.logits, ln=self.ln_f, f32=True)
        return self.logits

    def greedy(self) -> torch.Tensor:
        """The argmax of the last call's logits as a [1] int64 tensor (computed inside the
        logits kernel; one 1-thread launch here instead of a 50K-wide reduction)."""
        if self._last is not self.logits:        # the call fell back to torch ops
            return torch.argmax(self._last, dim=-1)
        self.launch("argmax_token", 1, (self.amax.data_ptr(), self.token.data_ptr()),
                    current_stream_ptr(self.device.index))
        return self.token
