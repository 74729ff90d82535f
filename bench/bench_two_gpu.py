"""Serving on two GPUs (issue 15, item 1): is splitting prefill and decode across the two
GPUs of a host worth it, and with which KV hand-over?

    PYTHONPATH=. python -m bench.bench_two_gpu --json two-gpu.json --md two-gpu.md
    PYTHONPATH=. python -m bench.bench_two_gpu --dry-run        # the plan, nothing started

Configurations (each started on its own, measured, stopped with SIGTERM before the next):
- `one-gpu`: one pair, prefill and decode both on cuda:0 (cuda:1 idle);
- `split-host`: prefill on cuda:0, decode on cuda:1, the KV through the shared pinned host
  region (the client never asks for the GPU path: `kv_device=False`);
- `split-ipc`: the same services, the KV GPU to GPU (CUDA IPC): the client asks for it and
  gets it where the decode mapped the prefill GPU's KV buffer (ServiceInfo.prefills[].device);
- `two-engines`: two independent pairs, pair 0 on cuda:0, pair 1 on cuda:1, the client
  routing over both (client/router.py): the fair "no disaggregation" baseline on the same
  two GPUs.

For each configuration and workload mix (`--mixes IN:OUT,...`, default 64:128 and the
prefill-heavy 512:128) it runs `hybrid bench serve`'s closed loop (bench/bench_serve.py:
N clients, each sending its next request when its last ends, for `--duration-s` per
level, uniform random prompt ids, ignore_eos, greedy) at each `--concurrency` level after
`--warmup` requests, and reports per point: request/s, output tok/s, TTFT p50/p90, TPOT
p50/p90 (bench/serve_stats.py, as vLLM's benchmark_serving) and goodput. Every
configuration sees the same request sequence at a given point (seeded by the point).

Goodput (DistServe, Zhong et al. OSDI'24): completed requests per second that met BOTH
SLOs, TTFT <= --slo-ttft-ms (default 200) and TPOT <= --slo-tpot-ms (default 20); failed
requests never count. TPOT per request = (E2E - TTFT) / (output tokens - 1).

Output: the device (GPU names, count, peer access 0<->1) first, the plan and its time
budget, then a Markdown table (one row per configuration x mix x concurrency) and, per
mix, the configuration with the best goodput at each concurrency. `--json`/`--md` write
them. Each row also names the KV path the decode reported per request when the client
exposes it (DecodeTimings.kv_path: shm, grpc, cuda-ipc) and how requests spread over the
pairs, so a split-ipc that silently fell back to the host path shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench import bench_serve as bs
from bench import serve_stats as st
from bench.serve_stats import Slo

HOST = "127.0.0.1"
CONFIGS = ("one-gpu", "split-host", "split-ipc", "two-engines")
DEFAULT_MIXES = "64:128,512:128"
DEFAULT_CONCURRENCY = "1,8,32,128"
GRACE_S = 5.0  # services' drain on SIGTERM: idle when stopped, so short

# Wall-time estimates for the plan's budget (s): one configuration's start (processes,
# weights, CUDA graphs, each service's own warm-up; services start in parallel) and stop,
# the bench's warm-up per mix, and a closed loop's drain after its deadline (the requests
# in flight then still finish, about one E2E latency, longer at higher concurrency).
START_S, STOP_S, WARMUP_S = 30.0, 3.0, 2.0


def drain_s(concurrency: int) -> float:
    return 0.5 + concurrency / 64


# ---- the plan -----------------------------------------------------------------------

@dataclass(frozen=True)
class Service:
    role: str                       # "prefill" | "decode"
    device: str                     # "cuda:N"
    port: int
    prefill_port: int | None = None  # decode: the prefill service it attaches to

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def name(self) -> str:
        return f"{self.role}-{self.device.replace(':', '')}"

    @property
    def gpu(self) -> int:
        """The CUDA ordinal (-1: not a cuda:N device, e.g. a CPU smoke run)."""
        head, _, idx = self.device.partition(":")
        return int(idx) if head == "cuda" and idx else -1

    def argv(self, model: str, prefill_flags: Sequence[str], decode_flags: Sequence[str]
             ) -> list[str]:
        """`python -m client.cli <this>` (client/cmd_serve.py's options)."""
        args = ["serve", self.role, "--model", model, "--device", self.device,
                "--host", HOST, "--port", str(self.port)]
        if self.role == "decode":
            return [*args, "--backend", "gpu", "--prefill", f"{HOST}:{self.prefill_port}",
                    *decode_flags]
        return [*args, *prefill_flags]


@dataclass(frozen=True)
class ConfigPlan:
    name: str
    services: tuple[Service, ...]   # prefill, decode[, prefill, decode]: pair by pair
    kv_device: bool                 # the client may ask for the GPU-to-GPU KV path
    about: str

    def role(self, role: str) -> list[Service]:
        return [s for s in self.services if s.role == role]

    @property
    def pairs(self) -> list[tuple[Service, Service]]:
        return list(zip(self.role("prefill"), self.role("decode"), strict=True))

    @property
    def prefill_addr(self) -> str:
        return ",".join(s.address for s in self.role("prefill"))

    @property
    def decode_addr(self) -> str:
        return ",".join(s.address for s in self.role("decode"))

    @property
    def gpus_needed(self) -> int:
        return 1 + max(s.gpu for s in self.services)


def plan_config(name: str, ports: Iterator[int]) -> ConfigPlan:
    """The services of configuration `name`, on ports drawn from `ports`."""
    def pair(pdev: str, ddev: str) -> tuple[Service, Service]:
        p = Service("prefill", pdev, next(ports))
        return p, Service("decode", ddev, next(ports), p.port)

    if name == "one-gpu":
        return ConfigPlan(name, pair("cuda:0", "cuda:0"), True,
                          "one pair, prefill and decode both on cuda:0 (cuda:1 idle)")
    if name == "split-host":
        return ConfigPlan(name, pair("cuda:0", "cuda:1"), False,
                          "prefill cuda:0, decode cuda:1, KV through the shared pinned host "
                          "region (client kv_device=False)")
    if name == "split-ipc":
        return ConfigPlan(name, pair("cuda:0", "cuda:1"), True,
                          "prefill cuda:0, decode cuda:1, KV GPU to GPU by CUDA IPC (asked "
                          "for; taken where the decode mapped the prefill GPU's KV buffer)")
    if name == "two-engines":
        return ConfigPlan(name, (*pair("cuda:0", "cuda:0"), *pair("cuda:1", "cuda:1")), True,
                          "two independent pairs (cuda:0, cuda:1), the client routing "
                          "over both by load")
    raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")


def free_ports() -> Iterator[int]:
    """Free loopback ports, none twice (the OS may hand the same one out again)."""
    from client.launch import free_port

    seen: set[int] = set()
    while True:
        port = free_port()
        if port not in seen:
            seen.add(port)
            yield port


def parse_configs(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise ValueError(f"unknown configuration(s) {bad or text!r}; known: {', '.join(CONFIGS)}")
    return names


def parse_mixes(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        try:
            n_in, n_out = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"a mix is IN:OUT like 64:128, got {part!r}") from None
        if min(n_in, n_out) < 1:
            raise ValueError(f"mix lengths must be >= 1, got {part!r}")
        out.append((n_in, n_out))
    if not out:
        raise ValueError(f"expected mixes like {DEFAULT_MIXES}, got {text!r}")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Options:
    configs: tuple[str, ...] = CONFIGS
    mixes: tuple[tuple[int, int], ...] = ((64, 128), (512, 128))
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    duration_s: float = 10.0
    warmup: int = 8
    slo: Slo = Slo(200.0, 20.0)
    model: str = "synthetic:gpt2-medium"
    dtype: str = "float16"
    max_batch: int = 256
    region_mb: int = 4096
    clients_per_channel: int = 32
    timeout_s: float = 120.0
    startup_timeout_s: float = 300.0
    seed: int = 0
    log_dir: str | None = None
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()

    def serve_config(self, plan: ConfigPlan | None = None) -> bs.ServeBenchConfig:
        """bench_serve's config for one configuration (the mix is set per mix)."""
        return bs.ServeBenchConfig(
            targets=("pair",), model=self.model, dtype=self.dtype, max_batch=self.max_batch,
            prefill_addr=plan.prefill_addr if plan else None,
            decode_addr=plan.decode_addr if plan else None,
            concurrency=self.concurrency, duration_s=self.duration_s, seed=self.seed,
            input_len=self.mixes[0][0], output_len=self.mixes[0][1], slo=self.slo,
            warmup=self.warmup, timeout_s=self.timeout_s,
            clients_per_channel=self.clients_per_channel, region_mb=self.region_mb,
            kv_device=plan.kv_device if plan else True)

    def service_flags(self) -> tuple[list[str], list[str]]:
        """Flags of the started services, the same for every configuration: bench_serve's
        (queues deep enough for the biggest level, decode --max-batch/--max-active, the
        region), prefill slots and admission for the biggest level (as the H200 serving
        runs of docs/performance.md), a short drain; then --prefill-arg/--decode-arg."""
        load = max(64, 2 * max(self.concurrency))
        cfg = replace(self.serve_config(), prefill_args=(
            "--max-slots", str(load), "--max-active", str(load), "--grace-s", f"{GRACE_S:g}",
            *self.prefill_args), decode_args=("--grace-s", f"{GRACE_S:g}", *self.decode_args))
        return bs.service_args(cfg)

    def commands(self, plan: ConfigPlan) -> list[tuple[Service, list[str]]]:
        pf, df = self.service_flags()
        return [(s, s.argv(self.model, pf, df)) for s in plan.services]

    def budget(self) -> dict:
        """Planned wall time (s): measured points plus the estimated overheads."""
        n_cfg, n_mix = len(self.configs), len(self.mixes)
        measured = n_cfg * n_mix * len(self.concurrency) * self.duration_s
        overhead = n_cfg * (START_S + STOP_S) + n_cfg * n_mix * (
            (WARMUP_S if self.warmup else 0.0) + sum(drain_s(c) for c in self.concurrency))
        return {"points": n_cfg * n_mix * len(self.concurrency), "measured_s": measured,
                "overhead_s": overhead, "total_s": measured + overhead}


def budget_line(opts: Options) -> str:
    b = opts.budget()
    line = (f"planned time: {len(opts.configs)} configs x {len(opts.mixes)} mixes x "
            f"{len(opts.concurrency)} levels x {opts.duration_s:g} s = {b['measured_s']:.0f} s "
            f"measured + ~{b['overhead_s']:.0f} s start/stop/warm-up/drain (estimated) = "
            f"~{b['total_s'] / 60:.1f} min")
    if b["total_s"] > 8.5 * 60:
        line += " (over ~8 min: lower --duration-s, or fewer --configs/--concurrency)"
    return line


# ---- the device ---------------------------------------------------------------------

def device_info() -> dict:
    """GPU names, count and peer access 0<->1 of this machine (the services' machine)."""
    try:
        import torch
    except ImportError:
        return {"cuda": False, "count": 0, "names": [], "peer": None, "note": "no torch"}
    if not torch.cuda.is_available():
        return {"cuda": False, "count": 0, "names": [], "peer": None,
                "torch": torch.__version__}
    n = torch.cuda.device_count()
    peer = None
    if n >= 2:
        peer = {"0->1": bool(torch.cuda.can_device_access_peer(0, 1)),
                "1->0": bool(torch.cuda.can_device_access_peer(1, 0))}
    return {"cuda": True, "count": n, "names": [torch.cuda.get_device_name(i) for i in range(n)],
            "peer": peer, "torch": torch.__version__}


def describe_device(d: dict) -> str:
    if not d.get("cuda"):
        return "device: no CUDA device on this machine" + (f" ({d['note']})" if d.get("note") else "")
    names = Counter(d["names"])
    what = ", ".join(f"{k} x {v}" for k, v in names.items())
    peer = d.get("peer")
    pa = ("n/a (one GPU)" if peer is None else
          ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in peer.items()))
    return f"device: {d['count']} GPU(s): {what}; peer access {pa}"


# ---- services -----------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def started(plan: ConfigPlan, opts: Options, logs: str):
    """Starts every service of `plan` at once, waits until each is SERVING; on leaving
    (normally or not) stops them all with SIGTERM, decodes first. Yields the seconds
    the start took."""
    from client import launch

    procs: list[tuple[Service, object]] = []
    try:
        for svc, argv in opts.commands(plan):
            path = str(Path(logs) / f"{plan.name}-{svc.name}.log")
            procs.append((svc, launch.spawn(argv, log_path=path)))
        t0 = time.perf_counter()
        try:
            for svc, proc in procs:
                left = max(1.0, opts.startup_timeout_s - (time.perf_counter() - t0))
                launch.wait_serving(svc.address, proc, left)
            for svc, _ in procs:  # routable only once attached (its prefill loads too)
                if svc.role == "decode":
                    left = max(1.0, opts.startup_timeout_s - (time.perf_counter() - t0))
                    launch.wait_attached(svc.address, 1, left)
        except Exception:
            for f in sorted(Path(logs).glob(f"{plan.name}-*.log")):  # why it did not come up
                log(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text().splitlines()[-20:]))
            raise
        start_s = time.perf_counter() - t0
        log(f"{plan.name}: {len(procs)} services SERVING after {start_s:.1f} s")
        yield start_s
    finally:
        for svc, proc in sorted(procs, key=lambda sp: sp[0].role != "decode"):
            rc = launch.stop(proc)
            if rc not in (0, None, -15):
                log(f"{plan.name}: {svc.name} exited with {rc}")


