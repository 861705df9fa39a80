"""How busy the machine is with other people's work while a case runs (Linux /proc/stat).

A shared CPU slows whichever side happens to run while someone else computes; the benchmark says
how much other work there was, and can wait for a quiet moment before each case.
"""

import os
import resource
import time

TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def _own_seconds() -> float:
    """CPU seconds of this process and of its finished children (the benchmark's own work)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class OthersLoad:
    """Fraction of all cores that other processes kept busy between start() and stop()."""

    def start(self) -> "OthersLoad":
        self._wall, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def stop(self) -> float:
        wall = time.perf_counter() - self._wall
        others = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, sample_s: float = 2.0) -> float:
    """Wait (at most `max_wait_s`) until other processes use under `threshold` of the CPU; return the wait."""
    start = time.perf_counter()
    while True:
        load = OthersLoad().start()
        time.sleep(sample_s)
        if load.stop() < threshold or time.perf_counter() - start >= max_wait_s:
            return time.perf_counter() - start
        time.sleep(3.0)
