"""Cross-process behaviour of the KV region: real processes (spawn / subprocess)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from engine.errors import Aborted
from tests import transport_procs as procs
from transport.reader import KvReader
from transport.region import KvRegion
from transport.shm import SHM_DIR, sweep_stale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX = mp.get_context("spawn")


def _prefix() -> str:
    return f"hkvtest-{uuid.uuid4().hex[:8]}"


def _ours(prefix: str) -> list[str]:
    return [e for e in os.listdir(SHM_DIR) if e.startswith(prefix + "-")]


@pytest.fixture
def region():
    r = KvRegion.create(4 << 20, 4, 8, 0.5, name_prefix=_prefix(), cuda_register=False)
    yield r
    r.close()


def _recv(conn, timeout_s: float = 10.0):
    assert conn.poll(timeout_s), "child process did not answer in time"
    return conn.recv()


def test_reader_consumes_layers_as_they_become_ready(region):
    n_layers, nbytes = 8, 64 * 1024
    desc = region.alloc(n_layers * nbytes, n_layers, checksums=True)
    here, there = CTX.Pipe()
    child = CTX.Process(target=procs.follow_layers, args=(region.name, desc.to_bytes(), there, 10.0))
    child.start()
    try:
        for layer in range(n_layers):
            region.write_layer(desc, layer, procs.pattern(layer, nbytes))
            region.mark_ready(desc, layer)
            # The reader reports layer l before layer l+1 exists: consumption overlaps
            # production (the layer-wise hand-off), deterministically.
            kind, got_layer, data, _ = _recv(here)
            assert (kind, got_layer) == ("layer", layer)
            assert data == procs.pattern(layer, nbytes)
        region.set_first_token(desc, 17)
        assert _recv(here) == ("first_token", 17)
    finally:
        child.join(10)
    assert child.exitcode == 0


def test_free_running_writer_and_reader_bytes_equal(region):
    n_layers, nbytes = 6, 100_000  # not a multiple of 256: exercises layer alignment
    desc = region.alloc(n_layers * nbytes, n_layers, checksums=True)
    here, there = CTX.Pipe()
    child = CTX.Process(target=procs.follow_layers, args=(region.name, desc.to_bytes(), there, 10.0))
    child.start()
    for layer in range(n_layers):
        region.write_layer(desc, layer, procs.pattern(layer, nbytes, salt=3))
        region.mark_ready(desc, layer)
    region.set_first_token(desc, 5)
    got = [_recv(here) for _ in range(n_layers + 1)]
    child.join(10)
    assert [g[2] for g in got[:-1]] == [procs.pattern(i, nbytes, salt=3) for i in range(n_layers)]
    assert got[-1] == ("first_token", 5)


class FakeClock:
    """Lease time the test advances by hand: whether the child process is scheduled
    promptly changes nothing (issue 16)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_reader_killed_mid_read_slot_reclaimed_after_lease(region):
    clock = FakeClock()
    region.clock = clock
    desc = region.alloc(2 * 8192, 2)  # lease 0.5 s of the fake clock
    region.write_layer(desc, 0, procs.pattern(0, 8192))
    region.mark_ready(desc, 0)
    here, there = CTX.Pipe()
    child = CTX.Process(target=procs.read_then_hang, args=(region.name, desc.to_bytes(), there))
    child.start()
    assert _recv(here) == ("layer0", procs.pattern(0, 8192))
    # While the consumer lives, each of its renewals keeps the slot: 4 renewals 0.3 s
    # apart span 1.2 s, more than twice the lease; without them it would be reaped.
    for _ in range(4):
        assert _recv(here) == ("renew",)  # a handshake, however late the child runs
        region.renew(desc)
        clock.t += 0.3
        assert region.reap_expired() == []
    os.kill(child.pid, signal.SIGKILL)  # mid-read: it is inside read_layer's wait
    child.join(5)
    clock.t += 0.3  # 0.6 s after its last renewal: past the 0.5 s lease ...
    assert [d.slot for d in region.reap_expired()] == [desc.slot]
    assert region.stats()["slots_used"] == 0
    with pytest.raises(Aborted):
        region.renew(desc)
    assert region.alloc(region.stats()["capacity"], 1)  # all space came back


