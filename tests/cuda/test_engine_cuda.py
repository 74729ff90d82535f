"""Engine on an NVIDIA GPU: fp16 greedy parity with transformers, bf16, CUDA graphs.

Run on a GPU machine from the repo root: PYTHONPATH=. python -m pytest -q -m cuda tests/cuda
"""

import pytest
import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.loader import load_model
from tests.helpers import make_tiny_gpt2, make_tiny_llama

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
PROMPTS = ([5, 17, 42, 99, 3], list(range(40, 100)))
MAKERS = {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def ckpt(request, tmp_path_factory):
    # init_std 0.1: logits spread enough that fp16 rounding cannot flip a greedy choice
    return MAKERS[request.param](tmp_path_factory.mktemp(request.param), init_std=0.1)


def test_fp16_greedy_matches_hf_fp16(ckpt):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).to("cuda", torch.float16).eval()
    lm = load_model(str(ckpt), device="cuda", dtype="float16")
    assert lm.dtype == torch.float16 and lm.device.type == "cuda"
    for prompt in PROMPTS:
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=20, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(lm, prompt, 20).token_ids == ref


def test_bf16_runs_close_to_fp32(ckpt):
    ref = load_model(str(ckpt), device="cpu")
    lm = load_model(str(ckpt), device="cuda", dtype="bfloat16")
    assert lm.fingerprint == ref.fingerprint  # fingerprint covers source bytes, not the cast
    ids = torch.tensor(PROMPTS[1])
    want = ref.model.prefill(ids, KVCache(ref.config, 1, 64))
    got = lm.model.prefill(ids.cuda(), KVCache(lm.config, 1, 64, "cuda", torch.bfloat16))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), want, atol=0.15, rtol=0.05)
    out = generate(lm, PROMPTS[0], 16)
    assert len(out.token_ids) >= 1 and out.timings["total_ms"] > 0


def test_decode_step_captures_in_a_cuda_graph(ckpt):
    """decode_step must be graph-capturable (static shapes, no host sync): the seam
    issue 7 builds on. Replays with new tokens/positions equal eager steps."""
    lm = load_model(str(ckpt), device="cuda", dtype="float16")
    prompt = PROMPTS[0]
    eager_cache = KVCache(lm.config, 1, 64, "cuda", torch.float16)
    graph_cache = KVCache(lm.config, 1, 64, "cuda", torch.float16)
    ids = torch.tensor(prompt, device="cuda")
    first = lm.model.prefill(ids, eager_cache).argmax().view(1)
    lm.model.prefill(ids, graph_cache)
    tokens = first.clone()
    positions = torch.tensor([len(prompt)], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on a side stream, as capture requires
        lm.model.decode_step(tokens, positions, KVCache(lm.config, 1, 64, "cuda", torch.float16))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = lm.model.decode_step(tokens, positions, graph_cache)
    tok_e = first.clone()
    for step in range(8):
        pos = torch.tensor([len(prompt) + step], device="cuda")
        want = lm.model.decode_step(tok_e, pos, eager_cache)
        tokens.copy_(tok_e)
        positions.copy_(pos)
        graph.replay()
        torch.testing.assert_close(static_logits, want, atol=1e-2, rtol=0)
        tok_e = want.argmax(-1)


def test_synthetic_on_cuda_matches_cpu_fingerprint():
    a = load_model("synthetic:tiny-llama:5", device="cuda", dtype="float16")
    b = load_model("synthetic:tiny-llama:5")
    assert a.fingerprint == b.fingerprint
    w = b.model.state_dict()["layers.1.self_attn.k_proj.weight"].half()
    assert torch.equal(a.model.state_dict()["layers.1.self_attn.k_proj.weight"].cpu(), w)
    assert generate(a, [1, 2, 3], 8).token_ids  # runs end to end


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cli_generate_on_cuda(dtype):
    import json

    from click.testing import CliRunner

    from client.cli import main

    r = CliRunner().invoke(main, ["generate", "hello", "--local", "--model", "synthetic:tiny-llama",
                                  "--device", "cuda", "--dtype", dtype, "--max-new-tokens", "8",
                                  "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"].startswith("cuda") and out["dtype"] == dtype
    assert 1 <= len(out["token_ids"]) <= 8
