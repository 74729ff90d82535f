"""`fpga-csim`: the HLS kernel (kernels/hls/hbm_decode.cpp), compiled by g++, driven by the
XRT host code over the same 32 channel images as the software U55C (`fpga-emu`).

Each (model, image dtype) is compiled once (kernels.hls_build caches the library by source
hash); the four builds of this module run two at a time in a session fixture."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.errors import InvalidArgument, ResourceExhausted
from engine.loader import load_model
from fpga_service.backends import make_backend
from fpga_service.backends.base import DecodeSpec
from fpga_service.device import abi
from kernels.hbm_layout import HbmLayout
from kernels.hls_build import build_csim
from tests.fpga_helpers import PROMPT, prefill_packed, reference, run_session
from tests.helpers import make_tiny_gpt2, make_tiny_llama

MiB = 2**20
N_NEW = 12
# prompts of 9, 31 and 40 tokens: decode crosses the 32-token tile boundary from both sides
PROMPTS = [PROMPT, [(7 * i + 3) % 290 for i in range(31)], [(11 * i + 5) % 290 for i in range(40)]]
MODELS = [("gpt2", "float32"), ("gpt2", "float16"), ("llama", "float32"), ("llama", "float16")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("csim")
    # init_std 0.2 spreads the logits: varied greedy tokens with clear top-2 margins
    paths = {"gpt2": str(make_tiny_gpt2(root, init_std=0.2)),
             "llama": str(make_tiny_llama(root, init_std=0.2))}  # GQA: 4 query, 2 KV heads
    lms = {k: load_model(p) for k, p in paths.items()}
    with ThreadPoolExecutor(2) as pool:  # compile the four kernels two at a time
        list(pool.map(lambda m: build_csim(lms[m[0]].config, m[1]), MODELS))
    return paths, lms


def _backend(name: str, path: str, hbm_dtype: str):
    return make_backend(name, model_spec=path, device="cpu", dtype="float32",
                        hbm_dtype=hbm_dtype, channel_bytes=4 * MiB)


@pytest.fixture(scope="module", params=MODELS, ids=[f"{m}-{d}" for m, d in MODELS])
def pair(request, ckpts):
    family, dtype = request.param
    path, lm = ckpts[0][family], ckpts[1][family]
    csim, emu = _backend("fpga-csim", path, dtype), _backend("fpga-emu", path, dtype)
    yield lm, dtype, csim, emu
    csim.close()
    emu.close()


def test_csim_tokens_equal_emulator_and_engine(pair):
    lm, dtype, csim, emu = pair
    assert csim.device.name == "fpga-csim" and csim.kv_dtype == dtype
    layout = HbmLayout.for_model(lm.config, dtype)
    for prompt in PROMPTS:
        first, layers = prefill_packed(lm, prompt, layout)
        got = run_session(csim, first, layers, len(prompt), N_NEW)
        assert got == run_session(emu, first, layers, len(prompt), N_NEW), len(prompt)
        if dtype == "float32":  # fp32 image: the engine's own tokens
            assert got == reference(lm, prompt, N_NEW), len(prompt)
        assert len(set(got)) > 3  # not a degenerate repeat


def _one_run(backend, lm, prompt, dtype, n_steps):
    first, layers = prefill_packed(lm, prompt, HbmLayout.for_model(lm.config, dtype))
    session = backend.open_session(DecodeSpec("multi", len(prompt), n_steps + 1))
    try:
        for layer, data in enumerate(layers):
            session.ingest_layer(layer, memoryview(data))
        return backend.device.run_decode(session.kv, first, len(prompt), n_steps=n_steps)
    finally:
        session.close()


def test_multi_step_run_and_logits_match_the_emulator(pair):
    """One kernel run of 30 steps (the kernel feeds itself its greedy picks, across a
    tile boundary): same tokens, and the last step's logits agree to rounding."""
    lm, dtype, csim, emu = pair
    a = _one_run(csim, lm, PROMPTS[1], dtype, 30)
    b = _one_run(emu, lm, PROMPTS[1], dtype, 30)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), rtol=1e-4, atol=1e-4)
    assert a.modeled_ms > 0