# ---- measurement --------------------------------------------------------------------

def kv_path_of(result) -> str:
    """How a request's KV came ("shm", "grpc", "cuda-ipc"), where the client says."""
    v = getattr(result, "kv_path", None) or (getattr(result, "timings", None) or {}).get("kv_path")
    return v if isinstance(v, str) and v else "?"


class RoutedTarget(bs.PairTarget):
    """bench_serve's pair target that also tallies, per request, the (prefill, decode)
    it went to and the KV path it took."""

    def __init__(self, prefill: str, decode: str, cfg: bs.ServeBenchConfig) -> None:
        super().__init__(prefill, decode, cfg)
        self.routes: Counter[str] = Counter()
        self.kv_paths: Counter[str] = Counter()

    def on_result(self, result) -> None:
        route = f"{getattr(result, 'prefill_address', '')} > {getattr(result, 'decode_address', '')}"
        self.routes[route] += 1
        self.kv_paths[kv_path_of(result)] += 1

    def take_tallies(self) -> tuple[dict[str, int], dict[str, int]]:
        out = dict(self.routes.most_common()), dict(self.kv_paths.most_common())
        self.routes.clear()
        self.kv_paths.clear()
        return out


async def service_infos(plan: ConfigPlan, timeout_s: float = 10.0) -> list[dict]:
    """Each pair's Info: devices, the prefill's GPU KV buffer, whether the decode mapped it."""
    import asyncio

    from client.api import HybridClient
    from protos import hybrid_pb2 as pb

    out = []
    for p, d in plan.pairs:
        async with HybridClient(p.address, d.address, timeout_s=timeout_s) as c:
            for _ in range(int(timeout_s / 0.25)):  # the decode maps the mirror at Attach
                pi, di = await c.prefill_info(), await c.decode.Info(pb.InfoRequest(),
                                                                      timeout=timeout_s)
                if not pi.kv_device or any(x.device for x in di.prefills):
                    break
                await asyncio.sleep(0.25)
        paired = [{"address": x.address, "state": x.state, "local": x.local,
                   "device": bool(getattr(x, "device", False))} for x in di.prefills]
        out.append({"prefill": p.address, "prefill_device": pi.device,
                    "prefill_kv_device": getattr(pi, "kv_device", ""),
                    "decode": d.address, "decode_device": di.device, "paired": paired,
                    "ipc_mapped": any(x["device"] for x in paired)})
    return out


