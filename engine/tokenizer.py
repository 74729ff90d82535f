"""Tokenizers: Hugging Face tokenizer.json via `tokenizers`, or a byte-level fallback.

The byte tokenizer serves synthetic models (and checkpoints shipped without a
tokenizer.json): ids 0-255 are the bytes of the UTF-8 text, the EOS id sits above them,
and ids it cannot render decode to a visible placeholder `<|id|>`. Its output is
labelled synthetic (`Tokenizer.synthetic`). A checkpoint without a tokenizer.json whose
vocabulary is too small for bytes (< 256) gets `IdTokenizer`: token ids in, every id
rendered as its placeholder out, text input refused (`Tokenizer.ids_only`).

`stream()` gives an incremental decoder for printing tokens as they come: it holds back
bytes of an unfinished UTF-8 sequence (and, for BPE, text that may still change) so a
character is never split across pushes.
"""

from __future__ import annotations

import codecs
from abc import ABC, abstractmethod
from pathlib import Path

N_BYTES = 256


class StreamDecoder(ABC):
    @abstractmethod
    def push(self, token_id: int) -> str:
        """Add one token; return the text that became printable ('' if none yet)."""

    @abstractmethod
    def flush(self) -> str:
        """End of stream: return whatever is still held back."""


class Tokenizer(ABC):
    eos_id: int | None = None
    synthetic: bool = False
    ids_only: bool = False  # no text: token ids in, `<|id|>` placeholders out

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def stream(self) -> StreamDecoder: ...


def placeholder(token_id: int) -> str:
    return f"<|{token_id}|>"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255; `eos_id` (default 256) decodes to nothing."""

    synthetic = True

    def __init__(self, vocab_size: int, eos_id: int | None = None) -> None:
        if vocab_size < N_BYTES:
            raise ValueError(f"byte tokenizer needs vocab_size >= {N_BYTES}, got {vocab_size}")
        if eos_id is None and vocab_size > N_BYTES:
            eos_id = N_BYTES
        self.vocab_size = vocab_size
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        s = self.stream()
        return "".join(s.push(i) for i in ids) + s.flush()

    def stream(self) -> StreamDecoder:
        return _ByteStream(self.eos_id)


class _ByteStream(StreamDecoder):
    def __init__(self, eos_id: int | None) -> None:
        self.eos_id = eos_id
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if 0 <= token_id < N_BYTES:
            return self._utf8.decode(bytes([token_id]))
        held = self._utf8.decode(b"", final=True)  # an interrupted sequence ends here
        self._utf8.reset()
        return held + ("" if token_id == self.eos_id else placeholder(token_id))

    def flush(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


class IdTokenizer(Tokenizer):
    """No text at all: a checkpoint without tokenizer.json and a vocabulary under 256 (too
    small for the byte tokenizer). Token ids run as they are; each output id decodes to
    its placeholder `<|id|>` (EOS to nothing); `encode` refuses text with one clear line."""

    synthetic = True
    ids_only = True

    def __init__(self, vocab_size: int, eos_id: int | None = None, name: str = "") -> None:
        self.vocab_size, self.eos_id, self.name = vocab_size, eos_id, name

    def encode(self, text: str) -> list[int]:
        from engine.errors import InvalidArgument

        raise InvalidArgument(
            f"{self.name or 'this model'} has no tokenizer.json and a vocabulary of "
            f"{self.vocab_size} (< {N_BYTES}, too small for the byte tokenizer): text input "
            f"is not possible; give token ids (--prompt-ids)")

    def decode(self, ids: list[int]) -> str:
        s = self.stream()
        return "".join(s.push(i) for i in ids)

    def stream(self) -> StreamDecoder:
        return _IdStream(self.eos_id)


class _IdStream(StreamDecoder):
    def __init__(self, eos_id: int | None) -> None:
        self.eos_id = eos_id

    def push(self, token_id: int) -> str:
        return "" if token_id == self.eos_id else placeholder(token_id)

    def flush(self) -> str:
        return ""


class HFTokenizer(Tokenizer):
    """A tokenizer.json (BPE/SentencePiece-style) through the `tokenizers` library."""

    synthetic = False

    def __init__(self, path: str | Path, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        return _OffsetStream(self.decode)


class _OffsetStream(StreamDecoder):
    """Decode a window of recent ids and emit only the new suffix once it no longer ends
    in U+FFFD (an incomplete byte sequence); the window keeps BPE merges and leading
    spaces right (the approach of HF text-generation-inference)."""

    def __init__(self, decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this were already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return now[len(before) :]


def load_tokenizer(model_dir: str | Path | None, vocab_size: int, eos_id: int | None) -> Tokenizer:
    """tokenizer.json in `model_dir` when present, else the byte tokenizer (token ids
    only, `IdTokenizer`, for a vocabulary too small for bytes)."""
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer.json"
        if path.is_file():
            return HFTokenizer(path, eos_id)
    if vocab_size < N_BYTES:
        return IdTokenizer(vocab_size, eos_id, str(model_dir or ""))
    return ByteTokenizer(vocab_size, eos_id)
