"""The paged decode attention kernels (kernels/paged_attn_cuda.py) on a GPU against
engine.paged_kv.paged_attention_ref (in fp32 on the same inputs): fp16, bf16 and fp32,
GPT-2-medium (H=16, D=64) and Llama (H=32, Hkv=8, D=128) shapes, batches 1..64,
contexts 1..1025, a strided q, and replays of a captured CUDA graph after the tables and
context lengths change in place.

Run on a GPU machine from the repo root: PYTHONPATH=. python -m pytest -q -m cuda tests/cuda
"""

from __future__ import annotations

import pytest
import torch

from engine.config import preset
from engine.paged_kv import NULL_BLOCK, PagedBatch, PagedKVCache, blocks_for, paged_attention_ref
from kernels.paged_attn_cuda import PagedAttention, paged_attention_for

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
pytest.importorskip("cupy")

BS = 16
MAX_CTX = 1025
WIDTH = blocks_for(MAX_CTX, BS)                  # 65 blocks: 1040 positions
SHAPES = {"gpt2-medium": (16, 16, 64), "llama": (32, 8, 128)}
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}
RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}   # ~1 ulp: |out| > 2


def _ctx_lens(b: int, g: torch.Generator) -> list[int]:
    """Random lengths in 1..MAX_CTX, with the edges (1, a block +- 1, the maximum)."""
    edges = [1, MAX_CTX, 16, 17, 15, 1024]
    rand = torch.randint(1, MAX_CTX + 1, (b,), generator=g).tolist()
    return (edges + rand)[:b] if b > 1 else [MAX_CTX]


def _tables(b: int, n_blocks: int, ctx_lens: list[int], g: torch.Generator) -> torch.Tensor:
    """Scattered, non-contiguous block tables (never block 0); unused columns NULL_BLOCK."""
    perm = torch.randperm(n_blocks - 1, generator=g)[: b * WIDTH] + 1
    tables = perm.view(b, WIDTH).to(torch.int32)
    for row, n in enumerate(ctx_lens):
        tables[row, blocks_for(n, BS):] = NULL_BLOCK
    return tables.cuda()


def _inputs(b: int, shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0):
    """(q as a strided view into a [B, 3*H*D] qkv buffer, k_pool, v_pool, PagedBatch)."""
    h, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    n_blocks = b * WIDTH + 1
    k = torch.randn(n_blocks * BS, hkv, d, generator=g).to("cuda", dtype)
    v = torch.randn(n_blocks * BS, hkv, d, generator=g).to("cuda", dtype)
    qkv = torch.randn(b, 3 * h * d, generator=g).to("cuda", dtype)
    q = qkv[:, : h * d].view(b, h, d)
    ctx = _ctx_lens(b, g)
    batch = _batch(_tables(b, n_blocks, ctx, g), ctx)
    return q, k, v, batch


def _batch(tables: torch.Tensor, ctx: list[int]) -> PagedBatch:
    b = tables.shape[0]
    zeros = torch.zeros(b, dtype=torch.long, device="cuda")    # the kernels read neither
    return PagedBatch(zeros, zeros, tables, torch.tensor(ctx, dtype=torch.int32, device="cuda"))


