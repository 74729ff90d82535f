"""`hybrid generate`: the --json contract, streaming text, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from client.cli import main
from tests.helpers import make_tiny_gpt2, make_tokenizer_json

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--local", "--model", "synthetic:tiny-gpt2"]


def run(*args):
    return CliRunner().invoke(main, ["generate", *args], env={"HF_HUB_OFFLINE": "1"})


def test_json_fields():
    r = run("hello", *TINY, "--max-new-tokens", "6", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) <= 6 and out["token_ids"]
    assert out["model"] == "synthetic:tiny-gpt2" and out["synthetic"] is True
    assert len(out["weights_fingerprint"]) == 32 and out["prompt_ids"] == list(b"hello")
    assert set(out["timings"]) >= {"prefill_ms", "decode_ms", "total_ms"}
    assert out["timings"]["total_ms"] >= out["timings"]["prefill_ms"] >= 0
    assert "synthetic weights, byte tokenizer" in r.stderr and "loading" not in r.stderr


def test_text_output_equals_json_text():
    args = ("héllo", *TINY, "--max-new-tokens", "12")
    text = run(*args).stdout
    data = json.loads(run(*args, "--json").stdout)
    assert text == data["text"] + "\n"


def test_sampling_seed_is_reproducible():
    args = ("--prompt-ids", "1,2,3", *TINY, "--max-new-tokens", "10", "--temperature", "1.5",
            "--top-k", "40", "--top-p", "0.9", "--json")
    a = json.loads(run(*args, "--seed", "5").stdout)["token_ids"]
    assert a == json.loads(run(*args, "--seed", "5").stdout)["token_ids"]


def test_local_hf_dir_with_tokenizer(tmp_path):
    model = make_tiny_gpt2(tmp_path)
    make_tokenizer_json(model)
    r = run("hello world", "--local", "--model", str(model), "--max-new-tokens", "5", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["synthetic"] is False and out["synthetic_tokenizer"] is False
    assert out["weights_fingerprint"] and "note:" not in r.stderr


BAD = [
    (["", *TINY], "empty prompt"),
    ([*TINY], "empty prompt"),
    (["--prompt-ids", "1,x", *TINY], "comma-separated integers"),
    (["--prompt-ids", "", *TINY], "empty --prompt-ids"),
    (["--prompt-ids", "5,320", *TINY], "outside the vocabulary"),
    (["--prompt-ids", "-1", *TINY], "negative"),
    (["hi", *TINY, "--max-new-tokens", "255"], "exceeds the model's 256 positions"),
    (["hi", *TINY, "--max-new-tokens", "0"], "max-new-tokens"),
    (["hi", "--local", "--model", "synthetic:nope"], "unknown model"),
    (["hi", "--local", "--model", "./no/such/dir"], "no model directory"),
    (["hi", *TINY, "--temperature", "-1"], "temperature"),
    (["hi", *TINY, "--top-p", "1.5"], "top_p"),
    (["hi", *TINY, "--dtype", "int8"], "unknown dtype"),
    (["hi", *TINY, "--device", "tpu"], "device"),
    (["hi", "--prompt-ids", "1", *TINY], "not both"),
    (["hi", "there", "--model", "synthetic:tiny-gpt2"], "several PROMPTS run with --local"),
]


@pytest.mark.parametrize(("args", "msg"), BAD, ids=[m for _, m in BAD])
def test_bad_input_one_line_exit_2(args, msg):
    r = run(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], lines
    assert r.stdout == ""


def test_offline_hub_id_says_what_to_do():
    r = run("hi", "--local", "--model", "someone/some-model")
    assert r.exit_code != 0
    assert "synthetic:<preset>" in r.stderr and "local model directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_service_path_absent_is_one_clear_line():
    try:
        import client.remote  # noqa: F401
    except ModuleNotFoundError:
        r = run("hi", "--max-new-tokens", "2")
        assert r.exit_code != 0 and "use --local" in r.stderr
    else:
        pytest.skip("client.remote exists in this build")


def test_real_process_no_traceback():
    p = subprocess.run([sys.executable, "-m", "client.cli", "generate", "--local", "--prompt-ids",
                        "1,zz", "--model", "synthetic:tiny-gpt2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: --prompt-ids must be comma-separated integers; 'zz' is not"


def test_stop_id_option():
    llama = ["--local", "--model", "synthetic:tiny-llama", "--prompt-ids", "9,8,7,6", "--json"]
    full = json.loads(run(*llama, "--max-new-tokens", "12").stdout)["token_ids"]
    k = max(i for i, t in enumerate(full) if t not in full[:i])  # last first-occurrence
    out = json.loads(run(*llama, "--max-new-tokens", "12", "--stop-id", str(full[k])).stdout)
    assert out["token_ids"] == full[: k + 1] and out["finish_reason"] == "stop"


def test_several_prompts_local_run_together_and_equal_one_at_a_time():
    """`hybrid generate A B C --local`: the engine batches them; each prompt's tokens
    equal its own run."""
    prompts = ["hello", "a longer second prompt", "x"]
    r = run(*prompts, *TINY, "--max-new-tokens", "8", "--json")
    assert r.exit_code == 0, r.stderr
    many = json.loads(r.stdout)
    assert [m["prompt_ids"] for m in many] == [list(p.encode()) for p in prompts]
    for p, m in zip(prompts, many, strict=True):
        one = json.loads(run(p, *TINY, "--max-new-tokens", "8", "--json").stdout)
        assert m["token_ids"] == one["token_ids"]
    text = run(*prompts, *TINY, "--max-new-tokens", "8").stdout
    assert text.startswith("[0] ") and text.index("\n[1] ") < text.index("\n[2] ")
