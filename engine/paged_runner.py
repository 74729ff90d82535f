"""The engine's runner on a GPU (or the CPU): the paged KV pool and its block manager,
the CUDA-graph decode step (engine/model_runner.py), KV copies on a copy stream, and
sampling (greedy on the device; temperature/top-k/top-p on the host, keyed by
(seed, step), so any run of a request draws the same tokens)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from contextlib import nullcontext as _nullcontext
from typing import Any

import numpy as np
import torch

from engine.batch_steps import failure
from engine.block_manager import BlockManager
from engine.freelist import FreeList
from engine.loader import LoadedModel
from engine.model_runner import ModelRunner
from engine.runner_base import StepRunner
from engine.sampling import sample
from engine.sequence import Sequence


class PagedRunner(StepRunner):
    def __init__(self, lm: LoadedModel, max_batch: int, n_blocks: int | None = None,
                 cuda_graphs: bool | None = None) -> None:
        self.lm, self.max_batch = lm, max_batch
        self._opts = (n_blocks, cuda_graphs)
        self.model: ModelRunner | None = None
        self.blocks: BlockManager | None = None
        self._copy: torch.cuda.Stream | None = None
        self._rewrite: frozenset[int] = frozenset()  # rows whose next token the host chose
        # Pinned staging for ingest: request threads copy a prompt's KV into a chunk
        # (numpy, GIL released), the loop DMAs it to the device without waiting and
        # frees the chunk when the copy's event completes.
        self.ring: torch.Tensor | None = None
        self._ring_free: FreeList | None = None
        self._ring_lock = threading.Lock()
        self._ring_busy: deque[tuple[torch.cuda.Event, int, int]] = deque()

    RING_MB = 256  # pinned staging for whole prompts' KV (HYBRID_INGEST_RING_MB)

    def start(self) -> None:
        if self.lm.device.type == "cuda":
            dev = self.lm.device  # set_device needs an index: plain "cuda" is the current one
            torch.cuda.set_device(dev if dev.index is not None else torch.cuda.current_device())
            self._copy = torch.cuda.Stream(self.lm.device)
        n_blocks, graphs = self._opts
        self.model = ModelRunner(self.lm, self.max_batch, n_blocks, cuda_graphs=graphs)
        self.blocks = BlockManager(self.model.cache.n_blocks, self.model.cache.block_size)
        self.pipelined = self.model.pipelined
        if self._copy is not None:
            mb = int(os.environ.get("HYBRID_INGEST_RING_MB", self.RING_MB))
            self.ring = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
            self._ring_free = FreeList(0, mb << 20, 4096)

    # ---- memory (any thread, under the engine's lock) ---------------------------------
    def fits(self, seq: Sequence) -> str | None:
        need = self.blocks.blocks_needed(seq.n_reserve)
        if need > self.blocks.n_lendable:
            return f"request needs {need} KV blocks; the pool has {self.blocks.n_lendable}"
        return None

    def can_reserve(self, seq: Sequence) -> bool:
        return self.blocks.can_allocate(seq.n_reserve)

    def reserve(self, seq: Sequence) -> None:
        seq.blocks = self.blocks.allocate(seq.n_reserve)

    def release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.blocks.free(seq.blocks)
            seq.blocks = []

    # ---- the engine thread ---------------------------------------------------------
    def _slots(self, seq: Sequence) -> torch.Tensor:
        if seq.prompt_slots is None:
            seq.prompt_slots = self.model.cache.slots_of(seq.blocks, 0, seq.req.n_prompt)
        return seq.prompt_slots

    # ---- ingest staging (any thread) ---------------------------------------------------
    def stage(self, nbytes: int) -> tuple[int, np.ndarray] | None:
        """A pinned chunk of the ring for one prompt's KV: (offset, writable uint8
        view), or None (CPU, or the ring is full: the caller uses plain memory)."""
        if self._ring_free is None:
            return None
        with self._ring_lock:
            off = self._ring_free.alloc(nbytes)
        if off is None:
            return None
        return off, self.ring.numpy()[off : off + nbytes]

    def unstage(self, off: int, nbytes: int) -> None:
        """Give back a chunk that will not be ingested (the request failed first)."""
        with self._ring_lock:
            self._ring_free.free(off, nbytes)

    def discard(self, payload: Any) -> None:
        if isinstance(payload, tuple) and payload[0] == "ring":
            self.unstage(payload[1], payload[2])
        elif isinstance(payload, tuple) and payload[0] == "peer":
            _resolve(payload[3], None)  # nothing was read from the prefill's GPU

    def _reap_ring(self) -> None:
        while self._ring_busy and self._ring_busy[0][0].query():
            _, off, n = self._ring_busy.popleft()
            self.unstage(off, n)

    def write_prompt(self, seq: Sequence, payload: Any) -> None:
        """The whole prompt's KV at once (one DMA, one scatter per K and V for all
        layers): payload ("ring", offset, nbytes) or a host uint8 tensor, holding the
        dense layout layer after layer, each [K: Hkv, T, D][V: Hkv, T, D]."""
        cfg, lm = self.lm.config, self.lm
        if isinstance(payload, tuple) and payload[0] == "peer":
            return self._write_peer(seq, *payload[1:])
        if isinstance(payload, tuple):
            _, off, n = payload
            host = self.ring[off : off + n]
        else:
            host, off, n = payload, None, 0
        shape = (cfg.n_layers, 2, cfg.n_kv_heads, seq.req.n_prompt, cfg.head_dim)
        with self._on_copy_stream():
            kv = host.view(lm.dtype).to(lm.device, non_blocking=True).view(shape)
            slots = self._slots(seq)
            self.model.cache.k.index_copy_(1, slots, kv[:, 0].transpose(1, 2))
            self.model.cache.v.index_copy_(1, slots, kv[:, 1].transpose(1, 2))
            if off is not None:
                ev = torch.cuda.Event()
                ev.record(self._copy)
                self._ring_busy.append((ev, off, n))
        self._reap_ring()

    def _write_peer(self, seq: Sequence, src: torch.Tensor, stride: int, done: Any) -> None:
        """GPU to GPU (transport.device_kv): `src` is the slot's bytes in the prefill GPU's
        mirror, layers `stride` bytes apart. One bulk copy over NVLink (the copy engines
        at full bandwidth; a scatter reading the peer directly would fetch it in small
        strided pieces), then the same scatter as the host path, from local memory.
        `done` gets the CUDA event after which the slot may be released."""
        cfg, lm = self.lm.config, self.lm
        e = lm.dtype.itemsize
        h, t, d = cfg.n_kv_heads, seq.req.n_prompt, cfg.head_dim
        try:
            with self._on_copy_stream():
                local = torch.empty(src.numel(), dtype=torch.uint8, device=lm.device)
                local.copy_(src, non_blocking=True)
                kv = local.view(lm.dtype).as_strided(
                    (cfg.n_layers, 2, h, t, d), (stride // e, h * t * d, t * d, d, 1))
                slots = self._slots(seq)
                self.model.cache.k.index_copy_(1, slots, kv[:, 0].transpose(1, 2))
                self.model.cache.v.index_copy_(1, slots, kv[:, 1].transpose(1, 2))
                ev = torch.cuda.Event()
                ev.record(self._copy)
        except BaseException:
            self._copy.synchronize()  # whatever was queued has read the peer's bytes
            _resolve(done, None)
            raise
        _resolve(done, ev)

    def write_layer(self, seq: Sequence, layer: int, payload: Any) -> None:
        """payload: (k, v) [n_kv_heads, n_prompt, head_dim] on any device."""
        k, v = payload
        with self._on_copy_stream():
            self.model.write_kv(layer, self._slots(seq), k, v)

    def _on_copy_stream(self):
        """KV writes go on the loop's copy stream (CUDA), overlapping the batch's decode
        steps; kv_written/before_step order the sequence's first step after them."""
        return torch.cuda.stream(self._copy) if self._copy is not None else _nullcontext()

    def kv_written(self, seq: Sequence) -> None:
        if self._copy is not None:
            seq.kv_ready = torch.cuda.Event()
            seq.kv_ready.record(self._copy)

    def before_step(self, seq: Sequence) -> None:
        if seq.kv_ready is not None:
            torch.cuda.current_stream(self.lm.device).wait_event(seq.kv_ready)

    def prefill(self, seqs: list[Sequence], prompts: list[list[int]]) -> list[int]:
        """Prompts in one packed forward (model.prefill_packed), each layer's K/V
        written into its sequence's blocks as it is made; first tokens sampled with
        each sequence's params (generated index 0)."""
        lm = self.lm
        ids = [torch.tensor(p, dtype=torch.long, device=lm.device) for p in prompts]
        slots = [self._slots(s) for s in seqs]

        def on_layer(layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.model.write_kv(layer, slots[i], k, v)

        logits = lm.model.prefill_packed(ids, on_layer=on_layer)
        return [int(sample(logits[i], s.req.params, 0)[0]) for i, s in enumerate(seqs)]

    def launch(self, rows: list[Sequence]):
        self._reap_ring()
        rewrite, self._rewrite = self._rewrite, frozenset()
        try:
            return self.model.launch(rows, rewrite)
        except BaseException:
            self.model.reset()  # rewrite every input before the next step
            raise

    def collect(self, handle) -> list[int | BaseException]:
        out: list[int | BaseException] = list(self.model.collect(handle))
        sampled = []
        for i, s in enumerate(handle.rows):
            if s.req.params.greedy:
                continue
            try:  # noise keyed by (seed, step): any run of the request draws the same
                out[i] = int(sample(handle.logits[handle.index[i]], s.req.params, s.step)[0])
                sampled.append(s.seq_id)
            except Exception as e:
                out[i] = failure(e, "sampling")
        # the device fed its argmax back; these rows get the host's token next launch
        self._rewrite = frozenset(sampled)
        return out

    def reset(self) -> None:
        self.model.reset()

    def stats(self) -> dict[str, int]:
        m, b = self.model, self.blocks
        return {"steps": m.steps if m else 0, "rows_computed": m.rows_computed if m else 0,
                "blocks_free": b.n_free if b else 0, "blocks_total": b.n_lendable if b else 0}


def _resolve(fut: Any, value: Any) -> None:
    """Hand `value` to a waiting request; one that stopped waiting already is fine."""
    with contextlib.suppress(Exception):  # InvalidStateError: cancelled or set
        fut.set_result(value)
