"""GPU: the registered region as the destination of layer-wise device-to-host copies.

Run on an H100/H200: PYTHONPATH=. python -m pytest -q -m cuda tests/test_transport_cuda.py
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_region_is_registered_and_views_are_pinned():
    from transport.reader import KvReader
    from transport.region import KvRegion
    with KvRegion.create(8 << 20, 2, 4, 5.0, name_prefix="hkvtest-cuda") as region:
        assert region.registered
        desc = region.alloc(4 * (1 << 20), 4, checksums=True)
        view = region.layer_view(desc, 2)
        assert view.dtype == torch.uint8 and view.numel() == 1 << 20 and view.is_pinned()
        src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            view.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        region.mark_ready(desc, 2, event=ev)  # flag only after the copy completed
        with KvReader.open(region.name) as reader:
            assert reader.read_layer(desc, 2, 1.0) == src.cpu().numpy().tobytes()
        del view


def test_layerwise_d2h_reaches_80_percent_of_pinned_bandwidth():
    """48 MiB fp16 KV (gpt2-medium, 512 tokens) layer by layer into the region vs
    into cudaHostAlloc memory, measured in the same run (bench/bench_transport.py)."""
    from bench.bench_transport import measure_d2h
    r = measure_d2h(iters=20)
    print(f"pinned {r['pinned']:.1f} GB/s, region {r['region']:.1f} GB/s "
          f"({r['region'] / r['pinned']:.1%}), pageable {r['pageable']:.1f} GB/s, "
          f"with protocol {r['protocol']:.1f} GB/s")
    assert r["bytes_equal"] == 1.0
    assert r["region"] >= 0.8 * r["pinned"]
