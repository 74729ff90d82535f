"""The decode step over a batch of sequences, on the paged KV pool, in CUDA graphs.

Owned by the engine thread (engine/llm_engine.py): nothing here is thread-safe, and no
other thread may issue CUDA work while a graph is captured, which is why every graph is
captured once, at start-up, before any request exists.

Buckets: the step is captured for batch sizes 1, 2, 4, ... up to max_batch (and
max_batch itself); a batch of b rows replays the smallest bucket >= b, the rows past b
padded (token 0 at position 0 in the scratch block, see engine/paged_kv.py).

The captured step advances itself: after the forward it writes each row's greedy token
into the token input, and moves position, context length and KV slot one token on, on
the device. While the batch keeps its rows, the host replays without writing any input;
it only reads the tokens back. A row that samples (temperature > 0) gets its token from
the host (engine.sampling keys noise by (seed, step) on the CPU), written back before
the next replay; a change of rows rewrites the inputs once.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from engine.fused_decode import fused_step_for
from engine.loader import LoadedModel
from engine.paged_kv import NULL_BLOCK, PagedBatch, PagedKVCache, table_width
from engine.sequence import Sequence

log = logging.getLogger("hybrid.engine")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def default_kv_blocks(lm: LoadedModel, max_batch: int, block_size: int) -> int:
    """Blocks for max_batch full-length sequences (never more is useful), within a
    budget: on CUDA a fraction of free device memory (HYBRID_KV_MEMORY_FRACTION, default
    0.25: the prefill service may share the GPU), on the CPU HYBRID_KV_CPU_MB (512).
    At least one full-length sequence always fits."""
    cfg = lm.config
    per_block = 2 * cfg.n_layers * block_size * cfg.kv_dim * lm.dtype.itemsize
    one = table_width(cfg, block_size)
    want = max_batch * one + 1
    if lm.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(lm.device)
        budget = int(free * float(os.environ.get("HYBRID_KV_MEMORY_FRACTION", "0.25")))
    else:
        budget = int(os.environ.get("HYBRID_KV_CPU_MB", "512")) << 20
    return max(one + 1, min(want, budget // per_block))


class ModelRunner:
    def __init__(self, lm: LoadedModel, max_batch: int, n_blocks: int | None = None,
                 block_size: int = 16, cuda_graphs: bool | None = None) -> None:
        self.lm, self.config, self.max_batch = lm, lm.config, max_batch
        self.device = lm.device
        n_blocks = n_blocks or default_kv_blocks(lm, max_batch, block_size)
        self.cache = PagedKVCache(self.config, n_blocks, self.device, lm.dtype, block_size)
        self.width = table_width(self.config, block_size)
        self._buffers()
        self._attention_kernel()
        # GPT-2's fused batch-1 kernels (engine/fused_decode.py) for the 1-row bucket:
        # measured faster than cuBLAS + torch ops at batch 1 (docs/performance.md)
        self.fused = fused_step_for(lm.model) if self.cache.attention_kernel else None
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("HYBRID_CUDA_GRAPHS", "1") != "0"
        on_cuda = self.device.type == "cuda"
        self.buckets = batch_buckets(max_batch) if on_cuda and cuda_graphs else []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._rows: list[int] | None = None  # seq ids the device inputs hold, in order
        self._bucket = 0
        self.steps = 0
        self.rows_computed = 0  # sum of real rows over steps: mean batch = rows / steps
        if self.buckets:
            self._capture_all()

    # ---- set-up --------------------------------------------------------------------
    def _buffers(self) -> None:
        n, w, dev = self.max_batch, self.width, self.device
        pin = dev.type == "cuda"
        self.h_tokens = torch.zeros(n, dtype=torch.long, pin_memory=pin)
        self.h_positions = torch.zeros(n, dtype=torch.long, pin_memory=pin)
        self.h_tables = torch.zeros(n, w, dtype=torch.int32, pin_memory=pin)
        self.h_out = torch.zeros(n, dtype=torch.long, pin_memory=pin)
        if dev.type == "cpu":
            self.tokens, self.positions, self.tables = self.h_tokens, self.h_positions, self.h_tables
        else:
            self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
            self.positions = torch.zeros(n, dtype=torch.long, device=dev)
            self.tables = torch.zeros(n, w, dtype=torch.int32, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.ctx_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.out = torch.zeros(n, dtype=torch.long, device=dev)

    def _attention_kernel(self) -> None:
        try:
            from kernels.paged_attn_cuda import paged_attention_for
        except ImportError:
            return
        self.cache.attention_kernel = paged_attention_for(
            self.config, self.lm.dtype, self.device, self.max_batch, self.width,
            self.cache.block_size)

    def _forward(self, b: int, width: int | None = None) -> torch.Tensor:
        """The step over rows [0, b): logits, then the self-advance (module docstring).
        `width`: block-table columns attention reads (eager steps read only the live
        ones; a graph reads all, its shapes being fixed)."""
        pos = self.positions[:b]
        batch = PagedBatch(pos, self.slots[:b], self.tables[:b, :width], self.ctx_lens[:b])
        fused = self.fused is not None and self.fused.takes(self.cache, b)
        step = self.fused if fused else self.lm.model.decode_step
        logits = step(self.tokens[:b], pos, self.cache, batch)
        nxt = self.fused.greedy() if fused else torch.argmax(logits, dim=-1)
        self.out[:b].copy_(nxt)
        self.tokens[:b].copy_(nxt)
        pos.add_(1)
        self._derive(b)
        return logits

    def _derive(self, b: int) -> None:
        """ctx_lens and slots from positions and tables (clamped so a padded row that
        advances for a long time stays inside its table and the scratch block)."""
        bs, pos = self.cache.block_size, self.positions[:b]
        self.ctx_lens[:b].copy_((pos + 1).clamp(max=self.width * bs))
        col = (pos // bs).clamp(max=self.width - 1)
        blk = self.tables[:b].gather(1, col[:, None])[:, 0].long()
        self.slots[:b].copy_(blk * bs + pos % bs)

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        with torch.inference_mode():
            for b in reversed(self.buckets):  # largest first: the others reuse its memory
                self._reset_inputs()
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # warm-up: cuBLAS handles, workspaces
                    for _ in range(2):
                        self._forward(b)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                self._reset_inputs()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(b)
                self.graphs[b] = (graph, logits)
        self._reset_inputs()
        torch.cuda.synchronize(self.device)

    def _reset_inputs(self) -> None:
        """Every row padded: all writes go to the scratch block."""
        for t in (self.tokens, self.positions, self.tables, self.slots, self.out):
            t.zero_()
        self.ctx_lens.fill_(1)
        self._rows = None

    # ---- the step ------------------------------------------------------------------
    def bucket_for(self, b: int) -> int:
        return next((k for k in self.buckets if k >= b), b)

    def step(self, rows: list[Sequence]) -> tuple[list[int], torch.Tensor]:
        """One decode step for `rows` (each at its `token`/`position`, KV of positions
        before it in its blocks). Returns each row's greedy token and the logits
        [>= len(rows), vocab] (valid until the next step) for rows that sample."""
        b = len(rows)
        bucket = self.bucket_for(b)
        ids = [s.seq_id for s in rows]
        if ids != self._rows or bucket != self._bucket:
            self._write_inputs(rows, bucket)
            self._rows, self._bucket = ids, bucket
        with torch.inference_mode():
            if bucket in self.graphs:
                graph, logits = self.graphs[bucket]
                graph.replay()
            else:  # eager (CPU, or graphs off): attend only over the live blocks
                live = max(s.position for s in rows) + 1
                logits = self._forward(bucket, -(-live // self.cache.block_size))
        self.steps += 1
        self.rows_computed += b
        if self.h_out is self.out:
            return self.out[:b].tolist(), logits
        self.h_out[:b].copy_(self.out[:b])  # synchronous: the tokens are needed now
        return self.h_out[:b].tolist(), logits

    def set_tokens(self, tokens: list[int]) -> None:
        """Next step's input tokens for the current rows, when some row's token came
        from the host (sampling) rather than from the device's argmax."""
        b = len(tokens)
        self.h_tokens[:b] = torch.tensor(tokens, dtype=torch.long)
        if self.tokens is not self.h_tokens:
            self.tokens[:b].copy_(self.h_tokens[:b], non_blocking=True)

    def invalidate(self) -> None:
        """Force a full rewrite of the inputs before the next step (after a failure)."""
        self._rows = None

    def _write_inputs(self, rows: list[Sequence], bucket: int) -> None:
        tok, pos, tab = self.h_tokens.numpy(), self.h_positions.numpy(), self.h_tables.numpy()
        tok[:bucket], pos[:bucket], tab[:bucket] = 0, 0, NULL_BLOCK
        for i, s in enumerate(rows):
            tok[i], pos[i] = s.token, s.position
            tab[i, : len(s.blocks)] = np.asarray(s.blocks, dtype=np.int32)
        if self.tokens is not self.h_tokens:
            for d, h in ((self.tokens, self.h_tokens), (self.positions, self.h_positions),
                         (self.tables, self.h_tables)):
                d[:bucket].copy_(h[:bucket], non_blocking=True)
        self._derive(bucket)

    # ---- KV in -----------------------------------------------------------------------
    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prompt's layer (k, v [Hkv, T, D], any device) into its pool slots."""
        self.cache.write(layer, slots, k, v)
