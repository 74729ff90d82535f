"""The GPU-to-GPU KV path's plumbing, on the CPU: on-device descriptors, slots and their
refusals, Attach and the client's choice. (The CUDA IPC itself and the pair on GPUs:
tests/cuda/test_device_kv_cuda.py.)"""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from engine.errors import Aborted, FailedPrecondition, InvalidArgument
from protos import hybrid_pb2 as pb
from transport import layout as L
from transport.descriptor import INVALID_HANDLE, KvDescriptor
from transport.reader import KvReader
from transport.region import KvRegion


class HostMirror:
    """DeviceMirror's interface over a CPU tensor (what the region asks of it)."""

    def __init__(self, nbytes: int, payload_offset: int) -> None:
        self.nbytes, self.payload_offset = nbytes, payload_offset
        self.tensor = torch.zeros(nbytes, dtype=torch.uint8)
        self.closed = False

    def view(self, offset: int, length: int):
        from transport.device_kv import _span

        return self.tensor[_span(offset, length, self.payload_offset, self.nbytes)]

    def close(self) -> None:
        self.closed = True

    def export(self) -> dict:
        return {"bus_id": "0000:00:06.0", "ipc_handle": bytes(range(64)),
                "nbytes": self.nbytes, "payload_offset": self.payload_offset}

    def describe(self) -> str:
        return f"cpu (test) {self.nbytes >> 20} MiB"


@pytest.fixture
def region():
    with KvRegion.create(4 << 20, 8, 4, 10.0, cuda_register=False) as r:
        yield r


def _alloc(region, **kw):
    return region.alloc(4 * 8192, 4, layout="dense", dtype="float16", n_tokens=64,
                        n_kv_heads=1, head_dim=32, checksums=True, **kw)


def test_descriptor_carries_on_device_in_proto_and_digest(region):
    region.attach_device(HostMirror(region.geometry.payload_bytes, region.geometry.payload_offset))
    desc = _alloc(region, on_device=True)
    assert desc.on_device and not desc.checksums  # no host bytes to checksum
    back = KvDescriptor.from_proto(desc.to_proto())
    assert back == desc and back.on_device
    from dataclasses import replace

    assert replace(desc, on_device=False).digest() != desc.digest()  # flipping it is forgery


def test_the_mirror_ipc_handle_is_published_in_the_region_header_only(region):
    """The handle maps every slot's bytes: it lives in the mode-0600 region's header (only
    the owner's uid may map it), not in any message; gone again once the region closes."""
    with KvReader.open(region.name) as r:
        assert r.device_export() is None
    g = region.geometry
    m = HostMirror(g.payload_bytes, g.payload_offset)
    region.attach_device(m)
    with KvReader.open(region.name) as r:
        assert r.device_export() == m.export()
        region.close()
        assert r.device_export() is None and m.closed


def test_on_device_slot_needs_a_mirror(region):
    with pytest.raises(FailedPrecondition, match="no GPU mirror"):
        _alloc(region, on_device=True)


def test_mirror_must_cover_the_payload(region):
    g = region.geometry
    with pytest.raises(InvalidArgument, match="does not cover"):
        region.attach_device(HostMirror(g.payload_bytes - 4096, g.payload_offset))
    with pytest.raises(InvalidArgument, match="does not cover"):
        region.attach_device(HostMirror(g.payload_bytes, g.payload_offset + 4096))


