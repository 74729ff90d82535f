"""KvDescriptor: protobuf round trip and validation of hostile field values."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import Aborted, HybridError, InvalidArgument
from protos import hybrid_pb2 as pb
from transport.descriptor import INVALID_HANDLE, KvDescriptor, LayerRange
from transport.reader import KvReader
from transport.region import KvRegion

U64 = (1 << 64) - 1


def _desc(**kw) -> KvDescriptor:
    base = dict(region="/hybrid-kv-1-2", epoch=2, slot=0, offset=8192, length=8192,
                generation=1, layout="dense", dtype="float16", n_layers=2, n_tokens=4,
                layers=((0, 2048), (2048, 2048)), n_kv_heads=4, head_dim=32, checksums=True,
                secret=bytes(range(16)))
    return KvDescriptor(**{**base, **kw})


def test_proto_round_trip_keeps_every_field():
    d = _desc(layout="hbm", dtype="bfloat16", offset=U64 - 8192)
    msg = d.to_proto()
    assert msg.layout == pb.KV_LAYOUT_HBM and msg.dtype == pb.DTYPE_BF16
    assert KvDescriptor.from_proto(msg) == d
    assert KvDescriptor.from_bytes(d.to_bytes()) == d
    assert [tuple(r) for r in d.layers] == [(0, 2048), (2048, 2048)]
    assert isinstance(d.layers[0], LayerRange)


@pytest.mark.parametrize("field,value", [("layout", 0), ("layout", 9), ("dtype", 0), ("dtype", 7)])
def test_from_proto_refuses_unknown_enums(field, value):
    msg = _desc().to_proto()
    setattr(msg, field, value)
    with pytest.raises(InvalidArgument, match=field):
        KvDescriptor.from_proto(msg)


def test_from_bytes_refuses_garbage():
    with pytest.raises(InvalidArgument):
        KvDescriptor.from_bytes(b"\xff\xff\xff")


def test_valid_descriptor_passes():
    assert _desc().validate(1 << 20, payload_offset=8192, max_slots=4, max_layers=2)


@pytest.mark.parametrize("changes,match", [
    ({"offset": U64, "length": 2}, "overflows u64"),
    ({"offset": U64 - 10, "length": 8192}, "overflows u64"),
    ({"offset": 1 << 20}, "outside the region"),
    ({"offset": 4096}, "outside the region"),          # inside the slot table
    ({"length": 0}, "outside the region"),
    ({"offset": -1}, r"offset=-1"),
    ({"offset": 1 << 64}, "not an integer"),
    ({"slot": 4}, "slot 4 out of range"),
    ({"slot": 1 << 32}, "not an integer"),
    ({"generation": 0}, "generation 0"),
    ({"n_layers": 3}, "n_layers 3 but 2"),
    ({"n_layers": 0, "layers": ()}, "n_layers 0"),
    ({"layers": ((0, 2048), (8000, 2048))}, "leave the slot"),
    ({"layers": ((0, 2048), (U64, 2048))}, "leave the slot"),
    ({"layers": ((0, 2048), (1024, 2048))}, "overlap"),
    ({"layers": ((0, 2048), (2048, 0))}, "invalid"),
    ({"n_tokens": 5}, "dense layer 0 has 2048 bytes"),
    ({"region": "/../etc/passwd"}, "bad region name"),
    ({"region": "/a/b"}, "bad region name"),
    ({"region": ""}, "bad region name"),
    ({"checksums": 1}, "not a bool"),
    ({"epoch": "2"}, "not an integer"),
])
def test_validate_refuses(changes, match):
    with pytest.raises(InvalidArgument, match=match):
        _desc(**changes).validate(1 << 20, payload_offset=8192, max_slots=4, max_layers=2)


def test_max_layers_bound():
    with pytest.raises(InvalidArgument, match="max_layers"):
        _desc().validate(1 << 20, max_layers=1)


def test_layer_span_is_absolute_and_bounded():
    d = _desc()
    assert d.layer_span(1) == (8192 + 2048, 2048)
    for bad in (-1, 2, "0"):
        with pytest.raises(InvalidArgument):
            d.layer_span(bad)


@pytest.fixture(scope="module")
def live():
    region = KvRegion.create(1 << 20, 4, 4, 5.0, name_prefix="hkvtest-desc", cuda_register=False)
    desc = region.alloc(4 * 4096, 4, n_tokens=8, n_kv_heads=4, head_dim=32, checksums=True)
    for layer in range(4):
        region.write_layer(desc, layer, bytes([layer]) * 4096)
        region.mark_ready(desc, layer)
    reader = KvReader.open(region.name)
    yield region, desc, reader
    reader.close()
    region.close()


@pytest.mark.parametrize("changes,error", [
    ({"epoch": 1}, Aborted),                                   # another incarnation
    ({"region": "/hybrid-kv-9-9"}, InvalidArgument),           # another region
    ({"slot": 5}, Aborted),                                    # past max_slots: no hint
    # fields altered (the digest differs): the fixed answer, before any geometry check
    ({"layers": ((0, 4096), (4096, 4096), (8192, 4096), (12288, 2048))}, Aborted),
    ({"n_tokens": 16, "n_kv_heads": 2}, Aborted),              # digest differs
    ({"checksums": False}, Aborted),                           # digest differs
    ({"offset": 0}, Aborted),                                  # header bytes
    ({"secret": bytes(16)}, Aborted),                          # every field right but this
    ({"secret": b""}, Aborted),                                # a handle from before secrets
])
def test_reader_refuses_forged_descriptor(live, changes, error):
    _, desc, reader = live
    with pytest.raises(error):
        reader.read_layer(replace(desc, **changes), 0, 0.01)
    assert reader.read_layer(desc, 0, 0.01) == bytes(4096)


@pytest.mark.parametrize("changes", [{"secret": bytes(16)}, {"secret": b"x" * 15},
                                     {"slot": 3}, {"generation": 2}, {"offset": 0}])
def test_forged_handle_learns_nothing(live, changes):
    """Without the secret, owner and reader answer with one fixed message: no slot,
    generation, offset or payload range to probe with (issue 13, finding 1)."""
    region, desc, reader = live
    forged = replace(desc, **{"secret": bytes(16), **changes})
    for call in (lambda: reader.read_layer(forged, 0, 0.01), lambda: region.renew(forged),
                 lambda: region.free(forged), lambda: region.check(forged)):
        with pytest.raises(Aborted) as e:
            call()
        assert str(e.value) == INVALID_HANDLE
    assert reader.read_layer(desc, 0, 0.01) == bytes(4096)  # the holder's handle still works


def test_secret_is_fresh_per_allocation_and_never_printed(live):
    region, desc, _ = live
    assert len(desc.secret) == 16 and desc.secret.hex() not in repr(desc)
    other = region.alloc(4096, 1)
    assert other.secret != desc.secret
    region.free(other)


_u64 = st.one_of(st.integers(0, 64), st.integers(0, U64), st.sampled_from([U64, U64 - 1, 1 << 63]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=_u64, length=_u64, slot=st.integers(0, 1 << 32), gen=_u64, layer_off=_u64,
       layer_len=_u64, layer=st.integers(-2, 6))
def test_fuzzed_descriptors_fail_cleanly(live, offset, length, slot, gen, layer_off, layer_len, layer):
    """Whatever the numbers, the reader answers with one of our errors (or the right
    bytes), never an IndexError, OverflowError or a crash."""
    _, desc, reader = live
    layers = list(desc.layers)
    layers[1] = LayerRange(layer_off, layer_len)
    forged = replace(desc, offset=offset, length=length, slot=slot, generation=gen,
                     layers=tuple(layers))
    try:
        data = reader.read_layer(forged, layer, 0.0)
    except HybridError:
        return
    assert forged == desc or data == bytes([layer]) * 4096
