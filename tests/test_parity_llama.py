"""Our Llama (GQA: 4 query heads, 2 KV heads) against Hugging Face transformers."""

import pytest
import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.loader import load_model
from tests.helpers import engine_logits_trace, hf_logits_trace, hf_model, make_tiny_llama

PROMPT = [1, 17, 42, 99, 3, 250, 7, 7, 130, 64, 5]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return make_tiny_llama(d), make_tiny_llama(d, safe=False)


@pytest.mark.parametrize("fmt", [0, 1], ids=["safetensors", "bin"])
def test_logits_match_hf_prefill_and_20_decode_steps(ckpt, fmt):
    want, fed = hf_logits_trace(hf_model(ckpt[0]), PROMPT, 20)
    lm = load_model(str(ckpt[fmt]))
    assert lm.config.n_kv_heads < lm.config.n_heads
    got = engine_logits_trace(lm, PROMPT, fed)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=f"step {step}")


def test_greedy_tokens_match_hf_generate(ckpt):
    hf, lm = hf_model(ckpt[0]), load_model(str(ckpt[0]))
    for prompt in (PROMPT, [1], list(range(3, 90))):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(lm, prompt, 20).token_ids == ref


def test_tied_embeddings_and_sharded_safetensors(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "a", tie=True, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    lm = load_model(str(sharded))
    assert lm.config.tie_embeddings and lm.fingerprint == load_model(str(src)).fingerprint
    want, fed = hf_logits_trace(hf, PROMPT, 3)
    for g, w in zip(engine_logits_trace(lm, PROMPT, fed), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_batched_decode_rows_at_different_positions(ckpt):
    """Two sequences of different lengths in one decode step: the position mask keeps
    each row to its own tokens, so each row equals its batch-1 run."""
    lm = load_model(str(ckpt[0]))
    prompts = [PROMPT, PROMPT[:4]]
    batched = KVCache(lm.config, 2, 32)
    solo = []
    for row, p in enumerate(prompts):
        lm.model.prefill(torch.tensor(p), batched, row=row)
        c = KVCache(lm.config, 1, 32)
        lm.model.prefill(torch.tensor(p), c)
        solo.append(c)
    tokens = torch.tensor([11, 12])
    for step in range(3):
        pos = torch.tensor([len(p) + step for p in prompts])
        both = lm.model.decode_step(tokens, pos, batched)
        for row in range(2):
            one = lm.model.decode_step(tokens[row : row + 1], pos[row : row + 1], solo[row])
            torch.testing.assert_close(both[row], one[0], atol=1e-5, rtol=0)
        tokens = both.argmax(-1)