def _launch(dev, kv, *, magic=abi.IO_MAGIC, n_steps=1, position=0, token=1, capacity=None):
    header = bytearray(abi.pack_io_header(list(kv.offsets)))
    header[:8] = magic.to_bytes(8, "little")
    scalars = {abi.ARG_N_STEPS: n_steps, abi.ARG_POSITION: position, abi.ARG_TOKEN: token,
               abi.ARG_KV_CAPACITY: kv.capacity_tokens if capacity is None else capacity}
    _, _, status, done = abi.IoView(dev._launch(bytes(header), scalars, 10.0)).header()
    return status, done


def test_status_codes(ckpts):
    lm = ckpts[1]["gpt2"]
    backend = _backend("fpga-csim", ckpts[0]["gpt2"], "float32")
    dev = backend.device
    kv = dev.alloc_kv(64, "status")
    try:
        vocab = lm.config.vocab_size
        assert _launch(dev, kv) == (abi.STATUS_OK, 1)
        bad = [dict(magic=0x1234), dict(n_steps=0), dict(n_steps=abi.MAX_STEPS + 1),
               dict(token=vocab), dict(capacity=48)]
        for kw in bad:
            assert _launch(dev, kv, **kw) == (abi.STATUS_BAD_ARGS, 0), kw
        # KV area full: position + n_steps beyond the area, or beyond max positions
        assert _launch(dev, kv, position=60, n_steps=5) == (abi.STATUS_KV_FULL, 0)
        assert _launch(dev, kv, position=63, n_steps=1) == (abi.STATUS_OK, 1)
        big = lm.config.max_positions + 32
        assert _launch(dev, kv, position=lm.config.max_positions - 1, n_steps=2,
                       capacity=big) == (abi.STATUS_KV_FULL, 0)
        with pytest.raises(ResourceExhausted):
            dev.run_decode(kv, 1, 64, n_steps=1)
        # a meta buffer for another model: the bitstream refuses to run
        good = bytes(dev._meta._dev[:64])
        dev._meta._dev[20] ^= 1
        try:
            assert _launch(dev, kv) == (abi.STATUS_BAD_ARGS, 0)
            with pytest.raises(InvalidArgument, match="status -1"):
                dev.run_decode(kv, 1, 0)
        finally:
            dev._meta._dev[:64] = np.frombuffer(good, np.uint8)
        assert _launch(dev, kv) == (abi.STATUS_OK, 1)
    finally:
        kv.free()
        backend.close()


