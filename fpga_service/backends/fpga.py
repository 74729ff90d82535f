"""The FPGA decode backends: `fpga-emu` (the software U55C) and `fpga-xrt` (a real U55C).

Both load the model once on the host only to pack its HBM weights image
(kernels.weights_image), write it into the device and then drop the host copy: from
then on every token is computed by the device's decode kernel from HBM bytes. Ingest
writes each layer's packed K, V (slot form, kernels.reshape.pack_layer) into the
request's KV area as soon as it arrives; decode runs the kernel one step per token and
samples on the host with engine.sampling.sample, so tokens equal single-process
generation for the same logits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

from engine.errors import FailedPrecondition, InvalidArgument
from engine.generate import eos_id, is_stop
from engine.sampling import sample
from fpga_service.backends.base import DecodeBackend, DecodeSession, DecodeSpec
from fpga_service.device.bandwidth import BandwidthModel
from fpga_service.device.base import CHANNEL_BYTES, HbmDevice

HBM_DTYPES = ("float16", "float32")


class FpgaSession(DecodeSession):
    def __init__(self, backend: _FpgaBackend, spec: DecodeSpec) -> None:
        if spec.n_prompt < 1 or spec.max_new_tokens < 1:
            raise InvalidArgument(f"need n_prompt >= 1 and max_new_tokens >= 1, got "
                                  f"{spec.n_prompt}, {spec.max_new_tokens}")
        cfg = backend.config
        if spec.n_prompt + spec.max_new_tokens > cfg.max_positions:
            raise InvalidArgument(f"{spec.n_prompt} + {spec.max_new_tokens} tokens exceed the "
                                  f"model's {cfg.max_positions} positions")
        self.backend, self.spec = backend, spec
        self.dev = backend.device
        self.kv = self.dev.alloc_kv(spec.n_prompt + spec.max_new_tokens, spec.request_id)
        self._next_layer = 0
        self._t: dict[str, float] = {"ingest_ms": 0.0, "decode_ms": 0.0, "n_tokens": 0.0,
                                     "modeled_device_ms": 0.0, "bytes_read": 0.0}
        self._t_first: float | None = None
        # close() may come from another thread (a cancelled request) while a kernel run
        # or an ingest is writing into this KV area: it waits, so a freed area is never
        # written (it could already belong to the next request).
        self._lock = threading.Lock()
        self._closed = False

    def ingest_layer(self, layer: int, data: memoryview) -> None:
        if layer != self._next_layer:
            raise InvalidArgument(f"layer {layer} arrived, expected {self._next_layer}")
        now = time.perf_counter()
        self._t_first = self._t_first or now
        with self._lock:
            self._check_open()
            self.dev.write_kv_layer(self.kv, layer, data, self.spec.n_prompt)
        self._next_layer += 1
        self._t["ingest_ms"] = (time.perf_counter() - self._t_first) * 1e3

    def decode(self, first_token: int) -> Iterator[int]:
        cfg, spec = self.backend.config, self.spec
        if self._next_layer != cfg.n_layers:
            raise FailedPrecondition(f"decode before all layers arrived "
                                     f"({self._next_layer}/{cfg.n_layers})")
        stops, eos = frozenset(spec.stop_ids), self.backend.eos_id
        if is_stop(first_token, eos, stops, spec.ignore_eos):
            return
        token, pos = first_token, spec.n_prompt
        for step in range(1, spec.max_new_tokens):
            t0 = time.perf_counter()
            with self._lock:
                if self._closed:
                    return
                res = self.dev.run_decode(self.kv, token, pos, 1, self.backend.timeout_s)
            token = int(sample(res.logits, spec.sampling, step)[0])
            self._account(t0, res)
            yield token
            if is_stop(token, eos, stops, spec.ignore_eos):
                return
            pos += 1

    def _account(self, t0: float, res) -> None:
        t = self._t
        t["decode_ms"] += (time.perf_counter() - t0) * 1e3
        t["n_tokens"] += 1
        t["modeled_device_ms"] += res.modeled_ms
        t["bytes_read"] += res.bytes_read

    def timings(self) -> dict[str, float]:
        t = dict(self._t)
        n = max(t["n_tokens"], 1.0)
        t["decode_ms_per_token"] = t["decode_ms"] / n
        t["modeled_device_ms_per_token"] = t["modeled_device_ms"] / n
        return t

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"session {self.spec.request_id} is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.kv.free()


class _FpgaBackend(DecodeBackend):
    kv_layout = "hbm"
    default_hbm_dtype = "float16"

    def __init__(self, model_spec: str, device: str = "cpu", dtype: str = "float32",
                 hbm_dtype: str | None = None, channel_bytes: int = CHANNEL_BYTES,
                 bandwidth: BandwidthModel | None = None, timeout_s: float = 30.0,
                 **opts) -> None:
        from engine.loader import load_model
        from kernels.hbm_layout import HbmLayout
        from kernels.weights_image import pack_weights

        # HYBRID_HBM_DTYPE: how `hybrid serve decode` picks it until the CLI has an option
        hbm_dtype = hbm_dtype or os.environ.get("HYBRID_HBM_DTYPE") or self._default_dtype(str(dtype))
        if hbm_dtype not in HBM_DTYPES:
            raise InvalidArgument(f"hbm_dtype must be one of {HBM_DTYPES}, got {hbm_dtype!r}")
        self.kv_dtype = hbm_dtype
        self.timeout_s = timeout_s
        self.device = self._make_device(channel_bytes, bandwidth, **opts)
        self.device.open()  # fails first (Unavailable) when the hardware is missing
        try:
            lm = load_model(model_spec, device="cpu", dtype="float32")
            self.config, self.tokenizer = lm.config, lm.tokenizer
            self.fingerprint, self.spec, self.synthetic = lm.fingerprint, lm.spec, lm.synthetic
            self.eos_id = eos_id(lm.tokenizer, lm.config)
            layout = HbmLayout.for_model(lm.config, hbm_dtype)
            # kernels.weights_image's default naming reads the engine's parameters too
            # (it tells nn.Linear [out, in] from HF Conv1D by c_attn's shape)
            image = pack_weights(lm.config, lm.model.state_dict(), layout)
            del lm  # the host copy of the weights: from now on only HBM holds them
            self.device.load_model(self.config, hbm_dtype, _channel_bytes(image))
        except BaseException:
            self.device.close()
            raise

    def _default_dtype(self, dtype: str) -> str:
        return self.default_hbm_dtype

    def _make_device(self, channel_bytes: int, bandwidth, **opts) -> HbmDevice:
        raise NotImplementedError

    def open_session(self, spec: DecodeSpec) -> DecodeSession:
        return FpgaSession(self, spec)

    def info(self) -> dict[str, str]:
        dev = self.device
        return {"device": dev.name, "model": self.spec, "fingerprint": self.fingerprint,
                "hbm_dtype": self.kv_dtype, "synthetic": str(self.synthetic),
                "hbm_used_bytes": str(dev.used_bytes()),
                "hbm_capacity_bytes": str(dev.capacity_bytes())}

    def close(self) -> None:
        self.device.close()


def _channel_bytes(image) -> list:
    """The 32 per-channel byte arrays of a kernels.weights_image.WeightsImage."""
    return list(image.channels)


class EmulatorBackend(_FpgaBackend):
    """`fpga-emu`: fp32 HBM images when the service computes in fp32 (exact-token parity
    with `hybrid generate --local`), fp16 (the U55C's element type) otherwise."""

    name = "fpga-emu"

    def _default_dtype(self, dtype: str) -> str:
        return "float32" if dtype in ("float32", "fp32", "torch.float32") else "float16"

    def _make_device(self, channel_bytes: int, bandwidth, **opts) -> HbmDevice:
        from fpga_service.device.emulator import EmulatorDevice

        if opts:
            raise InvalidArgument(f"fpga-emu: unknown options {sorted(opts)}")
        return EmulatorDevice(channel_bytes, bandwidth)


class XrtBackend(_FpgaBackend):
    """`fpga-xrt`: a U55C through pyxrt; options xclbin (path) and device_index (int or BDF)."""

    name = "fpga-xrt"

    def _make_device(self, channel_bytes: int, bandwidth, xclbin: str | None = None,
                     device_index: int | str = 0, **opts) -> HbmDevice:
        from fpga_service.device.xrt import XrtDevice

        if opts:
            raise InvalidArgument(f"fpga-xrt: unknown options {sorted(opts)}")
        return XrtDevice(xclbin, device_index, channel_bytes, bandwidth)
