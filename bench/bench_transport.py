"""KV hand-off bandwidth: our registered /dev/shm region vs the baselines, same run.

GPU (when CUDA is present): a gpt2-medium 512-token fp16 KV (24 layers x K,V x 512 x
1024 x 2 B = 48 MiB) copied layer by layer device-to-host
  - into cudaHostAlloc memory (torch pin_memory)           = the pinned baseline
  - into the KV region (cudaHostRegister'ed shm mapping)   = ours (target >= 80%)
  - into pageable memory                                   = what registration avoids
  - into the region with the full protocol (event + mark_ready per layer)
CPU (always): the reader's copy-out of ready layers vs a plain memcpy of the same bytes,
with and without xxh3 checksums; cross-process latency from mark_ready to the reader
seeing the flag (futex wake-up) vs a multiprocessing Pipe message.

    PYTHONPATH=. python bench/bench_transport.py [--iters 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

N_LAYERS, N_TOKENS, N_HEADS, HEAD_DIM = 24, 512, 16, 64  # gpt2-medium
LAYER_BYTES = 2 * N_HEADS * N_TOKENS * HEAD_DIM * 2        # K+V fp16 = 2 MiB
KV_BYTES = N_LAYERS * LAYER_BYTES                          # 48 MiB


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def copy_layers(src_layers, dst_layers, stream) -> float:
    """Seconds for one layer-by-layer D2H pass on `stream` (CUDA events)."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for src, dst in zip(src_layers, dst_layers, strict=True):
            dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure_d2h(iters: int = 20) -> dict[str, float]:
    """Median GB/s of each destination, interleaved so clock drift hits all alike."""
    import torch

    from transport.region import KvRegion
    src = torch.randn(N_LAYERS, 2, N_TOKENS, N_HEADS * HEAD_DIM, dtype=torch.float16,
                      device="cuda")
    src_layers = [src[i].reshape(-1).view(torch.uint8) for i in range(N_LAYERS)]
    pinned = torch.empty(KV_BYTES, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(KV_BYTES, dtype=torch.uint8)
    split = lambda t: list(t.split(LAYER_BYTES))  # noqa: E731
    stream = torch.cuda.Stream()
    # Room for two requests: the bandwidth slot stays while _protocol_pass allocs its own.
    with KvRegion.create(2 * KV_BYTES + (16 << 20), 4, N_LAYERS, 30.0, cuda_register=True) as region:
        desc = region.alloc(KV_BYTES, N_LAYERS, n_tokens=N_TOKENS, n_kv_heads=N_HEADS,
                            head_dim=HEAD_DIM)
        views = [region.layer_view(desc, i) for i in range(N_LAYERS)]
        assert region.registered and views[0].is_pinned()
        targets = {"pinned": split(pinned), "region": views, "pageable": split(pageable)}
        times: dict[str, list[float]] = {k: [] for k in targets}
        for it in range(iters + 2):
            for name, dst in targets.items():
                t = copy_layers(src_layers, dst, stream)
                if it >= 2:  # warm-up passes
                    times[name].append(t)
        region_bytes = torch.cat([v.clone() for v in views])
        ok = torch.equal(region_bytes, torch.cat(src_layers).cpu())
        proto = _protocol_pass(region, src_layers, stream, iters)
        del views, targets
    out = {k: _gbps(KV_BYTES, statistics.median(v)) for k, v in times.items()}
    out["protocol"] = proto
    out["bytes_equal"] = float(ok)
    return out


def _protocol_pass(region, src_layers, stream, iters: int) -> float:
    """GB/s of copy + record event + mark_ready (waits on the event) per layer, as the
    prefill service publishes layers; wall clock, fresh slot each pass."""
    import torch
    walls = []
    for _ in range(iters):
        desc = region.alloc(KV_BYTES, N_LAYERS, n_tokens=N_TOKENS, n_kv_heads=N_HEADS,
                            head_dim=HEAD_DIM)
        events = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for i, src in enumerate(src_layers):
                region.layer_view(desc, i).copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
                events.append(ev)
        for i, ev in enumerate(events):
            region.mark_ready(desc, i, event=ev)
        walls.append(time.perf_counter() - t0)
        region.free(desc)
    return _gbps(KV_BYTES, statistics.median(walls))


def measure_cpu(iters: int = 10) -> dict[str, float]:
    """Reader copy-out GB/s (no checksum, checksum) vs memcpy of the same bytes."""
    from transport.reader import KvReader
    from transport.region import KvRegion
    payload = bytes(range(256)) * (LAYER_BYTES // 256)
    out: dict[str, list[float]] = {"memcpy": [], "read_layer": [], "read_layer+xxh3": []}
    with KvRegion.create(2 * KV_BYTES + (1 << 20), 4, N_LAYERS, 30.0, cuda_register=False) as region:
        descs = {}
        for checks in (False, True):
            descs[checks] = d = region.alloc(KV_BYTES, N_LAYERS, checksums=checks)
            for i in range(N_LAYERS):
                region.write_layer(d, i, payload)
                region.mark_ready(d, i)
        with KvReader.open(region.name) as reader:
            srcs = [bytearray(payload) for _ in range(N_LAYERS)]  # 48 MiB: not cache-hot
            for _ in range(iters):
                t0 = time.perf_counter()
                for src in srcs:
                    bytes(src)
                out["memcpy"].append(time.perf_counter() - t0)
                for checks, key in ((False, "read_layer"), (True, "read_layer+xxh3")):
                    t0 = time.perf_counter()
                    for i in range(N_LAYERS):
                        reader.read_layer(descs[checks], i, 1.0)
                    out[key].append(time.perf_counter() - t0)
    return {k: _gbps(KV_BYTES, min(v)) for k, v in out.items()}


def _latency_reader(name: str, raw_desc: bytes, conn) -> None:
    """Child: note when each layer's ready flag is seen, then when each pipe message
    arrives (the baseline notification)."""
    from transport.descriptor import KvDescriptor
    from transport.reader import KvReader
    desc = KvDescriptor.from_bytes(raw_desc)
    with KvReader.open(name) as reader:
        conn.send("ready")
        seen = []
        for layer in range(desc.n_layers):
            reader.wait_layer(desc, layer, 10.0)
            seen.append(time.monotonic_ns())
    conn.send(seen)
    conn.send([(conn.recv(), time.monotonic_ns())[1] for _ in range(desc.n_layers)])


def measure_ready_latency(n: int = 200, gap_s: float = 0.001) -> dict[str, float]:
    """Cross-process latency (µs, median and p99) from mark_ready to the reader seeing
    the flag, vs a multiprocessing Pipe message sent at the same cadence."""
    import multiprocessing as mp

    from transport.region import KvRegion
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    with KvRegion.create(n * 4096, 1, n, 30.0, cuda_register=False) as region:
        desc = region.alloc(n * 4096, n)
        child = ctx.Process(target=_latency_reader, args=(region.name, desc.to_bytes(), there))
        child.start()
        here.recv()
        marked, sent = [], []
        for layer in range(n):
            time.sleep(gap_s)
            marked.append(time.monotonic_ns())
            region.mark_ready(desc, layer)
        seen = here.recv()
        for _ in range(n):
            time.sleep(gap_s)
            sent.append(time.monotonic_ns())
            here.send(0)
        got = here.recv()
        child.join()
    out = {}
    for key, a, b in (("flag", marked, seen), ("pipe", sent, got)):
        lat = sorted((y - x) / 1e3 for x, y in zip(a, b, strict=True))
        out[key + "_p50"], out[key + "_p99"] = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print(f"KV: {N_LAYERS} layers x {LAYER_BYTES / 2**20:.0f} MiB = {KV_BYTES / 2**20:.0f} MiB "
          "(gpt2-medium, 512 tokens, fp16)")
    cpu = measure_cpu(max(3, args.iters // 2))
    print(f"CPU  memcpy baseline        {cpu['memcpy']:7.2f} GB/s")
    print(f"CPU  reader read_layer      {cpu['read_layer']:7.2f} GB/s  "
          f"({cpu['read_layer'] / cpu['memcpy']:.0%} of memcpy)")
    print(f"CPU  reader + xxh3 checksum {cpu['read_layer+xxh3']:7.2f} GB/s")
    lat = measure_ready_latency()
    print(f"ready flag -> reader sees it    p50 {lat['flag_p50']:7.1f} us  p99 {lat['flag_p99']:7.1f} us")
    print(f"baseline: pipe message latency  p50 {lat['pipe_p50']:7.1f} us  p99 {lat['pipe_p99']:7.1f} us")
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        print("GPU  skipped: CUDA not available")
        return
    r = measure_d2h(args.iters)
    print(f"GPU  {torch.cuda.get_device_name()}")
    print(f"D2H  pinned (cudaHostAlloc) baseline  {r['pinned']:7.2f} GB/s")
    print(f"D2H  KV region (cudaHostRegister shm) {r['region']:7.2f} GB/s  "
          f"({r['region'] / r['pinned']:.1%} of pinned; target >= 80%)")
    print(f"D2H  pageable                         {r['pageable']:7.2f} GB/s")
    print(f"D2H  region + event + mark_ready      {r['protocol']:7.2f} GB/s (wall clock)")
    print(f"bytes equal after copy: {bool(r['bytes_equal'])}")


if __name__ == "__main__":
    main()
