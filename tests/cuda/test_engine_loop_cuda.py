"""The decode engine loop on an NVIDIA GPU: CUDA-graph buckets equal eager steps,
64 concurrent requests equal their solo tokens in fp32, fp16 batched logits stay within
a stated tolerance of batch-1 logits, the fused batch-1 bucket is taken for GPT-2.

PYTHONPATH=. python -m pytest -q -m cuda tests/cuda/test_engine_loop_cuda.py
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine.llm_engine import DecodeEngine
from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from tests.engine_helpers import paged_seqs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
FP16_LOGIT_ATOL = 0.05  # batched vs batch-1 logits, synthetic gpt2 fp16 (stated in docs)


def _requests(n: int, seed: int = 0, sampled_every: int = 5):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 250) for _ in range(rng.randrange(1, 80))]
        params = (SamplingParams(0.9, 20, 0.95, seed=i) if sampled_every and i % sampled_every == 0
                  else SamplingParams())
        out.append((prompt, rng.randrange(1, 40), params))
    return out


def _run_all(eng: DecodeEngine, reqs) -> list[list[int]]:
    with ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(lambda r: list(eng.submit(r[0], r[1], r[2], ignore_eos=True)), reqs))


def _solo(lm, reqs, graphs: bool) -> list[list[int]]:
    eng = DecodeEngine(lm, max_batch=1, cuda_graphs=graphs)
    try:
        return [list(eng.submit(p, n, s, ignore_eos=True)) for p, n, s in reqs]
    finally:
        eng.close()


@pytest.mark.parametrize("spec", ["synthetic:tiny-gpt2:3", "synthetic:tiny-llama:5",
                                  "synthetic:gpt2"])
def test_64_concurrent_fp32_equal_solo_and_graphs_equal_eager(spec):
    lm = load_model(spec, device="cuda", dtype="float32")
    reqs = _requests(64)
    eng = DecodeEngine(lm, max_batch=64)
    try:
        assert eng.runner.model.graphs  # the buckets were captured
        got = _run_all(eng, reqs)
        st = eng.stats()
    finally:
        eng.close()
    assert st["rows_computed"] > st["steps"]
    assert st["blocks_free"] == st["blocks_total"] and st["live"] == 0
    assert got == _solo(lm, reqs, graphs=True)
    assert got == _solo(lm, reqs, graphs=False)


@pytest.mark.parametrize("spec", ["synthetic:gpt2-medium", "synthetic:tiny-llama:5"])
def test_fp16_batched_logits_within_tolerance_of_batch1(spec):
    lm = load_model(spec, device="cuda", dtype="float16")
    prompts = [list(range(1 + i, 30 + 7 * i)) for i in range(9)]
    with torch.inference_mode():
        runner = ModelRunner(lm, max_batch=16)
        seqs = paged_seqs(lm, runner, prompts)
        want = []
        for s in seqs:
            runner.reset()
            _, logits = runner.step([s])
            want.append(logits[0].clone())
            runner.reset()
        _, batched = runner.step(seqs)
    diff = max((batched[i] - want[i]).abs().max().item() for i in range(len(seqs)))
    print(f"{spec}: max |batched - batch-1| logit = {diff:.4g}")
    assert diff <= FP16_LOGIT_ATOL


def test_gpt2_fp16_one_row_bucket_is_fused_and_matches_torch_ops():
    lm = load_model("synthetic:gpt2", device="cuda", dtype="float16")
    with torch.inference_mode():
        runner = ModelRunner(lm, max_batch=4)
        if runner.cache.attention_kernel is None:
            pytest.skip("no paged attention kernel (CuPy missing)")
        assert runner.fused is not None
        s = paged_seqs(lm, runner, [list(range(3, 60))])[0]
        _, fused = runner.step([s])
        fused = fused[0].clone()
        runner.reset()
        ref = lm.model.decode_step(
            torch.tensor([s.token], device="cuda"), torch.tensor([s.position], device="cuda"),
            runner.cache, _batch_of(runner, s))
    assert (fused - ref[0]).abs().max().item() <= FP16_LOGIT_ATOL


def _batch_of(runner: ModelRunner, s: Sequence):
    from engine.paged_kv import PagedBatch

    tables = torch.zeros(1, runner.width, dtype=torch.int32, device="cuda")
    tables[0, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
    pos = torch.tensor([s.position], device="cuda")
    slot = runner.cache.slots_of(s.blocks, s.position, 1)
    return PagedBatch(pos, slot, tables, (pos + 1).int())


def test_padded_graph_rows_never_leave_the_position_table():
    """9 live rows replay the 16-row graph for more steps than GPT-2 has positions: the
    7 padded rows used to advance every replay until wpe[pos] indexed past the table (a
    device-side assert that killed the decode: bench_two_gpu two-engines). The live rows
    run past their own end too (clamped, as a row the host stops a step late)."""
    lm = load_model("synthetic:tiny-gpt2", device="cuda", dtype="float16")
    n = lm.config.max_positions
    with torch.inference_mode():
        runner = ModelRunner(lm, max_batch=16)
        assert 16 in runner.graphs
        seqs = paged_seqs(lm, runner, [list(range(1, 4 + i)) for i in range(9)])
        runner.collect(runner.launch(seqs, frozenset(s.seq_id for s in seqs)))
        for _ in range(n + 20):
            runner.collect(runner.launch(seqs))
        torch.cuda.synchronize()
        pos = runner.positions.tolist()
    assert max(pos) == n - 1                  # the live rows, clamped
    assert pos[9:16] == [0] * 7               # padding never moved