async def measure_config(plan: ConfigPlan, opts: Options) -> tuple[dict, list[dict]]:
    """Every mix and level against the running services of `plan`."""
    base = opts.serve_config(plan)
    target = RoutedTarget(plan.prefill_addr, plan.decode_addr, base)
    try:
        info = await target.describe()
        info["pairs"] = await service_infos(plan)
        vocab, max_pos = bs.model_shape(info["model"])
        max_pos = min(max_pos, info["max_positions"] or max_pos)
        rows = []
        for n_in, n_out in opts.mixes:
            cfg = replace(base, input_len=n_in, output_len=n_out)
            bs.check_fits(cfg, max_pos)
            if cfg.warmup:
                warm = await bs.run_closed(
                    target.request, bs.spec_stream(cfg, vocab, max_pos, (cfg.seed, 1 << 20)),
                    cfg.warmup, cfg.warmup, 0.0)
                errs = st.status_counts(warm.records)
                log(f"{plan.name} {n_in}:{n_out}: warm-up {cfg.warmup} requests in "
                    f"{warm.duration_s:.2f}s" + (f", failures {errs}" if errs else ""))
                if errs and not any(r.ok for r in warm.records):
                    raise RuntimeError(f"every warm-up request failed: {errs} "
                                       f"{st.error_samples(warm.records)}")
            target.take_tallies()
            for i, point in enumerate(cfg.points()):
                m = await bs.measure_point(target.request, cfg, point, i, vocab, max_pos)
                routes, paths = target.take_tallies()
                row = {"config": plan.name, "mix": f"{n_in}:{n_out}", "input_len": n_in,
                       "output_len": n_out, **point.to_json(), "max_in_flight": m.max_in_flight,
                       **st.summarize(m.records, m.duration_s, cfg.slo),
                       "kv_paths": paths, "routes": routes}
                log(f"{plan.name} {row['mix']} {point.label}: {row['completed']} done, "
                    f"{row['failed']} failed {row['errors'] or ''}in {m.duration_s:.2f}s, "
                    f"goodput {_f(row['goodput'], 2)} req/s, kv {paths}")
                rows.append(row)
        return info, rows
    finally:
        await target.aclose()


