"""The HBM device layer without a model: allocation, capacity, the write/sync/read path,
and the XRT implementation's failure messages (against the fake pyxrt of tests/)."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidArgument, ResourceExhausted, Unavailable
from fpga_service.device import abi
from fpga_service.device.base import ALIGN, ChannelAllocator
from fpga_service.device.emulator import EmulatorDevice
from fpga_service.device.xrt import XrtDevice
from tests.fpga_helpers import use_fake_pyxrt

MiB = 2**20


@pytest.fixture
def emu():
    dev = EmulatorDevice(channel_bytes=1 * MiB)
    dev.open()
    yield dev
    dev.close()


@pytest.fixture
def pyxrt(monkeypatch):
    yield use_fake_pyxrt(monkeypatch)
    sys.modules.pop("pyxrt", None)


def test_default_geometry_is_u55c():
    dev = EmulatorDevice()
    assert dev.n_channels == 32 and dev.channel_bytes == 512 * MiB
    assert dev.capacity_bytes() == 16 * 2**30


def test_allocator_first_fit_and_coalescing():
    a = ChannelAllocator(8 * ALIGN)
    x, y, z = a.alloc(ALIGN), a.alloc(2 * ALIGN), a.alloc(1)
    assert (x, y, z) == (0, ALIGN, 3 * ALIGN)
    a.free(y)
    assert a.alloc(3 * ALIGN) == 4 * ALIGN  # the 2-page hole is too small
    a.free(x)
    assert a.alloc(4 * ALIGN) is None  # holes of 3 pages and 1 page
    a.free(z)
    assert a.alloc(4 * ALIGN) == 0  # x, y, z coalesced back into one range


def test_allocation_is_all_or_nothing(emu):
    before = emu.used_bytes()
    sizes = [4096] * 32
    sizes[5] = 2 * MiB  # larger than a channel
    with pytest.raises(ResourceExhausted, match="channel 5"):
        emu.allocate(sizes, "too-big")
    assert emu.used_bytes() == before


def test_full_device_then_free(emu):
    bufs = [emu.allocate(256 * 1024, f"r{i}") for i in range(4)]
    with pytest.raises(ResourceExhausted):
        emu.allocate(4096, "one-more")
    for b in bufs:
        b.free()
        b.free()  # idempotent: every exit path may free
    assert emu.used_bytes() == 0
    emu.allocate(MiB, "whole").free()


def test_write_read_and_bounds(emu):
    buf = emu.allocate(8192, "t")
    emu.write_synced(3, buf.offsets[3] + 10, b"hello")
    assert emu.read(3, buf.offsets[3] + 10, 5) == b"hello"
    with pytest.raises(InvalidArgument):
        emu.write(3, MiB - 2, b"abc")
    with pytest.raises(InvalidArgument):
        emu.read(32, 0, 1)


def test_kernel_scalars_fit_a_c_int():
    assert abi.check_scalar("n", 2**31 - 1) == 2**31 - 1
    for bad in (2**31, -1, 1.5, True):
        with pytest.raises(InvalidArgument):
            abi.check_scalar("n", bad)


def test_xrt_without_pyxrt_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyxrt", None)  # import fails as if XRT were absent
    with pytest.raises(Unavailable, match="pyxrt"):
        XrtDevice(str(tmp_path / "x.xclbin")).open()


def test_xrt_without_xclbin_or_device(pyxrt, tmp_path):
    with pytest.raises(Unavailable, match="xclbin"):
        XrtDevice(str(tmp_path / "missing.xclbin")).open()
    xclbin = tmp_path / "hbm_decode.xclbin"
    xclbin.write_bytes(b"fake")
    pyxrt.FAULTS["no_device"] = True
    with pytest.raises(Unavailable, match="no Alveo device"):
        XrtDevice(str(xclbin), channel_bytes=MiB).open()


def test_xrt_bytes_reach_the_device_only_after_sync(pyxrt, tmp_path):
    xclbin = tmp_path / "hbm_decode.xclbin"
    xclbin.write_bytes(b"fake")
    dev = XrtDevice(str(xclbin), device="0000:3b:00.1", channel_bytes=MiB)
    dev.open()
    try:
        assert [bo.group for bo in dev._bos] == list(range(32))  # one bo per HBM bank
        dev.write(7, 4096, b"abcd")
        assert dev.read(7, 4096, 4) == b"\0" * 4  # read syncs FROM the device: not there yet
        dev.write(7, 4096, b"abcd")
        dev.sync(7, 4096, 4)
        assert dev.read(7, 4096, 4) == b"abcd"
    finally:
        dev.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * ALIGN)), max_size=40))
def test_allocator_never_overlaps_and_returns_everything(ops):
    a = ChannelAllocator(16 * ALIGN)
    live: dict[int, int] = {}
    for is_alloc, size in ops:
        if is_alloc or not live:
            off = a.alloc(size)
            if off is not None:
                n = -(-size // ALIGN) * ALIGN
                assert all(off + n <= o or o + s <= off for o, s in live.items())
                assert off + n <= a.capacity
                live[off] = n
        else:
            off = min(live)
            del live[off]
            a.free(off)
        assert a.used == sum(live.values())
    for off in list(live):
        a.free(off)
    assert a.used == 0 and a.alloc(16 * ALIGN) == 0


def test_overlapping_kernel_runs_restore_torch_threads():
    """Two emulated runs that overlap (two sessions' threads) and end in the order they
    began: each runs on one intra-op thread, and the process gets its thread count back.
    A per-run save/set/restore left the process at one thread after this interleaving."""
    import threading

    import torch

    from fpga_service.device.kernel import _one_torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen: list[int] = []

        def run(mine: threading.Event, wait_for: threading.Event, then: threading.Event | None):
            with _one_torch_thread():
                seen.append(torch.get_num_threads())
                mine.set()
                wait_for.wait(5)
            if then is not None:
                then.set()

        a = threading.Thread(target=run, args=(a_in, b_in, a_out))
        a.start()
        a_in.wait(5)
        b = threading.Thread(target=run, args=(b_in, a_out, None))
        b.start()
        a.join(5)
        b.join(5)
        assert seen == [1, 1]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
