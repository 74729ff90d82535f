"""Soak the service pair: many requests at a concurrency, optionally with faults, then a
JSON summary (issue 13: slots, fds and RSS must stay flat; a restarted decode serves
again within seconds).

    python -m bench.soak --requests 10000 --concurrency 16
    python -m bench.soak --requests 10000 --concurrency 16 --stop-decode-s 2 --kill-decode
    python -m bench.soak --prefill host:50051 --decode host:50052   # running services

Starts both services on the CPU with synthetic:tiny-gpt2 (ServicePair-like, but each
process on a fixed port so a fault can restart it there) unless --prefill/--decode are
given. After `--warmup` requests it records each service's RSS (VmRSS) and open fds, runs
`--requests` more, and records them again. Faults (only on services it started):
  --stop-decode-s S   SIGSTOP the decode service a third of the way in, SIGCONT S s later
                      (the load keeps going: requests wait, or end with a documented status)
  --kill-decode       two thirds of the way in: hold new requests, SIGKILL decode (in-flight
                      requests fail), restart it on the same port, and time SERVING, the
                      prefill's slots back to 0 (reclaimed from the dead instance) and the
                      first OK request; then let the load go on.
The chaos suite (tests/chaos) imports the process and load helpers from here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

MODEL = "synthetic:tiny-gpt2"


# ---- processes -------------------------------------------------------------------------
@dataclass
class Service:
    """One service process on a fixed port that may be killed and started again there."""

    role: str
    port: int
    log_path: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    model: str = MODEL
    device: str = "cpu"
    proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 120.0) -> Service:
        from client.launch import spawn, wait_serving

        self.proc = spawn(["serve", self.role, "--model", self.model, "--device", self.device,
                           "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                          env=self.env, log_path=self.log_path)
        try:
            wait_serving(self.target, self.proc, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (after a SIGCONT: never leave one stopped), SIGKILL after timeout_s."""
        from client.launch import stop

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        return stop(self.proc, timeout_s)

    def log(self) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port() -> int:
    from client.launch import free_port as fp

    return fp()


def proc_status_kb(pid: int, key: str) -> int:
    """A kB figure of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def settled_rss_mb(pid: int, samples: int = 5, period_s: float = 0.1) -> float:
    """Median of a few samples: one reading can land mid-allocation."""
    vals = []
    for _ in range(samples):
        vals.append(rss_mb(pid))
        time.sleep(period_s)
    return statistics.median(vals)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mapped_segments(pid: int) -> set[str]:
    """/dev/shm KV segment paths mapped by `pid` (an unlinked one ends in ' (deleted)')."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/hybrid-kv"):
                out.add(parts[5].strip())
    return out


def counters(target: str, role: str, timeout_s: float = 10.0) -> Counter:
    """ServiceInfo.counters (blocking; 0 for names not reported yet)."""
    import grpc

    from protos import hybrid_pb2 as pb
    from protos import hybrid_pb2_grpc as pbg

    stub_cls = pbg.PrefillServiceStub if role == "prefill" else pbg.DecodeServiceStub
    with grpc.insecure_channel(target) as ch:
        return Counter(dict(stub_cls(ch).Info(pb.InfoRequest(), timeout=timeout_s).counters))


