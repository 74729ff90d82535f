"""The decode step over a batch of sequences, on the paged KV pool, in CUDA graphs.

Owned by the engine thread (engine/llm_engine.py): nothing here is thread-safe, and no
other thread may issue CUDA work while a graph is captured, which is why every graph is
captured once, at start-up, before any request exists.

Buckets: the step is captured for batch sizes 1, 2, 4, ... up to max_batch (and
max_batch itself); a batch of b rows replays the smallest bucket >= b, the rows past b
padded (token 0 at position 0 in the scratch block, see engine/paged_kv.py).

The captured step advances itself: after the forward it writes each row's greedy token
into the token input, and moves position, context length and KV slot one token on, on
the device (live rows only: padded rows stay at position 0). While the batch keeps its
rows, the host replays without writing any input; it only reads the tokens back. A row
that samples (temperature > 0) gets its token from the host (engine.sampling keys noise
by (seed, step) on the CPU), written back before the next replay; a change of rows
rewrites the inputs once.
"""

from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from engine.fused_decode import fused_step_for
from engine.loader import LoadedModel
from engine.paged_kv import NULL_BLOCK, PagedBatch, PagedKVCache, table_width
from engine.sequence import Sequence

log = logging.getLogger("hybrid.engine")


@dataclass
class Launch:
    """A decode step in flight: its rows, their batch slots, where its tokens land."""

    rows: list[Sequence]
    index: list[int]          # batch slot of each row
    bucket: int
    buf: int                  # which host output buffer
    event: torch.cuda.Event | None
    logits: torch.Tensor      # [bucket, vocab]; valid until the next launch


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
        self._bucket = 0
        self.steps = 0
        self.rows_computed = 0  # sum of real rows over steps: mean batch = rows / steps
        self.pipelined = on_cuda  # launches return before the step is done
        if self.buckets:
            self._capture_all()

    # ---- set-up --------------------------------------------------------------------
    def _buffers(self) -> None:
        n, w, dev = self.max_batch, self.width, self.device
        pin = dev.type == "cuda"
        self.h_out = [torch.zeros(n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        # (2n: room to spare; changes are per slot, so at most n)
        self._staging = [{"rows": torch.zeros(2 * n, dtype=torch.long, pin_memory=pin).numpy(),
                          "tok": torch.zeros(2 * n, dtype=torch.long, pin_memory=pin).numpy(),
                          "pos": torch.zeros(2 * n, dtype=torch.long, pin_memory=pin).numpy(),
                          "live": torch.zeros(2 * n, dtype=torch.long, pin_memory=pin).numpy(),
                          "tab": torch.zeros(2 * n, w, dtype=torch.int32, pin_memory=pin).numpy()}
                         for _ in range(2)]
        self._flip = 0
        self._row_of: dict[int, int] = {}          # seq id -> its batch slot
        self._free_rows = list(range(n))           # a heap: lowest slot first
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        # 1 for a row that holds a sequence, 0 for a padded or vacated one: only live
        # rows advance (see _forward)
        self.live = torch.zeros(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, w, dtype=torch.int32, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.ctx_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.out = torch.zeros(n, dtype=torch.long, device=dev)
        if dev.type == "cpu":  # read back directly: no copy, no event
            self.h_out = [self.out, self.out]

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
        # Padded rows must not advance: a bucket's rows past the live ones (and vacated
        # rows) are written only when they change, so a step that advanced them all
        # walked their positions past the position table after max_positions steps in
        # one bucket (wpe[pos] out of range: a device-side assert that killed the
        # decode, seen with 9 live rows in the 16-row graph for ~1 s), and grew their
        # attention span meanwhile. The clamp keeps a row that ran a step past its end
        # (the host learns of the end a step late) inside the table too.
        pos.add_(self.live[:b]).clamp_(max=self.config.max_positions - 1)
        self._derive(b)
        return logits

    def _derive(self, b: int) -> None:
        """ctx_lens and slots from positions and tables (clamped so a row stepped past
        its end stays inside its table)."""
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
                # thread_local: other threads' CUDA calls (a second engine in the same
                # process, request threads polling events) do not invalidate the capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = self._forward(b)
                self.graphs[b] = (graph, logits)
        self._reset_inputs()
        torch.cuda.synchronize(self.device)

    def _reset_inputs(self) -> None:
        """Every row padded: all writes go to the scratch block."""
        for t in (self.tokens, self.positions, self.tables, self.slots, self.out, self.live):
            t.zero_()
        self.ctx_lens.fill_(1)

    # ---- the step ------------------------------------------------------------------
    def bucket_for(self, b: int) -> int:
        return next((k for k in self.buckets if k >= b), b)

    def launch(self, rows: list[Sequence], rewrite: frozenset[int] = frozenset()) -> Launch:
        """Queue one decode step for `rows` and return at once (CUDA; the CPU computes
        it here). A row keeps its batch slot while it runs, so only rows that joined or
        left, and rows in `rewrite` (seq ids whose next token the host chose), have
        their inputs written; the others continue from the device's own state, which
        may be steps ahead of what the host has read back."""
        changes = self._assign(rows, rewrite)
        hi = max(self._row_of.values()) + 1
        bucket = self.bucket_for(hi)
        if changes or bucket != self._bucket:
            self._write_rows(changes, max(bucket, self._bucket))
        self._bucket = bucket
        buf = self._flip = 1 - self._flip
        with torch.inference_mode():
            if bucket in self.graphs:
                graph, logits = self.graphs[bucket]
                graph.replay()
            else:  # eager (CPU, or graphs off): attend only over the live blocks
                live = max(s.position for s in rows) + 2  # +1: the host may lag a step
                logits = self._forward(bucket, -(-live // self.cache.block_size))
            event = None
            if self.h_out[buf] is not self.out:
                self.h_out[buf][:bucket].copy_(self.out[:bucket], non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        self.steps += 1
        self.rows_computed += len(rows)
        return Launch(list(rows), [self._row_of[s.seq_id] for s in rows], bucket, buf,
                      event, logits)

    def collect(self, step: Launch) -> list[int]:
        """Each row's greedy token of a launched step (waits for it)."""
        if step.event is not None:
            step.event.synchronize()
        out = self.h_out[step.buf][: step.bucket].tolist()
        return [out[r] for r in step.index]

    def step(self, rows: list[Sequence]) -> tuple[list[int], torch.Tensor]:
        """Launch and collect one step, every row's inputs written from the host
        (tests and benchmarks); returns greedy tokens and the logits by batch slot."""
        launch = self.launch(rows, frozenset(s.seq_id for s in rows))
        return self.collect(launch), launch.logits[launch.index]

    def reset(self) -> None:
        """Vacate every batch slot (after a failure): the next launch rewrites all."""
        self._row_of.clear()
        self._free_rows = list(range(self.max_batch))
        with torch.inference_mode():
            self._reset_inputs()

    def _assign(self, rows: list[Sequence], rewrite: frozenset[int]) -> list:
        """Slots for `rows` (lowest free first, so buckets stay small); the changes to
        write: (slot, token, position, blocks), blocks None for a vacated slot."""
        want = {s.seq_id for s in rows}
        changes: dict[int, tuple] = {}  # by slot: a slot vacated and refilled is written once
        for sid, r in list(self._row_of.items()):
            if sid not in want:
                del self._row_of[sid]
                heapq.heappush(self._free_rows, r)
                changes[r] = (r, 0, 0, None)
        for s in rows:
            r = self._row_of.get(s.seq_id)
            if r is None:
                r = self._row_of[s.seq_id] = heapq.heappop(self._free_rows)
            elif s.seq_id not in rewrite:
                continue
            changes[r] = (r, s.token, s.position, s.blocks)
        return list(changes.values())

    def _write_rows(self, changes: list, bucket: int) -> None:
        """Scatter the changed slots' inputs into the device buffers (one small copy
        per buffer through pinned staging, double-buffered: a launch never overwrites
        staging that an earlier, possibly unfinished, launch still reads)."""
        st = self._staging[self._flip]
        k = len(changes)
        st["tab"][:k] = NULL_BLOCK
        for i, (r, tok, pos, blocks) in enumerate(changes):
            st["rows"][i], st["tok"][i], st["pos"][i] = r, tok, pos
            st["live"][i] = blocks is not None
            if blocks:
                st["tab"][i, : len(blocks)] = np.asarray(blocks, dtype=np.int32)
        if k:
            idx = torch.from_numpy(st["rows"][:k]).to(self.device, non_blocking=True)
            for dst, name in ((self.tokens, "tok"), (self.positions, "pos"),
                              (self.tables, "tab"), (self.live, "live")):
                src = torch.from_numpy(st[name][:k]).to(self.device, non_blocking=True)
                dst.index_copy_(0, idx, src)
        with torch.inference_mode():
            self._derive(bucket)

    # ---- KV in -----------------------------------------------------------------------
    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prompt's layer (k, v [Hkv, T, D], any device) into its pool slots."""
        self.cache.write(layer, slots, k, v)