def test_on_device_bytes_go_to_the_mirror_and_never_through_the_region(region):
    g = region.geometry
    mirror = HostMirror(g.payload_bytes, g.payload_offset)
    region.attach_device(mirror)
    desc = _alloc(region, on_device=True)
    w = g.slot_word(desc.slot)
    assert region._u64[w + L.S_FLAGS] & L.FLAG_DEVICE
    view = region.layer_view(desc, 2)
    view.fill_(7)
    a, n = desc.layer_span(2)
    assert mirror.tensor[a - g.payload_offset:a - g.payload_offset + n].eq(7).all()
    assert not any(region._u8[a:a + n])  # the shared region's bytes stay untouched
    with pytest.raises(FailedPrecondition, match="GPU"):
        region.layer_buffer(desc, 0)  # the CPU writer / hashing path has no bytes here
    for layer in range(4):
        region.mark_ready(desc, layer)  # no checksum for device bytes
    region.set_first_token(desc, 5)
    reader = KvReader.attach(region)
    assert reader.wait_first_token(desc, 1.0) == 5
    with pytest.raises(FailedPrecondition, match="GPU to GPU"):
        reader.read_layer(desc, 0, 1.0)  # a host reader gets a clear refusal ...
    from dataclasses import replace

    with pytest.raises(Aborted, match=re.escape(INVALID_HANDLE)):  # ... after the capability check
        reader.read_layer(replace(desc, secret=bytes(range(16))), 0, 1.0)
    region.close()
    assert mirror.closed  # the region owns its mirror


def test_fetch_of_an_on_device_slot_is_refused(region):
    from transport.fetch import iter_chunks

    g = region.geometry
    region.attach_device(HostMirror(g.payload_bytes, g.payload_offset))
    desc = _alloc(region, on_device=True)
    for layer in range(4):
        region.mark_ready(desc, layer)
    with pytest.raises(FailedPrecondition):
        next(iter_chunks(region, desc, 0, 1.0))


def test_span_bounds():
    from transport.device_kv import _span

    assert _span(4096 + 10, 20, 4096, 100) == slice(10, 30)
    for off, n in ((4095, 1), (4096, 0), (4096 + 90, 11)):
        with pytest.raises(InvalidArgument):
            _span(off, n, 4096, 100)


def test_peer_mirror_refuses_a_bad_handle():
    from transport import device_kv

    if not device_kv.available():
        with pytest.raises(FailedPrecondition):
            device_kv.PeerMirror.open({"ipc_handle": b"x" * 64, "nbytes": 1, "bus_id": "0",
                                       "payload_offset": 0}, 0)
        return
    with pytest.raises(InvalidArgument, match="64-byte"):
        device_kv.PeerMirror.open({"ipc_handle": b"short", "nbytes": 1, "bus_id": "0",
                                   "payload_offset": 0}, 0)


class _Inst:
    def __init__(self, region=None):
        self.info = None if region is None else pb.ServiceInfo(region=region[0],
                                                               region_epoch=region[1])

    def region(self):
        return (self.info.region.lstrip("/"), self.info.region_epoch) if self.info else None


def _decode_info(*paired):
    return pb.ServiceInfo(prefills=[pb.PairedPrefill(region=r, region_epoch=e, device=d)
                                    for r, e, d in paired])


def test_client_asks_for_the_device_only_where_the_decode_mapped_that_prefill():
    from client.api import device_paired

    info = _decode_info(("/a", 1, True), ("/b", 2, False))
    assert device_paired(_Inst(("/a", 1)), info)
    assert not device_paired(_Inst(("/b", 2)), info)
    assert not device_paired(_Inst(("/a", 2)), info)  # a restarted prefill: not mapped yet
    # one prefill, not polled: the decode's only prefill decides
    assert device_paired(_Inst(), _decode_info(("/a", 1, True)))
    assert not device_paired(_Inst(), _decode_info(("/a", 1, False)))
    assert not device_paired(_Inst(), info)  # several, and we do not know which


@pytest.fixture(scope="module")
def cpu_pair(tmp_path_factory):
    from client.launch import ServicePair

    with ServicePair(model="synthetic:gpt2", device="cpu",
                     log_dir=str(tmp_path_factory.mktemp("pair"))) as pair:
        yield pair


async def _prefill_on_device(addr: str):
    from client.api import HybridClient

    async with HybridClient(addr, "127.0.0.1:1") as c:
        call = c.prefill.Prefill(pb.PrefillRequest(prompt_ids=[1, 2, 3], max_new_tokens=4,
                                                   kv_on_device=True), timeout=20)
        return [m async for m in call]


