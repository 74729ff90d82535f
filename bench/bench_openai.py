"""The OpenAI endpoint under concurrent load, beside the gRPC client in the same run.

    python -m bench.bench_openai --concurrency 1,16,64 --requests 128

Starts the pair (or uses --prefill/--decode) and `hybrid serve openai` in front of it,
then for each concurrency level runs a closed loop of /v1/completions requests (streamed
SSE, greedy, ignore_eos, fixed lengths) and the same load through client.api.HybridClient
directly: the difference is what the HTTP/JSON/SSE hop costs. Prints one JSON line per
(target, level) and a table; every non-200 is counted, never hidden.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter

from client.launch import ServicePair, free_port, spawn, stop


async def _http_one(http, url: str, model: str, prompt: list[int], n_out: int) -> tuple[str, float, int]:
    t0, ttft, n = time.perf_counter(), None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": n_out, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return str(r.status_code), 0.0, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):  # the last chunk: token counts (SSE chunks may batch tokens)
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                ttft = ttft or time.perf_counter() - t0
    return "200", ttft or 0.0, n


async def _grpc_one(client, prompt: list[int], n_out: int) -> tuple[str, float, int]:
    from engine.errors import HybridError

    t0, ttft, n = time.perf_counter(), None, 0
    try:
        async for item in client.stream(prompt_ids=prompt, max_new_tokens=n_out, ignore_eos=True):
            if isinstance(item, tuple):
                n += len(item[0])
                ttft = ttft or time.perf_counter() - t0
    except HybridError as e:
        return e.status, 0.0, 0
    return "OK", ttft or 0.0, n


async def _level(one, concurrency: int, requests: int) -> dict:
    todo = iter(range(requests))
    statuses: Counter = Counter()
    ttfts, tokens = [], 0

    async def worker() -> None:
        nonlocal tokens
        for _ in todo:
            status, ttft, n = await one()
            statuses[status] += 1
            if n:
                ttfts.append(ttft * 1e3)
                tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests, "statuses": dict(statuses),
            "req_s": round(requests / wall, 2), "out_tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(statistics.median(ttfts), 2) if ttfts else None}


async def run(args, prefill: str, decode: str, url: str) -> list[dict]:
    import httpx

    from client.api import HybridClient

    prompt = [(7 * i) % 200 + 1 for i in range(args.input_len)]
    rows = []
    limits = httpx.Limits(max_connections=max(args.levels) + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http, \
            HybridClient(prefill, decode, timeout_s=300) as grpc_client:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
        for c in args.levels:
            for target, one in (
                    ("openai", lambda: _http_one(http, url, model, prompt, args.output_len)),
                    ("grpc", lambda: _grpc_one(grpc_client, prompt, args.output_len))):
                await _level(one, c, min(c, args.requests))  # warm-up
                row = {"target": target, **await _level(one, c, args.requests)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic:gpt2-medium")
    p.add_argument("--device", default="auto")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--log-dir", default=None)
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",")]
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    pair = ServicePair(model=args.model, device=args.device, log_dir=args.log_dir).start()
    port = free_port()
    log = f"{args.log_dir}/openai.log" if args.log_dir else None
    proc = spawn(["serve", "openai", "--prefill", pair.prefill, "--decode", pair.decode,
                  "--port", str(port)], log_path=log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, proc)
        rows = asyncio.run(run(args, pair.prefill, pair.decode, url))
    finally:
        stop(proc)
        pair.stop()
    print("\n| target | c | requests | statuses | req/s | out tok/s | TTFT p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['concurrency']} | {r['requests']} | {r['statuses']} | "
              f"{r['req_s']} | {r['out_tok_s']} | {r['ttft_p50_ms']} |")
    bad = sum(n for r in rows for s, n in r["statuses"].items() if s not in ("200", "OK"))
    return 1 if bad else 0


def _wait_http(url: str, proc, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"openai endpoint exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


if __name__ == "__main__":
    sys.exit(main())
