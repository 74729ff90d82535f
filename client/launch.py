"""Start the two services as local subprocesses (the demo and the tests use this).

Each service runs `python -m client.cli serve ...` on a free loopback port; `start()`
returns once both answer SERVING on the health service, `stop()` sends SIGTERM (the
servers drain and remove their shared-memory region) and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from engine.errors import DeadlineExceeded, Unavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], env: dict[str, str] | None = None, log_path: str | None = None
          ) -> subprocess.Popen:
    """`python -m client.cli <args>` from the repo root, its output to `log_path`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # keep the caller's PYTHONPATH (e.g. packages carried to a GPU box) behind the repo root
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    full_env = os.environ | {"PYTHONPATH": path} | (env or {})
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "client.cli", *args], cwd=root, env=full_env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float) -> None:
    from client.api import health

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"service for {target} exited with code {proc.returncode}")
        try:
            if asyncio.run(health(target, timeout_s=1.0)) == "SERVING":
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise DeadlineExceeded(f"{target} not SERVING after {timeout_s:.0f}s")


def attached_prefills(decode: str) -> int:
    """How many prefills `decode`'s Info lists as attached (distinct regions)."""
    from client.api import HybridClient

    async def info():
        async with HybridClient("127.0.0.1:1", decode) as c:
            return await c.decode_info()

    return len({x.region for x in asyncio.run(info()).prefills
                if x.state == "attached" and x.region})


def wait_attached(decode: str, n_prefills: int, timeout_s: float) -> None:
    """Until `decode`'s Info lists `n_prefills` prefills attached. A decode is SERVING
    before it has attached (its prefills may still be loading), and a client routes only
    to a decode attached to the prefill it picked (client/router.py): a load started
    between the two would see UNAVAILABLE for want of a route."""
    deadline, n = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if (n := attached_prefills(decode)) >= n_prefills:
                return
        time.sleep(0.1)
    raise DeadlineExceeded(f"decode {decode}: {n} of {n_prefills} prefill(s) attached "
                           f"after {timeout_s:.0f}s")


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> int:
    """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class ServicePair:
    model: str = "synthetic:gpt2"
    device: str = "auto"
    backend: str = "gpu"
    prefill_args: list[str] = field(default_factory=list)
    decode_args: list[str] = field(default_factory=list)
    decode_env: dict[str, str] = field(default_factory=dict)  # e.g. test fault hooks
    prefill_env: dict[str, str] = field(default_factory=dict)
    log_dir: str | None = None
    prefill_port: int = field(default_factory=free_port)
    decode_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def prefill(self) -> str:
        return f"127.0.0.1:{self.prefill_port}"

    @property
    def decode(self) -> str:
        return f"127.0.0.1:{self.decode_port}"

    def start(self, timeout_s: float = 120.0) -> ServicePair:
        common = ["--model", self.model, "--device", self.device, "--host", "127.0.0.1"]
        log = (lambda n: os.path.join(self.log_dir, f"{n}.log")) if self.log_dir else (lambda n: None)
        self.procs["prefill"] = spawn(
            ["serve", "prefill", *common, "--port", str(self.prefill_port), *self.prefill_args],
            env=self.prefill_env, log_path=log("prefill"))
        self.procs["decode"] = spawn(
            ["serve", "decode", *common, "--port", str(self.decode_port), "--backend",
             self.backend, "--prefill", self.prefill, *self.decode_args],
            env=self.decode_env, log_path=log("decode"))
        try:
            wait_serving(self.prefill, self.procs["prefill"], timeout_s)
            wait_serving(self.decode, self.procs["decode"], timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> dict[str, int]:
        return {name: stop(p) for name, p in reversed(list(self.procs.items()))}

    def __enter__(self) -> ServicePair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
