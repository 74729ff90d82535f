"""The fused decode kernels (kernels/decode_cuda.py via engine/fused_decode.py) against
the torch decode step: same cache writes and logits within fp16/bf16 rounding, and the
same greedy tokens through the CUDA-graph path on a model with peaked logits."""

import pytest
import torch

from engine.cuda_graph import GraphDecoder, GraphPool, bucket_len
from engine.fused_decode import FusedGPT2Step, fused_step_for
from engine.kv_cache import KVCache
from engine.loader import load_model
from tests.helpers import make_tiny_gpt2

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
pytest.importorskip("cupy")


def _filled(lm, n_prompt: int, length: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, lm.config.vocab_size, (n_prompt,), device="cuda", generator=g)
    cache = KVCache(lm.config, 1, length, "cuda", lm.dtype)
    lm.model.prefill(ids, cache)
    return cache


def _clone(lm, cache: KVCache) -> KVCache:
    other = KVCache(lm.config, 1, cache.max_len, cache.device, cache.dtype)
    other.k.copy_(cache.k)
    other.v.copy_(cache.v)
    return other


@pytest.mark.parametrize("model,dtype,n", [("synthetic:gpt2-medium", "float16", 300),
                                           ("synthetic:gpt2-medium", "float16", 1),
                                           ("synthetic:gpt2-medium", "float16", 1018),
                                           ("synthetic:gpt2", "bfloat16", 77)])
def test_fused_step_matches_torch_step(model, dtype, n):
    lm = load_model(model, "cuda", dtype)
    step = fused_step_for(lm.model)
    assert isinstance(step, FusedGPT2Step)
    ref = _filled(lm, n, 1024 if n > 500 else 512)
    fused = _clone(lm, ref)
    tol = 2e-2 if dtype == "float16" else 1e-1   # a few ulps of the logits' magnitude
    tok = torch.tensor([123], device="cuda")
    for i in range(6):                             # teacher-forced: same token each path
        pos = torch.tensor([n + i], device="cuda")
        want = lm.model.decode_step(tok, pos, ref)
        got = step(tok, pos, fused).clone()
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.equal(step.greedy(), got.argmax(-1))      # the fused argmax
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= tol * max(1.0, scale), i
        # this token's K/V landed at pos in every layer (and nothing else moved)
        assert torch.allclose(fused.k[:, 0, :, n + i].float(), ref.k[:, 0, :, n + i].float(),
                              atol=tol, rtol=tol)
        assert torch.equal(fused.k[:, 0, :, :n], ref.k[:, 0, :, :n])
        assert torch.equal(fused.v[:, 0, :, n + i + 1:], ref.v[:, 0, :, n + i + 1:])
        tok = torch.tensor([int(want.argmax())], device="cuda")


def test_graph_with_fused_step_gives_eager_tokens(tmp_path):
    lm = load_model(str(make_tiny_gpt2(tmp_path, init_std=0.1)), device="cuda", dtype="float16")
    prompt = torch.tensor([5, 17, 42, 99, 3, 11, 250], device="cuda")
    n, steps, length = prompt.shape[0], 60, bucket_len(67, 256)
    plain = GraphDecoder(lm.model, KVCache(lm.config, 1, length, "cuda", lm.dtype))
    fused = GraphDecoder(lm.model, KVCache(lm.config, 1, length, "cuda", lm.dtype),
                         step_fn=fused_step_for(lm.model))
    first = int(lm.model.prefill(prompt, plain.cache).argmax())
    lm.model.prefill(prompt, fused.cache)
    assert list(fused.run(first, n, steps)) == list(plain.run(first, n, steps))


def test_pool_uses_fused_step_unless_turned_off(tmp_path, monkeypatch):
    lm = load_model(str(make_tiny_gpt2(tmp_path)), device="cuda", dtype="float16")
    assert GraphPool(lm.model, lm.config, lm.device, lm.dtype).fused is not None
    monkeypatch.setenv("HYBRID_FUSED_DECODE", "0")
    assert GraphPool(lm.model, lm.config, lm.device, lm.dtype).fused is None
    lm32 = load_model(str(make_tiny_gpt2(tmp_path)), device="cuda", dtype="float32")
    monkeypatch.delenv("HYBRID_FUSED_DECODE")
    assert fused_step_for(lm32.model) is None        # fp32 stays on torch ops