@pytest.mark.parametrize("what", ["kv", "weights"])
def test_corrupting_one_channel_changes_the_tokens(ckpts, what):
    lm = ckpts[1]["llama"]
    backend = _backend("fpga-csim", ckpts[0]["llama"], "float32")
    try:
        layout = HbmLayout.for_model(lm.config, "float32")
        first, layers = prefill_packed(lm, PROMPTS[2], layout)
        want = run_session(backend, first, layers, len(PROMPTS[2]), N_NEW)
        dev = backend.device
        session = backend.open_session(DecodeSpec("bad", len(PROMPTS[2]), N_NEW))
        try:
            for layer, data in enumerate(layers):
                session.ingest_layer(layer, memoryview(data))
            if what == "kv":  # channel 0 holds KV lane 0: its K and V tiles
                kv = session.kv
                dev.write_synced(0, kv.offsets[0], np.full(kv.sizes[0] // 4, 3.0, np.float32).tobytes())
            else:  # channel 0's rows of layer 0's q projection, negated
                e = layout.weight_table(lm.config)["layers.0.attn.q.weight"]
                off, n = dev.weights.offsets[0] + e.offset, e.channel_bytes(0)
                w = np.frombuffer(dev.read(0, off, n), np.float32)
                dev.write_synced(0, off, (w * -4.0).tobytes())
            got = [first, *session.decode(first)]
        finally:
            session.close()
        assert got != want
    finally:
        backend.close()


def test_csim_backend_info_and_no_host_weights(ckpts):
    import torch

    backend = _backend("fpga-csim", ckpts[0]["llama"], "float16")
    try:
        assert not any(isinstance(v, torch.nn.Module | torch.Tensor) for v in vars(backend).values())
        info = backend.info()
        assert info["device"] == "fpga-csim" and info["hbm_dtype"] == "float16"
        assert os.path.isfile(backend.device.xclbin)  # the g++ build stands in for the xclbin
    finally:
        backend.close()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_csim_through_both_services_equals_local(ckpts, family, tmp_path):
    from client.remote import run_remote
    from engine.sampling import SamplingParams
    from tests.test_fpga_services import Pair

    path, lm = ckpts[0][family], ckpts[1][family]
    want = reference(lm, PROMPT, 16)
    with Pair(path, "fpga-csim", {"HYBRID_HBM_DTYPE": "float32"}, str(tmp_path)) as pair:
        res = run_remote(prompt_ids=PROMPT, max_new_tokens=16, params=SamplingParams(),
                         prefill=pair.prefill, decode=pair.decode, kv_transport="shm",
                         timeout_s=60)
        assert res.token_ids == want
        assert res.timings.get("modeled_device_ms_per_token", 0) > 0


def test_rows_that_straddle_port_words():
    """synthetic:tiny-llama has d_ff 176: in an fp16 image a row of mlp.down is 5.5 port
    words, so half the MAC words hold the end of one row and the start of the next."""
    spec = "synthetic:tiny-llama"
    lm = load_model(spec)
    assert (lm.config.d_ff * 2) % 64 and lm.config.n_kv_heads < lm.config.n_heads
    csim, emu = _backend("fpga-csim", spec, "float16"), _backend("fpga-emu", spec, "float16")
    try:
        first, layers = prefill_packed(lm, PROMPT, HbmLayout.for_model(lm.config, "float16"))
        got = run_session(csim, first, layers, len(PROMPT), N_NEW)
        assert got == run_session(emu, first, layers, len(PROMPT), N_NEW)
        a = _one_run(csim, lm, PROMPT, "float16", 3)
        b = _one_run(emu, lm, PROMPT, "float16", 3)
        np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), rtol=1e-4, atol=1e-4)
    finally:
        csim.close()
        emu.close()


def test_connectivity_config_matches_the_kernel_ports():
    """kernels/hls/hbm_decode.cfg (v++ --link) maps m_axi_gmem{c} -> HBM[c] for exactly the
    kernel's 32 channel bundles, plus its io and meta bundles."""
    import re

    from kernels.hls_build import HLS_DIR

    src = (HLS_DIR / "hbm_decode.cpp").read_text()
    cfg = (HLS_DIR / "hbm_decode.cfg").read_text()
    bundles = re.findall(r"#pragma HLS INTERFACE m_axi port = (\w+) offset = slave bundle = (\w+)", src)
    assert [p for p, _ in bundles[:32]] == [f"gmem{c}" for c in range(32)]
    sp = dict(re.findall(r"^sp=hbm_decode_1\.m_axi_(\w+):(\S+)$", cfg, re.M))
    assert set(sp) == {b for _, b in bundles}
    assert all(sp[f"gmem{c}"] == f"HBM[{c}]" for c in range(32))
    assert sp["gmem_io"].startswith("HBM[") and sp["gmem_meta"].startswith("HBM[")
    # the host's signature: 32 channel ports, io, meta, 4 int scalars (abi.N_ARGS = 38)
    sig = re.search(r'extern "C" void hbm_decode\(HBM_GMEM_PARAMS,([^)]*)\)', src).group(1)
    assert len(sig.split(",")) + 32 == abi.N_ARGS


# KV widths that are not a multiple of 32 (docs/hbm-layout.md, "Pad lanes"): GPT-2 with 3
# heads of 16 (kv_dim 48: lane 1 half pad) and a GQA Llama with 6 query / 3 KV heads of 20
# (kv_dim 60, heads straddle lanes and channels, 4 pad elements).
ODD = {"gpt2": dict(n_embd=48, n_head=3), "llama": dict(hidden=120, n_heads=6, n_kv_heads=3)}


