"""Errors shared by every layer, each naming the gRPC status it maps to.

engine/, kernels/ and transport/ never import grpc; the servicers turn `status` into
`grpc.StatusCode[status]`. Bad input must never surface as UNKNOWN.
"""

from __future__ import annotations


class HybridError(Exception):
    status = "INTERNAL"


class InvalidArgument(HybridError, ValueError):
    status = "INVALID_ARGUMENT"


class NotFound(HybridError, KeyError):
    status = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ResourceExhausted(HybridError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(HybridError):
    status = "UNAVAILABLE"


class Aborted(HybridError):
    status = "ABORTED"


class DataLoss(HybridError):
    status = "DATA_LOSS"


class FailedPrecondition(HybridError):
    status = "FAILED_PRECONDITION"


class DeadlineExceeded(HybridError, TimeoutError):
    status = "DEADLINE_EXCEEDED"


# CUDA errors after which the context is unusable for good ("sticky"): every later call
# fails too, so the process must stop serving and be replaced. Out of memory is not one.
_STICKY = ("device-side assert", "illegal memory access", "illegal instruction",
           "unspecified launch failure", "misaligned address", "uncorrectable ecc",
           "hardware stack error", "launch timed out")


def is_fatal_device_error(e: BaseException) -> bool:
    """Whether `e` is a CUDA error that poisons the device context."""
    text = str(e).lower()
    return "cuda error" in text and any(s in text for s in _STICKY)
