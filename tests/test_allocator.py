"""A CPU fit keeps freed host memory for the next step (transfer_cli/allocator.py).

mallopt() changes the whole process, so each case runs in a fresh interpreter; that a CPU fit calls it
is tested in test_step_overhead.py.
"""

import os
import subprocess
import sys

import pytest

# Four 8 MB blocks, written, then freed: how much of the 32 MB goes back to the kernel.
FREE_AND_MEASURE = """
import sys
from transfer_cli.allocator import keep_freed_memory
tuned = keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
blocks = [bytearray(8 * 2**20) for _ in range(4)]
held = rss_mb()
del blocks
print(tuned, round(held - rss_mb()))
"""


def _glibc() -> bool:
    # Not allocator.is_glibc: a broken check there must fail these tests, not skip them.
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # not glibc; no os.confstr at all on Windows
        return False


needs_glibc = pytest.mark.skipif(not (_glibc() and os.path.exists("/proc/self/statm")), reason="glibc on Linux only")


def _returned_mb(**env: str) -> tuple[str, int]:
    chosen = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "TRANSFER_MALLOC")  # this machine's own choices
    clean = {k: v for k, v in os.environ.items() if not k.startswith(chosen)}
    out = subprocess.run(
        [sys.executable, "-c", FREE_AND_MEASURE], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@needs_glibc
def test_freed_memory_stays_with_the_process():
    assert _returned_mb() == ("True", 0)


@needs_glibc
@pytest.mark.parametrize(
    "env",
    [
        {"TRANSFER_MALLOC_TUNING": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_ARENA_MAX": "2"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
    ids=["opt-out", "malloc-threshold", "malloc-arena-max", "glibc-tunables"],
)
def test_the_users_own_setting_wins(env):
    tuned, returned = _returned_mb(**env)
    assert tuned == "False" and returned == 32  # glibc's default: the blocks went back to the kernel
