"""How the engine runs on the machine: the thread count per call, the compile notice and
the OpenMP threads' wait policy. Nothing here changes a result."""

from __future__ import annotations

import contextlib
import os
import sys
import threading


def quiet_spin() -> None:
    """Let Numba's OpenMP threads spin 1,000 iterations at a barrier, then sleep, unless the
    user chose a wait policy (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``). The default
    ~300,000 burns the time slices a busy neighbour's partner thread needs
    (docs/PERFORMANCE.md). Effective only before the process's first parallel call."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "1000"


COMPILE_NOTICE = (
    "tinyvit158: compiling the Numba kernels for this CPU (the first run only: 10-30 s; "
    "later runs load them from the cache)"
)


@contextlib.contextmanager
def first_run_notice(after_s: float = 2.0, stream=None):
    """Say on stderr why a call is slow if it takes longer than ``after_s``: on a new
    install (or CPU) the first call compiles the kernels, which takes tens of seconds."""
    timer = threading.Timer(after_s, lambda: print(COMPILE_NOTICE, file=stream or sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class ThreadGovernor:
    """Adaptive threads: run each call with the thread count that is faster right now.

    Every parallel region waits at its end for its slowest thread. When another busy
    process takes a core, the operating system deschedules one of ours for a whole time
    slice, and a call of ~30 regions waits for it again and again, where one thread would
    not (docs/PERFORMANCE.md). So the governor times each call, per batch size, at the current Numba
    thread count ``n`` and at 1, runs the faster (:func:`_faster`: the best of each one's
    last three calls, with a margin in favour of ``n``), and every ``probe`` calls runs
    the other once, to notice when the load changes. Each is tried twice first (the very
    first call warms buffers up). Results do not depend on the thread count: every
    kernel computes each row the same way whichever thread takes it.
    ``TINYVIT158_ADAPTIVE_THREADS=0`` turns it off (always ``n``).
    """

    def __init__(self, probe: int = 16):
        self.probe = probe
        self.enabled = os.environ.get("TINYVIT158_ADAPTIVE_THREADS", "1") != "0"
        self._stats: dict[tuple[int, int], dict] = {}  # (batch, n) -> {"calls", threads -> recent seconds}
        self._lock = threading.Lock()

    def choose(self, batch: int, n: int) -> int:
        """The thread count for the next call of ``batch`` images (``n``: the most allowed)."""
        if not self.enabled or n <= 1:
            return n
        with self._lock:
            st = self._stats.setdefault((batch, n), {"calls": 0, n: [], 1: []})
            st["calls"] += 1
            for c in (n, 1):
                if len(st[c]) < 2:
                    return c
            best = _faster(st, n)
            if st["calls"] % self.probe == 0:
                return 1 if best == n else n
            return best

    def record(self, batch: int, n: int, threads: int, seconds: float) -> None:
        if not self.enabled or n <= 1:
            return
        with self._lock:
            times = self._stats[(batch, n)][threads]
            times.append(seconds)
            del times[:-3]

    def current(self, batch: int, n: int) -> int | None:
        """The thread count the governor now prefers for ``batch`` (None: not decided yet)."""
        st = self._stats.get((batch, n))
        if st is None or len(st[1]) < 2 or len(st[n]) < 2:
            return None
        return _faster(st, n)


def _faster(st: dict, n: int) -> int:
    """n, unless 1 thread has been clearly faster: the fastest of each one's last three
    calls (a call slowed by a passing hiccup does not count; a contended count is slow
    every time), and 1 only when it beats n by ``1 / ONE_THREAD_MARGIN``."""
    return 1 if min(st[1]) < ONE_THREAD_MARGIN * min(st[n]) else n


ONE_THREAD_MARGIN = 0.8  # quiet, 1 thread is ~1.25-1.6x slower; beside a busy process ~0.4x
