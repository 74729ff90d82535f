"""Page-locking an existing mapping for CUDA (cudaHostRegister), through torch's cudart.

Registered memory is what makes `copy_(non_blocking=True)` from the GPU a real DMA into
the shared region; without it the copy stages through a pageable bounce buffer.
torch is imported lazily: readers and CPU-only owners never need it.
"""

from __future__ import annotations

import contextlib

from engine.errors import Unavailable

HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current one


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def host_register(ptr: int, size: int) -> None:
    import torch
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, HOST_REGISTER_PORTABLE))
    if err != 0:
        raise Unavailable(
            f"cudaHostRegister of the KV region ({size} bytes at {ptr:#x}) failed with cudaError "
            f"{err}; check the locked-memory limit (ulimit -l) or pass cuda=False")


def host_unregister(ptr: int) -> int:
    """cudaError code (0 = success); never raises, since it runs on shutdown paths."""
    import torch
    try:
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))
    except Exception:  # CUDA already torn down at interpreter exit
        return -1


def synchronize_quietly() -> None:
    """Wait for all device work (copies into the region) before it is unregistered."""
    import torch
    with contextlib.suppress(Exception):  # CUDA already torn down at interpreter exit
        torch.cuda.synchronize()
