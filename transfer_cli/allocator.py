"""Keep the host memory a training step frees for the next step instead of handing it back to the kernel.

glibc's malloc serves blocks above a moving threshold (128 KB at first, 32 MB at most) with fresh
mmap()s and gives the top of its heap back to the kernel whenever more than a threshold is free there.
A training step on the CPU frees and reallocates the same activations, gradients and temporaries every
step, some of them above 32 MB (ResNet50 at 32 px, batch 32: blocks of 72 MB, seen with strace); which
of them land at the heap's top depends on the order of allocations, so one loop keeps its memory and
another doing the same arithmetic pays a page fault for every 4 KB of it on every step. Measured with
`getrusage` around 8 steps of that ResNet50 on two cores: Lightning's loop 157,000-183,000 page faults
and 0.46 s of kernel time, a plain loop 37,000-111,000 and 0.1-0.3 s, 5-10% apart in speed; with the
thresholds below both under 12,000 and at the same speed. PyTorch's CPU tuning guide gets the same by
preloading jemalloc or tcmalloc.

The price: blocks up to 256 MB come from the heap, which then holds up to TRIM_THRESHOLD of freed memory
for reuse, and blocks of many different sizes can leave it holding more than the process uses. So this
is done only where it pays, for a fit on the CPU (cpu_fit.py); on a GPU the step's memory is the
device's. glibc's own settings win: with MALLOC_* variables, GLIBC_TUNABLES or a preloaded allocator
in the environment nothing is changed, and TRANSFER_MALLOC_TUNING=0 turns this off.
"""

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# Above the per-step blocks of the models we train on the CPU; a glibc that refuses this much (some cap
# the threshold at 32 MB) gets the largest it accepts.
MMAP_THRESHOLDS = (256 * 2**20, 32 * 2**20)
TRIM_THRESHOLD = 256 * 2**20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were changed."""
    if os.environ.get("TRANSFER_MALLOC_TUNING", "1") == "0" or user_chose_allocator():
        return False
    if not is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    if not any(mallopt(M_MMAP_THRESHOLD, size) for size in MMAP_THRESHOLDS):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # another C library; no os.confstr at all on Windows
        return False


def user_chose_allocator() -> bool:
    if any(name.startswith("MALLOC_") for name in os.environ):  # MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_, ...
        return True
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return "alloc" in os.environ.get("LD_PRELOAD", "")  # jemalloc, tcmalloc, mimalloc, ...
