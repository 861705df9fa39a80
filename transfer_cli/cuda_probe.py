"""Keep torch's optimizers from asking NVML whether CUDA is available on every step of a CPU fit.

Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when it is imported, so that asking whether CUDA is
available does not initialise CUDA in a process that may fork later. torch then answers
`torch.cuda.is_available()` by loading NVML, and caches nothing until CUDA is initialised, which a run
on the CPU never does; torch's Adam and AdamW ask on every step (their CUDA-graph capture check). On a
machine without NVML every optimizer step of a CPU fit was a failed dlopen() of libnvidia-ml followed
by the CUDA runtime's answer: 0.2-0.4 ms of a 3-4 ms step in the per-step benchmark here. Where no CUDA
device is visible the CUDA runtime answers directly (once; it caches the count) and gives the same
answer, 0, with nothing left for a fork to inherit; where one is visible nothing changes.
"""

import os

import torch

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def ask_cuda_runtime() -> bool:
    """Where no CUDA device is visible, have `torch.cuda.is_available()` ask the CUDA runtime from now on.

    True when it changed anything; `ask_nvml_again` undoes it. A fit that fails leaves it changed, which
    changes no answer: there is no device.
    """
    if os.environ.get(NVML_CHECK) != "1" or visible_cuda_devices() > 0:
        return False
    os.environ[NVML_CHECK] = "0"
    return True


def visible_cuda_devices() -> int:
    return torch.cuda.device_count()


def ask_nvml_again() -> None:
    os.environ[NVML_CHECK] = "1"
