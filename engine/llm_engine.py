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
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator

import torch

from engine.block_manager import BlockManager
from engine.errors import DeadlineExceeded, HybridError, ResourceExhausted, Unavailable
from engine.kv_cache import KVCache
from engine.loader import LoadedModel
from engine.model_runner import ModelRunner
from engine.sampling import SamplingParams, sample
from engine.sequence import DONE, DecodeRequest, SeqState, Sequence, eos_id, is_stop

log = logging.getLogger("hybrid.engine")


class StepFailed(HybridError):
    """A decode step raised: its sequences end with INTERNAL."""


class DecodeEngine:
    def __init__(self, lm: LoadedModel, max_batch: int = 64, max_waiting: int | None = None,
                 n_blocks: int | None = None, cuda_graphs: bool | None = None,
                 start_timeout_s: float = 600.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.lm, self.max_batch = lm, max_batch
        self.max_waiting = 4 * max_batch if max_waiting is None else max_waiting
        self.eos = eos_id(lm.tokenizer, lm.config)
        self._cond = threading.Condition()
        self._cmds: deque[tuple] = deque()
        self._waiting: deque[Sequence] = deque()   # no blocks yet (FIFO)
        self._ready: deque[Sequence] = deque()     # first token known, no batch row yet
        self._live: dict[int, Sequence] = {}       # every sequence not finished
        self.running: list[Sequence] = []          # (loop) the batch, in row order
        self._stopping = False
        self._dead: BaseException | None = None
        self._init = (n_blocks, cuda_graphs)
        self.runner: ModelRunner | None = None
        self.blocks: BlockManager | None = None
        self.finished = 0
        # Called on the loop thread after each iteration with the sequences whose `out`
        # got items (an asyncio owner wakes its readers with ONE call_soon_threadsafe
        # per step instead of one per token). None: consumers block on `out`.
        self.notifier: Callable[[list[Sequence]], None] | None = None
        self._touched: list[Sequence] = []
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
            need = self.blocks.blocks_needed(seq.n_reserve)
            if need > self.blocks.n_lendable:
                raise ResourceExhausted(f"request needs {need} KV blocks; the pool has "
                                        f"{self.blocks.n_lendable}")
            self._live[seq.seq_id] = seq
            if not self._waiting and self.blocks.can_allocate(seq.n_reserve):
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

    def ingest(self, seq: Sequence, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer `layer` of the prompt: k, v [n_kv_heads, n_prompt, head_dim]."""
        self._command("ingest", seq, layer, k, v)

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

    def cancel(self, seq: Sequence) -> None:
        with self._cond:
            seq.cancelled = True
            if seq in self._waiting:  # never had blocks: nothing for the loop to do
                self._waiting.remove(seq)
                self._end(seq, DONE)
                return
        self._command("cancel", seq, check=False)

    def stats(self) -> dict[str, int]:
        with self._cond:
            r = self.runner
            return {"running": len(self.running), "ready": len(self._ready),
                    "waiting": len(self._waiting), "live": len(self._live),
                    "blocks_free": self.blocks.n_free if self.blocks else 0,
                    "blocks_total": self.blocks.n_lendable if self.blocks else 0,
                    "steps": r.steps if r else 0, "rows_computed": r.rows_computed if r else 0,
                    "finished": self.finished}

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
        seq.blocks = self.blocks.allocate(seq.n_reserve)
        seq.state = SeqState.INGESTING
        seq.admitted.set()

    def _end(self, seq: Sequence, end: object) -> None:
        """Finish `seq` (caller holds the lock): blocks back, waiting ones admitted."""
        if seq.state is SeqState.FINISHED:
            return
        if seq.blocks:
            self.blocks.free(seq.blocks)
            seq.blocks = []
        seq.state = SeqState.FINISHED
        self._live.pop(seq.seq_id, None)
        self.finished += 1
        seq.out.put(end)
        self._touched.append(seq)
        while self._waiting and self.blocks.can_allocate(self._waiting[0].n_reserve):
            self._admit(self._waiting.popleft())

    # ---- the loop thread ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            if self.lm.device.type == "cuda":
                torch.cuda.set_device(self.lm.device)
            n_blocks, graphs = self._init
            self.runner = ModelRunner(self.lm, self.max_batch, n_blocks, cuda_graphs=graphs)
            self.blocks = BlockManager(self.runner.cache.n_blocks, self.runner.cache.block_size)
            self._copy = torch.cuda.Stream(self.lm.device) if self.lm.device.type == "cuda" else None
        except BaseException as e:  # reported by __init__
            self._dead = Unavailable(f"decode engine failed to start: {type(e).__name__}: {e}")
            self._up.set()
            return
        self._up.set()
        end: BaseException = Unavailable("decode engine closed")
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as e:  # never die silently: fail everyone below
            log.exception("decode engine loop failed")
            end = Unavailable(f"decode engine stopped: {type(e).__name__}: {e}")
        self._die(end)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._cmds or self.running or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                cmds = list(self._cmds)
                self._cmds.clear()
            for cmd in cmds:
                self._apply(cmd)
            self._schedule()
            if self.running:
                self._step()
            self._notify()

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
        if kind == "cancel":
            self._finish(seq, DONE)
            return
        if seq.state is not SeqState.INGESTING or seq.cancelled:
            return  # cancelled (or failed) while its commands were queued
        try:
            if kind == "ingest":
                self._write_layer(seq, *args)
            elif kind == "start":
                self._begin(seq, *args)
            elif kind == "prefill":
                self._prefill(seq, *args)
        except Exception as e:
            log.exception("engine: %s of seq %d failed", kind, seq.seq_id)
            self._finish(seq, e if isinstance(e, HybridError) else StepFailed(f"{kind}: {e}"))

    def _slots(self, seq: Sequence) -> torch.Tensor:
        if getattr(seq, "prompt_slots", None) is None:
            seq.prompt_slots = self.runner.cache.slots_of(seq.blocks, 0, seq.req.n_prompt)
        return seq.prompt_slots

    def _write_layer(self, seq: Sequence, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._copy is None:
            self.runner.write_kv(layer, self._slots(seq), k, v)
            return
        with torch.cuda.stream(self._copy):  # overlaps the batch's decode steps
            self.runner.write_kv(layer, self._slots(seq), k, v)

    def _begin(self, seq: Sequence, first: int, deliver: bool) -> None:
        if self._copy is not None:  # its first step must see the KV the copy stream wrote
            seq.kv_ready = torch.cuda.Event()
            seq.kv_ready.record(self._copy)
        seq.token, seq.position, seq.step, seq.n_out = first, seq.req.n_prompt, 1, 1
        if deliver:
            seq.out.put(first)
            self._touched.append(seq)
        r = seq.req
        if r.max_new_tokens <= 1 or is_stop(first, self.eos, r.stop_ids, r.ignore_eos):
            self._finish(seq, DONE)
            return
        seq.state = SeqState.READY
        self._ready.append(seq)

    def _prefill(self, seq: Sequence, ids: list[int]) -> None:
        lm, n = self.lm, len(ids)
        dense = KVCache(lm.config, 1, n, lm.device, lm.dtype)
        logits = lm.model.prefill(torch.tensor(ids, dtype=torch.long, device=lm.device), dense)
        slots = self._slots(seq)
        for layer in range(lm.config.n_layers):
            self.runner.write_kv(layer, slots, dense.k[layer, 0], dense.v[layer, 0])
        first = int(sample(logits, seq.req.params, 0)[0])
        self._begin(seq, first, deliver=True)

    def _schedule(self) -> None:
        self.running = [s for s in self.running if not s.cancelled]
        while self._ready and len(self.running) < self.max_batch:
            s = self._ready.popleft()
            if s.cancelled:
                continue  # its cancel command finishes it
            ev = getattr(s, "kv_ready", None)
            if ev is not None:
                torch.cuda.current_stream(self.lm.device).wait_event(ev)
            s.state = SeqState.RUNNING
            self.running.append(s)

    def _step(self) -> None:
        rows = list(self.running)
        try:
            greedy, logits = self.runner.step(rows)
        except Exception as e:
            log.exception("decode step failed (%d rows)", len(rows))
            self.runner.invalidate()
            for s in rows:
                self._finish(s, StepFailed(f"decode step failed: {type(e).__name__}: {e}"))
            return
        tokens, host = list(greedy), False
        for i, s in enumerate(rows):
            if not s.req.params.greedy:
                try:  # noise keyed by (seed, step): the tokens of any other run
                    tokens[i] = int(sample(logits[i], s.req.params, s.step)[0])
                    host = True
                except Exception as e:
                    self._finish(s, e if isinstance(e, HybridError) else StepFailed(str(e)))
                    continue
            self._deliver(s, tokens[i])
        if host:
            self.runner.set_tokens(tokens)

    def _deliver(self, s: Sequence, tok: int) -> None:
        s.out.put(tok)
        self._touched.append(s)
        s.n_out += 1
        r = s.req
        if s.n_out >= r.max_new_tokens or is_stop(tok, self.eos, r.stop_ids, r.ignore_eos):
            self._finish(s, DONE)
            return
        s.token, s.position, s.step = tok, s.position + 1, s.step + 1

    def _finish(self, seq: Sequence, end: object) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq.state is SeqState.READY and seq in self._ready:
            self._ready.remove(seq)
        with self._cond:
            self._end(seq, end)

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
