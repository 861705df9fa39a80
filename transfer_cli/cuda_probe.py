"""Keep torch's optimizers from asking NVML whether CUDA is available on every step of a CPU run.

Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when it is imported, so that asking whether CUDA is
available does not initialise CUDA in a process that may fork later. torch then answers
`torch.cuda.is_available()` by loading NVML, and caches nothing until CUDA is initialised, which a run
on the CPU never does; torch's Adam and AdamW ask on every step (their CUDA-graph capture check). Every
optimizer step of a CPU fit was a dlopen() of libnvidia-ml: 0.2-0.4 ms of a 3-4 ms step in the
per-step benchmark here. While a fit runs on the CPU, after Lightning has started its processes, the
CUDA runtime answers instead (once; it caches the count), and the variable is put back afterwards.
"""

import os

import torch

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def ask_cuda_runtime(device: torch.device) -> bool:
    """On a non-CUDA device, have `torch.cuda.is_available()` ask the CUDA runtime from now on.

    True when it changed anything; `ask_nvml_again` undoes it.
    """
    if device.type == "cuda" or os.environ.get(NVML_CHECK) != "1":
        return False
    os.environ[NVML_CHECK] = "0"
    return True


def ask_nvml_again() -> None:
    os.environ[NVML_CHECK] = "1"


class CudaRuntimeCheckDuringFit:
    """LightningModule hooks: the CUDA runtime answers torch's per-step question while a fit runs."""

    _asked_cuda_runtime = False

    def on_fit_start(self) -> None:
        self._asked_cuda_runtime = ask_cuda_runtime(self.trainer.strategy.root_device)

    def on_fit_end(self) -> None:
        if self._asked_cuda_runtime:
            ask_nvml_again()
            self._asked_cuda_runtime = False
