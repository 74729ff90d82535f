"""Byte tokenizer, tokenizer.json tokenizer, and their streaming decoders."""

import pytest

from engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from tests.helpers import make_tokenizer_json

TEXTS = ["hello world", "héllo wörld: naïve café", "漢字 🙂 mixed ascii", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_roundtrip(text):
    tok = ByteTokenizer(320)
    ids = tok.encode(text)
    assert ids == list(text.encode()) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text and tok.synthetic


def test_byte_specials_and_placeholders():
    tok = ByteTokenizer(320)
    assert tok.eos_id == 256
    assert tok.decode([104, 105, 256]) == "hi"  # EOS renders as nothing
    assert tok.decode([104, 300, 105]) == "h<|300|>i"  # visible, never silently lost
    assert ByteTokenizer(50257, eos_id=50256).eos_id == 50256
    with pytest.raises(ValueError):
        ByteTokenizer(100)


def test_byte_stream_never_splits_a_character():
    tok = ByteTokenizer(320)
    text = "aé漢🙂z"
    s = tok.stream()
    pieces = [s.push(i) for i in tok.encode(text)] + [s.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # held until the second byte arrives


def test_byte_stream_interrupted_sequence_is_visible():
    s = ByteTokenizer(320).stream()
    out = s.push(0xE6) + s.push(0xBC) + s.push(300) + s.push(ord("x"))
    assert out == "\ufffd<|300|>x"  # a broken sequence shows as U+FFFD, not dropped
    assert s.push(0xFF) == "\ufffd"


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return HFTokenizer(make_tokenizer_json(tmp_path_factory.mktemp("tok")), eos_id=0)


@pytest.mark.parametrize("text", TEXTS[:3])
def test_hf_roundtrip_and_stream(hf_tok, text):
    ids = hf_tok.encode(text)
    assert hf_tok.decode(ids) == text and not hf_tok.synthetic
    s = hf_tok.stream()
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_hf_stream_holds_partial_utf8(hf_tok):
    # one byte-level token per byte of an emoji: no output until the 4th byte
    ids = [hf_tok._tok.token_to_id(c) for c in "ðŁĻĤ"]  # byte-level symbols of 🙂
    assert None not in ids
    s = hf_tok.stream()
    assert [s.push(i) for i in ids] == ["", "", "", "🙂"]


def test_load_tokenizer_picks_tokenizer_json(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, 320, None), ByteTokenizer)
    make_tokenizer_json(tmp_path)
    assert isinstance(load_tokenizer(tmp_path, 320, 0), HFTokenizer)
    assert isinstance(load_tokenizer(None, 320, None), ByteTokenizer)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_byte_stream_equals_whole_decode_for_any_bytes(data):
    """Streaming arbitrary (also invalid) UTF-8 gives exactly what decoding it at once
    gives, and no piece ever ends inside a character."""
    s = ByteTokenizer(320).stream()
    pieces = [s.push(b) for b in data] + [s.flush()]
    assert "".join(pieces) == data.decode("utf-8", errors="replace")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_byte_roundtrip_any_text(text):
    tok = ByteTokenizer(320)
    assert tok.decode(tok.encode(text)) == text