def config_warnings(name: str, info: dict | None, rows: Sequence[dict]) -> list[str]:
    """What says a configuration did not measure what its name promises."""
    out = []
    paths: Counter[str] = Counter()
    for r in rows:
        paths.update(r.get("kv_paths") or {})
    if info is not None and name == "split-ipc" and not all(
            p["ipc_mapped"] for p in info.get("pairs", [])):
        out.append("split-ipc: the decode did not map the prefill GPU's KV buffer "
                   "(ServiceInfo.prefills[].device is false): its KV took the host path")
    if name == "split-ipc" and paths and "?" not in paths and not paths.get("cuda-ipc"):
        out.append(f"split-ipc: no request took the cuda-ipc path ({dict(paths)})")
    if name == "split-host" and paths.get("cuda-ipc"):
        out.append(f"split-host: {paths['cuda-ipc']} requests took the cuda-ipc path")
    if name == "two-engines":
        used: Counter[str] = Counter()
        for r in rows:
            used.update(r.get("routes") or {})
        if len(used) < 2 and rows:
            out.append(f"two-engines: requests went to one pair only ({dict(used)})")
    return out


# ---- summary and reports ------------------------------------------------------------

def best_goodput(rows: Sequence[dict], configs: Sequence[str] = CONFIGS) -> list[dict]:
    """Per (mix, concurrency): each configuration's goodput and the best (a list: ties;
    empty when no configuration had a request meet the SLO)."""
    order = {c: i for i, c in enumerate(configs)}
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        if r.get("mode", "concurrency") != "concurrency":
            continue
        g = r.get("goodput")
        cells.setdefault((r["mix"], r["concurrency"]), {})[r["config"]] = g if g is not None else 0.0
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    out = []
    for (mix, conc), by in sorted(cells.items(), key=lambda kv: (mixes.index(kv[0][0]), kv[0][1])):
        by = dict(sorted(by.items(), key=lambda kv: order.get(kv[0], len(order))))
        top = max(by.values())
        best = [c for c, g in by.items() if g == top] if top > 0 else []
        out.append({"mix": mix, "concurrency": conc, "best": best, "goodput": top,
                    "by_config": by})
    return out


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _p50_90(d: dict, nd: int) -> str:
    return f"{_f(d.get('p50'), nd)} / {_f(d.get('p90'), nd)}"