def test_lease_is_not_reaped_before_it_runs_out(region):
    clock = FakeClock()
    region.clock = clock
    desc = region.alloc(8192, 1)
    clock.t += 0.49
    assert region.reap_expired() == []
    clock.t += 0.02
    assert [d.slot for d in region.reap_expired()] == [desc.slot]


def test_stale_generation_refused_across_processes(region):
    desc = region.alloc(8192, 1)
    region.free(desc)
    fresh = region.alloc(8192, 1)
    assert fresh.slot == desc.slot and fresh.generation == desc.generation + 1
    region.write_layer(fresh, 0, procs.pattern(0, 8192))
    region.mark_ready(fresh, 0)
    here, there = CTX.Pipe()
    child = CTX.Process(target=procs.follow_layers, args=(region.name, desc.to_bytes(), there, 2.0))
    child.start()
    kind, name, msg = _recv(here)
    child.join(10)
    assert (kind, name) == ("error", "Aborted") and "not valid" in msg


def test_10k_cycles_no_leak_and_bounded_rss():
    here, there = CTX.Pipe()
    owner = CTX.Process(target=procs.owner_cycles, args=(10_000, 1000, there))
    t0 = time.monotonic()
    owner.start()
    report = _recv(here, timeout_s=60)
    owner.join(10)
    assert owner.exitcode == 0
    assert report["failures"] == 0
    stats = report["stats"]
    assert stats["slots_used"] == 0 and stats["free_blocks"] == 1
    assert stats["bytes_free"] == stats["capacity"]
    growth = (report["rss1"] - report["rss0"]) / report["rss0"]
    assert growth < 0.05, f"owner RSS grew {growth:.1%} over 9000 cycles"
    assert report["objects"] < 200, f"{report['objects']} Python objects accumulated"
    assert not os.path.exists(report["path"])
    print(f"10k cycles in {time.monotonic() - t0:.1f} s, owner RSS {report['rss0'] >> 10} -> "
          f"{report['rss1'] >> 10} KiB ({growth:+.2%})")


_OWNER = """
import signal, sys, time
# A shell's background job starts with SIGINT ignored, and Python then keeps it ignored:
# restore its KeyboardInterrupt handler, as an interactive start has it
signal.signal(signal.SIGINT, signal.default_int_handler)
from transport.region import KvRegion
from transport.shm import install_signal_cleanup
r = KvRegion.create(1 << 20, 2, 2, 1.0, name_prefix=sys.argv[1], cuda_register=False)
install_signal_cleanup(r)
d = r.alloc(8192, 2)
print(r.path, flush=True)
if sys.argv[2] == "wait":
    time.sleep(30)
"""


def _spawn_owner(prefix: str, mode: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "-c", _OWNER, prefix, mode], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = p.stdout.readline().strip()
    assert path.startswith(SHM_DIR), p.stderr.read()
    return p, path


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT"])
def test_no_shm_entry_left_after_owner_exits(how):
    prefix = _prefix()
    p, path = _spawn_owner(prefix, "exit" if how == "exit" else "wait")
    if how != "exit":
        assert os.path.exists(path)
        p.send_signal(getattr(signal, how))
    rc = p.wait(10)
    assert not os.path.exists(path) and _ours(prefix) == []
    if how == "SIGTERM":  # chained to the default action: still "killed by SIGTERM"
        assert rc == -signal.SIGTERM
    elif how == "SIGINT":  # Python's default handler: KeyboardInterrupt
        assert rc != 0
    else:
        assert rc == 0


