"""One decode step per model family, on the emulated datapath (fpga_service.device.kernel).

Mirrors engine/gpt2.py and engine/llama.py op for op (same torch functions, same order),
so that with an fp32 HBM image the greedy tokens equal single-process generation; the
difference is only where the numbers come from: every weight and every K, V are read
out of the channel bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.llama import apply_rope, rope_cos_sin
from fpga_service.device.kernel import Datapath, attend
from kernels.hbm_layout import KvArea


def _kv(dp: Datapath, kv_base, area: KvArea, layer: int, pos: int, k, v):
    dp.write_kv(kv_base, area, layer, pos, k, v)
    return dp.read_kv(kv_base, area, layer, pos + 1)


def gpt2_step(dp: Datapath, kv_base, area: KvArea, token: int, pos: int) -> torch.Tensor:
    cfg = dp.cfg
    d = (cfg.d_model,)
    x = dp.embed_row("tok_emb", token) + dp.embed_row("pos_emb", pos)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = F.layer_norm(x, d, dp.vec(p + "ln1.weight"), dp.vec(p + "ln1.bias"), cfg.norm_eps)
        q = dp.linear(p + "attn.q.weight", h, p + "attn.q.bias")
        k = dp.linear(p + "attn.k.weight", h, p + "attn.k.bias")
        v = dp.linear(p + "attn.v.weight", h, p + "attn.v.bias")
        kk, vv = _kv(dp, kv_base, area, i, pos, k, v)
        x = x + dp.linear(p + "attn.o.weight", attend(cfg, q, kk, vv), p + "attn.o.bias")
        h = F.layer_norm(x, d, dp.vec(p + "ln2.weight"), dp.vec(p + "ln2.bias"), cfg.norm_eps)
        up = F.gelu(dp.linear(p + "mlp.up.weight", h, p + "mlp.up.bias"), approximate="tanh")
        x = x + dp.linear(p + "mlp.down.weight", up, p + "mlp.down.bias")
    h = F.layer_norm(x, d, dp.vec("ln_f.weight"), dp.vec("ln_f.bias"), cfg.norm_eps)
    return dp.linear("tok_emb" if cfg.tie_embeddings else "lm_head.weight", h)


def _rms(dp: Datapath, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return dp.vec(name) * h


def llama_step(dp: Datapath, kv_base, area: KvArea, token: int, pos: int) -> torch.Tensor:
    cfg = dp.cfg
    hd = cfg.head_dim
    cos, sin = rope_cos_sin(torch.tensor([pos]), hd, cfg.rope_theta, torch.float32)  # [1, D]
    x = dp.embed_row("tok_emb", token)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = _rms(dp, p + "attn_norm.weight", x, cfg.norm_eps)
        q = apply_rope(dp.linear(p + "attn.q.weight", h).view(cfg.n_heads, hd), cos, sin)
        k = apply_rope(dp.linear(p + "attn.k.weight", h).view(cfg.n_kv_heads, hd), cos, sin)
        v = dp.linear(p + "attn.v.weight", h)
        kk, vv = _kv(dp, kv_base, area, i, pos, k.reshape(-1), v)
        x = x + dp.linear(p + "attn.o.weight", attend(cfg, q.reshape(-1), kk, vv))
        h = _rms(dp, p + "mlp_norm.weight", x, cfg.norm_eps)
        g = F.silu(dp.linear(p + "mlp.gate.weight", h)) * dp.linear(p + "mlp.up.weight", h)
        x = x + dp.linear(p + "mlp.down.weight", g)
    h = _rms(dp, "norm.weight", x, cfg.norm_eps)
    return dp.linear("tok_emb" if cfg.tie_embeddings else "lm_head.weight", h)
