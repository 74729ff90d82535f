"""generate (through the engine loop): stopping, limits, request checks."""

import pytest
import torch

from engine.errors import InvalidArgument
from engine.generate import check_request, generate
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def lm():
    return load_model("synthetic:tiny-gpt2:4")


def test_length_limit_and_timings(lm):
    res = generate(lm, [1, 2, 3], 7)
    assert len(res.token_ids) == 7 and res.finish_reason == "length"
    assert res.text == lm.tokenizer.decode(res.token_ids)
    t = res.timings
    assert t["total_ms"] >= t["prefill_ms"] > 0 and t["decode_ms"] > 0


def test_stop_id_ends_generation_and_is_yielded_last():
    llama = load_model("synthetic:tiny-llama")  # its greedy tokens vary (tiny-gpt2's repeat)
    full = generate(llama, [9, 8, 7, 6], 12).token_ids
    k = max(i for i, t in enumerate(full) if t not in full[:i])  # last first-occurrence
    assert k >= 2
    res = generate(llama, [9, 8, 7, 6], 12, stop_ids=[full[k]])
    assert res.token_ids == full[: k + 1] and res.finish_reason == "stop"


def test_eos_stops_unless_ignored(lm):
    from tests.engine_helpers import continue_in_engine

    eos = lm.tokenizer.eos_id
    assert eos == 256
    assert continue_in_engine(lm, [1, 2], eos, 5, SamplingParams()) == [eos]
    got = continue_in_engine(lm, [1, 2], eos, 5, SamplingParams(), ignore_eos=True)
    assert len(got) == 5 and got[0] == eos


def test_on_token_sees_every_token_in_order(lm):
    seen = []
    res = generate(lm, [5], 9, on_token=seen.append)
    assert seen == res.token_ids


@pytest.mark.parametrize(("ids", "n", "msg"), [
    ([], 4, "empty prompt"),
    ([1, 320], 4, "outside the vocabulary"),
    ([-1], 4, "outside the vocabulary"),
    ([1] * 250, 7, "exceeds"),
    ([1], 0, "max_new_tokens"),
])
def test_check_request(lm, ids, n, msg):
    with pytest.raises(InvalidArgument, match=msg):
        check_request(lm.config, ids, n)


def test_exact_position_limit_is_allowed(lm):
    res = generate(lm, [1] * 250, 6)  # 256 positions: the last token needs no KV slot
    assert len(res.token_ids) == 6


def test_kv_cache_write_and_views(lm):
    cfg = lm.config
    cache = KVCache(cfg, 2, 8)
    k = torch.randn(cfg.n_kv_heads, 3, cfg.head_dim)
    cache.write_layer(1, k, -k, row=1, start=2)
    assert torch.equal(cache.k[1, 1, :, 2:5], k) and torch.equal(cache.v[1, 1, :, 2:5], -k)
    assert cache.k[:, 0].abs().sum() == 0
    view = cache.rows(1)
    assert view.batch == 1 and torch.equal(view.k[1, 0, :, 2:5], k)
    view.write_layer(0, k, k, start=0)  # writes through to row 1 of the parent
    assert torch.equal(cache.k[0, 1, :, :3], k)
    with pytest.raises(ValueError):
        cache.write_layer(0, k, k, start=6)
    assert cache.nbytes() == 2 * cache.k.numel() * 4


def test_decode_step_writes_only_its_positions(lm):
    cache = KVCache(lm.config, 1, 16)
    lm.model.prefill(torch.tensor([3, 4, 5]), cache)
    lm.model.decode_step(torch.tensor([6]), torch.tensor([3]), cache)
    filled = cache.k[0, 0].abs().sum(dim=(0, 2)) > 0
    assert filled.tolist() == [True] * 4 + [False] * 12


def test_cpu_bfloat16_runs():
    lm = load_model("synthetic:tiny-llama", dtype="bfloat16")
    res = generate(lm, [1, 2, 3], 5)
    assert len(res.token_ids) == 5


def streamed(tokenizer, ids: list[int]) -> list[str]:
    """The text after each token, as the stream decoder lets it out."""
    stream, acc, out = tokenizer.stream(), "", []
    for i in ids:
        acc += stream.push(i)
        out.append(acc)
    return out


def test_stop_string_ends_the_text_before_it():
    """The generation stops at the token that completes the stop string; that token is
    kept, the text ends just before the string. Parity with the service path is in
    tests/test_services_e2e.py."""
    llama = load_model("synthetic:tiny-llama")
    full = generate(llama, [9, 8, 7, 6], 40, ignore_eos=True)
    texts = streamed(llama.tokenizer, full.token_ids)
    stop = texts[-1][len(texts[-1]) // 2:][:2]
    assert len(stop) == 2
    k = next(i for i, t in enumerate(texts) if stop in t)  # the token that completes it
    res = generate(llama, [9, 8, 7, 6], 40, ignore_eos=True, stop=[stop, "\x00never"])
    assert res.finish_reason == "stop" and k < 39
    assert res.token_ids == full.token_ids[: k + 1]
    assert res.text == texts[k][: texts[k].find(stop)] and stop not in res.text


def test_stop_string_never_generated_changes_nothing(lm):
    a = generate(lm, [1, 2, 3], 9)
    b = generate(lm, [1, 2, 3], 9, stop=["\x00never"])
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