COLUMNS = ("config", "mix", "clients", "done", "failed", "req/s", "out tok/s",
           "TTFT p50 / p90 ms", "TPOT p50 / p90 ms", "goodput req/s", "good %", "KV path",
           "errors")


def table_row(r: dict) -> list[str]:
    good = (f"{100 * r['good_requests'] / r['completed']:.0f}" if r["completed"] else "-")
    paths = ", ".join(f"{k} {v}" for k, v in (r.get("kv_paths") or {}).items()) or "-"
    errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"
    return [r["config"], r["mix"], str(r["concurrency"]), str(r["completed"]), str(r["failed"]),
            _f(r["request_throughput"], 2), _f(r["output_throughput"], 0),
            _p50_90(r["ttft_ms"], 1), _p50_90(r["tpot_ms"], 2), _f(r["goodput"], 2), good,
            paths, errs]


def slo_line(slo: Slo) -> str:
    return (f"goodput SLO: {slo.describe()} (DistServe goodput: completed requests/s "
            "meeting both the TTFT and the TPOT bound; failures never count)")


def markdown(report: dict) -> str:
    m = report["meta"]
    configs = [c["name"] for c in m["configs"]]
    lines = ["# Serving on two GPUs: one GPU vs split prefill/decode vs two engines", "",
             describe_device(m["device"]), "",
             f"model {m['model']} {m['dtype']}; mixes (in:out) {', '.join(m['mixes'])}; "
             f"closed loop at {', '.join(map(str, m['concurrency']))} clients, "
             f"{m['duration_s']:g} s per point after {m['warmup']} warm-up requests per mix; "
             "ignore_eos, greedy, uniform random prompt ids", "",
             slo_line(Slo(**m["slo"])), ""]
    if m.get("wall_s") is not None:
        starts = [c["start_s"] for c in m["configs"] if c.get("start_s") is not None]
        lines += [f"run took {m['wall_s'] / 60:.1f} min (planned ~{m['budget']['total_s'] / 60:.1f}"
                  + (f"; service starts {', '.join(f'{x:.0f}' for x in starts)} s" if starts else "")
                  + ")", ""]
    for c in m["configs"]:
        lines.append(f"- `{c['name']}`: {c['about']}")
    lines.append("")
    for w in m.get("warnings", []):
        lines.append(f"**warning**: {w}")
    for f in m.get("failures", []):
        lines.append(f"**failed**: `{f['config']}`: {f['error']}")
    if m.get("warnings") or m.get("failures"):
        lines.append("")
    order = {c: i for i, c in enumerate(configs)}
    mixes = m["mixes"]
    rows = sorted(report["points"], key=lambda r: (
        mixes.index(r["mix"]) if r["mix"] in mixes else len(mixes), r["concurrency"],
        order.get(r["config"], len(order))))
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    lines += ["", "## Best goodput per mix and concurrency", ""]
    lines += best_lines(report["best"])
    return "\n".join(lines) + "\n"


