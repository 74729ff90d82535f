"""`fpga-xrt` end to end against the fake pyxrt: same tokens as single-process generation,
runs through pyxrt.run + set_arg with a bounded wait, clear errors on bad run states."""

from __future__ import annotations

import pytest

from engine.errors import DeadlineExceeded, HybridError, Unavailable
from engine.loader import load_model
from fpga_service.backends import make_backend
from fpga_service.backends.base import DecodeSpec
from kernels.hbm_layout import HbmLayout
from tests.fpga_helpers import PROMPT, prefill_packed, reference, run_session, use_fake_pyxrt
from tests.helpers import make_tiny_gpt2, make_tiny_llama

MiB = 2**20
N_NEW = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("xrt")
    xclbin = root / "hbm_decode.xclbin"
    xclbin.write_bytes(b"fake bitstream")
    return str(make_tiny_gpt2(root)), str(make_tiny_llama(root)), str(xclbin)


def _backend(spec: str, xclbin: str, hbm_dtype: str = "float32"):
    return make_backend("fpga-xrt", model_spec=spec, device="cpu", dtype="float32",
                        hbm_dtype=hbm_dtype, xclbin=xclbin, device_index="0000:3b:00.1",
                        channel_bytes=2 * MiB)


@pytest.mark.parametrize("which", [0, 1], ids=["gpt2", "llama"])
def test_xrt_tokens_equal_single_process(monkeypatch, checkpoints, which):
    pyxrt = use_fake_pyxrt(monkeypatch)
    spec, xclbin = checkpoints[which], checkpoints[2]
    lm = load_model(spec)
    backend = _backend(spec, xclbin)
    try:
        before = backend.device.used_bytes()
        first, layers = prefill_packed(lm, PROMPT, HbmLayout.for_model(lm.config, "float32"))
        assert run_session(backend, first, layers, len(PROMPT), N_NEW) == \
            reference(lm, PROMPT, N_NEW)
        assert backend.device.used_bytes() == before
    finally:
        backend.close()
    calls = pyxrt.CALLS
    assert "kernel.__call__" not in calls  # never the call form (drops floats, big ints)
    assert "start" in calls and all(int(c.split(":")[1]) > 0 for c in calls if c.startswith("wait:"))
    assert {f"set_arg:{i}" for i in range(38)} <= set(calls)


def test_xrt_odd_kv_width_equals_single_process(monkeypatch, checkpoints, tmp_path):
    """GPT-2 with 3 heads of 16 (kv_dim 48, a zero-padded lane) through the XRT host code."""
    use_fake_pyxrt(monkeypatch)
    spec = str(make_tiny_gpt2(tmp_path, n_embd=48, n_head=3, init_std=0.2))
    lm = load_model(spec)
    assert HbmLayout.for_model(lm.config, "float32").kv_pad == 16
    backend = _backend(spec, checkpoints[2])
    try:
        first, layers = prefill_packed(lm, PROMPT, HbmLayout.for_model(lm.config, "float32"))
        assert run_session(backend, first, layers, len(PROMPT), N_NEW) == \
            reference(lm, PROMPT, N_NEW)
    finally:
        backend.close()


def test_xrt_fp16_image_runs_and_reports_modeled_time(monkeypatch, checkpoints):
    use_fake_pyxrt(monkeypatch)
    spec, xclbin = checkpoints[0], checkpoints[2]
    lm = load_model(spec)
    backend = _backend(spec, xclbin, "float16")
    try:
        assert backend.kv_dtype == "float16"
        first, layers = prefill_packed(lm, PROMPT, HbmLayout.for_model(lm.config, "float16"))
        session = backend.open_session(DecodeSpec("fp16", len(PROMPT), 4))
        for layer, data in enumerate(layers):
            session.ingest_layer(layer, memoryview(data))
        toks = list(session.decode(first))
        t = session.timings()
        session.close()
        assert 1 <= len(toks) <= 3 and all(0 <= x < lm.config.vocab_size for x in toks)
        assert t["modeled_device_ms_per_token"] > 0 and t["decode_ms"] > 0
    finally:
        backend.close()


@pytest.mark.parametrize("state,error", [("ERT_CMD_STATE_ERROR", HybridError),
                                         ("ERT_CMD_STATE_TIMEOUT", DeadlineExceeded),
                                         ("ERT_CMD_STATE_ABORT", HybridError)])
def test_xrt_run_state_other_than_completed_is_an_error(monkeypatch, checkpoints, state, error):
    pyxrt = use_fake_pyxrt(monkeypatch)
    spec, xclbin = checkpoints[0], checkpoints[2]
    lm = load_model(spec)
    backend = _backend(spec, xclbin)
    try:
        first, layers = prefill_packed(lm, PROMPT, HbmLayout.for_model(lm.config, "float32"))
        pyxrt.FAULTS["state"] = pyxrt.ert_cmd_state[state]
        before = backend.device.used_bytes()
        with pytest.raises(error, match=state if error is HybridError else "did not finish"):
            run_session(backend, first, layers, len(PROMPT), 4)
        assert backend.device.used_bytes() == before  # the failed request freed its KV
    finally:
        backend.close()


def test_xrt_backend_without_device_is_unavailable(monkeypatch, checkpoints):
    pyxrt = use_fake_pyxrt(monkeypatch)
    pyxrt.FAULTS["no_device"] = True
    with pytest.raises(Unavailable, match="no Alveo device"):
        _backend(checkpoints[0], checkpoints[2])
