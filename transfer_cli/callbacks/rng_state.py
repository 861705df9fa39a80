"""The random generators carried through a checkpoint."""

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RandomState(Callback):
    """Carries the random generators through a checkpoint, so a resumed run draws the same data order
    and augmentations as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        random.setstate((state_dict["python_version"], tuple(state_dict["python"]), state_dict["python_gauss"]))
        kind, keys, *rest = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        cuda = state_dict.get("cuda") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)  # augmentation draws its random numbers on the device
