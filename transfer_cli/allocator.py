"""Keep freed host memory in the process for the next step instead of handing it back to the kernel.

glibc's malloc serves blocks above a moving threshold (128 KB at first) with fresh mmap()s and gives
the top of its heap back to the kernel whenever more than a threshold is free there. A training step
on the CPU frees and reallocates the same few megabytes of activations, gradients and optimizer
temporaries every step; which of them land at the heap's top depends on the order of allocations, so
one loop keeps its memory and another, doing the same arithmetic, pays a page fault for every 4 KB
of it again on every step. Measured on ResNet50 at 32 px, batch 32, two cores (benchmarks/RESULTS.md):
Lightning's loop took 160,000-180,000 page faults and 0.46 s of kernel time per 8 steps where the
plain loop took 40,000-110,000 and 0.1-0.3 s, a 5-10% slower step; with the thresholds below both took under
10,000 and ran at the same speed. This is what PyTorch's CPU tuning guide gets by preloading jemalloc
or tcmalloc, done with two mallopt() calls instead.

The price: memory freed by one phase stays with the process for the next (up to the largest heap the
run reached); the peak does not grow. glibc's own settings win: with MALLOC_*_ variables,
GLIBC_TUNABLES or a preloaded allocator in the environment nothing is changed, and
TRANSFER_MALLOC_TUNING=0 turns this off.
"""

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# Above every per-step block of the models we train on CPU; glibc versions that refuse this much
# (their limit is 32 MB) get the largest they accept.
MMAP_THRESHOLDS = (256 * 2**20, 32 * 2**20)
TRIM_THRESHOLD = 2**30

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were changed."""
    if os.environ.get("TRANSFER_MALLOC_TUNING", "1") == "0" or _user_chose_allocator():
        return False
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # raises where the C library is not glibc
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    if not any(mallopt(M_MMAP_THRESHOLD, size) for size in MMAP_THRESHOLDS):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _user_chose_allocator() -> bool:
    if any(name in os.environ for name in USER_SETTINGS):
        return True
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return "alloc" in os.environ.get("LD_PRELOAD", "")  # jemalloc, tcmalloc, mimalloc, ...
