"""`hybrid bench serve`: serving load against the service pair and/or the single-process
engine, modelled on vLLM's benchmarks/benchmark_serving.py.

What is measured, per target and load point (bench/serve_stats.py computes it):
completed requests, wall time, request/s, output tok/s, TTFT, TPOT, ITL and E2E latency
(mean, p50/p90/p99), goodput against a TTFT/TPOT SLO, and every failure by gRPC status.

How it maps to benchmark_serving:
- `--rate R` is its `--request-rate` (Poisson arrivals, gamma with `--burstiness`; `inf`
  sends all at once) with `--num-requests` as its `--num-prompts`: open loop, a request is
  sent at its arrival time whatever is still in flight.
- `--concurrency N` is closed loop (its `--max-concurrency` with an infinite rate): N
  clients, each sending its next request when the last one ends, for `--duration-s`
  seconds or `--requests` requests per level. The wall time ends at the last completion.
- Lengths are its "random" dataset: uniform random token ids from a seeded generator (no
  tokenizer), fixed lengths or `--dist lognormal` around the given means, always
  `ignore_eos` so every request produces what it asked for; greedy sampling.
- Every point of every target sees the same request sequence (the seed depends on the
  point, not the target), so `--target both` compares the two on identical work, in one
  run; each target gets `--warmup` requests first (graph capture, channels, allocators).

Targets: `pair` starts both services as local processes (client.launch.ServicePair, as
bench/bench_pair.py does) unless `--prefill/--decode` name running ones, and drives them
with client.api.HybridClient from one event loop (one client, i.e. two channels, per
`--clients-per-channel` lanes). `local` is engine.llm_engine.LLMEngine in this process,
each request iterated on a worker thread that timestamps every token as it is yielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench import serve_stats as st
from bench.serve_stats import RequestRecord, Slo, Stopwatch

TARGETS = ("pair", "local")
DEFAULT_CONCURRENCY = (1, 4, 16, 64, 256)
OPEN_LOOP_LANES = 256  # open loop: request i uses lane i % 256 (8 pair clients at 32/lane)


@dataclass(frozen=True)
class ServeBenchConfig:
    targets: tuple[str, ...] = ("pair",)
    model: str | None = None           # None: the running pair's, else synthetic:gpt2-medium
    device: str | None = None          # None: services "auto", local cuda if present
    dtype: str = "auto"
    backend: str = "gpu"               # decode backend of a started pair
    max_batch: int = 256               # local engine rows; a started decoder's --max-batch
    prefill_addr: str | None = None    # both or neither: running services
    decode_addr: str | None = None
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    duration_s: float = 30.0
    requests: int | None = None        # per concurrency level; overrides duration_s
    num_requests: int = 200            # per rate
    burstiness: float = 1.0
    input_len: int = 64
    output_len: int = 128
    dist: str = "fixed"
    sigma: float = 0.5
    seed: int = 0
    slo: Slo = Slo()
    warmup: int = 4
    timeout_s: float = 600.0
    clients_per_channel: int = 32
    region_mb: int = 1024
    startup_timeout_s: float = 600.0
    log_dir: str | None = None
    prefill_args: tuple[str, ...] = ()  # extra flags for a started pair (they come last,
    decode_args: tuple[str, ...] = ()   # so they override the bench's own)
    security: object = None             # transport.security.Security of running services
    kv_device: bool = True              # pair: the client may ask for the GPU-to-GPU KV
                                        # path (False: always the shared pinned region)

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"unknown target(s) {bad}: use pair, local or both")
        if (self.prefill_addr is None) != (self.decode_addr is None):
            raise ValueError("give both --prefill and --decode, or neither")
        if self.dist not in ("fixed", "lognormal"):
            raise ValueError(f"--dist must be fixed or lognormal, not {self.dist!r}")
        if min(self.input_len, self.output_len) < 1:
            raise ValueError("--input-len and --output-len must be >= 1")

    def points(self) -> list[Point]:
        conc = self.concurrency or (() if self.rates else DEFAULT_CONCURRENCY)
        return ([Point("concurrency", float(c)) for c in conc]
                + [Point("rate", r) for r in self.rates])

    def lengths_label(self) -> str:
        if self.dist == "fixed":
            return f"fixed {self.input_len}:{self.output_len}"
        return f"lognormal means {self.input_len}:{self.output_len}, sigma {self.sigma:g}"


@dataclass(frozen=True)
class Point:
    mode: str          # "concurrency" (closed loop) or "rate" (open loop, Poisson)
    value: float       # clients, or requests/s (inf: all at t=0)

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c={int(self.value)}"
        return "rate=inf" if math.isinf(self.value) else f"rate={self.value:g}/s"

    def to_json(self) -> dict:
        conc = int(self.value) if self.mode == "concurrency" else None
        rate = self.value if self.mode == "rate" else None  # inf -> null in JSON
        return {"mode": self.mode, "label": self.label, "concurrency": conc, "rate": rate}


@dataclass(frozen=True)
class RequestSpec:
    prompt_ids: list[int]
    output_len: int


def parse_ints(text: str) -> tuple[int, ...]:
    vals = tuple(int(x) for x in text.split(",") if x.strip())
    if not vals or min(vals) < 1:
        raise ValueError(f"expected positive integers like 1,4,16, got {text!r}")
    return vals


def parse_rates(text: str) -> tuple[float, ...]:
    vals = tuple(float(x) for x in text.split(",") if x.strip())  # float("inf") works
    if not vals or not all(v > 0 for v in vals):
        raise ValueError(f"expected positive rates like 10,50,inf, got {text!r}")
    return vals


# ---- workload -----------------------------------------------------------------------

def sample_lengths(n: int, input_len: int, output_len: int, dist: str, sigma: float,
                   max_positions: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n (prompt, output) lengths. lognormal: mean-preserving (mu = ln m - sigma^2/2),
    rounded, then clipped so that each request fits: 1 <= in <= max-1, 1 <= out <= max-in."""
    if dist == "fixed":
        ins, outs = np.full(n, input_len), np.full(n, output_len)
    else:
        ins = np.rint(rng.lognormal(math.log(input_len) - sigma**2 / 2, sigma, n))
        outs = np.rint(rng.lognormal(math.log(output_len) - sigma**2 / 2, sigma, n))
    ins = np.clip(ins, 1, max_positions - 1).astype(np.int64)
    outs = np.clip(outs, 1, max_positions - ins).astype(np.int64)
    return ins, outs


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator,
                     burstiness: float = 1.0) -> np.ndarray:
    """Send times (s from the start) of n requests: the first at 0, then gamma gaps of
    mean 1/rate (shape `burstiness`; 1 = exponential = Poisson), as vLLM's get_request."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n - 1) if n > 1 else np.zeros(0)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def spec_stream(cfg: ServeBenchConfig, vocab: int, max_positions: int,
                seed: Sequence[int]) -> Iterator[RequestSpec]:
    """An endless seeded sequence of requests (closed loop does not know how many)."""
    rng = np.random.default_rng(list(seed))
    while True:
        ins, outs = sample_lengths(64, cfg.input_len, cfg.output_len, cfg.dist, cfg.sigma,
                                   max_positions, rng)
        for n_in, n_out in zip(ins.tolist(), outs.tolist(), strict=True):
            yield RequestSpec(rng.integers(0, vocab, n_in).tolist(), n_out)


def check_fits(cfg: ServeBenchConfig, max_positions: int) -> None:
    if cfg.dist == "fixed" and cfg.input_len + cfg.output_len > max_positions:
        raise ValueError(f"--input-len {cfg.input_len} + --output-len {cfg.output_len} "
                         f"exceeds the model's {max_positions} positions")


def model_shape(spec: str) -> tuple[int, int]:
    """(vocab size, max positions) of a model spec without loading its weights."""
    from engine.config import ModelConfig
    from engine.loader import peek_config, resolve_model_dir

    cfg = peek_config(spec) or ModelConfig.from_hf(resolve_model_dir(spec))
    return cfg.vocab_size, cfg.max_positions


# ---- load drivers -------------------------------------------------------------------

RequestFn = Callable[[RequestSpec, int], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Measured:
    records: list[RequestRecord]
    duration_s: float
    max_in_flight: int


class InFlight:
    """Counts requests in flight and keeps the peak (the closed loop's invariant)."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    async def call(self, fn: RequestFn, spec: RequestSpec, lane: int) -> RequestRecord:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await fn(spec, lane)
        finally:
            self.now -= 1


class Budget:
    """Closed loop's stop rule: a request count, else a deadline for new requests."""

    def __init__(self, requests: int | None, duration_s: float) -> None:
        self.left = math.inf if requests is None else requests
        self.deadline = math.inf if requests is not None else time.perf_counter() + duration_s

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


async def run_closed(fn: RequestFn, specs: Iterator[RequestSpec], clients: int,
                     requests: int | None, duration_s: float) -> Measured:
    """`clients` loops, each sending its next request as soon as its last one ends."""
    gauge, records, t0 = InFlight(), [], time.perf_counter()
    budget = Budget(requests, duration_s)

    async def client(lane: int) -> None:
        while budget.take():
            records.append(await gauge.call(fn, next(specs), lane))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return Measured(records, time.perf_counter() - t0, gauge.peak)


async def run_open(fn: RequestFn, specs: Sequence[RequestSpec],
                   arrivals: Sequence[float]) -> Measured:
    """Each request sent at its arrival time, whatever is still in flight."""
    gauge, tasks, t0 = InFlight(), [], time.perf_counter()
    for i, (spec, at) in enumerate(zip(specs, arrivals, strict=True)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(gauge.call(fn, spec, i % OPEN_LOOP_LANES)))
    records = list(await asyncio.gather(*tasks))
    return Measured(records, time.perf_counter() - t0, gauge.peak)


async def measure_point(fn: RequestFn, cfg: ServeBenchConfig, point: Point, index: int,
                        vocab: int, max_positions: int) -> Measured:
    specs = spec_stream(cfg, vocab, max_positions, (cfg.seed, index))
    if point.mode == "concurrency":
        return await run_closed(fn, specs, int(point.value), cfg.requests, cfg.duration_s)
    batch = [next(specs) for _ in range(cfg.num_requests)]
    rng = np.random.default_rng([cfg.seed, index, 1])
    return await run_open(fn, batch, poisson_arrivals(len(batch), point.value, rng,
                                                      cfg.burstiness).tolist())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def measure_target(name: str, fn: RequestFn, cfg: ServeBenchConfig, vocab: int,
                         max_positions: int) -> list[dict]:
    """Warm-up, then every load point: one summary dict per point."""
    if cfg.warmup:
        warm = await run_closed(fn, spec_stream(cfg, vocab, max_positions, (cfg.seed, 1 << 20)),
                                cfg.warmup, cfg.warmup, 0.0)
        errs = st.status_counts(warm.records)
        log(f"{name}: warm-up {cfg.warmup} requests in {warm.duration_s:.2f}s"
            + (f", failures {errs} {st.error_samples(warm.records)}" if errs else ""))
    out = []
    for i, point in enumerate(cfg.points()):
        m = await measure_point(fn, cfg, point, i, vocab, max_positions)
        row = {"target": name, **point.to_json(), "max_in_flight": m.max_in_flight,
               **st.summarize(m.records, m.duration_s, cfg.slo)}
        log(f"{name} {point.label}: {row['completed']} done, {row['failed']} failed "
            f"{row['errors'] or ''} in {m.duration_s:.2f}s")
        out.append(row)
    return out


# ---- targets ------------------------------------------------------------------------

def _status_of(e: BaseException) -> tuple[str, str]:
    """(gRPC status name, message) of a failed request."""
    import grpc

    from engine.errors import HybridError

    if isinstance(e, HybridError):
        return e.status, str(e)
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code().name, e.details() or ""
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "DEADLINE_EXCEEDED", str(e)
    return "UNKNOWN", f"{type(e).__name__}: {e}"  # what a server would call it


class PairTarget:
    """HybridClients for a running pair: lane i uses client i // clients_per_channel."""

    def __init__(self, prefill: str, decode: str, cfg: ServeBenchConfig) -> None:
        self.addrs, self.cfg = (prefill, decode), cfg
        self.clients: dict[int, object] = {}

    def _client(self, lane: int):
        from client.api import HybridClient

        idx = lane // self.cfg.clients_per_channel
        if idx not in self.clients:
            self.clients[idx] = HybridClient(*self.addrs, timeout_s=self.cfg.timeout_s,
                                             security=self.cfg.security)
        return self.clients[idx]

    async def describe(self) -> dict:
        c = self._client(0)
        d, p = await c.decode_info(), await c.prefill_info()
        return {"model": d.model, "device": f"prefill {p.device}, decode {d.device}",
                "backend": d.backend, "max_positions": d.max_positions,
                "prefill": self.addrs[0], "decode": self.addrs[1]}

    def stream_kwargs(self, spec: RequestSpec) -> dict:
        kw = dict(prompt_ids=spec.prompt_ids, max_new_tokens=spec.output_len, ignore_eos=True)
        if not self.cfg.kv_device:  # only when asked: the default is the client's own
            kw["kv_device"] = False
        return kw

    def on_result(self, result) -> None:
        """Each successful request's RemoteResult (a subclass may tally routes, KV paths)."""

    async def request(self, spec: RequestSpec, lane: int) -> RequestRecord:
        sw = Stopwatch(len(spec.prompt_ids), spec.output_len)
        try:
            async for item in self._client(lane).stream(**self.stream_kwargs(spec)):
                if isinstance(item, tuple):  # (ids, text); the RemoteResult comes last
                    sw.tokens(len(item[0]))
                else:
                    self.on_result(item)
        except Exception as e:  # noqa: BLE001 - every failure is a counted outcome
            return sw.done(*_status_of(e))
        return sw.done()

    async def aclose(self) -> None:
        for c in self.clients.values():
            await c.close()


class LocalTarget:
    """engine.llm_engine.LLMEngine in this process: each request iterated on a worker
    thread (the iterator blocks), each token timestamped as it is yielded."""

    def __init__(self, engine, workers: int) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(workers, "bench-local")  # threads start on demand
        self.live: set = set()  # requests being iterated: cancelled on close (Ctrl-C)
        self.lock = threading.Lock()

    async def request(self, spec: RequestSpec, lane: int) -> RequestRecord:
        sw = Stopwatch(len(spec.prompt_ids), spec.output_len)  # sent now, even if queued
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run, spec, sw)

    def _run(self, spec: RequestSpec, sw: Stopwatch) -> RequestRecord:
        from engine.sampling import SamplingParams

        req = None
        try:
            req = self.engine.submit(spec.prompt_ids, spec.output_len, SamplingParams(),
                                     ignore_eos=True)
            with self.lock:
                self.live.add(req)
            for _token in req:
                sw.tokens(1)
        except Exception as e:  # noqa: BLE001
            return sw.done(*_status_of(e))
        finally:
            with self.lock:
                self.live.discard(req)
        return sw.done()

    def close(self) -> None:
        with self.lock:
            for req in list(self.live):
                req.cancel()
        self.pool.shutdown(wait=True)


