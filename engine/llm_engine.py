"""The engine loop: ONE thread owns the decode device, the paged KV pool, every
sequence and every CUDA call (nano-vllm's `step(): schedule -> run -> postprocess`).

Other threads (gRPC handlers, the CLI, benchmarks) only talk to it:
  open(req)            reserve KV blocks (waits in a bounded FIFO while none are free)
  ingest(seq, l, k, v) hand over a prompt layer (host tensors the engine then owns)
  start(seq, first)    the first token is known: the sequence joins the batch
  tokens(seq)          iterate its tokens (a thread-safe queue fed by the loop)
  cancel(seq)          any time, idempotent: the loop frees its blocks in order
  submit(ids, ...)     local generation: the loop also runs the prefill
Every command goes through one FIFO, so a cancel is applied after the ingests queued
before it and blocks are never freed under a write still in the queue. Per iteration the
loop applies all queued commands (KV writes on its own copy stream, overlapping the
previous step), moves ready sequences into free batch rows, and runs one decode step
for every running row (engine/model_runner.py: CUDA-graph buckets, paged attention).

Failure: a failing step ends only its sequences (INTERNAL), a failing sample only its
row; the loop goes on. If the thread itself dies, every sequence and every later call
gets UNAVAILABLE: no consumer is left waiting.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator

import torch

from engine.batch_steps import BatchSteps, StepFailed, failure
from engine.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from engine.gil import short_gil_switch
from engine.loader import LoadedModel
from engine.runner_base import StepRunner
from engine.sampling import SamplingParams
from engine.sequence import DONE, DecodeRequest, SeqState, Sequence, eos_id

__all__ = ["DecodeEngine", "LLMEngine", "LocalRequest", "StepFailed"]
log = logging.getLogger("hybrid.engine")


class DecodeEngine(BatchSteps):
    """`DecodeEngine(lm, max_batch)` runs a model on the paged GPU/CPU runner;
    `DecodeEngine(runner=..., eos=...)` drives any engine.runner_base.StepRunner
    (the FPGA backends pass their HBM runner)."""

    def __init__(self, lm: LoadedModel | None = None, max_batch: int = 64,
                 max_waiting: int | None = None, n_blocks: int | None = None,
                 cuda_graphs: bool | None = None, *, runner: StepRunner | None = None,
                 eos: int | None = None, start_timeout_s: float = 600.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if runner is None:
            from engine.paged_runner import PagedRunner

            runner = PagedRunner(lm, max_batch, n_blocks, cuda_graphs)
            eos = eos_id(lm.tokenizer, lm.config)
        self.runner, self.eos = runner, eos
        self.max_batch = runner.max_batch = max_batch
        self.max_waiting = 4 * max_batch if max_waiting is None else max_waiting
        self._cond = threading.Condition()
        self._cmds: deque[tuple] = deque()
        self._waiting: deque[Sequence] = deque()   # no KV memory yet (FIFO)
        self._ready: deque[Sequence] = deque()     # first token known, no batch row yet
        self._live: dict[int, Sequence] = {}       # every sequence not finished
        self.running: list[Sequence] = []          # (loop) the batch, in row order
        self._pending: tuple | None = None         # (loop) the launched, unread step
        self._stopping = False
        self._dead: BaseException | None = None
        self.finished = 0
        self.loop_s: dict[str, float] = dict.fromkeys(("cmds", "prefill", "decode", "notify"), 0.0)
        # Fault injection for tests: a decode slow enough that a cancel or a SIGTERM
        # lands mid-stream (a tiny CPU model otherwise finishes 250 tokens in ~90 ms).
        self.fault_step_delay_s = float(os.environ.get("HYBRID_FAULT_TOKEN_DELAY_MS", 0)) / 1e3
        # ... and one that dies after this many decode steps (a CUDA error stands for it)
        self.fault_crash_steps = int(os.environ.get("HYBRID_FAULT_ENGINE_CRASH_STEPS", 0))
        # Called on the loop thread after each iteration with the sequences whose `out`
        # got items (an asyncio owner wakes its readers with ONE call_soon_threadsafe
        # per step instead of one per token). None: consumers block on `out`.
        self.notifier: Callable[[list[Sequence]], None] | None = None
        # Called once, on the loop thread, when the loop died of an error (not on close):
        # a CUDA error poisons the context, so the owner should stop serving and exit.
        self.on_death: Callable[[BaseException], None] | None = None
        self._touched: list[Sequence] = []
        short_gil_switch()  # the loop needs the GIL back as soon as a CUDA wait ends
        self._up = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self._thread.start()
        # a loop thread still inside torch at interpreter exit aborts the process
        atexit.register(_close_at_exit, weakref.ref(self))
        if not self._up.wait(start_timeout_s):
            raise Unavailable(f"decode engine not up after {start_timeout_s:.0f}s")
        if self._dead is not None:
            raise self._dead

    # ---- any thread ------------------------------------------------------------------
    def open(self, req: DecodeRequest, timeout_s: float = 60.0) -> Sequence:
        """A sequence with KV blocks for its whole length. Waits (FIFO, bounded by
        timeout_s) while the pool is full; ResourceExhausted when the wait queue is
        full, the wait times out, or the request can never fit."""
        seq = Sequence(req)
        with self._cond:
            self._check_alive()
            why = self.runner.fits(seq)
            if why is not None:
                raise ResourceExhausted(why)
            self._live[seq.seq_id] = seq
            if not self._waiting and self.runner.can_reserve(seq):
                self._admit(seq)
                return seq
            if len(self._waiting) >= self.max_waiting:
                del self._live[seq.seq_id]
                raise ResourceExhausted(f"decode queue full ({len(self._waiting)} requests "
                                        "waiting for KV memory); retry later")
            self._waiting.append(seq)
        if not seq.admitted.wait(timeout_s):
            self.cancel(seq)
            raise ResourceExhausted(f"no KV memory free within {timeout_s:.0f}s; retry later")
        if seq.error is not None:
            raise seq.error
        return seq

    def ingest(self, seq: Sequence, layer: int, payload) -> None:
        """Layer `layer` of the prompt, in the runner's form (the paged runner takes
        (k, v) [n_kv_heads, n_prompt, head_dim]); the engine owns it from now on."""
        self._command("ingest", seq, layer, payload)

    def ingest_prompt(self, seq: Sequence, payload) -> None:
        """The whole prompt's KV in one hand-over (runner.write_prompt's payload)."""
        self._command("ingest", seq, None, payload)

    def start(self, seq: Sequence, first_token: int, deliver: bool = False) -> None:
        """All layers are in: decode from prefill's `first_token` (generated index 0;
        put on the token stream too when `deliver`)."""
        self._command("start", seq, first_token, deliver)

    def submit(self, prompt_ids: list[int], max_new_tokens: int,
               params: SamplingParams = SamplingParams(),  # noqa: B008 - frozen
               ignore_eos: bool = False, stop_ids: frozenset[int] = frozenset(),
               timeout_s: float = 60.0) -> LocalRequest:
        """Local generation: the loop prefills too. Iterate the result for tokens."""
        req = DecodeRequest(len(prompt_ids), max_new_tokens, params.with_seed(),
                            frozenset(stop_ids), ignore_eos)
        seq = self.open(req, timeout_s)
        self._command("prefill", seq, list(prompt_ids))
        return LocalRequest(self, seq)

    def tokens(self, seq: Sequence, timeout_s: float = 60.0) -> Iterator[int]:
        """The sequence's tokens as the loop produces them; raises its error."""
        while True:
            try:
                item = seq.out.get(timeout=timeout_s)
            except queue.Empty:
                raise DeadlineExceeded(f"no token within {timeout_s:.0f}s") from None
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _injected_fault(self) -> None:
        """HYBRID_FAULT_ENGINE_CRASH_STEPS ran out: the loop dies. With
        HYBRID_FAULT_DEVICE_ASSERT=1 on a GPU it dies of a real device-side assert (an
        index past a tensor's end, checked on the device), which poisons the CUDA
        context as the out-of-range position once did; else of a plain Python error."""
        lm = getattr(self.runner, "lm", None)
        if os.environ.get("HYBRID_FAULT_DEVICE_ASSERT") == "1" and lm is not None \
                and lm.device.type == "cuda":
            idx = torch.tensor([1 << 20], device=lm.device)
            torch.zeros(1, device=lm.device)[idx].item()
        raise RuntimeError("injected engine fault (HYBRID_FAULT_ENGINE_CRASH_STEPS)")

    def cancel(self, seq: Sequence) -> None:
        with self._cond:
            seq.cancelled = True
            if seq in self._waiting:  # never had blocks: nothing for the loop to do
                self._waiting.remove(seq)
                self._end(seq, DONE)
                return
        self._command("cancel", seq, check=False)

    def barrier(self, timeout_s: float = 30.0) -> None:
        """Return once the loop has applied every command queued before this call
        (tests and tools: e.g. a cancel's memory is free after it)."""
        done = threading.Event()
        self._command("barrier", None, done)
        if not done.wait(timeout_s):
            raise DeadlineExceeded(f"engine barrier not reached in {timeout_s:.0f}s")

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self.running), "ready": len(self._ready),
                    "waiting": len(self._waiting), "live": len(self._live),
                    "finished": self.finished} | self.runner.stats() | {
                        f"loop_{k}_ms": int(v * 1e3) for k, v in self.loop_s.items()}

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _command(self, *cmd, check: bool = True) -> None:
        with self._cond:
            if check:
                self._check_alive()
            self._cmds.append(cmd)
            self._cond.notify()

    def _check_alive(self) -> None:  # caller holds the lock
        if self._dead is not None:
            raise Unavailable(f"decode engine is down: {self._dead}")
        if self._stopping:
            raise Unavailable("decode engine is shutting down")

    def _admit(self, seq: Sequence) -> None:  # caller holds the lock
        self.runner.reserve(seq)
        seq.state = SeqState.INGESTING
        seq.admitted.set()

    def _end(self, seq: Sequence, end: object) -> None:
        """Finish `seq` (caller holds the lock): memory back, waiting ones admitted."""
        if seq.state is SeqState.FINISHED:
            return
        if seq.inflight:  # a launched step may still write its KV: free after it
            seq.release_later = True
        elif seq.state is not SeqState.WAITING:
            self.runner.release(seq)
        seq.state = SeqState.FINISHED
        self._live.pop(seq.seq_id, None)
        self.finished += 1
        seq.out.put(end)
        self._touched.append(seq)
        self._admit_waiting()

    def _admit_waiting(self) -> None:  # caller holds the lock
        while self._waiting and self.runner.can_reserve(self._waiting[0]):
            self._admit(self._waiting.popleft())

    # ---- the loop thread ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.runner.start()
        except BaseException as e:  # reported by __init__
            self._dead = Unavailable(f"decode engine failed to start: {type(e).__name__}: {e}")
            self._up.set()
            return
        self._up.set()
        end: BaseException = Unavailable("decode engine closed")
        failed = False
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as e:  # never die silently: fail everyone below
            log.exception("decode engine loop failed")
            end = Unavailable(f"decode engine stopped: {type(e).__name__}: {e}")
            failed = True
        self._die(end)
        if failed and self.on_death is not None:  # e.g. the server stops serving and exits
            try:
                self.on_death(end)
            except Exception:
                log.exception("engine on_death hook failed")
        self.runner.close()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._cmds or self.running or self._pending or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                cmds = list(self._cmds)
                self._cmds.clear()
            t0 = time.perf_counter()
            prefills = []
            for cmd in cmds:
                if cmd[0] == "prefill":
                    prefills.append(cmd)
                else:
                    self._apply(cmd)
            t1 = time.perf_counter()
            self._prefill(prefills)
            t2 = time.perf_counter()
            self._schedule()
            if self.running:
                if self.fault_step_delay_s:
                    time.sleep(self.fault_step_delay_s)
                if self.fault_crash_steps:  # fault injection: the loop dies mid-stream
                    self.fault_crash_steps -= 1
                    if not self.fault_crash_steps:
                        self._injected_fault()
                self._step()
            else:
                self._collect()
            t3 = time.perf_counter()
            self._notify()
            self._account(t0, t1, t2, t3, time.perf_counter())

    def _account(self, *t: float) -> None:
        """Where the loop's time goes (ms totals in stats()): commands (KV ingest),
        local prefill, decode (launch + read-back + delivery), notifying readers."""
        for name, a, b in zip(("cmds", "prefill", "decode", "notify"), t, t[1:], strict=False):
            self.loop_s[name] += b - a

    def _notify(self) -> None:
        if not self._touched:
            return
        touched, self._touched = self._touched, []
        if self.notifier is not None:
            try:
                self.notifier(touched)
            except Exception:  # e.g. the owner's event loop is closed: readers time out
                log.exception("engine notifier failed")

    def _apply(self, cmd: tuple) -> None:
        kind, seq, *args = cmd
        if kind == "barrier":
            args[0].set()
            return
        if kind == "cancel":
            self._finish(seq, DONE)
            return
        if seq.state is not SeqState.INGESTING or seq.cancelled:
            if kind == "ingest":  # cancelled (or failed) while its commands were queued
                self.runner.discard(args[1])
            return
        try:
            if kind == "ingest":
                self._write_layer(seq, *args)
            elif kind == "start":
                self._begin(seq, *args)
        except Exception as e:
            log.exception("engine: %s of seq %d failed", kind, seq.seq_id)
            self._finish(seq, failure(e, kind))

    def _write_layer(self, seq: Sequence, layer: int | None, payload) -> None:
        if layer is None:
            self.runner.write_prompt(seq, payload)
        else:
            self.runner.write_layer(seq, layer, payload)

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            self._stopping = True
            self._dead = exc
            for seq in list(self._live.values()):
                seq.error = exc
                seq.admitted.set()
                self._end(seq, exc)
            self._waiting.clear()
            self._ready.clear()
            self._cmds.clear()
        self.running = []
        self._notify()


def _close_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close(timeout_s=5.0)


class LocalRequest:
    """A local generation's token stream (prefill's token first). Iterating blocks;
    `cancel()` may come from any thread."""

    def __init__(self, engine: DecodeEngine, seq: Sequence) -> None:
        self.engine, self.seq = engine, seq

    def __iter__(self) -> Iterator[int]:
        try:
            yield from self.engine.tokens(self.seq)
        finally:
            if self.seq.state is not SeqState.FINISHED:
                self.engine.cancel(self.seq)

    def cancel(self) -> None:
        self.engine.cancel(self.seq)


LLMEngine = DecodeEngine  # the name bench/ and the docs use for local serving
