"""POSIX shared-memory segments under /dev/shm, managed with plain os calls.

We do not use multiprocessing.shared_memory: its resource_tracker unlinks a segment
when *any* process that touched it exits, behind the owner's back. Here the owner
alone unlinks (close(), atexit, SIGTERM/SIGINT helper), and `sweep_stale` removes what
a crashed owner left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import time
from collections.abc import Callable
from typing import Any

from engine.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^/?([A-Za-z0-9_][A-Za-z0-9._-]{0,200})$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}$")


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix or ""):
        raise InvalidArgument(f"region name prefix {prefix!r}: use letters, digits, '.', '_', '-'")
    return prefix


def segment_path(name: str, shm_dir: str = SHM_DIR) -> str:
    """'/hybrid-kv-1-2' -> '/dev/shm/hybrid-kv-1-2'; refuses anything that is not one
    plain file name (a descriptor comes off the network: no '/', no '..')."""
    m = _NAME_RE.match(name or "")
    if not m or m.group(1) in (".", ".."):
        raise InvalidArgument(f"bad region name {name!r}: expected '/<letters, digits, ._->'")
    return os.path.join(shm_dir, m.group(1))


def free_bytes(shm_dir: str = SHM_DIR) -> int:
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


def _space_error(path: str, need: int, shm_dir: str) -> ResourceExhausted:
    have = free_bytes(shm_dir)
    return ResourceExhausted(
        f"{shm_dir} has {have} bytes ({have / 2**20:.1f} MiB) free; the KV region {path} "
        f"needs {need} bytes ({need / 2**20:.1f} MiB). Enlarge it (docker: --shm-size="
        f"{-(-need // 2**20) + 64}m; host: mount -o remount,size=... {shm_dir}) or lower "
        "the region capacity")


def create_segment(path: str, size: int, mode: int = 0o600, shm_dir: str = SHM_DIR) -> int:
    """Create `path` exclusively and reserve `size` bytes now, so a full tmpfs fails
    here with a clear message instead of SIGBUS on first touch. Returns the fd."""
    if size > free_bytes(shm_dir):  # refuse before fallocate half-fills a shared tmpfs
        raise _space_error(path, size, shm_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        unlink_quietly(path)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise _space_error(path, size, shm_dir) from e
        raise Unavailable(f"posix_fallocate({path}, {size}) failed: {e}") from e
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    return fd


def open_readonly(path: str, owner_uid: int | None = None) -> tuple[int, int]:
    """(fd, size) of an existing segment, read-only. The name comes off the network,
    so this never blocks and never follows anything: O_NOFOLLOW refuses a symlink,
    O_NONBLOCK makes a FIFO's open return at once (then refused as not a regular file),
    and the file must belong to `owner_uid` (default: our effective uid), so another
    local user cannot plant a region for us to read."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NotFound(f"KV region {path} does not exist (owner gone or restarted)") from None
    except PermissionError as e:
        raise Unavailable(f"cannot open KV region {path}: {e} (run both services as "
                          "the same user or widen the region's mode)") from e
    except OSError as e:  # ELOOP: a symlink; ENXIO: a FIFO or socket with no peer
        raise InvalidArgument(f"{path} is not a KV region (not a plain file)") from e
    try:
        st = os.fstat(fd)
        uid = os.geteuid() if owner_uid is None else owner_uid
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{path} is not a KV region (not a plain file)")
        if st.st_uid != uid:
            raise InvalidArgument(f"{path} is not a KV region of this user (uid {uid})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/pid/stat), so a
    recycled pid is not mistaken for the owner. None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw.rsplit(b")", 1)[-1].split()
    return int(rest[19]) if len(rest) > 19 else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_of(path: str) -> tuple[int, int] | None:
    """(pid, start ticks) from a region header, None when it is no region of ours."""
    from transport.layout import H_OWNER_PID, H_OWNER_START, MAGIC
    try:  # never blocks or follows (a FIFO planted under our prefix), ours only
        fd, _ = open_readonly(path)
    except (OSError, InvalidArgument, NotFound, Unavailable):
        return None
    try:
        head = os.pread(fd, 8 * (H_OWNER_START + 1), 0)
    finally:
        os.close(fd)
    if len(head) < 8 * (H_OWNER_START + 1) or head[:8] != MAGIC:
        return None
    word = lambda i: int.from_bytes(head[8 * i: 8 * i + 8], "little")  # noqa: E731
    return word(H_OWNER_PID), word(H_OWNER_START)


def sweep_stale(prefix: str = "hybrid-kv", shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink `<prefix>-<pid>-<epoch>` segments whose owner process is gone (dead pid,
    or the pid now belongs to a later process). Call it at service start. Only sound
    where this process sees the owners' pids (same PID namespace): give services in
    separate containers sharing /dev/shm distinct prefixes."""
    pat = re.compile(rf"^{re.escape(check_prefix(prefix))}-(\d+)-(\d+)$")
    removed = []
    for entry in sorted(os.listdir(shm_dir)):
        m = pat.match(entry)
        if not m:
            continue
        pid = int(m.group(1))
        path = os.path.join(shm_dir, entry)
        owner = _owner_of(path)
        if pid == os.getpid() or owner is None or owner[0] != pid:
            continue  # ours alive, or not a region of this user's (never touch those)
        stale = not pid_alive(pid)
        if not stale and owner is not None and owner[1]:
            now = process_start_ticks(pid)
            stale = now is not None and now != owner[1]
        if stale and unlink_quietly(path):
            removed.append("/" + entry)
    return removed


def install_signal_cleanup(region: Any, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
                           ) -> Callable[[], None]:
    """Unlink `region`'s segment on these signals, then chain to the handler that was
    installed before (default action: re-raise so the exit status stays 'killed by
    SIGTERM'). The handler only unlinks (lock-free, idempotent): it may interrupt the
    main thread inside a region call. Main thread only. Returns an undo function."""
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum: int, frame: Any) -> None:
        region.unlink()
        prev = previous.get(signum)
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_IGN:
            return
        else:  # SIG_DFL (or None: installed from C): die the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            time.sleep(1)  # delivery is asynchronous; never fall through and continue

    for sig in signals:
        signal.signal(sig, handler)

    def undo() -> None:
        for sig, prev in previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)

    return undo


def close_at_exit(ref: Callable[[], Any], path: str, owner_pid: int) -> None:
    """atexit hook of a region: close it if still alive, else at least unlink its name
    (only in the creating process: a forked child inherits atexit hooks)."""
    region = ref()
    if region is not None:
        region.close()
    elif os.getpid() == owner_pid:
        unlink_quietly(path)