def service_args(cfg: ServeBenchConfig) -> tuple[list[str], list[str]]:
    """Flags of a started pair: queues deep enough for the biggest load (else the bench
    measures admission, RESOURCE_EXHAUSTED), the decoder batching --max-batch rows and
    admitting twice that (the decode service's own default since the engine loop)."""
    load = max([int(p.value) for p in cfg.points() if p.mode == "concurrency"]
               + [cfg.num_requests if cfg.rates else 0])
    common = ["--dtype", cfg.dtype, "--max-queue", str(max(128, load))]
    return ([*common, "--region-mb", str(cfg.region_mb), *cfg.prefill_args],
            [*common, "--max-batch", str(cfg.max_batch),
             "--max-active", str(max(16, 2 * cfg.max_batch)), *cfg.decode_args])


@contextlib.contextmanager
def pair_addresses(cfg: ServeBenchConfig, model: str):
    """(prefill, decode, started_here): the given services, or a pair started for the run."""
    if cfg.prefill_addr:
        yield cfg.prefill_addr, cfg.decode_addr, False
        return
    from client.launch import ServicePair

    with contextlib.ExitStack() as stack:
        logs = cfg.log_dir or stack.enter_context(tempfile.TemporaryDirectory())
        Path(logs).mkdir(parents=True, exist_ok=True)
        pfx, dec = service_args(cfg)
        pair = ServicePair(model=model, device=cfg.device or "auto", backend=cfg.backend,
                           log_dir=logs, prefill_args=pfx, decode_args=dec)
        log(f"pair: starting {model} on {cfg.device or 'auto'} (logs in {logs}) ...")
        stack.enter_context(_started(pair, cfg.startup_timeout_s, logs))
        yield pair.prefill, pair.decode, True


