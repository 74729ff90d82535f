"""The KV hand-over inside the running services: host path (shared pinned region) against
GPU to GPU (the prefill GPU's mirror through CUDA IPC), one request at a time, so the
difference in time to first token is the hand-over's exposed cost and nothing else.

    PYTHONPATH=. python -m bench.bench_kv_path --pairs cuda:0/cuda:1,cuda:0/cuda:0 \\
        --tokens 64,512,1000 --requests 20

Per (pair, prompt length, path): the median over --requests of
- ttft_ms: request sent -> first token at the client (prefill + hand-over + decode's
  first token; the generated tokens are 2, so decode barely counts);
- prefill transfer_ms / exposed_ms: the prefill side's layer copies (D2H into the slot on
  the host path, device-to-device into the mirror on the GPU path), all of them and the
  part compute did not hide;
- ingest_ms / ingest_wait_ms: decode's whole ingest and the part spent waiting for
  prefill; ingest_ms - ingest_wait_ms is the decode side's copy after prefill finished
  (host path: the per-layer host copies not overlapped, then the H2D; GPU path: the
  peer copy and the scatter).
The model is synthetic gpt2-medium fp16 (24 layers, 1024 wide: 96 KiB of KV per token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time


async def _run(prefill: str, decode: str, n_tokens: int, kv_device: bool, requests: int,
               vocab: int) -> dict:
    from client.api import HybridClient

    rows = []
    async with HybridClient(prefill, decode, timeout_s=120) as c:
        for i in range(requests + 3):  # 3 warm-up requests per point
            ids = [(i * 7919 + j * 31) % vocab for j in range(n_tokens)]
            res = await c.generate(prompt_ids=ids, max_new_tokens=2, ignore_eos=True,
                                   kv_device=kv_device)
            if i >= 3:
                rows.append(res)
    t = [r.timings for r in rows]

    def med(key: str) -> float:
        return round(statistics.median(x[key] for x in t), 3)

    paths = sorted({r.kv_path for r in rows})
    return {"tokens": n_tokens, "path": "/".join(paths), "ttft_ms": med("ttft_ms"),
            "transfer_ms": med("transfer_ms"), "exposed_ms": med("exposed_transfer_ms"),
            "ingest_ms": med("ingest_ms"), "ingest_wait_ms": med("ingest_wait_ms"),
            "kv_mib": round(t[0]["kv_bytes"] / 2**20, 2)}


def _wait_mapped(decode: str, timeout_s: float = 30.0) -> bool:
    from client.api import HybridClient
    from protos import hybrid_pb2 as pb

    async def mapped() -> bool:
        async with HybridClient("127.0.0.1:1", decode) as c:
            info = await c.decode.Info(pb.InfoRequest(), timeout=10)
            return bool(info.prefills) and info.prefills[0].device

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if asyncio.run(mapped()):
            return True
        time.sleep(0.2)
    return False


def run(pairs: list[tuple[str, str]], tokens: list[int], requests: int, model: str,
        log_dir: str | None = None) -> list[dict]:
    import os

    out = []
    for pdev, ddev in pairs:
        with tempfile.TemporaryDirectory() as tmp:
            logs = os.path.join(log_dir, f"{pdev}-{ddev}".replace(":", "")) if log_dir else tmp
            os.makedirs(logs, exist_ok=True)
            out.extend(_one_pair(pdev, ddev, tokens, requests, model, logs))
    return out


def _one_pair(pdev: str, ddev: str, tokens: list[int], requests: int, model: str,
              logs: str) -> list[dict]:
    from client.launch import ServicePair

    out = []
    with ServicePair(model=model, device=pdev, decode_args=["--device", ddev],
                     prefill_args=["--region-mb", "2048"], log_dir=logs) as pair:
        if not _wait_mapped(pair.decode):
            print(f"warning: {pdev}->{ddev}: decode did not map the GPU mirror", flush=True)
        for n in tokens:
            for kv_device in (False, True):
                row = asyncio.run(_run(pair.prefill, pair.decode, n, kv_device, requests, 50257))
                row["pair"] = f"{pdev}->{ddev}"
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| prefill->decode | prompt tokens | KV MiB | path | TTFT ms | prefill copy ms "
             "(exposed) | decode ingest ms (waiting for prefill) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['tokens']} | {r['kv_mib']} | {r['path']} | "
                     f"{r['ttft_ms']:.2f} | {r['transfer_ms']:.3f} ({r['exposed_ms']:.3f}) | "
                     f"{r['ingest_ms']:.2f} ({r['ingest_wait_ms']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="cuda:0/cuda:1,cuda:0/cuda:0")
    p.add_argument("--tokens", default="64,512,1000")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--model", default="synthetic:gpt2-medium")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--log-dir", default=None, help="keep the services' logs here")
    args = p.parse_args(argv)
    import torch

    pairs = [tuple(x.split("/")) for x in args.pairs.split(",")]
    pairs = [x for x in pairs if max(int(d[-1]) for d in x) < torch.cuda.device_count()]
    print(f"device: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", flush=True)
    rows = run(pairs, [int(x) for x in args.tokens.split(",")], args.requests, args.model,
               args.log_dir)
    print("\n" + table(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
