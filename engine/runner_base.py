"""What the engine loop (engine/llm_engine.py) drives: a decode device's KV memory and
its decode step. One implementation per kind of device: `engine.paged_runner` (GPU or
CPU: paged KV pool, CUDA-graph buckets) and `fpga_service.backends.hbm_runner` (a
U55C's HBM, real or emulated: one kernel run per row).

Threading contract: `fits`, `can_reserve`, `reserve` and `release` are called under the
engine's lock from any thread and must not touch the device (bookkeeping only); every
other method runs on the engine thread, the only thread that issues device work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from engine.sequence import Sequence


class StepRunner(ABC):
    max_batch: int = 1

    def start(self) -> None:
        """Engine thread, once, before any request: make device state (pools, graphs)."""
        return None  # optional hook

    @abstractmethod
    def fits(self, seq: Sequence) -> str | None:
        """None when the sequence could be served by an empty device, else why not."""

    @abstractmethod
    def can_reserve(self, seq: Sequence) -> bool:
        """Whether `reserve` would succeed now."""

    @abstractmethod
    def reserve(self, seq: Sequence) -> None:
        """Take KV memory for the sequence's whole length (ResourceExhausted if none)."""

    @abstractmethod
    def release(self, seq: Sequence) -> None:
        """Give the sequence's KV memory back. Called once, after its last device use."""

    @abstractmethod
    def write_layer(self, seq: Sequence, layer: int, payload: Any) -> None:
        """One prompt layer into the sequence's KV memory (payload: what the backend's
        session hands over; the runner owns it from now on)."""

    def write_prompt(self, seq: Sequence, payload: Any) -> None:
        """Every layer of the prompt at once (runners that support it)."""
        raise NotImplementedError(f"{type(self).__name__} ingests layer by layer")

    def discard(self, payload: Any) -> None:
        """An ingest payload that will never be written (its request ended first)."""
        return None  # optional hook

    def kv_written(self, seq: Sequence) -> None:
        """All layers were handed over: make the first step see them (e.g. an event)."""
        return None  # optional hook

    def before_step(self, seq: Sequence) -> None:
        """The sequence joins the batch now (e.g. wait for its KV copy's event)."""
        return None  # optional hook

    pipelined: bool = False  # launch returns before the step is done (one step ahead)

    @abstractmethod
    def launch(self, rows: list[Sequence]) -> Any:
        """Start one decode step for every row (each at its `token`, `position`,
        `step`); returns a handle for `collect`. Raising fails every row."""

    @abstractmethod
    def collect(self, handle: Any) -> list[int | BaseException]:
        """The launched step's token for each of its rows, sampled with the row's own
        params; an exception in place of a token fails only that row."""

    def reset(self) -> None:
        """After a failed step: forget per-row device state (next launch rewrites)."""
        return None  # optional hook

    def prefill(self, seqs: list[Sequence], prompts: list[list[int]]) -> list[int]:
        """Local generation: compute each prompt's KV into its sequence's memory and
        return the first tokens (generated index 0)."""
        raise NotImplementedError(f"{type(self).__name__} does not prefill")

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        """Engine thread, at the end: release device state."""
        return None  # optional hook
