"""The decode-backend contract: what the DecodeService drives for one request.

A backend owns a decode device (a GPU through the engine, a real U55C through XRT, or
the software U55C). The servicer streams one request's KV into a session layer by
layer as prefill produces it, then asks for tokens. Implementations are picked by name
from `fpga_service.backends.REGISTRY` with lazy imports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.sampling import SamplingParams


@dataclass(frozen=True)
class DecodeSpec:
    """One generation request as the backend sees it."""

    request_id: str
    n_prompt: int                   # live tokens whose KV arrives by ingest
    max_new_tokens: int             # total generated, including prefill's first token
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


class DecodeSession(ABC):
    """One request's KV in device memory plus its decode loop.

    Lifetime: created by `DecodeBackend.open_session`, ended by `close()`, which the
    servicer calls exactly once however the request ends (done, error, cancel).
    """

    @abstractmethod
    def ingest_layer(self, layer: int, data: memoryview) -> None:
        """Write one layer's K and V (in the backend's `kv_layout`, the slot's dtype)
        into device memory. `data` is only valid during the call: copy what you keep.
        Layers arrive in order 0..n_layers-1, each exactly once."""

    @abstractmethod
    def decode(self, first_token: int) -> Iterator[int]:
        """Yield generated tokens 1..max_new_tokens-1 (token 0 is prefill's
        `first_token`). Stops early after EOS (unless ignore_eos) or a stop id,
        yielding that token last. Sampling for generated index i depends only on
        (logits, sampling params, i), so the tokens equal single-process generation."""

    @abstractmethod
    def timings(self) -> dict[str, float]:
        """Stage times in ms, e.g. decode_ms, modeled_device_ms_per_token (FPGA)."""

    @abstractmethod
    def close(self) -> None:
        """Free this request's device KV. Idempotent."""


class DecodeBackend(ABC):
    """A decode device with the model's weights loaded."""

    name: str = ""
    kv_layout: str = "dense"        # "dense" | "hbm": what ingest_layer expects
    kv_dtype: str = "float32"       # "float16" | "bfloat16" | "float32": slot element type

    @abstractmethod
    def open_session(self, spec: DecodeSpec) -> DecodeSession:
        """Reserve device KV space for spec.n_prompt + spec.max_new_tokens tokens.
        Raises engine.errors.ResourceExhausted when it does not fit."""

    @abstractmethod
    def info(self) -> dict[str, str]:
        """Human-readable facts: device, model, fingerprint, memory in use."""

    @abstractmethod
    def close(self) -> None:
        """Release the device. Idempotent."""
