"""load_model: spec resolution (hub ids online/offline), progress, devices and dtypes."""

import socket

import pytest
import torch

from engine import loader
from engine.errors import InvalidArgument, NotFound, Unavailable
from engine.loader import load_model, peek_config, resolve_dtype
from tests.helpers import make_tiny_llama


def test_progress_callback_counts_every_tensor(tmp_path):
    calls = []
    load_model("synthetic:tiny-gpt2", progress=lambda d, t: calls.append((d, t)))
    n = calls[-1][1]
    assert [d for d, _ in calls] == list(range(1, n + 1))
    calls.clear()
    load_model(str(make_tiny_llama(tmp_path)), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] > 0


def test_hub_id_offline_is_unavailable_with_advice(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(Unavailable, match="synthetic:<preset>"):
        load_model("openai-community/gpt2")


def test_hub_id_online_downloads_then_loads(monkeypatch, tmp_path):
    """The online path: the snapshot's directory is loaded like a local one."""
    import huggingface_hub

    local = make_tiny_llama(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: _Closable())
    seen = {}

    def fake_download(repo_id, allow_patterns):
        seen["repo"], seen["patterns"] = repo_id, allow_patterns
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    lm = load_model("someone/tiny-llama")
    assert seen["repo"] == "someone/tiny-llama" and "*.safetensors" in seen["patterns"]
    assert lm.fingerprint == load_model(str(local)).fingerprint and not lm.synthetic


class _Closable:
    def close(self):
        pass


@pytest.mark.parametrize(("spec", "exc"), [
    ("./missing-dir", NotFound),
    ("a b c", InvalidArgument),
    ("", InvalidArgument),
])
def test_bad_specs(spec, exc):
    with pytest.raises(exc):
        load_model(spec)


def test_dir_without_config_or_weights(tmp_path):
    with pytest.raises(InvalidArgument, match="config.json"):
        load_model(str(tmp_path))
    src = make_tiny_llama(tmp_path / "m")
    for f in src.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(InvalidArgument, match="no weights"):
        load_model(str(src))


def test_peek_config_and_dtypes(tmp_path):
    assert peek_config("synthetic:gpt2-medium").n_layers == 24
    assert peek_config(str(make_tiny_llama(tmp_path))).n_kv_heads == 2
    assert peek_config("someone/model") is None
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(InvalidArgument):
        resolve_dtype("float8", cpu)
    with pytest.raises(InvalidArgument):
        loader.resolve_device("cuda:99" if torch.cuda.is_available() else "cuda")
