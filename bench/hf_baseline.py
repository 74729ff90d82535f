"""HF transformers `generate()` latency: the baseline every sweep row is compared to.

A user who does not split prefill and decode would run exactly this. The model gets
random weights of the preset's shape (latency does not depend on the values; EOS is
disabled so every run produces exactly `n_out` tokens).
"""

from __future__ import annotations

import statistics
import time

import torch

from engine.config import ModelConfig


def hf_model(cfg: ModelConfig, device: str, dtype: torch.dtype):
    """An HF model of `cfg`'s shape with random weights."""
    import transformers as tf

    if cfg.family == "gpt2":
        hf_cfg = tf.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.d_model,
            n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
        )
        model = tf.GPT2LMHeadModel(hf_cfg)
    else:
        hf_cfg = tf.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_positions,
            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        )
        model = tf.LlamaForCausalLM(hf_cfg)
    return model.to(device=device, dtype=dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_generate_ms(model, n_in: int, n_out: int, static: bool, device: str,
                   reps: int = 3, warmup: int = 1) -> float:
    """Median wall time in ms of one batch-1 `generate()` of n_in -> n_out tokens."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(n_in)
    ids = torch.randint(0, vocab, (1, n_in), generator=g).to(device)
    kwargs = dict(
        max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False,
        attention_mask=torch.ones_like(ids), pad_token_id=0,
    )
    if static:
        kwargs["cache_implementation"] = "static"
    times = []
    for i in range(warmup + reps):
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        assert out.shape[1] == n_in + n_out, out.shape
    return statistics.median(times)