def best_lines(best: Sequence[dict]) -> list[str]:
    lines, mix = [], None
    for b in best:
        if b["mix"] != mix:
            if mix is not None:
                lines.append("")
            mix = b["mix"]
            lines.append(f"mix {mix}:")
        others = ", ".join(f"{c} {_f(g, 2)}" for c, g in b["by_config"].items())
        head = (" = ".join(f"**{c}**" for c in b["best"]) + f" {_f(b['goodput'], 2)} req/s"
                if b["best"] else "none met the SLO")
        lines.append(f"- c={b['concurrency']}: {head} ({others})")
    return lines or ["(no points measured)"]


# ---- the run ------------------------------------------------------------------------

def plan_text(opts: Options, plans: Sequence[ConfigPlan]) -> str:
    lines = [f"plan: {', '.join(f'{a}:{b}' for a, b in opts.mixes)} (in:out) at "
             f"{', '.join(map(str, opts.concurrency))} clients, {opts.duration_s:g} s each, "
             f"{opts.warmup} warm-up requests per mix", slo_line(opts.slo), budget_line(opts)]
    for plan in plans:
        lines.append(f"{plan.name}: {plan.about}; client --prefill {plan.prefill_addr} "
                     f"--decode {plan.decode_addr} kv_device={plan.kv_device}")
        for svc, argv in opts.commands(plan):
            lines.append(f"  {svc.name}: python -m client.cli {shlex.join(argv)}")
        lines.append("  points: " + ", ".join(
            f"{a}:{b} c={c}" for a, b in opts.mixes for c in opts.concurrency))
    return "\n".join(lines)


