"""Device loop threads and CPython's GIL hand-over.

A process with a device loop thread (the decode engine, the prefill loop) also runs
other Python threads: the grpc event loop, request threads, benchmark clients. When the
loop's CUDA wait ends it needs the GIL back at once, but CPython hands it over only
every switch interval (5 ms by default) while another thread computes: a decode step of
1-2 ms would wait up to 5 ms for its token bookkeeping. Every loop lowers it when it is
made (HYBRID_GIL_SWITCH_S, default 0.5 ms); it never raises it.
"""

from __future__ import annotations

import os
import sys


def short_gil_switch(interval_s: float | None = None) -> None:
    if interval_s is None:
        interval_s = float(os.environ.get("HYBRID_GIL_SWITCH_S", "0.0005"))
    sys.setswitchinterval(min(sys.getswitchinterval(), interval_s))