def wait_for(pred: Callable[[], bool], timeout_s: float, period_s: float = 0.05) -> float | None:
    """Seconds until pred() held, None if it never did within timeout_s."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            return None
        time.sleep(period_s)


# ---- load ----------------------------------------------------------------------------
@dataclass
class LoadResult:
    by_status: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    max_overrun_s: float = float("-inf")  # worst time a request ran past its own deadline
    done: int = 0

    @property
    def ok(self) -> int:
        return self.by_status["OK"]

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def default_prompts() -> list[list[int]]:
    return [[1 + (i % 250), 7, 3 + (i % 11), 40 + i % 30][: 2 + i % 3] for i in range(64)]


async def run_load(prefill: str, decode: str, n: int, concurrency: int, *,
                   max_new_tokens: int = 4, timeout_s: float = 30.0,
                   prompts: Iterable[list[int]] | None = None, grpc_every: int = 0,
                   gate: asyncio.Event | None = None, result: LoadResult | None = None,
                   error_backoff_s: float = 0.0) -> LoadResult:
    """`n` requests through HybridClient, `concurrency` at a time (a client each).
    Every request ends OK (with all its tokens) or with a status name; one still running
    30 s past its deadline counts as HUNG. `grpc_every`: every k-th request takes the KV
    through FetchKv instead of shared memory. `gate`: workers wait for it before each
    request (a fault holds the load). `result` fills in as requests end."""
    from client.api import HybridClient
    from engine import errors

    prompts = list(prompts or default_prompts())
    res = result if result is not None else LoadResult()
    todo = iter(range(n))

    async def worker() -> None:
        async with HybridClient(prefill, decode, timeout_s=timeout_s) as c:
            for i in todo:
                if gate is not None:
                    await gate.wait()
                transport = "grpc" if grpc_every and i % grpc_every == grpc_every - 1 else "shm"
                t0 = time.monotonic()
                failed = False
                try:
                    out = await asyncio.wait_for(
                        c.generate(prompt_ids=prompts[i % len(prompts)],
                                   max_new_tokens=max_new_tokens, ignore_eos=True,
                                   kv_transport=transport), timeout_s + 30)
                    if len(out.token_ids) == max_new_tokens:
                        res.by_status["OK"] += 1
                        res.latencies_ms.append((time.monotonic() - t0) * 1e3)
                    else:
                        res.by_status["SHORT"] += 1
                except errors.HybridError as e:
                    res.by_status[getattr(e, "status", type(e).__name__)] += 1
                    failed = True
                except TimeoutError:
                    res.by_status["HUNG"] += 1
                    failed = True
                res.max_overrun_s = max(res.max_overrun_s, time.monotonic() - t0 - timeout_s)
                res.done += 1
                if failed and error_backoff_s:
                    await asyncio.sleep(error_backoff_s)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.wall_s = time.monotonic() - t0
    return res


# ---- the soak ----------------------------------------------------------------------------
def _figures(svc: dict[str, Service]) -> dict:
    return {name: {"pid": s.pid, "rss_mb": round(settled_rss_mb(s.pid), 1),
                   "fds": fd_count(s.pid)} for name, s in svc.items()}


async def _when(res: LoadResult, n: int) -> None:
    while res.done < n:
        await asyncio.sleep(0.05)


async def _stop_decode(decode: Service, res: LoadResult, at: int, seconds: float) -> dict:
    await _when(res, at)
    before = Counter(res.by_status)
    decode.signal(signal.SIGSTOP)
    await asyncio.sleep(seconds)
    decode.signal(signal.SIGCONT)
    await asyncio.sleep(5)  # requests that were waiting end one way or the other
    return {"at_request": at, "stopped_s": seconds,
            "statuses_until_5s_after_sigcont": dict(Counter(res.by_status) - before)}


async def _kill_decode(decode: Service, prefill: Service, res: LoadResult, at: int,
                       gate: asyncio.Event, after: asyncio.Task | None = None) -> dict:
    """SIGKILL decode with the load held, restart it on its port; the figures: time to
    SERVING, slots back to 0 (in-flight clients release theirs; prefill reclaims what
    the dead instance had claimed), first OK request."""
    from client.api import HybridClient

    await _when(res, at)
    if after is not None:
        await asyncio.shield(after)  # one fault at a time
    gate.clear()  # hold new requests: the figures below are the restart's alone
    before = Counter(res.by_status)
    reclaimed0 = counters(prefill.target, "prefill")["slots-reclaimed"]
    loop = asyncio.get_running_loop()
    t_kill = time.monotonic()
    decode.kill()
    in_use_after_kill = counters(prefill.target, "prefill")["slots-in-use"]
    freeing = loop.run_in_executor(
        None, wait_for, lambda: counters(prefill.target, "prefill")["slots-in-use"] == 0, 60)
    await loop.run_in_executor(None, decode.start)
    t_serving = time.monotonic()
    kill_free_s = await freeing
    free_s = None if kill_free_s is None else max(0.0, t_kill + kill_free_s - t_serving)
    first_ok = None
    async with HybridClient(prefill.target, decode.target, timeout_s=10) as c:
        while first_ok is None and time.monotonic() - t_serving < 30:
            try:
                await c.generate(prompt_ids=[1, 2, 3], max_new_tokens=4)
                first_ok = time.monotonic() - t_serving
            except Exception:
                await asyncio.sleep(0.1)
    gate.set()
    return {"at_request": at, "kill_to_serving_s": round(t_serving - t_kill, 2),
            "slots_in_use_after_kill": in_use_after_kill,
            "kill_to_slots_free_s": None if kill_free_s is None else round(kill_free_s, 3),
            "serving_to_slots_free_s": None if free_s is None else round(free_s, 3),
            "serving_to_first_ok_s": None if first_ok is None else round(first_ok, 3),
            "slots_reclaimed": counters(prefill.target, "prefill")["slots-reclaimed"] - reclaimed0,
            "in_flight_failed": dict(Counter(res.by_status) - before)}


async def soak(a: argparse.Namespace, svc: dict[str, Service]) -> dict:
    prefill = svc["prefill"].target if svc else a.prefill
    decode = svc["decode"].target if svc else a.decode
    warm = await run_load(prefill, decode, a.warmup, a.concurrency,
                          max_new_tokens=a.max_new_tokens, grpc_every=a.grpc_every)
    time.sleep(0.5)
    before = _figures(svc) if svc else {}
    res, gate = LoadResult(), asyncio.Event()
    gate.set()
    faults: list[asyncio.Task] = []
    if svc and a.stop_decode_s:
        faults.append(asyncio.create_task(
            _stop_decode(svc["decode"], res, a.requests // 3, a.stop_decode_s)))
    if svc and a.kill_decode:
        faults.append(asyncio.create_task(
            _kill_decode(svc["decode"], svc["prefill"], res, 2 * a.requests // 3, gate,
                         faults[0] if faults else None)))
    await run_load(prefill, decode, a.requests, a.concurrency, max_new_tokens=a.max_new_tokens,
                   timeout_s=a.timeout_s, grpc_every=a.grpc_every, gate=gate, result=res,
                   error_backoff_s=0.05)
    fault_report = [await f for f in faults]
    free_s = wait_for(lambda: counters(prefill, "prefill")["slots-in-use"] == 0, 10)
    time.sleep(0.5)
    after = _figures(svc) if svc else {}
    p, d = counters(prefill, "prefill"), counters(decode, "decode")
    return {
        "requests": a.requests, "concurrency": a.concurrency,
        "max_new_tokens": a.max_new_tokens, "warmup_requests": a.warmup,
        "warmup_by_status": dict(warm.by_status),
        "ok": res.ok, "by_status": dict(res.by_status),
        "latency_ms": {"p50": round(res.percentile(50), 1), "p99": round(res.percentile(99), 1),
                       "max": round(max(res.latencies_ms, default=0.0), 1)},
        "wall_s": round(res.wall_s, 1), "requests_per_s": round(a.requests / res.wall_s, 1),
        "max_overrun_of_deadline_s": round(res.max_overrun_s, 2),
        "services_after_warmup": before, "services_after": after,
        "slots_in_use_after": p["slots-in-use"],
        "slots_free_after_s": None if free_s is None else round(free_s, 2),
        "prefill_counters": {k: p[k] for k in ("slots-allocated", "slots-released",
                                               "slots-reaped", "slots-failed",
                                               "slots-reclaimed", "clients-holding",
                                               "fetch-streams")},
        "decode_counters": {k: d[k] for k in ("sessions-open", "active", "cancelled",
                                              "shm-requests", "grpc-requests")},
        "faults": fault_report,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=200, help="requests before the 'before' figures")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=30.0, help="each request's deadline")
    p.add_argument("--grpc-every", type=int, default=10,
                   help="every k-th request takes its KV through FetchKv (0: never)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--lease-s", type=float, default=30.0)
    p.add_argument("--prefill", default=None, help="a running prefill service (no launch)")
    p.add_argument("--decode", default=None, help="a running decode service (no launch)")
    p.add_argument("--stop-decode-s", type=float, default=0.0)
    p.add_argument("--kill-decode", action="store_true")
    p.add_argument("--log-dir", default=None, help="service logs (default: a temp dir)")
    a = p.parse_args(argv)
    if bool(a.prefill) != bool(a.decode):
        p.error("give both --prefill and --decode, or neither")
    svc: dict[str, Service] = {}
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="soak-")
    os.makedirs(log_dir, exist_ok=True)
    try:
        if not a.prefill:
            pre = Service("prefill", free_port(), os.path.join(log_dir, "prefill.log"),
                          ["--lease-s", str(a.lease_s)], model=a.model)
            svc["prefill"] = pre.start()
            svc["decode"] = Service("decode", free_port(), os.path.join(log_dir, "decode.log"),
                                    ["--prefill", pre.target], model=a.model).start()
        t0 = time.monotonic()
        out = asyncio.run(soak(a, svc))
        out["total_s"] = round(time.monotonic() - t0, 1)
        out["log_dir"] = log_dir if svc else None
    finally:
        for s in reversed(list(svc.values())):
            s.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