def make_plans(opts: Options, ports: Iterator[int] | None = None) -> list[ConfigPlan]:
    ports = free_ports() if ports is None else ports
    return [plan_config(n, ports) for n in opts.configs]


def check_mixes(opts: Options) -> None:
    """Every mix fits the model (before a slow start)."""
    _, max_pos = bs.model_shape(opts.model)
    for n_in, n_out in opts.mixes:
        bs.check_fits(replace(opts.serve_config(), input_len=n_in, output_len=n_out), max_pos)


def run(opts: Options, echo: Callable[[str], None] = print,
        plans: Sequence[ConfigPlan] | None = None) -> dict:
    """Each configuration in turn: start, measure every mix and level, stop. `plans`:
    other services than opts.configs' (a CPU smoke run)."""
    dev = device_info()
    echo(describe_device(dev))
    plans = list(plans) if plans is not None else make_plans(opts)
    need = max(p.gpus_needed for p in plans)
    if dev["count"] < need:
        raise RuntimeError(f"configurations {', '.join(opts.configs)} need {need} GPUs, "
                           f"this machine has {dev['count']}")
    check_mixes(opts)
    echo(plan_text(opts, plans))
    started_at, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    points, metas, warnings, failures = [], [], [], []
    with contextlib.ExitStack() as stack:
        logs = opts.log_dir or stack.enter_context(tempfile.TemporaryDirectory())
        Path(logs).mkdir(parents=True, exist_ok=True)
        for plan in plans:
            name = plan.name
            meta = {"name": name, "about": plan.about, "kv_device": plan.kv_device,
                    "services": [{"name": s.name, "address": s.address, "argv": argv}
                                 for s, argv in opts.commands(plan)]}
            metas.append(meta)
            info, rows, c0 = None, [], time.perf_counter()
            log(f"{name}: starting {len(plan.services)} services (logs in {logs}) ...")
            try:
                with started(plan, opts, logs) as start_s:
                    meta["start_s"] = start_s
                    info, rows = asyncio.run(measure_config(plan, opts))
            except Exception as e:  # noqa: BLE001 - the next configuration still runs
                failures.append({"config": name, "error": f"{type(e).__name__}: {e}"})
                log(f"{name}: FAILED: {type(e).__name__}: {e}")
            meta["info"], meta["wall_s"] = info, time.perf_counter() - c0
            points += rows
            warnings += config_warnings(name, info, rows)
    meta = {"tool": "bench/bench_two_gpu.py", "device": dev, "model": opts.model,
            "dtype": opts.dtype, "mixes": [f"{a}:{b}" for a, b in opts.mixes],
            "concurrency": list(opts.concurrency), "duration_s": opts.duration_s,
            "warmup": opts.warmup, "slo": {"ttft_ms": opts.slo.ttft_ms, "tpot_ms": opts.slo.tpot_ms},
            "slo_text": slo_line(opts.slo), "budget": opts.budget(),
            "wall_s": time.perf_counter() - t0, "configs": metas, "warnings": warnings,
            "failures": failures, "torch": dev.get("torch"), "started": started_at}
    return {"meta": meta, "points": points, "best": best_goodput(points, opts.configs)}


