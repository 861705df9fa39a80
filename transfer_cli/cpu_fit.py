"""What a fit on the CPU changes in its process when it starts (LightningModule hooks, a mixin)."""

from transfer_cli import allocator, cuda_probe


class CpuFitTuning:
    """On a CPU fit: freed memory kept for the next step (allocator.py), no NVML query per step (cuda_probe.py)."""

    _asked_cuda_runtime = False

    def on_fit_start(self) -> None:
        if self.trainer.strategy.root_device.type != "cpu":
            return
        allocator.keep_freed_memory()  # for the rest of the process: glibc cannot go back to its dynamic threshold
        self._asked_cuda_runtime = cuda_probe.ask_cuda_runtime()

    def on_fit_end(self) -> None:
        if self._asked_cuda_runtime:
            cuda_probe.ask_nvml_again()
            self._asked_cuda_runtime = False
