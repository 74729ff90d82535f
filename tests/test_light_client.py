"""The light client install (issue 14): pyproject.toml's base dependencies carry the API,
the CLI commands that talk to services and the OpenAI endpoint; torch, numpy, safetensors,
tokenizers, xxhash and grpcio-reflection are the `serve` extra.

How it is checked here (reliable in CI, no network, no second venv): a child process
sees only the standard library, this project and the installed distributions that the
base dependencies pull in (their requirement closure, markers evaluated): a meta-path
finder makes every other installed top-level module (torch, numpy, transformers, openai,
grpc_tools, ...) raise ModuleNotFoundError, as in a light install. The child runs
`hybrid generate` through services that are not there (it must fail with UNAVAILABLE,
not an ImportError), `health`, `info`, `serve openai --help`, `serve prefill` (one line
naming the serve extra), and builds the OpenAI app. A real fresh-venv `pip install .`
without torch was run by hand once (docs/openai.md, "Light client install").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "safetensors", "tokenizers", "xxhash", "grpc_reflection")
OURS = {"client", "engine", "transport", "protos", "kernels", "gpu_service", "fpga_service",
        "bench", "tests"}
DEAD = ["--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"]

CHILD = r"""
import json, sys
HIDDEN = set(json.loads(sys.argv[1]))
BEFORE = {m.partition(".")[0] for m in sys.modules}  # the interpreter's start-up (site, .pth)

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (light install)", name=name)

sys.meta_path.insert(0, Block())
from click.testing import CliRunner
from client.cli import main

runs = {}
for args in json.loads(sys.argv[2]):
    r = CliRunner().invoke(main, args)
    runs[" ".join(args[:3])] = [r.exit_code, r.output, repr(r.exception)]
from client.openai_api.server import OpenAIOptions, build_app
app = build_app(OpenAIOptions(model_dir=sys.argv[3], metrics_port=8000, port=8000))
assert app.state.api.template.render([{"role": "user", "content": "hi"}]) == "[user]hi"
import uvicorn
uvicorn.Config(app)
import client.api, client.remote  # noqa: E401
print(json.dumps({"runs": runs,
                  "modules": sorted({m.partition(".")[0] for m in sys.modules} - BEFORE)}))
"""


@pytest.fixture(scope="module")
def hidden() -> set[str]:
    """Installed top-level modules outside the base dependencies' closure."""
    closure = _closure(_project()["dependencies"])
    return {mod for mod, ds in metadata.packages_distributions().items()
            if mod not in OURS and not {_canon(d) for d in ds} & closure}


@pytest.fixture(scope="module")
def child(hidden, tmp_path_factory):
    assert set(HEAVY) <= hidden  # the serve extra's modules are not base dependencies
    cmds = [["generate", "Hello", *DEAD, "--timeout", "5"], ["health", *DEAD],
            ["info", *DEAD], ["serve", "openai", "--help"], ["serve", "prefill", "--port", "1"],
            ["generate", "Hello", "--local"], ["--help"]]
    ckpt = tmp_path_factory.mktemp("ckpt")  # a chat template: jinja2 gets imported
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sorted(hidden)),
                          json.dumps(cmds), str(ckpt)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_client_commands_run_without_the_serve_extra(child):
    runs = child["runs"]
    code, output, exc = runs["generate Hello --prefill"]
    assert code == 1 and "UNAVAILABLE" in output and "Import" not in exc, (output, exc)
    for name in ("health --prefill 127.0.0.1:1", "info --prefill 127.0.0.1:1"):
        code, output, exc = runs[name]
        assert code == 1 and "UNAVAILABLE" in output and "Import" not in exc, (name, output)
    code, output, _ = runs["serve openai --help"]
    assert code == 0 and "--api-key-file" in output and "--model-dir" in output
    assert runs["--help"][0] == 0
    # what runs a model says what to install, in one line
    for name in ("serve prefill --port", "generate Hello --local"):
        code, output, _ = runs[name]
        assert code == 1 and "hybrid-llm[serve]" in output and "Traceback" not in output, name
    assert not set(HEAVY) & set(child["modules"])


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Installed distributions the requirements pull in (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r).name for r in requirements]
    while todo:
        name = _canon(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_only_base_dependencies_were_imported(child, hidden):
    assert not hidden & set(child["modules"])
    assert {"grpc", "click", "starlette", "uvicorn", "jinja2", "prometheus_client"} <= set(
        child["modules"])


def test_extras_split():
    proj = _project()
    names = {_canon(re.split(r"[<>=!~\[ ;]", r)[0]) for r in proj["dependencies"]}
    assert not names & {"torch", "numpy", "safetensors", "tokenizers", "xxhash",
                        "grpcio-reflection"}
    assert {"grpcio", "grpcio-health-checking", "protobuf", "click", "starlette", "uvicorn",
            "jinja2", "prometheus-client"} <= names
    extras = proj["optional-dependencies"]
    serve = {_canon(re.split(r"[<>=!~\[ ;]", r)[0]) for r in extras["serve"]}
    assert serve >= {"torch", "numpy", "safetensors", "tokenizers", "xxhash", "grpcio-reflection"}
    dev = extras["dev"]
    assert "hybrid-llm[serve]" in dev  # `pip install -e .[dev]` (make setup, CI) gets it all
    assert any(d.startswith("openai") for d in dev) and any(d.startswith("httpx") for d in dev)
