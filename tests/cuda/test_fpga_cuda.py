"""GPU prefill (fp16, layers packed on the GPU) -> the software U55C (fp16 HBM image):
the hand-off the real system makes, checked against single-process fp16 generation.

Run on a GPU machine from the repo root: PYTHONPATH=. python -m pytest -q -m cuda tests/cuda
"""

import pytest
import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.sampling import SamplingParams, sample
from fpga_service.backends import make_backend
from kernels.hbm_layout import HbmLayout
from kernels.reshape import pack_layer
from tests.fpga_helpers import PROMPT, run_session
from tests.helpers import make_tiny_gpt2, make_tiny_llama

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
MAKERS = {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama}
N_NEW = 12


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_gpu_prefill_fpga_emulator_decode_fp16(family, tmp_path):
    # init_std 0.1: logits spread enough that fp16 rounding cannot flip a greedy choice
    path = str(MAKERS[family](tmp_path, init_std=0.1))
    lm = load_model(path, "cuda", "float16")
    want = generate(lm, PROMPT, N_NEW).token_ids
    layout = HbmLayout.for_model(lm.config, "float16")
    cache = KVCache(lm.config, 1, len(PROMPT), lm.device, lm.dtype)
    layers: list[bytes] = []

    def on_layer(layer, k, v):  # packed on the GPU (CuPy RawKernels when present)
        layers.append(pack_layer(k, v, layout).cpu().numpy().tobytes())

    logits = lm.model.prefill(torch.tensor(PROMPT, device="cuda"), cache, on_layer=on_layer)
    torch.cuda.synchronize()
    first = int(sample(logits, SamplingParams(), 0)[0])
    backend = make_backend("fpga-emu", model_spec=path, device="cpu", dtype="float16",
                           channel_bytes=4 * 2**20)
    try:
        assert backend.kv_dtype == "float16"
        assert run_session(backend, first, layers, len(PROMPT), N_NEW) == want
    finally:
        backend.close()
