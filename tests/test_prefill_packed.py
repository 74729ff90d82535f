"""prefill_packed: several prompts in one forward (packed variable length) give each
prompt what its own prefill gives; one prompt is bit-identical to prefill (CPU fp32)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidArgument
from engine.kv_cache import KVCache
from engine.loader import load_model

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7], list(range(10, 47)), [2, 7, 1, 8, 2, 8]]


@pytest.fixture(scope="module", params=["synthetic:tiny-gpt2", "synthetic:tiny-llama"])
def lm(request):
    return load_model(request.param, "cpu", "float32")


def _single(lm, ids: list[int]):
    """prefill() of one prompt: logits [vocab] and its cache (k, v per layer)."""
    cache = KVCache(lm.config, 1, len(ids), lm.device, lm.dtype)
    logits = lm.model.prefill(torch.tensor(ids), cache)
    return logits, cache


def _tensors(prompts: list[list[int]]) -> list[torch.Tensor]:
    return [torch.tensor(p) for p in prompts]


@pytest.mark.parametrize("ids", PROMPTS, ids=lambda p: f"T{len(p)}")
def test_one_prompt_is_bit_identical_to_prefill(lm, ids):
    want, _ = _single(lm, ids)
    got = lm.model.prefill_packed(_tensors([ids]))
    assert got.shape == (1, lm.config.vocab_size) and got.dtype == torch.float32
    assert torch.equal(got[0], want)


def test_several_prompts_match_their_own_prefill(lm):
    got = lm.model.prefill_packed(_tensors(PROMPTS))
    assert got.shape == (len(PROMPTS), lm.config.vocab_size)
    for i, ids in enumerate(PROMPTS):
        want, _ = _single(lm, ids)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
        assert int(got[i].argmax()) == int(want.argmax())


def test_on_layer_gets_each_prompts_kv_once_per_layer(lm):
    c = lm.config
    seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer(layer, i, k, v):
        assert (layer, i) not in seen
        seen[(layer, i)] = (k.clone(), v.clone())

    lm.model.prefill_packed(_tensors(PROMPTS), on_layer=on_layer)
    assert sorted(seen) == [(layer, i) for layer in range(c.n_layers) for i in range(len(PROMPTS))]
    for i, ids in enumerate(PROMPTS):
        _, cache = _single(lm, ids)
        for layer in range(c.n_layers):
            k, v = seen[(layer, i)]
            assert k.shape == v.shape == (c.n_kv_heads, len(ids), c.head_dim)
            torch.testing.assert_close(k, cache.k[layer, 0, :, :len(ids)], atol=1e-5, rtol=0)
            torch.testing.assert_close(v, cache.v[layer, 0, :, :len(ids)], atol=1e-5, rtol=0)


def test_one_prompt_hook_tensors_equal_prefills(lm):
    """The single-prompt hook sees exactly what prefill's on_layer(layer, k, v) sees."""
    ids = PROMPTS[2]
    old: list[tuple[torch.Tensor, torch.Tensor]] = []
    new: list[tuple[torch.Tensor, torch.Tensor]] = []
    cache = KVCache(lm.config, 1, len(ids), lm.device, lm.dtype)
    lm.model.prefill(torch.tensor(ids), cache, on_layer=lambda _l, k, v: old.append((k, v)))
    lm.model.prefill_packed(_tensors([ids]), on_layer=lambda _l, _i, k, v: new.append((k, v)))
    assert len(old) == len(new) == lm.config.n_layers
    for (k0, v0), (k1, v1) in zip(old, new, strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_empty_batch_is_refused(lm):
    with pytest.raises(InvalidArgument):
        lm.model.prefill_packed([])
