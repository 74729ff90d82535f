"""fpga-emu and fpga-xrt (fake pyxrt) behind the real decode service: the pair's tokens
equal `hybrid generate --local` (greedy, fp32), for tiny GPT-2 and Llama checkpoints."""

from __future__ import annotations

import os

import pytest

from client.launch import spawn, stop, wait_serving
from client.remote import run_remote
from engine.loader import load_model
from engine.sampling import SamplingParams
from tests.fpga_helpers import FAKE_PYXRT, PROMPT, reference
from tests.helpers import make_tiny_gpt2, make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_NEW = 16


class Pair:
    """Prefill + decode subprocesses; the decode one with extra environment."""

    def __init__(self, model: str, backend: str, env: dict[str, str], logs: str) -> None:
        from client.launch import free_port

        self.prefill, self.decode = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        common = ["--model", model, "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1"]
        self.procs = [
            spawn(["serve", "prefill", *common, "--port", self.prefill.split(":")[1]],
                  log_path=os.path.join(logs, "prefill.log")),
            spawn(["serve", "decode", *common, "--port", self.decode.split(":")[1],
                   "--backend", backend, "--prefill", self.prefill],
                  env=env, log_path=os.path.join(logs, "decode.log")),
        ]

    def __enter__(self) -> Pair:
        try:
            wait_serving(self.prefill, self.procs[0], 120)
            wait_serving(self.decode, self.procs[1], 120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            stop(p)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def ckpt(request, tmp_path_factory):
    maker = make_tiny_gpt2 if request.param == "gpt2" else make_tiny_llama
    return str(maker(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("backend", ["fpga-emu", "fpga-xrt"])
def test_pair_with_fpga_backend_equals_local(ckpt, backend, tmp_path):
    xclbin = tmp_path / "hbm_decode.xclbin"
    xclbin.write_bytes(b"fake bitstream")
    env = {"HYBRID_HBM_DTYPE": "float32"}
    if backend == "fpga-xrt":
        env |= {"PYTHONPATH": f"{ROOT}{os.pathsep}{FAKE_PYXRT}", "HYBRID_XCLBIN": str(xclbin)}
    lm = load_model(ckpt)
    want = reference(lm, PROMPT, N_NEW)
    with Pair(ckpt, backend, env, str(tmp_path)) as pair:
        for transport in ("shm", "grpc"):
            res = run_remote(prompt_ids=PROMPT, max_new_tokens=N_NEW, params=SamplingParams(),
                             prefill=pair.prefill, decode=pair.decode, kv_transport=transport,
                             timeout_s=60)
            assert res.token_ids == want, transport
            assert res.timings.get("modeled_device_ms_per_token", 0) > 0


def test_xrt_without_pyxrt_stays_not_serving(tmp_path):
    import asyncio

    from client.api import health
    from client.launch import free_port
    from tests.services_util import wait_until

    target = f"127.0.0.1:{free_port()}"
    log = tmp_path / "decode.log"
    proc = spawn(["serve", "decode", "--model", "synthetic:tiny-gpt2", "--device", "cpu",
                  "--host", "127.0.0.1", "--port", target.split(":")[1], "--backend", "fpga-xrt"],
                 env={"HYBRID_XCLBIN": ""}, log_path=str(log))
    try:
        assert wait_until(lambda: "NOT_SERVING" in log.read_text(), 60)
        assert proc.poll() is None  # alive, not crashed
        assert asyncio.run(health(target, timeout_s=2.0)) == "NOT_SERVING"
        assert "pyxrt" in log.read_text()
    finally:
        assert stop(proc) == 0
