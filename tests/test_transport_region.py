"""KvRegion / KvReader in one process: allocation, generations, leases, readiness,
failure semantics, start-up checks. (Cross-process: test_transport_multiproc.py.)"""

from __future__ import annotations

import errno
import mmap
import os
import time

import pytest

from engine.errors import (
    Aborted,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from transport import futex
from transport import layout as L
from transport.reader import KvReader
from transport.region import KvRegion
from transport.shm import SHM_DIR, free_bytes

PREFIX = "hkvtest-region"


@pytest.fixture
def region():
    r = KvRegion.create(1 << 20, 4, 4, 0.2, name_prefix=PREFIX, cuda_register=False)
    yield r
    r.close()


@pytest.fixture(params=[True, False], ids=["futex", "sleep"])
def reader(region, request):
    """Both wait strategies: futex wake-ups and the portable sleep/backoff fallback."""
    rd = KvReader.open(region.name, use_futex=request.param)
    assert bool(rd._addr) == (request.param and futex.available())
    yield rd
    rd.close()


def _fill(region, desc, value=7):
    for layer in range(desc.n_layers):
        region.write_layer(desc, layer, bytes([value + layer]) * desc.layers[layer].length)
        region.mark_ready(desc, layer)


def test_header_and_geometry(region):
    g = region.geometry
    assert os.path.exists(region.path) and os.stat(region.path).st_size == g.total_bytes
    assert oct(os.stat(region.path).st_mode & 0o777) == "0o600"
    with open(region.path, "rb") as f:
        head = f.read(64)
    assert head[:8] == L.MAGIC and int.from_bytes(head[8:16], "little") == L.VERSION
    assert int.from_bytes(head[24:32], "little") == region.epoch
    assert str(os.getpid()) in region.name and str(region.epoch) in region.name
    assert g.payload_offset % 4096 == 0 and g.payload_bytes == 1 << 20
    assert not region.registered


def test_alloc_layout_and_generation_bump(region, reader):
    d = region.alloc(3 * 1000, 3, n_tokens=0)
    assert [tuple(r) for r in d.layers] == [(0, 1000), (1024, 1000), (2048, 1000)]
    assert d.length == 4096 and d.generation == 1 and d.offset >= region.geometry.payload_offset
    _fill(region, d)
    assert reader.read_layer(d, 2, 0.1) == bytes([9]) * 1000
    assert region.free(d) is True
    assert region.free(d) is False  # idempotent for the same generation
    d2 = region.alloc(4096, 1)
    assert d2.slot == d.slot and d2.generation == 2
    with pytest.raises(Aborted, match="not valid"):
        reader.read_layer(d, 0, 0.1)
    with pytest.raises(Aborted):
        region.free(d)  # stale: the slot was reused since
    with pytest.raises(Aborted):
        region.mark_ready(d, 0)


def test_uneven_layer_sizes(region, reader):
    d = region.alloc(300 + 5000, 2, layer_bytes=[300, 5000], layout="hbm")
    assert [tuple(r) for r in d.layers] == [(0, 300), (512, 5000)]
    _fill(region, d, 1)
    assert reader.read_layer(d, 1, 0.1) == bytes([2]) * 5000
    with pytest.raises(InvalidArgument):
        region.alloc(100, 2, layer_bytes=[30, 60])
    with pytest.raises(InvalidArgument):
        region.alloc(101, 2)


@pytest.mark.parametrize("kw", [dict(layout="csr"), dict(dtype="int8"), dict(n_layers=5),
                                dict(n_layers=0), dict(n_bytes=-4),
                                dict(n_tokens=3, n_kv_heads=2, head_dim=8)])
def test_alloc_refuses_bad_arguments(region, kw):
    args = {"n_bytes": 4096, "n_layers": 2, **kw}
    with pytest.raises(InvalidArgument):
        region.alloc(args.pop("n_bytes"), args.pop("n_layers"), **args)
    assert region.stats()["slots_used"] == 0


def test_full_region_refuses_promptly(region):
    for _ in range(4):
        region.alloc(4096, 1)
    t0 = time.perf_counter()
    with pytest.raises(ResourceExhausted, match=r"all 4 slots in use"):
        region.alloc(4096, 1)
    assert time.perf_counter() - t0 < 0.1


def test_full_by_bytes_refuses_promptly_with_sizes():
    with KvRegion.create(1 << 20, 8, 1, 5.0, name_prefix=PREFIX, cuda_register=False) as r:
        descs = [r.alloc(256 << 10, 1) for _ in range(4)]
        t0 = time.perf_counter()
        with pytest.raises(ResourceExhausted, match=r"no free block of 4096 bytes \(free 0"):
            r.alloc(4096, 1)
        assert time.perf_counter() - t0 < 1.0  # at once: no wait (bound generous under load)
        r.free(descs[1])
        r.alloc(4096, 1)
        t0 = time.perf_counter()
        with pytest.raises(ResourceExhausted, match=r"no free block of 262144 bytes \(free 258048"):
            r.alloc(256 << 10, 1)
        assert time.perf_counter() - t0 < 1.0
        with pytest.raises(ResourceExhausted, match="can never fit"):
            r.alloc(2 << 20, 1)


def test_alloc_reaps_expired_leases_before_giving_up(region):
    stale = [region.alloc(256 << 10, 1) for _ in range(4)]
    time.sleep(0.25)  # lease 0.2 s, nobody renewed
    fresh = region.alloc(256 << 10, 1)
    assert fresh.slot in {d.slot for d in stale}
    assert region.stats()["slots_used"] == 1


def test_on_release_hears_every_free_path(region):
    """free, reap_expired, reclaim and the reaping inside a full alloc all tell the
    owner's hook (the prefill service releases a client's share there; alloc's own
    reaping used to bypass it)."""
    clock = [100.0]
    region.clock = lambda: clock[0]
    seen = []
    region.on_release = seen.append
    a = region.alloc(4096, 1)
    region.free(a)
    b = region.alloc(4096, 1)
    region.claim(b, "decode-1", 1)
    assert region.reclaim("decode-1", 2) == [b]
    held = [region.alloc(4096, 1) for _ in range(4)]  # every slot
    clock[0] += 1.0  # all leases (0.2 s) ran out: the next alloc reaps them itself
    fresh = region.alloc(4096, 1)
    assert seen == [a, b, *held]
    region.free(fresh)
    assert seen[-1] == fresh


def test_renew_extends_lease(region):
    clock = [100.0]
    region.clock = lambda: clock[0]  # lease time advanced by hand, not slept
    d = region.alloc(4096, 1)
    for _ in range(4):
        clock[0] += 0.15  # within the 0.2 s lease, 0.6 s in all
        assert region.renew(d) == 0.2
        assert region.reap_expired() == []
    assert region.reap_expired(now=clock[0] + 0.3) == [d]
    with pytest.raises(Aborted, match="not valid"):
        region.renew(d)


def test_wait_is_bounded_and_does_not_spin(region, reader):
    d = region.alloc(2 * 4096, 2)
    t0, cpu0 = time.monotonic(), time.process_time()
    with pytest.raises(DeadlineExceeded, match="layer 1"):
        reader.read_layer(d, 1, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0  # bounded (generous: a loaded machine)
    assert time.process_time() - cpu0 < 0.15  # sleeping, not spinning a core
    with pytest.raises(InvalidArgument, match="finite"):
        reader.read_layer(d, 1, float("inf"))
    with pytest.raises(DeadlineExceeded, match="first token"):
        reader.wait_first_token(d, 0.01)


def test_failed_slot_reports_reason(region, reader):
    d = region.alloc(4096, 1)
    region.mark_failed(d, "CUDA out of memory in layer 3")
    with pytest.raises(Unavailable, match="CUDA out of memory in layer 3"):
        reader.read_layer(d, 0, 1.0)
    with pytest.raises(Unavailable):
        reader.wait_first_token(d, 1.0)


def test_checksum_mismatch_is_data_loss(region, reader):
    d = region.alloc(2 * 4096, 2, checksums=True)
    _fill(region, d)
    region.layer_buffer(d, 1)[10] ^= 0xFF  # corrupted after it was published
    assert reader.read_layer(d, 0, 0.1) == bytes([7]) * 4096
    with pytest.raises(DataLoss, match="checksum"):
        reader.read_layer(d, 1, 0.1)
    with pytest.raises(DataLoss):
        reader.read_layer_into(d, 1, bytearray(4096), 0.1)


def test_explicit_checksum_and_double_ready(region, reader):
    d = region.alloc(4096, 1, checksums=True)
    region.write_layer(d, 0, bytes(4096))
    region.mark_ready(d, 0, checksum=12345)  # a wrong producer-side checksum
    with pytest.raises(DataLoss):
        reader.read_layer(d, 0, 0.1)
    with pytest.raises(InvalidArgument, match="already"):
        region.mark_ready(d, 0)
    plain = region.alloc(4096, 1)
    with pytest.raises(InvalidArgument, match="without checksums"):
        region.mark_ready(plain, 0, checksum=1)


def test_zero_copy_view_and_read_into(region, reader):
    d = region.alloc(2 * 4096, 2, checksums=True)
    _fill(region, d, 3)
    with reader.layer(d, 1, 0.1) as view:
        assert view.readonly and bytes(view[:4]) == bytes([4]) * 4
    out = bytearray(5000)
    assert reader.read_layer_into(d, 0, out, 0.1) == 4096 and out[:4096] == bytes([3]) * 4096
    with pytest.raises(InvalidArgument, match="writable"):
        reader.read_layer_into(d, 0, bytearray(10), 0.1)
    region.set_first_token(d, 50256)
    assert reader.wait_first_token(d, 0.1) == 50256
    with pytest.raises(InvalidArgument):
        region.set_first_token(d, -1)


def test_zero_copy_view_detects_free_during_use(region, reader):
    d = region.alloc(4096, 1)
    _fill(region, d)
    with pytest.raises(Aborted, match="not valid"), reader.layer(d, 0, 0.1):
        region.free(d)


def test_reader_mapping_is_read_only(region, reader):
    with pytest.raises(TypeError):
        reader._u8[0] = 1
    assert reader._mm.closed is False and reader.epoch == region.epoch


def test_open_errors(tmp_path):
    with pytest.raises(NotFound):
        KvReader.open("/hkvtest-does-not-exist-1-1")
    with pytest.raises(InvalidArgument, match="bad region name"):
        KvReader.open("/../../etc/passwd")
    bogus = os.path.join(SHM_DIR, "hkvtest-bogus-1-1")
    with open(bogus, "wb") as f:
        f.write(b"x" * 8192)
    try:
        with pytest.raises(InvalidArgument, match="not a KV region"):
            KvReader.open("/hkvtest-bogus-1-1")
    finally:
        os.unlink(bogus)


def test_version_mismatch_is_refused(region):
    with open(region.path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
        mm[8:16] = (L.VERSION + 1).to_bytes(8, "little")
    with pytest.raises(FailedPrecondition, match="version"):
        KvReader.open(region.name)


def test_too_small_dev_shm_fails_at_start_with_the_size():
    need = free_bytes() + (1 << 30)
    with pytest.raises(ResourceExhausted, match=rf"needs {need + 4096 * 2}|needs \d+ bytes"):
        KvRegion.create(need, 2, 2, 1.0, name_prefix=PREFIX, cuda_register=False)
    assert not [e for e in os.listdir(SHM_DIR) if e.startswith(PREFIX)]


def test_enospc_from_fallocate_reports_sizes(monkeypatch):
    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ResourceExhausted, match=r"has \d+ bytes .* free; the KV region .* needs"):
        KvRegion.create(1 << 20, 2, 2, 1.0, name_prefix=PREFIX, cuda_register=False)
    assert not [e for e in os.listdir(SHM_DIR) if e.startswith(PREFIX)]


def test_close_unlinks_and_is_idempotent():
    r = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix=PREFIX, cuda_register=False)
    d = r.alloc(4096, 1)
    view = r.layer_buffer(d, 0)  # a view still alive at close
    r.close()
    r.close()
    assert not os.path.exists(r.path)
    view[0] = 1  # the mapping outlives close while referenced: no dangling pointer
    with pytest.raises(Unavailable, match="closed"):
        r.alloc(4096, 1)
    del view


def test_bad_create_arguments():
    for args in [(0, 1, 1, 1.0), (4096, 0, 1, 1.0), (4096, 1, 1, 0.0), (4096, 1, 10**6, 1.0)]:
        with pytest.raises(InvalidArgument):
            KvRegion.create(*args, name_prefix=PREFIX, cuda_register=False)
    with pytest.raises(InvalidArgument):
        KvRegion.create(4096, 1, 1, 1.0, name_prefix="../x", cuda_register=False)


def test_layer_view_is_a_zero_copy_tensor_over_the_slot(region, reader):
    torch = pytest.importorskip("torch")
    d = region.alloc(2 * 4096, 2, checksums=True)
    view = region.layer_view(d, 1)
    assert view.dtype == torch.uint8 and view.shape == (4096,)
    view.copy_(torch.arange(4096, dtype=torch.int64).remainder(251).to(torch.uint8))
    region.mark_ready(d, 1)
    assert reader.read_layer(d, 1, 0.1) == bytes(i % 251 for i in range(4096))
    region.free(d)
    with pytest.raises(Aborted):
        region.layer_view(d, 1)
    region.close()  # with `view` alive: unlinked, mapping kept until the view dies
    assert not os.path.exists(region.path)
    view[0] = 7
    del view


def test_producer_activity_keeps_the_lease_ahead(region):
    d = region.alloc(2 * 4096, 2)
    time.sleep(0.15)  # lease 0.2 s: 0.05 s left
    region.write_layer(d, 0, bytes(4096))  # producing: at least one lease ahead again
    region.mark_ready(d, 0)
    t = time.monotonic()
    assert region.reap_expired(now=t + 0.15) == []
    assert region.reap_expired(now=t + 0.25) == [d]


def test_reader_pool_reuses_and_drops_closed_regions():
    from transport.reader import ReaderPool
    pool = ReaderPool()
    a = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix=PREFIX, cuda_register=False)
    b = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix=PREFIX, cuda_register=False)
    try:
        ra = pool.get(a.name)
        assert pool.get(a.name.lstrip("/")) is ra and pool.get(b.name) is not ra
        a.close()
        pool.get(b.name)  # sweeps the reader of the closed region
        assert ra._mm.closed
        with pytest.raises(NotFound):
            pool.get(a.name)
    finally:
        pool.close()
        a.close()
        b.close()