def test_sweep_stale_removes_segment_of_killed_owner():
    prefix = _prefix()
    p, path = _spawn_owner(prefix, "wait")
    live = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix=prefix, cuda_register=False)
    try:
        assert sweep_stale(prefix) == []  # both owners alive
        p.kill()  # SIGKILL: no handler runs, the segment stays behind
        p.wait(10)
        assert os.path.exists(path)
        assert sweep_stale(prefix) == ["/" + os.path.basename(path)]
        assert _ours(prefix) == [os.path.basename(live.path)]
    finally:
        live.close()
    assert _ours(prefix) == []


def test_reader_sees_region_closed(region):
    desc = region.alloc(8192, 1)
    reader = KvReader.open(region.name)
    region.close()
    from engine.errors import Unavailable
    with pytest.raises(Unavailable, match="closed"):
        reader.read_layer(desc, 0, 0.1)
    reader.close()


def test_concurrent_free_and_reuse_never_yields_torn_bytes():
    """The seqlock: the owner frees and refills the one slot right after handing out
    each descriptor while the reader copies 1 MiB layers. A read either returns exactly
    its generation's bytes or fails with Aborted. Every 8th slot is held until read (must
    succeed) and every 8th is freed before it is handed out (must be refused); the rest
    race, so whether those succeed depends on the OS scheduler, never their bytes."""
    n = 1 << 20
    held = stale = 0
    with KvRegion.create(2 * n, 1, 1, 30.0, name_prefix=_prefix(), cuda_register=False) as r:
        here, there = CTX.Pipe()
        child = CTX.Process(target=procs.seqlock_reader, args=(r.name, there))
        child.start()
        for i in range(600):
            desc = r.alloc(n, 1)
            r.write_layer(desc, 0, procs.pattern(0, n, salt=desc.generation))
            r.mark_ready(desc, 0)
            hold, freed_first = i % 8 == 0, i % 8 == 4
            held, stale = held + hold, stale + freed_first
            if freed_first:
                r.free(desc)
            here.send((desc.to_bytes(), hold))
            if hold:
                assert _recv(here) == "read"
            else:
                time.sleep(0.0003 * (i % 3))  # let some reads start before the free
            if not freed_first:
                r.free(desc)
        here.send(None)
        counts = _recv(here)
        child.join(10)
    assert counts["torn"] == 0, counts
    assert sum(counts.values()) == 600, counts
    assert counts["ok"] >= held, counts
    assert counts["aborted"] + counts["aborted_mid_copy"] >= stale, counts
    print(counts)


def test_sweep_stale_detects_a_recycled_pid():
    """A live pid whose start time differs from the one in the header is a new process
    that inherited the number: the segment is stale. The same start time: kept."""
    from transport import layout as L
    from transport.shm import process_start_ticks
    prefix, pid = _prefix(), os.getppid()
    start = process_start_ticks(pid)
    if start is None:
        pytest.skip("no /proc start time here")
    for epoch, ticks in ((1, start), (2, start + 12345)):
        words = [0] * 8
        words[L.H_MAGIC] = int.from_bytes(L.MAGIC, "little")
        words[L.H_OWNER_PID], words[L.H_OWNER_START] = pid, ticks
        with open(os.path.join(SHM_DIR, f"{prefix}-{pid}-{epoch}"), "wb") as f:
            f.write(b"".join(w.to_bytes(8, "little") for w in words))
    try:
        assert sweep_stale(prefix) == [f"/{prefix}-{pid}-2"]
        assert _ours(prefix) == [f"{prefix}-{pid}-1"]
    finally:
        for entry in _ours(prefix):
            os.unlink(os.path.join(SHM_DIR, entry))


def test_owner_close_wakes_a_waiting_reader(region):
    desc = region.alloc(2 * 4096, 2)
    here, there = CTX.Pipe()
    child = CTX.Process(target=procs.follow_layers, args=(region.name, desc.to_bytes(), there, 30.0))
    child.start()
    time.sleep(0.5)  # the child is (most likely) asleep waiting for layer 0
    t0 = time.monotonic()
    region.close()
    kind, name, msg = _recv(here)
    child.join(10)
    assert (kind, name) == ("error", "Unavailable") and "closed" in msg
    assert time.monotonic() - t0 < 5.0  # not the 30 s timeout
