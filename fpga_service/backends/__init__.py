"""Decode backends by name, imported lazily so a machine without CUDA or XRT can still
run the others."""

from __future__ import annotations

import importlib
from typing import Any

from .base import DecodeBackend, DecodeSession, DecodeSpec

REGISTRY: dict[str, str] = {
    "gpu": "fpga_service.backends.gpu:GpuBackend",            # engine on cuda (or cpu)
    "fpga-emu": "fpga_service.backends.fpga:EmulatorBackend",  # software U55C
    "fpga-xrt": "fpga_service.backends.fpga:XrtBackend",       # real U55C through pyxrt
    "fpga-csim": "fpga_service.backends.fpga:CsimBackend",     # HLS kernel, g++ C simulation
}


def make_backend(name: str, **kwargs: Any) -> DecodeBackend:
    """Instantiate backend `name` with keyword options (model spec, device, ...)."""
    from engine.errors import InvalidArgument

    if name not in REGISTRY:
        raise InvalidArgument(f"unknown decode backend {name!r}; known: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["REGISTRY", "DecodeBackend", "DecodeSession", "DecodeSpec", "make_backend"]
