"""docker-compose.yml, run without docker: each service's command and environment as a
local process (CPU, tiny model, free ports), healthchecks included, then a generation
through them. Also checks the deployment rules the compose file must encode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest

from client.launch import free_port, stop, wait_serving
from client.remote import run_remote
from engine.loader import load_model
from engine.sampling import SamplingParams
from tests.services_util import local_tokens, shm_segments

yaml = pytest.importorskip("yaml")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "synthetic:tiny-gpt2"


@pytest.fixture(scope="module")
def compose():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} / ${VAR} with `env` (no shell)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}",
                  lambda m: env.get(m.group(1)) or (m.group(2) or ""), str(value))


def _local_argv(cmd: list[str]) -> list[str]:
    assert cmd[0] == "hybrid", cmd  # the console script; here the same entry as a module
    return [sys.executable, "-m", "client.cli", *cmd[1:]]


def _service_env(svc: dict, overrides: dict[str, str]) -> dict[str, str]:
    env = {k: _interpolate(v, {}) for k, v in svc["environment"].items()}
    return os.environ | env | overrides | {"PYTHONPATH": ROOT}


def test_compose_encodes_the_deployment_rules(compose):
    s = compose["services"]
    p, d, f = s["prefill"], s["decode"], s["decode-fpga"]
    assert p["ipc"] == "shareable" and d["ipc"] == f["ipc"] == "service:prefill"
    assert d["depends_on"]["prefill"]["condition"] == "service_healthy"
    assert p["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "fpga" in f["profiles"] and any("xclmgmt" in x for x in f["devices"])
    assert any("renderD" in x for x in f["devices"]) and any("/opt/xilinx" in v for v in f["volumes"])
    shm_gb = int(p["shm_size"].removesuffix("gb"))
    assert shm_gb * 1024 > int(p["environment"]["HYBRID_REGION_MB"])
    for svc in (p, d, f):
        assert "hybrid" in svc["healthcheck"]["test"] and "health" in svc["healthcheck"]["test"]
        grace = float(svc["environment"]["HYBRID_GRACE_S"])
        assert float(svc["stop_grace_period"].removesuffix("s")) > grace
    assert os.path.exists(os.path.join(ROOT, "docker-compose.cpu.yml"))
    for svc in (p, d):  # Prometheus metrics, published on loopback only like the gRPC port
        port = svc["environment"]["HYBRID_METRICS_PORT"]
        assert f"127.0.0.1:{port}:{port}" in svc["ports"]


def test_compose_services_run_locally(compose, tmp_path):
    s = compose["services"]
    pport, dport = free_port(), free_port()
    mports = {"prefill": free_port(), "decode": free_port()}  # not compose's fixed 9101/9102
    local = {"HYBRID_DEVICE": "cpu", "HYBRID_MODEL": MODEL, "HYBRID_HOST": "127.0.0.1",
             "HYBRID_REGION_MB": "64"}
    envs = {
        "prefill": _service_env(s["prefill"], local | {
            "HYBRID_PORT": str(pport), "HYBRID_METRICS_PORT": str(mports["prefill"])}),
        "decode": _service_env(s["decode"], local | {
            "HYBRID_PORT": str(dport), "HYBRID_PREFILL": f"127.0.0.1:{pport}",
            "HYBRID_METRICS_PORT": str(mports["decode"])}),
    }
    assert envs["decode"]["HYBRID_BACKEND"] == "gpu"
    procs = {}
    try:
        for name in ("prefill", "decode"):
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            procs[name] = subprocess.Popen(_local_argv(s[name]["command"]), cwd=ROOT,
                                           env=envs[name], stdout=log, stderr=subprocess.STDOUT)
        wait_serving(f"127.0.0.1:{pport}", procs["prefill"], 60)
        wait_serving(f"127.0.0.1:{dport}", procs["decode"], 60)
        for name, port in (("prefill", pport), ("decode", dport)):  # the healthchecks
            check = [re.sub(r"localhost:\d+", f"127.0.0.1:{port}", c)
                     for c in s[name]["healthcheck"]["test"][1:]]
            r = subprocess.run(_local_argv(check), cwd=ROOT, env=envs[name], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        params = SamplingParams(temperature=0.8, seed=5)
        res = run_remote(prompt_ids=[10, 20, 30], max_new_tokens=8, params=params,
                         prefill=f"127.0.0.1:{pport}", decode=f"127.0.0.1:{dport}")
        assert res.token_ids == local_tokens(load_model(MODEL), [10, 20, 30], 8, params)
        for name, port in mports.items():  # HYBRID_METRICS_PORT turned /metrics on
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                assert f'hybrid_requests_total{{role="{name}",status="OK"}} 1.0' in r.read().decode()
    finally:
        codes = {n: stop(p) for n, p in reversed(list(procs.items()))}
    assert codes == {"decode": 0, "prefill": 0}
    pid = procs["prefill"].pid  # regions are named /hybrid-kv-<owner pid>-<epoch>
    assert not [s for s in shm_segments() if f"hybrid-kv-{pid}-" in s]  # SIGTERM removed it


@pytest.mark.parametrize("backend", [None, "gpu"])
def test_demo_runs_and_cleans_up(backend):
    """Default backend: the software U55C, with its modeled per-token time; gpu on request."""
    extra = ["--backend", backend] if backend else []
    r = subprocess.run([sys.executable, "-m", "client.cli", "demo", "--model", MODEL,
                        "--device", "cpu", "--max-new-tokens", "8", *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=60,
                       env=os.environ | {"PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leftovers: none" in r.stdout and "exit codes {'decode': 0, 'prefill': 0}" in r.stdout
    for stage in ("time to first token", "KV copy, raw", "KV copy, not hidden", "decode per token"):
        assert stage in r.stdout
    assert f"backend {backend or 'fpga-emu'}," in r.stdout
    assert ("modeled U55C per token" in r.stdout) == (backend is None)