def test_cpu_services_keep_the_host_path(cpu_pair):
    import grpc

    from client.remote import run_remote

    res = run_remote(prompt_ids=[5, 6, 7, 8], max_new_tokens=4, prefill=cpu_pair.prefill,
                     decode=cpu_pair.decode)
    assert res.kv_path == "shm"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(_prefill_on_device(cpu_pair.prefill))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no GPU mirror" in e.value.details()


class _Ctx:
    def peer(self) -> str:
        return "ipv4:10.0.0.1:5"

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


@pytest.fixture
def prefill_servicer():
    """The real prefill servicer, runner and loop on a tiny CPU model, its region with a
    CPU stand-in for the GPU mirror (the CUDA part: tests/cuda/test_device_kv_cuda.py)."""
    from engine.loader import load_model
    from gpu_service.runner import PrefillRunner
    from gpu_service.servicer import PrefillServicer
    from transport import servekit as kit

    lm = load_model("synthetic:tiny-gpt2", "cpu", "float32")
    region = KvRegion.create(8 << 20, 8, lm.config.n_layers, 30.0, cuda_register=False)
    mirror = HostMirror(region.geometry.payload_bytes, region.geometry.payload_offset)
    region.attach_device(mirror)
    svc = PrefillServicer(PrefillRunner(lm, region), region, kit.Admission(8, 8), lease_s=30.0)
    yield svc, region, mirror
    svc.close()
    region.close()


async def _prefill_msgs(svc, ids, on_device: bool):
    return [m async for m in svc.Prefill(pb.PrefillRequest(
        prompt_ids=ids, max_new_tokens=2, kv_on_device=on_device), _Ctx())]


def test_prefill_writes_on_device_slots_into_the_mirror_and_lends_it_at_attach(
        prefill_servicer):
    svc, region, mirror = prefill_servicer
    ids = [3, 1, 4, 1, 5, 9, 2, 6]

    async def go():
        host = await _prefill_msgs(svc, ids, False)
        dev = await _prefill_msgs(svc, ids, True)
        plain = await svc.Attach(pb.AttachRequest(consumer="d:1", consumer_epoch=1), _Ctx())
        gpu = await svc.Attach(pb.AttachRequest(consumer="d:1", consumer_epoch=1,
                                                device_bus_id="0000:00:07.0"), _Ctx())
        info = await svc.Info(pb.InfoRequest(), _Ctx())
        return host, dev, plain, gpu, info

    host, dev, plain, gpu, info = asyncio.run(go())
    hd, dd = (KvDescriptor.from_proto(m[0].handle.kv) for m in (host, dev))
    assert dd.on_device and not hd.on_device and not dd.checksums
    assert dev[-1].done.first_token == host[-1].done.first_token
    g = region.geometry
    for layer in range(hd.n_layers):  # the same bytes: one in the region, one in the mirror
        a, n = hd.layer_span(layer)
        b, m = dd.layer_span(layer)
        want = bytes(region._u8[a:a + n])
        got = mirror.tensor[b - g.payload_offset:b - g.payload_offset + m].numpy().tobytes()
        assert got == want and any(want), layer
        assert not any(region._u8[b:b + m])  # nothing of the device slot in host memory
    assert not plain.HasField("kv_device")  # a CPU/FPGA decoder: no mirror named
    assert (gpu.kv_device.bus_id, gpu.kv_device.nbytes, gpu.kv_device.payload_offset) == (
        "0000:00:06.0", mirror.nbytes, g.payload_offset)
    # The IPC handle never goes over the wire: it is in the region's header, for a
    # process that may map the (mode 0600) region
    assert gpu.kv_device.ipc_handle == b"" and not plain.kv_device.ipc_handle
    with KvReader.open(region.name) as reader:
        assert reader.device_export() == mirror.export()
    assert info.kv_device.startswith("cpu (test)") and info.counters["device-slots"] == 1
