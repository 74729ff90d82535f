"""Shared test fixtures: tiny random Hugging Face checkpoints (saved with transformers'
save_pretrained) that other packages' tests reuse.

    from tests.helpers import make_tiny_gpt2, make_tiny_llama
    path = make_tiny_gpt2(tmp_path)          # -> directory with config.json + weights
"""

from __future__ import annotations

from pathlib import Path

import torch


def _save(model, path: Path, safe: bool) -> Path:
    """save_pretrained; for safe=False replace the weights with a pytorch_model.bin
    (transformers 5 always writes safetensors), the layout of older hub checkpoints."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    if not safe:
        for f in path.glob("*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def make_tiny_gpt2(tmpdir, *, safe: bool = True, seed: int = 0, vocab: int = 300,
                   n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 128,
                   init_std: float = 0.02) -> Path:
    """A random GPT-2 (2 layers, d 64) saved to `tmpdir/tiny-gpt2[-bin]`; eos id = vocab-1.
    A larger init_std spreads the logits (bigger top-2 margins), for fp16 token tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                     initializer_range=init_std)
    model = GPT2LMHeadModel(cfg).eval()
    _bump_biases(model)
    return _save(model, Path(tmpdir) / ("tiny-gpt2" if safe else "tiny-gpt2-bin"), safe)


def make_tiny_llama(tmpdir, *, safe: bool = True, seed: int = 0, vocab: int = 300,
                    n_layers: int = 2, hidden: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                    max_positions: int = 128, tie: bool = False, init_std: float = 0.02) -> Path:
    """A random Llama with grouped-query attention (4 query heads share 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=n_kv_heads, max_position_embeddings=max_positions,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, initializer_range=init_std)
    model = LlamaForCausalLM(cfg).eval()
    _bump_norms(model)
    name = "tiny-llama" if safe else "tiny-llama-bin"
    return _save(model, Path(tmpdir) / name, safe)


def _bump_biases(model) -> None:
    """HF initialises biases to 0 and norm gains to 1, which would hide a wrong mapping
    of those tensors; give them random values so parity tests see every tensor."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def _bump_norms(model) -> None:
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + torch.randn_like(p) * 0.1)


def hf_model(path):
    """Load a saved tiny checkpoint back with transformers (fp32, eager reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).float().eval()


def hf_logits_trace(hf, prompt: list[int], n_steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """HF's last-position logits for the prompt, then for `n_steps` greedy continuations
    (full forward over the grown sequence each time: no cache on the reference side).
    Returns (logits per step [vocab] fp32, greedy tokens)."""
    out, fed = [], []
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n_steps + 1):
            logits = hf(torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            out.append(logits)
            fed.append(int(logits.argmax()))
            seq.append(fed[-1])
    return out, fed


def engine_logits_trace(lm, prompt: list[int], fed: list[int]) -> list[torch.Tensor]:
    """Our logits for the prompt, then for each token of `fed` decoded in turn."""
    from engine.kv_cache import KVCache

    cache = KVCache(lm.config, 1, len(prompt) + len(fed) + 1, lm.device, lm.dtype)
    out = [lm.model.prefill(torch.tensor(prompt, device=lm.device), cache)]
    for i, tok in enumerate(fed[:-1]):
        t = torch.tensor([tok], device=lm.device)
        p = torch.tensor([len(prompt) + i], device=lm.device)
        out.append(lm.model.decode_step(t, p, cache)[0])
    return out


def make_tokenizer_json(model_dir, vocab_size: int = 300) -> Path:
    """Train a tiny byte-level BPE (GPT-2 style) and save it as model_dir/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["hello world, the quick brown fox jumps over the lazy dog",
              "héllo wörld: naïve café, 漢字 and emoji 🙂 too"] * 20
    tok.train_from_iterator(corpus, trainer)
    path = Path(model_dir) / "tokenizer.json"
    tok.save(str(path))
    return path


def hf_twin(lm):
    """A transformers model holding exactly `lm`'s weights (a LoadedModel, e.g. a
    synthetic one), on its device and dtype: the baseline for parity and benchmarks."""
    import transformers as tf

    from engine.weights import ours_to_hf

    c = lm.config
    if c.family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.d_model,
                            n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
                            layer_norm_epsilon=c.norm_eps, bos_token_id=c.bos_token_id,
                            eos_token_id=c.eos_token_id)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                             num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                             num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_positions,
                             rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                             tie_word_embeddings=c.tie_embeddings, bos_token_id=c.bos_token_id,
                             eos_token_id=c.eos_token_id)
        model = tf.LlamaForCausalLM(cfg)
    model.load_state_dict(ours_to_hf(c, lm.model.state_dict()), strict=True)
    return model.to(lm.device, lm.dtype).eval()