@contextlib.contextmanager
def _started(pair, timeout_s: float, logs: str):
    try:
        pair.start(timeout_s=timeout_s)
    except Exception:
        for f in sorted(Path(logs).glob("*.log")):  # why it did not come up
            log(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text().splitlines()[-20:]))
        raise
    try:
        yield pair
    finally:
        pair.stop()


def _gpu_name(device: str) -> str:
    """The CUDA device's name when this machine has it (services started here)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return ""
    return torch.cuda.get_device_name(torch.device(device))


async def _bench_pair(prefill: str, decode: str, local: bool, cfg: ServeBenchConfig,
                      shape: tuple[int, int] | None) -> tuple[dict, list[dict]]:
    target = PairTarget(prefill, decode, cfg)
    try:
        info = await target.describe()
        if local:
            names = {_gpu_name(d.split()[-1]) for d in info["device"].split(", ")} - {""}
            info["device"] += f" ({', '.join(sorted(names))})" if names else ""
        vocab, max_pos = shape or model_shape(info["model"])
        max_pos = min(max_pos, info["max_positions"] or max_pos)
        check_fits(cfg, max_pos)
        info["vocab_size"], info["max_positions"] = vocab, max_pos
        return info, await measure_target("pair", target.request, cfg, vocab, max_pos)
    finally:
        await target.aclose()


def bench_pair(cfg: ServeBenchConfig, model: str | None) -> tuple[dict, list[dict]]:
    spawn_model = model or "synthetic:gpt2-medium"
    shape = model_shape(model) if model else None
    if shape:
        check_fits(cfg, shape[1])  # before a slow service start
    with pair_addresses(cfg, spawn_model) as (p, d, here):
        return asyncio.run(_bench_pair(p, d, here, cfg, shape))


def _local_device(cfg: ServeBenchConfig) -> str:
    import torch

    if cfg.device and cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _new_engine(lm, max_batch: int):
    try:
        from engine.llm_engine import LLMEngine
    except ImportError as e:
        raise RuntimeError(f"--target local needs engine.llm_engine.LLMEngine: {e}") from None
    return LLMEngine(lm, max_batch=max_batch)


def bench_local(cfg: ServeBenchConfig, model: str) -> tuple[dict, list[dict]]:
    import torch

    from engine.loader import load_model

    device = _local_device(cfg)
    lm = load_model(model, device=device, dtype=cfg.dtype)
    check_fits(cfg, lm.config.max_positions)
    info = {"model": model, "device": _gpu_name(device) or device.upper(),
            "dtype": str(lm.dtype).replace("torch.", ""), "max_batch": cfg.max_batch,
            "vocab_size": lm.config.vocab_size, "max_positions": lm.config.max_positions}
    eng = _new_engine(lm, cfg.max_batch)
    biggest = max([int(p.value) for p in cfg.points() if p.mode == "concurrency"]
                  + [min(cfg.num_requests, 1024) if cfg.rates else 0, cfg.warmup, 1])
    target = LocalTarget(eng, biggest)
    try:
        return info, asyncio.run(measure_target("local", target.request, cfg,
                                                lm.config.vocab_size, lm.config.max_positions))
    finally:
        target.close()
        eng.close()
        del lm, eng
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # hand memory back before another target runs


# ---- whole run ----------------------------------------------------------------------

def run(cfg: ServeBenchConfig) -> dict:
    """Every target at every point; the pair first (its processes exit and free the GPU
    before the local engine loads here). Returns the report (see `dumps` for JSON)."""
    import torch

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    model, targets, points = cfg.model, {}, []
    for name in ("pair", "local"):
        if name not in cfg.targets:
            continue
        info, rows = bench_pair(cfg, model) if name == "pair" else bench_local(
            cfg, model or "synthetic:gpt2-medium")
        model = model or info["model"]  # a running pair names the model for local
        targets[name], points = info, points + rows
    meta = {"tool": "hybrid bench serve", "model": model, "targets": targets,
            "lengths": cfg.lengths_label(), "slo": cfg.slo.describe(),
            "config": _config_json(cfg), "torch": torch.__version__,
            "started": started}
    return {"meta": meta, "points": points}


def _config_json(cfg: ServeBenchConfig) -> dict:
    d = asdict(replace(cfg, security=None))  # never the token or key into a report
    d["security"] = cfg.security.describe(server=False) if cfg.security else "plaintext"
    d["points"] = [p.to_json() for p in cfg.points()]
    return d


def write_reports(report: dict, json_path: Path | None, md_path: Path | None,
                  png_path: Path | None) -> list[str]:
    """Writes the requested files; returns messages about what was written or skipped."""
    msgs = []
    for path, text in ((json_path, st.dumps(report)), (md_path, st.markdown(report))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            msgs.append(f"wrote {path}")
    if png_path is not None:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        msgs.append(f"wrote {png_path}" if st.chart(report, png_path)
                    else f"skipped {png_path}: matplotlib is not installed "
                         "(pip install -e '.[bench]')")
    return msgs
