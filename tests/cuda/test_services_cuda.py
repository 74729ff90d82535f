"""GPU: the prefill runner's layer-wise copies into the registered region overlap compute,
and the service pair on CUDA gives the tokens of single-process generation.

Run on an H100/H200: PYTHONPATH=. python -m pytest -q -m cuda tests/cuda/test_services_cuda.py -s
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def medium():
    from engine.loader import load_model

    return load_model("synthetic:gpt2-medium", "cuda", "float16")


def _run(lm, region, ids, layout):
    from engine.sampling import SamplingParams
    from gpu_service.runner import PrefillRunner

    runner = PrefillRunner(lm, region)
    n = lm.config.n_layers
    lb = runner.layer_bytes(layout, len(ids))
    desc = region.alloc(lb * n, n, layout=layout, dtype=runner.slot_dtype(layout),
                        n_tokens=len(ids), n_kv_heads=lm.config.n_kv_heads,
                        head_dim=lm.config.head_dim)
    return desc, runner.run(ids, desc, layout, SamplingParams(), threading.Event())


@pytest.mark.parametrize("layout", ["dense", "hbm"])
def test_runner_cuda_slot_matches_cache_and_hides_copies(medium, layout):
    from engine.kv_cache import KVCache
    from kernels.comm import make_layout
    from kernels.reshape import unpack_layer
    from transport.reader import KvReader
    from transport.region import KvRegion

    lm, T = medium, 512
    ids = torch.randint(0, lm.config.vocab_size, (T,)).tolist()
    with KvRegion.create(256 << 20, 4, lm.config.n_layers, 10.0) as region:
        assert region.registered
        for _ in range(2):  # warm-up, then the measured run
            desc, res = _run(lm, region, ids, layout)
            region.free(desc)
        desc, res = _run(lm, region, ids, layout)
        st = res.ship
        print(f"\n{layout}: prefill {res.prefill_ms:.2f} ms, KV {st.kv_bytes / 1e6:.1f} MB, "
              f"raw copy {st.transfer_ms:.3f} ms ({st.kv_bytes / st.transfer_ms / 1e6:.1f} GB/s), "
              f"exposed {st.exposed_transfer_ms:.3f} ms")
        assert 0 <= st.exposed_transfer_ms <= st.transfer_ms + 0.05
        cache = KVCache(lm.config, 1, T, lm.device, lm.dtype)
        with torch.inference_mode():
            lm.model.prefill(torch.tensor(ids, device="cuda"), cache)
        reader = KvReader.open(region.name)
        shape = (lm.config.n_kv_heads, T, lm.config.head_dim)
        for layer in (0, lm.config.n_layers - 1):
            raw = reader.read_layer(desc, layer, 5.0)
            if layout == "dense":
                flat = torch.frombuffer(bytearray(raw), dtype=torch.float16)
                k, v = flat[:flat.numel() // 2].view(shape), flat[flat.numel() // 2:].view(shape)
            else:
                k, v = unpack_layer(raw, make_layout("hbm", lm.config, "float16"), T)
            # Same kernels, same inputs: the slot holds exactly what the cache holds.
            assert torch.equal(k.cpu(), cache.k[layer, 0, :, :T].cpu())
            assert torch.equal(v.cpu(), cache.v[layer, 0, :, :T].cpu())
        reader.close()


def test_pair_on_cuda_equals_local(tmp_path):
    from client.launch import ServicePair
    from client.remote import run_remote
    from engine.generate import generate
    from engine.loader import load_model
    from engine.sampling import SamplingParams

    model, ids = "synthetic:gpt2", list(range(100, 164))
    lm = load_model(model, "cuda", "float16")
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=50, seed=11)):
        want = generate(lm, ids, 64, params).token_ids
        with ServicePair(model=model, device="cuda", log_dir=str(tmp_path)) as pair:
            for transport in ("shm", "grpc"):
                res = run_remote(prompt_ids=ids, max_new_tokens=64, params=params,
                                 prefill=pair.prefill, decode=pair.decode, kv_transport=transport)
                assert res.token_ids == want, (transport, params)
                assert "cuda" in res.device


def test_decode_killed_by_a_device_assert_stops_serving_and_exits_1(tmp_path):
    """A real device-side assert in the decode engine (injected: an index past a tensor,
    checked on the GPU) poisons the CUDA context: the request fails UNAVAILABLE, health
    leaves SERVING, and the process exits with status 1. Before, interpreter shutdown
    ran CUDA destructors on the poisoned context and c10 aborted (SIGABRT, -6)."""
    import asyncio
    import time

    from client.api import health
    from client.launch import ServicePair
    from client.remote import run_remote
    from engine import errors

    pair = ServicePair(model="synthetic:gpt2", device="cuda", log_dir=str(tmp_path),
                       decode_env={"HYBRID_FAULT_ENGINE_CRASH_STEPS": "5",
                                   "HYBRID_FAULT_DEVICE_ASSERT": "1"})
    with pair:
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable, match="device-side assert"):
            run_remote(prompt_ids=[1, 2, 3, 4], max_new_tokens=64, ignore_eos=True,
                       prefill=pair.prefill, decode=pair.decode, timeout_s=60)
        assert pair.procs["decode"].wait(timeout=30) == 1
        assert time.monotonic() - t0 < 30
        with pytest.raises(errors.Unavailable):
            asyncio.run(health(pair.decode, timeout_s=1.0))
        assert asyncio.run(health(pair.prefill)) == "SERVING"  # its own process, unharmed
    log = (tmp_path / "decode.log").read_text()
    assert "decode engine died" in log and "terminate called" not in log
