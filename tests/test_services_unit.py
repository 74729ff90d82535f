"""In-process pieces of the services: admission limits, status mapping, proto sampling,
the prefill runner writing a region slot (dense and HBM image), client text replay."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from client.remote import _ServerText
from engine import errors
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.sampling import SamplingParams
from gpu_service.runner import PrefillRunner
from protos import hybrid_pb2 as pb
from transport import servekit as kit
from transport.reader import KvReader
from transport.region import KvRegion


def test_admission_bounds_and_draining():
    async def go():
        adm = kit.Admission(max_active=1, max_queue=1)
        async with adm.slot():
            waiter = asyncio.create_task(_enter(adm))
            await asyncio.sleep(0.01)
            assert adm.waiting == 1
            with pytest.raises(errors.ResourceExhausted):
                await _enter(adm)
        assert await waiter >= 0.0
        adm.draining = True
        with pytest.raises(errors.Unavailable):
            await _enter(adm)

    asyncio.run(go())


async def _enter(adm: kit.Admission) -> float:
    async with adm.slot() as queue_ms:
        return queue_ms


@pytest.mark.parametrize("exc,code", [
    (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errors.Aborted("x"), grpc.StatusCode.ABORTED),
    (errors.DataLoss("x"), grpc.StatusCode.DATA_LOSS),
    (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
])
def test_status_mapping_never_unknown(exc, code):
    assert kit.status_of(exc) == code


def test_sampling_from_proto_restores_decimals():
    p = kit.sampling_from_proto(pb.SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3))
    assert p == SamplingParams(0.7, 5, 0.9, 3)
    assert kit.sampling_from_proto(pb.SamplingParams()).top_p == 1.0  # 0 = off
    assert kit.sampling_from_proto(pb.SamplingParams(temperature=0.5)).seed is not None
    with pytest.raises(errors.InvalidArgument):
        kit.sampling_from_proto(pb.SamplingParams(temperature=float("nan")))


def test_layout_and_dtype_names():
    assert kit.layout_name(pb.KV_LAYOUT_HBM) == "hbm"
    assert kit.dtype_name(pb.DTYPE_BF16) == "bfloat16"
    with pytest.raises(errors.InvalidArgument):
        kit.layout_name(0)


@pytest.fixture(scope="module")
def lm():
    return load_model("synthetic:tiny-llama", "cpu", "float32")


@pytest.fixture
def region(lm):
    r = KvRegion.create(8 << 20, 4, lm.config.n_layers, 5.0)
    yield r
    r.close()


def _prefill(runner, region, ids, layout):
    n = runner.config.n_layers
    lb = runner.layer_bytes(layout, len(ids))
    desc = region.alloc(lb * n, n, layout=layout, dtype=runner.slot_dtype(layout),
                        n_tokens=len(ids), n_kv_heads=runner.config.n_kv_heads,
                        head_dim=runner.config.head_dim, checksums=True)
    res = runner.run(ids, desc, layout, SamplingParams(), threading.Event())
    return desc, res


def test_runner_fills_dense_slot_like_the_engine(lm, region):
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    runner = PrefillRunner(lm, region)
    desc, res = _prefill(runner, region, ids, "dense")
    cache = KVCache(lm.config, 1, len(ids), lm.device, lm.dtype)
    logits = lm.model.prefill(torch.tensor(ids), cache)
    assert res.first_token == int(logits.argmax())
    reader = KvReader.open(region.name)
    shape = (lm.config.n_kv_heads, len(ids), lm.config.head_dim)
    for layer in range(lm.config.n_layers):
        flat = torch.frombuffer(bytearray(reader.read_layer(desc, layer, 1.0)), dtype=torch.float32)
        assert torch.equal(flat[:flat.numel() // 2].view(shape), cache.k[layer, 0, :, :len(ids)])
        assert torch.equal(flat[flat.numel() // 2:].view(shape), cache.v[layer, 0, :, :len(ids)])
    assert reader.wait_first_token(desc, 1.0) == res.first_token
    assert res.ship.kv_bytes == desc.nbytes and res.ship.transfer_ms > 0
    assert 0 <= res.ship.exposed_transfer_ms <= res.ship.transfer_ms
    reader.close()


def test_runner_hbm_image_unpacks_to_the_kv(lm, region):
    from kernels.hbm_layout import HbmLayout
    from kernels.reshape import unpack_layer

    ids = list(range(10, 47))
    runner = PrefillRunner(lm, region)
    desc, _ = _prefill(runner, region, ids, "hbm")
    assert desc.layout == "hbm" and desc.dtype == "float16"
    cache = KVCache(lm.config, 1, len(ids), lm.device, lm.dtype)
    lm.model.prefill(torch.tensor(ids), cache)
    layout = HbmLayout.for_model(lm.config, "float16")
    reader = KvReader.open(region.name)
    for layer in range(lm.config.n_layers):
        k, v = unpack_layer(reader.read_layer(desc, layer, 1.0), layout, len(ids))
        assert torch.equal(k.cpu(), cache.k[layer, 0, :, :len(ids)].half())
        assert torch.equal(v.cpu(), cache.v[layer, 0, :, :len(ids)].half())
    reader.close()


def test_runner_cancel_stops_between_layers(lm, region):
    runner = PrefillRunner(lm, region)
    ids = [1, 2, 3]
    lb = runner.layer_bytes("dense", 3)
    c = lm.config
    desc = region.alloc(lb * c.n_layers, c.n_layers, dtype="float32", n_tokens=3,
                        n_kv_heads=c.n_kv_heads, head_dim=c.head_dim)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(errors.Aborted):
        runner.run(ids, desc, "dense", SamplingParams(), cancel)


def test_server_text_replays_pieces():
    t = _ServerText()
    t.arrived([1, 2], "ab")
    t.arrived([], "!")
    s = t.stream()
    assert [s.push(1), s.push(2), s.flush()] == ["", "ab", "!"]


def test_health_not_serving_and_unavailable_until_ready():
    """The server answers from the moment it binds: NOT_SERVING and UNAVAILABLE while
    the weights load; SERVING once the servicer is in place."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos import hybrid_pb2_grpc as pbg

    class Ready(pbg.DecodeServiceServicer):
        async def Info(self, request, context):
            return pb.ServiceInfo(model="m")

    async def go():
        holder: dict = {}
        name = "hybrid.v1.DecodeService"
        server, health = kit.make_server(lambda s: pbg.add_DecodeServiceServicer_to_server(
            kit.late_servicer(pbg.DecodeServiceServicer, holder, ("Generate",), ("Info",)), s),
            [name])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            hc, stub = health_pb2_grpc.HealthStub(ch), pbg.DecodeServiceStub(ch)
            check = health_pb2.HealthCheckRequest(service=name)
            assert (await hc.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Info(pb.InfoRequest())
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            holder["servicer"] = Ready()
            kit.set_health(health, [name], kit.SERVING)
            assert (await hc.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
            assert (await stub.Info(pb.InfoRequest())).model == "m"
        await server.stop(0)

    asyncio.run(go())
