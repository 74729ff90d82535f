"""Issue 14's rough edges, each as a new user hit it (findings 1-4, 6-11; 5 is
tests/test_client_torch_free.py). One service pair serves a tiny GPT-2 checkpoint with a
vocabulary of 100 and no tokenizer files; beside it a decode whose weights differ (same
shape, another seed) and an `fpga-xrt` decode without pyxrt, all started at once."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from client.cli import main
from client.launch import ServicePair, free_port, spawn, stop
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from tests.helpers import make_tiny_gpt2
from tests.services_util import wait_until

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--local", "--model", "synthetic:tiny-gpt2"]


def cli(*args, env=None):
    return CliRunner().invoke(main, list(args), env={"HF_HUB_OFFLINE": "1"} | (env or {}))


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


async def _info(target: str) -> pb.ServiceInfo:
    async with grpc.aio.insecure_channel(target) as ch:
        return await pbg.DecodeServiceStub(ch).Info(pb.InfoRequest(), timeout=5)


def info_or_error(target: str):
    try:
        return asyncio.run(_info(target))
    except grpc.aio.AioRpcError as e:
        return e


# ---- the processes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rough")
    a = make_tiny_gpt2(root / "a", vocab=100)          # config.json + model.safetensors
    b = make_tiny_gpt2(root / "b", vocab=100, seed=1)  # same shape, other weights
    assert not list(a.glob("tokenizer*")) and (a / "model.safetensors").is_file()
    return {"a": str(a), "b": str(b), "logs": root}


@pytest.fixture(scope="module")
def procs(models):
    """The pair on checkpoint a; a decode of checkpoint b attached to the same prefill;
    an fpga-xrt decode without pyxrt. Started together so they load in parallel."""
    logs = models["logs"]
    pair = ServicePair(model=models["a"], device="cpu", log_dir=str(logs),
                       prefill_args=["--no-warm-up", "--region-mb", "16", "--max-slots", "8"],
                       decode_args=["--no-warm-up"])
    other = {"mismatch": free_port(), "xrt": free_port()}
    started = {
        "mismatch": spawn(["serve", "decode", "--model", models["b"], "--device", "cpu",
                           "--host", "127.0.0.1", "--port", str(other["mismatch"]),
                           "--prefill", pair.prefill, "--no-warm-up"],
                          log_path=str(logs / "mismatch.log")),
        "xrt": spawn(["serve", "decode", "--model", "synthetic:tiny-gpt2", "--device", "cpu",
                      "--host", "127.0.0.1", "--port", str(other["xrt"]), "--backend",
                      "fpga-xrt", "--prefill", pair.prefill],
                     env={"HYBRID_XCLBIN": ""}, log_path=str(logs / "xrt.log")),
    }
    try:
        pair.start(timeout_s=120)
        yield {"pair": pair, "logs": logs} | {
            name: f"127.0.0.1:{port}" for name, port in other.items()}
    finally:
        for p in started.values():
            stop(p)
        pair.stop()


# ---- 1. remote mode does not ignore --model, --device, --dtype --------------------------
@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--dtype", "float16"],
                                   ["--device", "cpu", "--dtype", "float32"]])
def test_1_remote_refuses_device_and_dtype(flags):
    r = cli("generate", "hi", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2", *flags)
    assert r.exit_code == 2, r.output
    line = one_error_line(r)
    assert "--local only" in line and flags[0] in line


def test_1_same_model_rules(tmp_path):
    from client.remote import same_model

    assert same_model("synthetic:gpt2", "synthetic:gpt2:0")
    assert not same_model("synthetic:gpt2", "synthetic:gpt2:1")
    assert not same_model("synthetic:gpt3", "synthetic:gpt2")
    assert not same_model("nosuchmodel", "synthetic:gpt2")
    (tmp_path / "x").mkdir()
    (tmp_path / "y" / "x").mkdir(parents=True)
    assert same_model(str(tmp_path / "x"), str(tmp_path / "x") + "/")
    assert not same_model(str(tmp_path / "x"), str(tmp_path / "y" / "x"))  # both here: differ
    assert same_model(str(tmp_path / "x"), "/no/such/mount/x")  # a container's path to it


def test_1_remote_model_checked_against_the_pair(procs, models):
    pair = procs["pair"]
    addrs = ["--prefill", pair.prefill, "--decode", pair.decode]
    for wrong in ("nosuchmodel", "synthetic:tiny-gpt2", models["b"]):
        r = cli("generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--model", wrong,
                *addrs)
        assert r.exit_code == 2, (wrong, r.output)
        line = one_error_line(r)
        assert f"--model {wrong} does not match" in line and models["a"] in line, line
    for ok in ([], ["--model", models["a"]]):  # the default path, and the right model
        r = cli("generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", *ok, *addrs)
        assert r.exit_code == 0, r.output


# ---- 2. a port in use: one line, no traceback --------------------------------------------
def test_2_serve_on_a_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "client.cli", "serve", "prefill", "--model",
                            "synthetic:tiny-gpt2", "--device", "cpu", "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode in (1, 2), p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr  # no traceback, no gRPC core "E..." bind line
    assert f"prefill: port {port} on 127.0.0.1 is in use" in lines[0], lines


def test_2_bind_failure_after_the_check_is_unavailable(monkeypatch):
    from engine.errors import Unavailable
    from transport import servekit as kit

    monkeypatch.setattr(kit, "check_port_free", lambda host, port: None)

    async def go():
        server, _ = kit.make_server(lambda s: None, [])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            with pytest.raises(Unavailable, match=f"cannot listen on port {port}"):
                kit.add_port(server, f"127.0.0.1:{port}")

    asyncio.run(go())


# ---- 3. --device auto, the default of --local ---------------------------------------------
def test_3_device_auto_is_the_default_and_resolves_to_cpu_here():
    import torch

    from engine.loader import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto resolves to cuda")
    assert resolve_device("auto") == torch.device("cpu")
    for extra in ([], ["--device", "auto"]):
        r = cli("generate", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json", *TINY,
                *extra)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["device"] == "cpu"


# ---- 4. a checkpoint without tokenizer and a vocabulary < 256 -----------------------------
def test_4_small_vocab_without_tokenizer_local(models):
    r = cli("generate", "--local", "--model", models["a"], "--prompt-ids", "1,2,3",
            "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert 1 <= len(out["token_ids"]) <= 4 and all(0 <= t < 100 for t in out["token_ids"])
    assert out["text"] == "".join(f"<|{t}|>" for t in out["token_ids"] if t != 99)
    assert "no text" in r.stderr and "token ids" in r.stderr
    text = cli("generate", "--local", "--model", models["a"], "--prompt-ids", "1,2,3",
               "--max-new-tokens", "4")
    assert text.exit_code == 0 and text.stdout.strip() == out["text"]
    r = cli("generate", "hello", "--local", "--model", models["a"])
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "no tokenizer.json" in line and "--prompt-ids" in line


def test_4_small_vocab_without_tokenizer_through_the_services(procs, models):
    pair = procs["pair"]
    addrs = ["--prefill", pair.prefill, "--decode", pair.decode]
    local = cli("generate", "--local", "--model", models["a"], "--prompt-ids", "5,6,7",
                "--max-new-tokens", "4", "--json")
    r = cli("generate", "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json", *addrs)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["token_ids"] == json.loads(local.stdout)["token_ids"]
    assert out["text"] == json.loads(local.stdout)["text"]
    # 9: counts stay integers in --json
    assert isinstance(out["timings"]["kv_bytes"], int) and out["timings"]["kv_bytes"] > 0
    r = cli("generate", "hello", *addrs)
    assert r.exit_code == 2
    assert "no tokenizer.json" in one_error_line(r)


# ---- 6. health and info carry the real reason ---------------------------------------------
def test_6_xrt_without_pyxrt_says_why(procs):
    target = procs["xrt"]
    assert wait_until(lambda: "pyxrt" in str(getattr(info_or_error(target), "details",
                                                     lambda: "")()), 90)
    err = info_or_error(target)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "still loading" not in err.details()
    r = cli("info", "--service", "decode", "--decode", target)
    assert r.exit_code == 1 and "pyxrt" in r.output and "still loading" not in r.output
    h = cli("health", "--service", "decode", "--decode", target)
    assert h.exit_code == 1
    assert "NOT_SERVING (decode backend fpga-xrt unavailable" in h.stdout and "pyxrt" in h.stdout


def test_6_weights_differ_from_prefill(procs):
    from client.api import health

    pair, target = procs["pair"], procs["mismatch"]
    assert wait_until(lambda: getattr(info_or_error(target), "not_serving", ""), 90)
    info = info_or_error(target)
    prefill_fp = asyncio.run(_prefill_info(pair.prefill)).weights_fingerprint
    assert prefill_fp != info.weights_fingerprint
    assert prefill_fp in info.not_serving and info.weights_fingerprint in info.not_serving
    assert asyncio.run(health(target)) == "NOT_SERVING"
    assert asyncio.run(health(target, service="hybrid.v1.DecodeService")) == "NOT_SERVING"
    h = cli("health", "--service", "decode", "--decode", target)
    assert h.exit_code == 1 and "NOT_SERVING (weights differ" in h.stdout
    i = cli("info", "--json", "--service", "decode", "--decode", target)
    assert i.exit_code == 0 and "weights differ" in json.loads(i.stdout)["decode"]["not_serving"]
    # Generate with a handle from that prefill: FAILED_PRECONDITION naming both
    code, details = asyncio.run(_generate_with_prefill_handle(pair.prefill, target))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert prefill_fp[:16] in details and info.weights_fingerprint[:16] in details
    log = (procs["logs"] / "mismatch.log").read_text()
    assert sum("ERROR" in ln and "weights differ" in ln for ln in log.splitlines()) == 1
    # the pair's own decode is unaffected
    assert asyncio.run(health(pair.decode)) == "SERVING"
    assert not asyncio.run(_info(pair.decode)).not_serving


async def _prefill_info(target: str) -> pb.ServiceInfo:
    async with grpc.aio.insecure_channel(target) as ch:
        return await pbg.PrefillServiceStub(ch).Info(pb.InfoRequest(), timeout=5)


async def _generate_with_prefill_handle(prefill: str, decode: str):
    async with grpc.aio.insecure_channel(prefill) as pch, \
            grpc.aio.insecure_channel(decode) as dch:
        call = pbg.PrefillServiceStub(pch).Prefill(pb.PrefillRequest(
            request_id="rough6", prompt_ids=[1, 2, 3], max_new_tokens=2), timeout=30)
        handle = (await call.read()).handle
        try:
            async for _ in pbg.DecodeServiceStub(dch).Generate(pb.GenerateRequest(
                    request_id="rough6", handle=handle, max_new_tokens=2), timeout=30):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        finally:
            call.cancel()
    return grpc.StatusCode.OK, ""


# ---- 7. bench from an installed (non-editable) package ------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel .` builds (no build isolation: offline), from a copy of the
    tree so the checkout gets no build/ or egg-info; (wheel path, build output)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("protos", "engine", "kernels", "transport", "gpu_service", "fpga_service",
                "client", "bench"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns(
            "__pycache__", "results"))
    out = src / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-v", ".", "-w", str(out)],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return next(out.glob("*.whl")), p.stdout + p.stderr


def test_7_bench_is_packaged_and_imports_from_the_wheel(wheel, tmp_path):
    whl, _ = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    for mod in ("sweep", "report", "hf_baseline", "bench_serve", "serve_stats"):
        assert f"bench/{mod}.py" in names, mod
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    code = ("import client.cmd_bench as c, bench.serve_stats; sweep, report = c._bench_modules(); "
            "print(c.__file__); print(sweep.__file__); print(bench.serve_stats.__file__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(site)})
    assert p.returncode == 0, p.stderr
    assert all(line.startswith(str(site)) for line in p.stdout.split()), p.stdout


# ---- 8. checks before the load; bad --model is a usage error ------------------------------
def test_8_too_many_tokens_refused_before_loading(monkeypatch):
    import engine.loader

    def no_load(*a, **k):
        raise AssertionError("load_model called")

    monkeypatch.setattr(engine.loader, "load_model", no_load)
    for args in (["hi", "--model", "synthetic:gpt2"], ["--prompt-ids", "1,2"]):
        t0 = time.perf_counter()
        r = cli("generate", "--local", "--max-new-tokens", "100000", *args)
        assert r.exit_code == 2, r.output
        assert "exceeds the model's" in one_error_line(r)
        assert time.perf_counter() - t0 < 5


def test_8_config_json_positions_checked_before_loading(monkeypatch, models):
    import engine.loader

    monkeypatch.setattr(engine.loader, "load_model", lambda *a, **k: 1 / 0)
    r = cli("generate", "--local", "--model", models["a"], "--prompt-ids", "1",
            "--max-new-tokens", "128")  # n_positions 128
    assert r.exit_code == 2 and "exceeds the model's 128 positions" in one_error_line(r)


@pytest.mark.parametrize("model", ["nosuchmodel", "someone/some-model", "synthetic:gpt3",
                                   "./no/such/dir"])
def test_8_bad_model_exits_2(model):
    r = cli("generate", "hi", "--local", "--model", model)
    assert r.exit_code == 2, r.output
    one_error_line(r)


# ---- 9. valid JSON from bench on a CPU, kv_bytes an int -----------------------------------
def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_9_bench_report_is_strict_json_without_roofline(tmp_path):
    import torch

    from bench.report import write
    from bench.sweep import Row, roofline_ms_per_token

    class Cpu:
        model, device = torch.nn.Linear(4, 4), torch.device("cpu")

    roof, gbps = roofline_ms_per_token(Cpu())
    assert roof is None and gbps is None
    meta = {"model": "m", "device": "cpu", "dtype": "float32", "device_name": "CPU", "reps": 1,
            "points": [(4, 3)], "roofline_ms_per_token": roof, "copy_gbps": gbps}
    rows = [Row("local", 4, 3, 12.5, ttft_ms=float("nan")),
            Row("pair", 4, 3, 20.0, extra={"kv_bytes": 4096})]
    paths = write(rows, meta, tmp_path)
    data = _strict(paths["json"].read_text())
    assert data["meta"]["roofline_ms_per_token"] is None and data["rows"][0]["ttft_ms"] is None
    assert data["rows"][1]["kv_bytes"] == 4096 and isinstance(data["rows"][1]["kv_bytes"], int)
    head = paths["md"].read_text().splitlines()[0]
    assert "nan" not in head.lower() and "roofline n/a" in head


# ---- 10. docker: xclbin mounted, one CUDA major version ------------------------------------
def test_10_one_cuda_major_version():
    import tomllib

    docker = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.", docker, re.M)
    torch_index = re.search(r"download\.pytorch\.org/whl/cu(\d+)", docker)
    cupy_image = re.findall(r"cupy-cuda(\d+)x", docker)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]
    cupy_extra = [m for d in extra for m in re.findall(r"cupy-cuda(\d+)x", d)]
    assert base and torch_index and cupy_image and cupy_extra
    majors = {int(base.group(1)), int(torch_index.group(1)[:-1]),
              *map(int, cupy_image), *map(int, cupy_extra)}
    assert majors == {13}, majors  # the stack every GPU figure in docs was measured on
    for doc in ("README.md",):
        assert "cu130" in (ROOT / doc).read_text() and "cupy-cuda13x" in (ROOT / doc).read_text()


def test_10_compose_fpga_mounts_the_xclbin():
    yaml = pytest.importorskip("yaml")
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["decode-fpga"]
    xclbin = svc["environment"]["HYBRID_XCLBIN"]
    mounts = {v.split(":")[-2]: v for v in svc["volumes"]}
    assert os.path.dirname(xclbin) in mounts and "HYBRID_XCLBIN_DIR" in mounts[
        os.path.dirname(xclbin)] and mounts[os.path.dirname(xclbin)].endswith(":ro")


def test_10_xrt_message_names_what_exists(monkeypatch):
    from engine.errors import Unavailable
    from fpga_service.device.xrt import XrtDevice
    from tests.fpga_helpers import use_fake_pyxrt

    use_fake_pyxrt(monkeypatch)
    monkeypatch.delenv("HYBRID_XCLBIN", raising=False)
    with pytest.raises(Unavailable) as e:
        XrtDevice().open()
    assert "HYBRID_XCLBIN" in str(e.value) and "--xclbin" not in str(e.value)


# ---- 11. smaller ---------------------------------------------------------------------------
def test_11_license_is_an_spdx_string_and_builds_without_warning(wheel):
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    req = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(re.search(r">=(\d+)", req).group(1)) >= 77  # PEP 639
    _, output = wheel
    assert "project.license" not in output and "License classifiers" not in output
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel[0]).read(
        next(n for n in zipfile.ZipFile(wheel[0]).namelist() if n.endswith("METADATA"))
    ).decode()


@pytest.mark.parametrize("command", ["health", "info"])
def test_11_health_and_info_options_have_help(command):
    import click

    from client.cli import main as group

    cmd = group.get_command(None, command)
    missing = [p.name for p in cmd.params if isinstance(p, click.Option) and not p.help]
    assert not missing, missing


def test_11_demo_stage_table_explains_its_columns():
    from client.cmd_demo import stage_table

    lines = stage_table({"ttft_ms": 1.0, "kv_bytes": 4096, "modeled_device_ms_per_token": 0.5})
    assert "what it measures" in lines[0]
    rows = lines[1:-1]
    assert all(len(re.split(r"\s{2,}", ln.strip())) >= 3 for ln in rows), rows
    assert "overlap" in lines[-1]


def test_11_plan_says_its_defaults_are_the_sources():
    r = cli("plan", "--input", "64", "--output", "64")
    assert r.exit_code == 0 and "source document's figures" in r.output
    assert "source document" in cli("plan", "--help").output
