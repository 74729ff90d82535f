"""The CUDA-graph decode path gives the tokens of eager decode (issue 7's fast path)."""

import pytest
import torch

from engine.cuda_graph import GraphDecoder, GraphPool, bucket_len
from engine.generate import decode_tokens
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.sampling import SamplingParams
from tests.helpers import make_tiny_gpt2, make_tiny_llama

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("maker", [make_tiny_gpt2, make_tiny_llama])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_graph_tokens_equal_eager(maker, dtype, tmp_path, monkeypatch):
    # torch ops on both sides (the fused kernels have tests/cuda/test_fused_decode.py):
    # eager decode would otherwise run the pool's fused step
    monkeypatch.setenv("HYBRID_FUSED_DECODE", "0")
    lm = load_model(str(maker(tmp_path, init_std=0.1)), device="cuda", dtype=dtype)
    prompt = torch.tensor([5, 17, 42, 99, 3, 11, 250], device="cuda")
    n, steps = prompt.shape[0], 40
    eager_cache = KVCache(lm.config, 1, n + steps + 1, "cuda", lm.dtype)
    first = int(lm.model.prefill(prompt, eager_cache).argmax())
    want = list(decode_tokens(lm, eager_cache, first, n, steps + 1, SamplingParams(),
                              ignore_eos=True))
    dec = GraphDecoder(lm.model, KVCache(lm.config, 1, bucket_len(n + steps, 256), "cuda", lm.dtype))
    assert int(lm.model.prefill(prompt, dec.cache).argmax()) == first
    assert list(dec.run(first, n, steps, chunk=7)) == want
    # a second request on the same graph (reused decoder, fresh prompt) is right too
    lm.model.prefill(prompt[:3], dec.cache)
    eager2 = KVCache(lm.config, 1, 3 + steps + 1, "cuda", lm.dtype)
    first2 = int(lm.model.prefill(prompt[:3], eager2).argmax())
    want2 = list(decode_tokens(lm, eager2, first2, 3, steps + 1, SamplingParams(), ignore_eos=True))
    assert list(dec.run(first2, 3, steps)) == want2


def test_pool_lends_and_bounds(tmp_path):
    lm = load_model(str(make_tiny_gpt2(tmp_path)), device="cuda", dtype="float16")
    pool = GraphPool(lm.model, lm.config, lm.device, lm.dtype, per_bucket=1)
    a = pool.acquire(10)
    assert a is not None and a.cache.max_len == 64
    assert pool.acquire(20) is None  # the only 64-bucket decoder is lent
    pool.release(a)
    assert pool.acquire(20) is a
