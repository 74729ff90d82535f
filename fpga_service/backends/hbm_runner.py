"""The engine loop's runner on a U55C, real (XRT) or emulated: the FPGA backends go
through the same DecodeEngine as the GPU one, so the card is one device queue owned by
one thread. Each sequence holds a KV area in HBM (kernels.hbm_layout) from admission to
its end; ingest writes each arriving layer into it; a step runs the decode kernel once
per running row, in row order (the kernel decodes one sequence per run), and samples on
the host with engine.sampling, so tokens equal single-process generation. Requests that
arrive while others decode are ingested between steps, so their KV writes interleave
with the other sequences' tokens.
"""

from __future__ import annotations

from typing import Any

from engine.errors import HybridError, ResourceExhausted
from engine.runner_base import StepRunner
from engine.sampling import sample
from engine.sequence import Sequence


class HbmRunner(StepRunner):
    def __init__(self, device: Any, config: Any, timeout_s: float) -> None:
        self.dev, self.config, self.timeout_s = device, config, timeout_s
        self.runs = 0

    # ---- memory (under the engine's lock; bookkeeping only) -----------------------------
    def _tokens(self, seq: Sequence) -> int:
        return seq.req.n_prompt + seq.req.max_new_tokens

    def fits(self, seq: Sequence) -> str | None:
        """HBM that is full now is refused at once (RESOURCE_EXHAUSTED), as a card
        with no room would be: the FPGA path does not queue for memory."""
        return self._trial(seq)

    def _trial(self, seq: Sequence) -> str | None:
        """None when an area for the sequence can be reserved now (it is freed again)."""
        try:
            self.dev.alloc_kv(self._tokens(seq), "trial").free()
        except ResourceExhausted as e:
            return str(e)
        return None

    def can_reserve(self, seq: Sequence) -> bool:
        return self._trial(seq) is None

    def reserve(self, seq: Sequence) -> None:
        seq.memory = self.dev.alloc_kv(self._tokens(seq), seq.req.request_id or str(seq.seq_id))

    def release(self, seq: Sequence) -> None:
        if seq.memory is not None:
            seq.memory.free()  # idempotent
            seq.memory = None

    # ---- the engine thread ---------------------------------------------------------------
    def write_layer(self, seq: Sequence, layer: int, payload: Any) -> None:
        self.dev.write_kv_layer(seq.memory, layer, memoryview(payload), seq.req.n_prompt)

    def launch(self, rows: list[Sequence]) -> list[int | BaseException]:
        return [self._one(s) for s in rows]

    def _one(self, s: Sequence) -> int | BaseException:
        try:
            res = self.dev.run_decode(s.memory, s.token, s.position, 1, self.timeout_s)
            self.runs += 1
            st = s.device_stats
            st["modeled_ms"] = st.get("modeled_ms", 0.0) + res.modeled_ms
            st["wall_ms"] = st.get("wall_ms", 0.0) + res.wall_ms
            st["steps"] = st.get("steps", 0) + 1
            return int(sample(res.logits, s.req.params, s.step)[0])
        except HybridError as e:
            return e
        except Exception as e:  # a kernel error fails this row only
            return HybridError(f"decode kernel: {type(e).__name__}: {e}")

    def collect(self, handle: list[int | BaseException]) -> list[int | BaseException]:
        return handle

    def stats(self) -> dict[str, int]:
        return {"kernel_runs": self.runs, "hbm_used_bytes": int(self.dev.used_bytes())}