def test_cuda_registration_order_without_a_gpu(monkeypatch):
    """The register/unregister calls (faked here; real ones in test_transport_cuda.py):
    the whole mapping once at create, unregistered after a device sync and before the
    mapping goes away."""
    pytest.importorskip("torch")
    from transport import cuda
    calls = []
    monkeypatch.setattr(cuda, "host_register", lambda ptr, n: calls.append(("reg", ptr, n)))
    monkeypatch.setattr(cuda, "synchronize_quietly", lambda: calls.append(("sync",)))

    def unregister(ptr):
        calls.append(("unreg", ptr, r._mm.closed, os.path.exists(r.path)))
        return 0

    monkeypatch.setattr(cuda, "host_unregister", unregister)
    r = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix=PREFIX, cuda_register=True)
    assert r.registered
    ptr = r._tensor.data_ptr()
    assert calls == [("reg", ptr, r.total_bytes)]
    r.close()
    assert calls[1:] == [("sync",), ("unreg", ptr, False, True)]
    assert r._mm.closed and not r.registered


def test_signal_cleanup_chains_to_previous_handler_and_undoes():
    import signal

    from transport.shm import install_signal_cleanup
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    r = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix=PREFIX, cuda_register=False)
    try:
        undo = install_signal_cleanup(r, signals=(signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert seen == [signal.SIGUSR1] and not os.path.exists(r.path)
        undo()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert seen == [signal.SIGUSR1] * 2  # the previous handler is back, alone
    finally:
        signal.signal(signal.SIGUSR1, old)
        r.close()


def test_only_the_creating_process_unlinks():
    r = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix=PREFIX, cuda_register=False)
    real_pid, r._owner_pid = r._owner_pid, -1  # as seen from a forked child
    r.unlink()
    assert os.path.exists(r.path)
    r._owner_pid = real_pid
    r.close()
    assert not os.path.exists(r.path)


@pytest.mark.parametrize("checksums", [False, True])
def test_owner_calls_refuse_layers_the_slot_does_not_have(region, checksums):
    d = region.alloc(2 * 4096, 2, checksums=checksums)
    for bad in (-1, 2, 4, 1 << 40):
        with pytest.raises(InvalidArgument, match="out of range"):
            region.mark_ready(d, bad)
        with pytest.raises(InvalidArgument, match="out of range"):
            region.layer_buffer(d, bad)
    g = region.geometry
    flags = bytes(region._u8[g.ready_byte(d.slot, 0):g.ready_byte(d.slot, 0) + g.max_layers])
    assert flags == bytes(g.max_layers)  # nothing was marked by the refused calls


def test_inconsistent_header_is_data_loss(region):
    with open(region.path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
        mm[8 * L.H_PAYLOAD_BYTES:8 * L.H_PAYLOAD_BYTES + 8] = (1 << 40).to_bytes(8, "little")
    with pytest.raises(DataLoss, match="header says"):
        KvReader.open(region.name)
