"""Our GPT-2 against Hugging Face transformers on the same tiny random checkpoint."""

import pytest
import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.loader import load_model
from tests.helpers import engine_logits_trace, hf_logits_trace, hf_model, make_tiny_gpt2

PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 130]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    return make_tiny_gpt2(d), make_tiny_gpt2(d, safe=False)


def test_checkpoint_formats(ckpt):
    safe, binary = ckpt
    assert list(safe.glob("*.safetensors")) and not list(safe.glob("*.bin"))
    assert (binary / "pytorch_model.bin").is_file() and not list(binary.glob("*.safetensors"))


@pytest.mark.parametrize("fmt", [0, 1], ids=["safetensors", "bin"])
def test_logits_match_hf_prefill_and_20_decode_steps(ckpt, fmt):
    hf = hf_model(ckpt[0])
    want, fed = hf_logits_trace(hf, PROMPT, 20)
    got = engine_logits_trace(load_model(str(ckpt[fmt])), PROMPT, fed)
    assert len(got) == len(want) == 21
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=f"step {step}")


def test_greedy_tokens_match_hf_generate(ckpt):
    hf, lm = hf_model(ckpt[0]), load_model(str(ckpt[0]))
    for prompt in (PROMPT, [1], list(range(40, 100))):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          pad_token_id=hf.config.eos_token_id)[0, len(prompt):].tolist()
        assert generate(lm, prompt, 20).token_ids == ref


def test_fingerprint_same_for_safetensors_and_bin(ckpt):
    a, b = (load_model(str(p)).fingerprint for p in ckpt)
    assert a == b and len(a) == 32


def test_fingerprint_changes_with_weights(tmp_path):
    a = load_model(str(make_tiny_gpt2(tmp_path / "a", seed=1))).fingerprint
    b = load_model(str(make_tiny_gpt2(tmp_path / "b", seed=2))).fingerprint
    assert a != b


def test_prefill_hook_sees_each_layer_before_the_next(ckpt):
    lm = load_model(str(ckpt[0]))
    cfg = lm.config
    cache = KVCache(cfg, 1, 32)
    seen = []

    def on_layer(layer, k, v):
        assert k.shape == v.shape == (cfg.n_kv_heads, len(PROMPT), cfg.head_dim)
        torch.testing.assert_close(cache.k[layer, 0, :, : len(PROMPT)], k, atol=0, rtol=0)
        torch.testing.assert_close(cache.v[layer, 0, :, : len(PROMPT)], v, atol=0, rtol=0)
        if layer + 1 < cfg.n_layers:  # the next layer has not computed yet
            assert not cache.k[layer + 1].any()
        seen.append(layer)

    lm.model.prefill(torch.tensor(PROMPT), cache, on_layer=on_layer)
    assert seen == list(range(cfg.n_layers))


def test_hub_style_names_load(ckpt, tmp_path):
    """The hub's gpt2 files name tensors without `transformer.` and carry the causal
    mask buffers `h.N.attn.bias`; they must load to the same model."""
    import shutil

    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpt[0] / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    shutil.copy(ckpt[0] / "config.json", tmp_path / "config.json")
    save_file(legacy, str(tmp_path / "model.safetensors"))
    a, b = load_model(str(ckpt[0])), load_model(str(tmp_path))
    ids = torch.tensor(PROMPT)
    la = a.model.prefill(ids, KVCache(a.config, 1, 16))
    lb = b.model.prefill(ids, KVCache(b.config, 1, 16))
    torch.testing.assert_close(la, lb, atol=0, rtol=0)


def test_mismatched_checkpoint_is_a_clear_error(ckpt, tmp_path):
    import json
    import shutil

    from engine.errors import InvalidArgument

    shutil.copy(ckpt[0] / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((ckpt[0] / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgument, match="missing"):
        load_model(str(tmp_path))
