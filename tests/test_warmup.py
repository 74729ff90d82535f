"""Warm-up before SERVING: one short request through each service's own path, leaving
no slot, session, batch row or counter behind; a failing warm-up only logs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from client.remote import run_remote
from fpga_service.backends import make_backend
from fpga_service.warmup import warm_up
from tests.services_util import counters, wait_until

MODEL = "synthetic:tiny-gpt2"


@pytest.mark.parametrize("name, opts", [
    ("gpu", {}), ("gpu", {"max_batch": 2}), ("fpga-emu", {}),
], ids=["gpu", "gpu-batched", "fpga-emu"])
def test_decode_warm_up_leaves_nothing_open(name, opts):
    backend = make_backend(name, model_spec=MODEL, device="cpu", dtype="float32", **opts)
    try:
        assert warm_up(backend) > 0
        info = backend.info()
        assert info.get("sessions_open", "0") == "0"
        if name == "gpu":
            st = backend.engine.stats()
            assert st["running"] == st["live"] == 0 and st["rows_computed"] == 3
            assert st["blocks_free"] == st["blocks_total"]
    finally:
        backend.close()


def test_failed_decode_warm_up_is_logged_not_fatal(caplog):
    from transport import servekit as kit

    class Broken:
        config = None  # warm_up fails at once

    log = logging.getLogger("hybrid.decode")
    with caplog.at_level(logging.ERROR, logger="hybrid.decode"):
        asyncio.run(kit.warm_up(log, "decode", None, warm_up, Broken()))
    assert "decode warm-up failed" in caplog.text


def test_services_warm_up_before_serving(tmp_path):
    """Both services log their warm-up before SERVING, and it left nothing counted."""
    from client.launch import ServicePair

    with ServicePair(model=MODEL, device="cpu", backend="fpga-emu", log_dir=str(tmp_path)) as pair:
        p, d = counters(pair.prefill, "prefill"), counters(pair.decode, "decode")
        assert p["slots-in-use"] == 0 and p["slots-allocated"] == 0
        assert d["sessions-open"] == 0 and d["shm-requests"] == 0
        # decode maps prefill's region in the background, ahead of the first request
        decode_log = tmp_path / "decode.log"
        assert wait_until(lambda: "ahead of requests" in decode_log.read_text(), 10)
        res = run_remote(prompt_ids=[1, 2, 3], max_new_tokens=3, prefill=pair.prefill,
                         decode=pair.decode, timeout_s=30)
        assert len(res.token_ids) == 3 and counters(pair.decode, "decode")["shm-requests"] == 1
    for role in ("prefill", "decode"):
        log = (tmp_path / f"{role}.log").read_text()
        assert f"{role} warm-up done" in log, log
        assert log.index(f"{role} warm-up done") < log.index(f"{role} SERVING")
