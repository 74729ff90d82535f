"""The decode step's batch rows (engine/model_runner.py) on the CPU: only rows that hold
a sequence advance, and no row's position leaves the model's position table.

On CUDA a bucket's padded rows used to advance every replay; after max_positions steps
in one bucket their positions ran past GPT-2's position table, a device-side assert that
killed the decode process (bench_two_gpu's two-engines, 9 live rows in the 16-row graph).
tests/cuda/test_engine_loop_cuda.py replays that on the GPU."""

from __future__ import annotations

import pytest
import torch

from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.sequence import Sequence
from tests.engine_helpers import paged_seqs


@pytest.fixture(scope="module")
def lm():
    return load_model("synthetic:tiny-gpt2", device="cpu", dtype="float32")


def _steps(runner: ModelRunner, rows: list[Sequence], n: int) -> None:
    """n steps continuing from the device's own state (as the engine loop runs them)."""
    for _ in range(n):
        runner.collect(runner.launch(rows))


def test_a_vacated_row_stays_put_while_the_others_advance(lm):
    with torch.inference_mode():
        runner = ModelRunner(lm, max_batch=4)
        a, b, c = paged_seqs(lm, runner, [[1, 2, 3], [4, 5, 6, 7], [8, 9]], 40)
        runner.collect(runner.launch([a, b, c], frozenset(s.seq_id for s in (a, b, c))))
        rows = {s.seq_id: runner._row_of[s.seq_id] for s in (a, b, c)}
        _steps(runner, [a, c], 30)  # b left: its row (between a's and c's) is padding now
        pos = runner.positions.tolist()
    assert pos[rows[b.seq_id]] == 0
    assert pos[rows[a.seq_id]] == a.position + 31
    assert pos[rows[c.seq_id]] == c.position + 31


def test_a_row_past_its_end_stays_inside_the_position_table(lm):
    """A row the device steps past the last position (the host learns of a sequence's
    end a step late) must not index past the position table."""
    n = lm.config.max_positions
    with torch.inference_mode():
        runner = ModelRunner(lm, max_batch=2)
        (s,) = paged_seqs(lm, runner, [list(range(1, n - 1))], 2)
        runner.collect(runner.launch([s], frozenset({s.seq_id})))
        _steps(runner, [s], 3)  # positions n-1, then past the table
        assert runner.positions[runner._row_of[s.seq_id]].item() == n - 1
