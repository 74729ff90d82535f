"""KV hand-over between two GPUs: the host bounce the services use today against a direct
peer copy (same process) and a CUDA IPC peer copy (another process, as a prefill and a
decode service would be). Issue 15, item 1: the raw transfer figures the design rests on.

    python -m bench.bench_p2p --tokens 64,512,2048          # needs 2 GPUs

Per layer of gpt2-medium fp16 (K+V = 2 x 16 heads x T x 64 x 2 bytes), median of
--repeats copies, each timed on the host around the whole path with both devices
synchronized (peer: one cudaMemcpyPeer). Prints one JSON line per size and a
table with the per-request total (24 layers) and the achieved GB/s. The host path is
what the services do today: D2H into the shared slot, the decode's host copy into its
pinned ring, H2D.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _time(fn, repeats: int, dev0, dev1) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize(dev0)
    torch.cuda.synchronize(dev1)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev0)
        torch.cuda.synchronize(dev1)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def _ipc_child(q_out, q_in, nbytes: int) -> None:
    """The 'prefill' process: a buffer on cuda:0 handed over by CUDA IPC (torch's
    multiprocessing reduction of a CUDA tensor), kept alive until told to stop."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda:0")
    q_out.put(src)
    q_in.get()


def run(tokens: list[int], repeats: int) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs (nvidia-h200-x2)")
    d0, d1 = torch.device("cuda:0"), torch.device("cuda:1")
    peer = torch.cuda.can_device_access_peer(1, 0)
    ctx = mp.get_context("spawn")
    rows = []
    for t in tokens:
        nbytes = 2 * 16 * t * 64 * 2
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=d0)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=d1)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # the shm slot
        ring = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)    # decode's ring

        def host(src=src, dst=dst, pinned=pinned, ring=ring):
            # what the services do: D2H into the slot, ready flag after the event, decode
            # copies the slot into its pinned ring (host memcpy), then one H2D
            with torch.cuda.device(d0):
                pinned.copy_(src, non_blocking=True)
                torch.cuda.current_stream(d0).synchronize()
            ring.copy_(pinned)
            with torch.cuda.device(d1):
                dst.copy_(ring, non_blocking=True)

        def direct(src=src, dst=dst):
            with torch.cuda.device(d1):
                dst.copy_(src, non_blocking=True)

        q_out, q_in = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=_ipc_child, args=(q_out, q_in, nbytes))
        child.start()
        shared = q_out.get(timeout=120)  # a cuda:0 tensor opened through CUDA IPC

        def ipc(shared=shared, dst=dst):
            with torch.cuda.device(d1):
                dst.copy_(shared, non_blocking=True)

        row = {"tokens": t, "layer_bytes": nbytes, "peer_access": peer}
        for name, fn in (("host", host), ("peer", direct), ("ipc_peer", ipc)):
            ms = _time(fn, repeats, d0, d1)
            row[f"{name}_ms"] = round(ms, 4)
            row[f"{name}_gb_s"] = round(nbytes / ms / 1e6, 1)
        assert torch.equal(dst.cpu(), shared.cpu()), "IPC copy differs from its source"
        del shared, ipc  # the closure holds it too: release before the producer exits
        q_in.put("done")
        child.join(60)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="64,512,2048")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--layers", type=int, default=24)
    args = p.parse_args(argv)
    rows = run([int(x) for x in args.tokens.split(",")], args.repeats)
    print(f"\n| tokens | layer KiB | host bounce ms (GB/s) | peer ms (GB/s) | IPC peer ms (GB/s) "
          f"| per request ({args.layers} layers) host / IPC ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['layer_bytes'] >> 10} | {r['host_ms']} ({r['host_gb_s']}) "
              f"| {r['peer_ms']} ({r['peer_gb_s']}) | {r['ipc_peer_ms']} ({r['ipc_peer_gb_s']}) "
              f"| {r['host_ms'] * args.layers:.2f} / {r['ipc_peer_ms'] * args.layers:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
