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

from engine.errors import FailedPrecondition, InvalidArgument
from engine.sequence import eos_id
from fpga_service.backends.base import DecodeBackend, DecodeSession, DecodeSpec
from fpga_service.backends.engine_session import EngineSession
from fpga_service.device.bandwidth import BandwidthModel
from fpga_service.device.base import CHANNEL_BYTES, HbmDevice

HBM_DTYPES = ("float16", "float32")


class FpgaSession(EngineSession):
    """One request on the card: a sequence of the backend's engine loop (its KV area
    in HBM; layers in slot form, kernels.reshape.pack_layer, in order)."""

    def __init__(self, backend: _FpgaBackend, spec: DecodeSpec) -> None:
        if spec.n_prompt < 1 or spec.max_new_tokens < 1:
            raise InvalidArgument(f"need n_prompt >= 1 and max_new_tokens >= 1, got "
                                  f"{spec.n_prompt}, {spec.max_new_tokens}")
        cfg = backend.config
        if spec.n_prompt + spec.max_new_tokens > cfg.max_positions:
            raise InvalidArgument(f"{spec.n_prompt} + {spec.max_new_tokens} tokens exceed the "
                                  f"model's {cfg.max_positions} positions")
        super().__init__(backend, spec)
        self._next_layer = 0

    def ingest_layer(self, layer: int, data: memoryview | bytes) -> None:
        if layer != self._next_layer:
            raise InvalidArgument(f"layer {layer} arrived, expected {self._next_layer}")
        want = self.backend.device.layout.layer_bytes(self.spec.n_prompt)
        if len(data) != want:
            raise InvalidArgument(f"layer {layer}: {len(data)} bytes for {self.spec.n_prompt} "
                                  f"tokens, expected {want}")
        self._next_layer += 1
        super().ingest_layer(layer, data)

    def start(self, first_token: int) -> None:
        if self._next_layer != self.backend.config.n_layers:
            raise FailedPrecondition(f"decode before all layers arrived "
                                     f"({self._next_layer}/{self.backend.config.n_layers})")
        super().start(first_token)

    @property
    def kv(self):
        """The request's HBM area once every layer handed over so far is written
        (tests and tools that read or corrupt it directly)."""
        self.engine.barrier()
        return self.seq.memory

    def timings(self) -> dict[str, float]:
        t = super().timings()
        st = self.seq.device_stats
        n = max(1, st.get("steps", 0))
        t["modeled_device_ms_per_token"] = st.get("modeled_ms", 0.0) / n
        return t


class _FpgaBackend(DecodeBackend):
    kv_layout = "hbm"
    default_hbm_dtype = "float16"

    def __init__(self, model_spec: str, device: str = "cpu", dtype: str = "float32",
                 hbm_dtype: str | None = None, channel_bytes: int = CHANNEL_BYTES,
                 bandwidth: BandwidthModel | None = None, timeout_s: float = 30.0,
                 max_batch: int = 16, **opts) -> None:
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
            self._start_engine(max_batch)
        except BaseException:
            self.device.close()
            raise

    def _default_dtype(self, dtype: str) -> str:
        return self.default_hbm_dtype

    def _make_device(self, channel_bytes: int, bandwidth, **opts) -> HbmDevice:
        raise NotImplementedError

    def open_session(self, spec: DecodeSpec) -> DecodeSession:
        return FpgaSession(self, spec)

    def _start_engine(self, max_batch: int) -> None:
        """The card as one device queue: one engine loop drives every request."""
        from engine.llm_engine import DecodeEngine

        from .hbm_runner import HbmRunner

        self.open_timeout_s = self.timeout_s
        self.engine = DecodeEngine(runner=HbmRunner(self.device, self.config, self.timeout_s),
                                   eos=self.eos_id, max_batch=max_batch)

    def info(self) -> dict[str, str]:
        dev = self.device
        return {"device": dev.name, "model": self.spec, "fingerprint": self.fingerprint,
                "hbm_dtype": self.kv_dtype, "synthetic": str(self.synthetic),
                "hbm_used_bytes": str(dev.used_bytes()),
                "hbm_capacity_bytes": str(dev.capacity_bytes())}

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None
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


class CsimBackend(EmulatorBackend):
    """`fpga-csim`: the HLS kernel source (kernels/hls/) compiled by g++ for C simulation,
    driven through the XRT host code (fpga_service/device/csim.py); image dtype defaults
    as for fpga-emu."""

    name = "fpga-csim"

    def _make_device(self, channel_bytes: int, bandwidth, **opts) -> HbmDevice:
        from fpga_service.device.csim import CsimDevice

        if opts:
            raise InvalidArgument(f"fpga-csim: unknown options {sorted(opts)}")
        return CsimDevice(channel_bytes, bandwidth)


class XrtBackend(_FpgaBackend):
    """`fpga-xrt`: a U55C through pyxrt; options xclbin (path) and device_index (int or BDF)."""

    name = "fpga-xrt"

    def _make_device(self, channel_bytes: int, bandwidth, xclbin: str | None = None,
                     device_index: int | str = 0, **opts) -> HbmDevice:
        from fpga_service.device.xrt import XrtDevice

        if opts:
            raise InvalidArgument(f"fpga-xrt: unknown options {sorted(opts)}")
        return XrtDevice(xclbin, device_index, channel_bytes, bandwidth)