def write(report: dict, json_path: Path | None, md_path: Path | None) -> list[str]:
    msgs = []
    for path, text in ((json_path, st.dumps(report)), (md_path, markdown(report))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            msgs.append(f"wrote {path}")
    return msgs


def _ints(text: str) -> tuple[int, ...]:
    return bs.parse_ints(text)


def parse_args(argv: Iterable[str] | None = None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, in order")
    p.add_argument("--mixes", default=DEFAULT_MIXES, help="IN:OUT token counts")
    p.add_argument("--concurrency", default=DEFAULT_CONCURRENCY, help="closed-loop client counts")
    p.add_argument("--duration-s", type=float, default=10.0, help="per point")
    p.add_argument("--warmup", type=int, default=8, help="requests per configuration and mix")
    p.add_argument("--slo-ttft-ms", type=float, default=200.0, help="goodput bound (0 = none)")
    p.add_argument("--slo-tpot-ms", type=float, default=20.0, help="goodput bound (0 = none)")
    p.add_argument("--model", default="synthetic:gpt2-medium")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--max-batch", type=int, default=256, help="decode batch rows")
    p.add_argument("--region-mb", type=int, default=4096,
                   help="prefill KV region: a 512-token gpt2-medium fp16 prompt takes 50 MB, "
                        "so 1 GiB holds ~20 in flight and would bound the 512:128 mix")
    p.add_argument("--clients-per-channel", type=int, default=32)
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="keep the services' logs here")
    p.add_argument("--prefill-arg", dest="prefill_args", action="append", default=[],
                   help="extra prefill flag, e.g. --prefill-arg=--max-slots=512")
    p.add_argument("--decode-arg", dest="decode_args", action="append", default=[],
                   help="extra decode flag, e.g. --decode-arg=--max-active=256")
    p.add_argument("--json", dest="json_path", type=Path, default=None)
    p.add_argument("--md", dest="md_path", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        opts = Options(
            configs=parse_configs(a.configs), mixes=parse_mixes(a.mixes),
            concurrency=_ints(a.concurrency), duration_s=a.duration_s, warmup=a.warmup,
            slo=Slo(a.slo_ttft_ms or None, a.slo_tpot_ms or None), model=a.model,
            dtype=a.dtype, max_batch=a.max_batch, region_mb=a.region_mb,
            clients_per_channel=a.clients_per_channel, timeout_s=a.timeout_s,
            startup_timeout_s=a.startup_timeout_s, seed=a.seed, log_dir=a.log_dir,
            prefill_args=tuple(a.prefill_args), decode_args=tuple(a.decode_args))
    except ValueError as e:
        p.error(str(e))
    if opts.duration_s <= 0 or opts.warmup < 0:
        p.error("--duration-s must be > 0 and --warmup >= 0")
    return opts, a


def main(argv: Iterable[str] | None = None) -> int:
    opts, a = parse_args(argv)
    if a.dry_run:
        print(describe_device(device_info()))
        print(plan_text(opts, make_plans(opts)))
        return 0
    try:
        report = run(opts)
    except (RuntimeError, ValueError) as e:  # too few GPUs, a mix longer than the model
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown(report))
    for msg in write(report, a.json_path, a.md_path):
        print(msg)
    return 1 if report["meta"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