@pytest.fixture(scope="module")
def odd_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    paths = {"gpt2": str(make_tiny_gpt2(root, init_std=0.2, **ODD["gpt2"])),
             "llama": str(make_tiny_llama(root, init_std=0.2, **ODD["llama"]))}
    lms = {k: load_model(p) for k, p in paths.items()}
    assert [lm.config.kv_dim for lm in lms.values()] == [48, 60]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda m: build_csim(lms[m[0]].config, m[1]), MODELS))
    return paths, lms


@pytest.mark.parametrize("family,dtype", MODELS, ids=[f"{m}-{d}" for m, d in MODELS])
def test_odd_kv_width_csim_equals_emulator_and_engine(odd_ckpts, family, dtype):
    path, lm = odd_ckpts[0][family], odd_ckpts[1][family]
    layout = HbmLayout.for_model(lm.config, dtype)
    assert layout.kv_pad > 0
    csim, emu = _backend("fpga-csim", path, dtype), _backend("fpga-emu", path, dtype)
    try:
        for prompt in (PROMPT, PROMPTS[2]):
            first, layers = prefill_packed(lm, prompt, layout)
            got = run_session(csim, first, layers, len(prompt), N_NEW)
            assert got == run_session(emu, first, layers, len(prompt), N_NEW), len(prompt)
            if dtype == "float32":
                assert got == reference(lm, prompt, N_NEW), len(prompt)
            assert len(set(got)) > 3
        a = _one_run(csim, lm, PROMPTS[1], dtype, 30)   # one run across a tile boundary
        b = _one_run(emu, lm, PROMPTS[1], dtype, 30)
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), rtol=1e-4, atol=1e-4)
        # the appended tokens' pad elements stay zero in HBM (ingest and kernel alike)
        session = csim.open_session(DecodeSpec("pad", len(PROMPT), 40))
        try:
            first, layers = prefill_packed(lm, PROMPT, layout)
            for layer, data in enumerate(layers):
                session.ingest_layer(layer, memoryview(data))
            kv, dev = session.kv, csim.device
            dev.run_decode(kv, first, len(PROMPT), n_steps=39)   # appends tokens 9..47
            c = layout.channel_of_lane(layout.n_lanes - 1)      # the channel of the padded lane
            _, lanes = layout.lane_range(c)
            nb = kv.capacity_tokens // 32
            for half in (0, 1):     # layer 0: K tiles [token][dim], V tiles [dim][token]
                off = kv.offsets[c] + half * layout.region_half_bytes(kv.capacity_tokens)
                raw = np.frombuffer(dev.read(c, off, nb * lanes * layout.tile_bytes), dtype)
                tiles = raw.reshape(nb, lanes, 32, 32)[:, -1]
                if half:
                    tiles = tiles.transpose(0, 2, 1)
                pad_from = layout.kv_dim - 32 * (layout.n_lanes - 1)
                live = tiles.reshape(nb * 32, 32)[: len(PROMPT) + 39]
                assert (live[:, pad_from:] == 0).all() and (live[:, :pad_from] != 0).all()
        finally:
            session.close()
    finally:
        csim.close()
        emu.close()


def test_odd_kv_width_fpga_emu_through_both_services(odd_ckpts, tmp_path):
    from client.remote import run_remote
    from engine.sampling import SamplingParams
    from tests.test_fpga_services import Pair

    path, lm = odd_ckpts[0]["gpt2"], odd_ckpts[1]["gpt2"]
    want = reference(lm, PROMPT, 16)
    with Pair(path, "fpga-emu", {"HYBRID_HBM_DTYPE": "float32"}, str(tmp_path)) as pair:
        res = run_remote(prompt_ids=PROMPT, max_new_tokens=16, params=SamplingParams(),
                         prefill=pair.prefill, decode=pair.decode, kv_transport="shm",
                         timeout_s=60)
        assert res.token_ids == want
