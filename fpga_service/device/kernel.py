"""The software U55C's decode kernel: one token step computed only from HBM bytes.

`run_kernel(channels, io, meta, ...)` is the whole ABI of docs/fpga-kernel-abi.md as a
function of byte arrays: 32 channel arrays (uint8), the io buffer and the meta buffer.
The emulator device and the fake pyxrt both call it, so the XRT host code and the
emulator are checked against the same datapath.

Datapath (the layout is docs/hbm-layout.md, kernels/hbm_layout.py):
- matrices are split by output rows over the channels; channel c's "datapath" computes
  its rows `W_c @ x` from zero-copy views of its bytes, the outputs are concatenated;
  its bias rows come from its own copy of the (replicated) bias;
- K and V of every layer live in 32x32 tiles spread over the channels by 32-element
  lanes; the new token's K, V are written into the tiles, then attention reads every
  live token's K, V back out of the tiles (including the one just written).
Compute is fp32 whatever the element type in HBM (fp16 values are widened on read).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from fpga_service.device import abi
from kernels.hbm_layout import HbmLayout, KvArea
from kernels.weight_table import WeightEntry

_NP = {"float16": np.float16, "float32": np.float32}
_CACHE: dict[tuple, Datapath] = {}
_CACHE_LOCK = threading.Lock()  # runs of several sessions (threads) share the cache
_THREADS_LOCK = threading.Lock()
_threads_users = 0  # kernel runs in progress inside _one_torch_thread
_threads_saved = 0


class Datapath:
    """Views of one model's weights in one set of channel arrays, and the step math."""

    def __init__(self, channels: Sequence[np.ndarray], meta: dict) -> None:
        self.cfg = ModelConfig(**meta["config"])
        self.layout = HbmLayout.for_model(self.cfg, meta["dtype"])
        self.np_dtype = _NP[meta["dtype"]]
        self.channels = channels
        self.table = self.layout.weight_table(self.cfg)
        base = meta["weights_base"]
        # channel c's KV lanes, (first element, lanes): the address generator's constants
        self.lanes = [self.layout.lane_range(c) for c in range(len(channels))]
        self.w = {name: self._views(e, base) for name, e in self.table.items()}

    def _views(self, e: WeightEntry, base: Sequence[int]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for c, ch in enumerate(self.channels):
            n = e.channel_bytes(c)
            if n == 0:
                out.append(None)
                continue
            start = base[c] + e.offset
            arr = ch[start : start + n].view(self.np_dtype).reshape(e.channel_shape(c))
            out.append(torch.from_numpy(arr))  # zero-copy: shares the channel's bytes
        return out

    # -- per-channel primitives ---------------------------------------------------------
    def linear(self, name: str, x: torch.Tensor, bias: str | None = None) -> torch.Tensor:
        """y = W x (+ b): channel c computes rows rows[c] from its own bytes."""
        e = self.table[name]
        y = torch.empty(e.shape[0], dtype=torch.float32)
        for c, w in enumerate(self.w[name]):
            if w is None:
                continue
            s, t = e.rows[c]
            torch.mv(w.float(), x, out=y[s:t])
            if bias is not None:
                y[s:t] += self.w[bias][c][s:t].float()
        return y

    def vec(self, name: str) -> torch.Tensor:
        """A replicated vector, read from channel 0's copy (the shared datapath's port)."""
        return self.w[name][0].float()

    def embed_row(self, name: str, row: int) -> torch.Tensor:
        e = self.table[name]
        for c, (s, t) in enumerate(e.rows):
            if s <= row < t:
                return self.w[name][c][row - s].float()
        raise IndexError(f"row {row} outside {name} {e.shape}")

    # -- KV tiles -----------------------------------------------------------------------
    def _tiles(self, kv_base: Sequence[int], area: KvArea, layer: int, which: str):
        """Per channel with lanes: (first element, tile view [blocks, lanes_c, 32, 32])."""
        lay = self.layout
        rel = (lay.k_offset if which == "k" else lay.v_offset)(area, layer)
        nb = lay.n_blocks(area.capacity_tokens)
        out = []
        for c, ch in enumerate(self.channels):
            first, lanes = self.lanes[c]
            if lanes == 0:
                continue
            start = kv_base[c] + rel
            n = nb * lanes * lay.tile_bytes
            arr = ch[start : start + n].view(self.np_dtype).reshape(nb, lanes, lay.vec, lay.vec)
            out.append((first * lay.vec, torch.from_numpy(arr)))
        return out

    def write_kv(self, kv_base, area, layer, pos, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one token: K row r of tile (block, lane); V column r (dim-major tile).
        Pad elements of the last lane (kv_dim % 32 != 0) are written as zeros."""
        vec, pad = self.layout.vec, self.layout.kv_pad
        blk, r = divmod(pos, vec)
        tdt = torch.from_numpy(np.zeros(0, self.np_dtype)).dtype
        if pad:
            k, v = F.pad(k, (0, pad)), F.pad(v, (0, pad))
        for which, src in (("k", k), ("v", v)):
            for e0, tiles in self._tiles(kv_base, area, layer, which):
                lanes = tiles.shape[1]
                part = src[e0 : e0 + lanes * vec].view(lanes, vec).to(tdt)
                if which == "k":
                    tiles[blk, :, r, :] = part
                else:
                    tiles[blk, :, :, r] = part

    def read_kv(self, kv_base, area, layer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Live K, V of tokens [0, n) as [n, kv_dim] fp32, gathered from the tiles."""
        nb = self.layout.n_blocks(n)
        halves = []
        for which in ("k", "v"):
            parts = []
            for _, tiles in self._tiles(kv_base, area, layer, which):
                t = tiles[:nb]
                if which == "v":
                    t = t.transpose(2, 3)  # dim-major tile -> [tok][dim]
                # [blocks, lanes, tok, dim] -> [blocks*tok, lanes*dim]
                parts.append(t.permute(0, 2, 1, 3).reshape(nb * self.layout.vec, -1))
            halves.append(torch.cat(parts, dim=1)[:n, : self.layout.kv_dim].float())  # no pad
        return halves[0], halves[1]


def attend(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H*D], k/v [T, Hkv*D] -> [H*D], the engine's decode attention for one token."""
    hkv, d = cfg.n_kv_heads, cfg.head_dim
    t = k.shape[0]
    qg = q.view(1, hkv, cfg.n_heads // hkv, d)
    kk = k.view(t, hkv, d).permute(1, 0, 2)[None]  # [1, Hkv, T, D]
    vv = v.view(t, hkv, d).permute(1, 0, 2)[None]
    scores = torch.matmul(qg, kk.transpose(-1, -2)) / math.sqrt(d)
    probs = torch.softmax(scores.float(), dim=-1)
    return torch.matmul(probs, vv).reshape(-1)


def _datapath(channels: Sequence[np.ndarray], meta_raw: np.ndarray) -> Datapath:
    meta_key = hashlib.sha1(bytes(meta_raw[: 8 + int(meta_raw[:8].view(np.int64)[0])])).hexdigest()
    key = (tuple(ch.__array_interface__["data"][0] for ch in channels), meta_key)
    with _CACHE_LOCK:
        dp = _CACHE.get(key)
        if dp is None:
            if len(_CACHE) > 8:
                _CACHE.clear()
            dp = _CACHE[key] = Datapath(channels, abi.decode_meta(meta_raw))
        return dp


def forget(channels: Sequence[np.ndarray]) -> None:
    """Drop cached views of these channels (the device closed), so their memory can go."""
    ptrs = tuple(ch.__array_interface__["data"][0] for ch in channels)
    with _CACHE_LOCK:
        for key in [k for k in _CACHE if k[0] == ptrs]:
            del _CACHE[key]


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch's intra-op thread count is per process: the first of overlapping runs saves
    it and the last restores it (a plain save/set/restore per run, interleaved across
    sessions, could leave the whole process at one thread)."""
    global _threads_users, _threads_saved
    with _THREADS_LOCK:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def run_kernel(channels: Sequence[np.ndarray], io: np.ndarray, meta: np.ndarray, *,
               n_steps: int, position: int, token: int, kv_capacity: int) -> None:
    """Execute one kernel run (the hardware's entry point); results go into `io`."""
    view = abi.IoView(io)
    magic, kv_base, _, _ = view.header()
    dp = _datapath(channels, meta)
    cfg = dp.cfg
    if (magic != abi.IO_MAGIC or not 1 <= n_steps <= abi.MAX_STEPS
            or not 0 <= token < cfg.vocab_size or kv_capacity % dp.layout.vec):
        view.set_result(abi.STATUS_BAD_ARGS, 0)
        return
    if position + n_steps > min(kv_capacity, cfg.max_positions):
        view.set_result(abi.STATUS_KV_FULL, 0)
        return
    area = KvArea(0, kv_capacity, dp.layout.kv_area_bytes(kv_capacity))
    tokens = view.tokens()
    # One host thread per run: the per-channel ops are small, and on a loaded host
    # intra-op threads cost more in synchronisation than they save (5x on 2 cores).
    with _one_torch_thread(), torch.no_grad():
        for i in range(n_steps):
            logits = step(dp, kv_base, area, token, position + i)
            token = int(torch.argmax(logits))
            tokens[i] = token
    view.logits(cfg.vocab_size)[:] = logits.numpy()
    view.set_result(abi.STATUS_OK, n_steps)


def step(dp: Datapath, kv_base, area: KvArea, token: int, pos: int) -> torch.Tensor:
    """One decoder pass for one token at `pos`; returns logits [vocab] fp32."""
    if dp.cfg.family == "gpt2":
        from fpga_service.device.kernel_models import gpt2_step

        return gpt2_step(dp, kv_base, area, token, pos)
    from fpga_service.device.kernel_models import llama_step

    return llama_step(dp, kv_base, area, token, pos)