def _reference(q, k, v, batch: PagedBatch) -> torch.Tensor:
    return paged_attention_ref(q.float(), k.float(), v.float(), batch.tables, batch.ctx_lens, BS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model", sorted(SHAPES))
@pytest.mark.parametrize("b", [1, 7, 64])
def test_kernels_match_reference(dtype, model, b):
    shape = SHAPES[model]
    attn = PagedAttention(dtype, "cuda", *shape, max_batch=64, table_width=WIDTH)
    q, k, v, batch = _inputs(b, shape, dtype, seed=b)
    if b > 1:  # (a size-1 dim's stride is not meaningful)
        assert q.stride(0) == 3 * shape[0] * shape[2]          # strided q is taken as is
    got = attn(q, k, v, batch, BS)
    assert attn.fallbacks == 0
    assert got.shape == (b, shape[0] * shape[2]) and got.dtype == dtype
    assert got.data_ptr() == attn.out.data_ptr()               # its own reused buffer
    torch.testing.assert_close(got.float(), _reference(q, k, v, batch), atol=ATOL[dtype],
                               rtol=RTOL[dtype])


@pytest.mark.parametrize("model", sorted(SHAPES))
def test_replay_of_captured_graph_sees_new_tables_and_lengths(model):
    shape, dtype, b = SHAPES[model], torch.float16, 7
    attn = PagedAttention(dtype, "cuda", *shape, max_batch=8, table_width=WIDTH)
    q, k, v, batch = _inputs(b, shape, dtype, seed=11)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                               # warm-up (compiles, caches)
        attn(q, k, v, batch, BS)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn(q, k, v, batch, BS)
    for seed in (12, 13, 14):
        q2, k2, v2, batch2 = _inputs(b, shape, dtype, seed=seed)
        q.copy_(q2)
        k.copy_(k2)
        v.copy_(v2)
        batch.tables.copy_(batch2.tables)
        g = torch.Generator().manual_seed(seed)                 # lengths unlike the captured
        batch.ctx_lens.copy_(torch.randint(1, MAX_CTX + 1, (b,), generator=g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), _reference(q, k, v, batch), atol=2e-3,
                                   rtol=1e-3)
    assert attn.fallbacks == 0


def test_paged_cache_attend_uses_the_kernel():
    """PagedKVCache.attend with the factory's kernel equals attend without one."""
    cfg = preset("gpt2-medium")
    b, n_blocks = 5, 5 * 8 + 1
    fast = PagedKVCache(cfg, n_blocks, "cuda", torch.float16)
    slow = PagedKVCache(cfg, n_blocks, "cuda", torch.float16)
    fast.attention_kernel = paged_attention_for(cfg, torch.float16, "cuda", 8, 8, BS)
    assert isinstance(fast.attention_kernel, PagedAttention)
    g = torch.Generator().manual_seed(3)
    fast.k.copy_(torch.randn(fast.k.shape, generator=g).to("cuda", torch.float16))
    fast.v.copy_(torch.randn(fast.v.shape, generator=g).to("cuda", torch.float16))
    slow.k.copy_(fast.k)  # the same pool contents in both
    slow.v.copy_(fast.v)
    tables = (torch.arange(1, n_blocks, dtype=torch.int32).view(b, 8)).cuda()
    ctx = torch.tensor([1, 17, 64, 100, 128], dtype=torch.int32, device="cuda")
    pos = (ctx - 1).long()
    slots = tables.long().gather(1, (pos // BS)[:, None])[:, 0] * BS + pos % BS
    batch = PagedBatch(pos, slots, tables, ctx)
    h, d = cfg.n_heads, cfg.head_dim
    q = torch.randn(b, h, d, generator=g).to("cuda", torch.float16)
    kn = torch.randn(b, h, d, generator=g).to("cuda", torch.float16)
    vn = torch.randn(b, h, d, generator=g).to("cuda", torch.float16)
    got = fast.attend(q, kn, vn, batch, layer=3)
    want = slow.attend(q, kn, vn, batch, layer=3)
    torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=0)


def test_inputs_it_cannot_take_go_to_the_reference(monkeypatch):
    shape = SHAPES["gpt2-medium"]
    attn = PagedAttention(torch.float16, "cuda", *shape, max_batch=4, table_width=WIDTH)
    q, k, v, batch = _inputs(3, shape, torch.float16)
    got = attn(q.float(), k.float(), v.float(), batch, BS)      # another dtype
    assert attn.fallbacks == 1 and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(q, k, v, batch), atol=1e-4, rtol=0)
    monkeypatch.setenv("HYBRID_PAGED_KERNEL", "0")
    assert paged_attention_for(preset("gpt2-medium"), torch.float16, "cuda", 4, WIDTH) is None
