"""Checkpoint files written atomically and read only as plain data, whatever the strategy asks for."""

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities import move_data_to_device

from transfer_cli.checkpoint import read_checkpoint
from transfer_cli.errors import ResourceError
from transfer_cli.lightning_private import reads_safely


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints appear complete under their final name or not at all, and load only as plain data."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ResourceError(
                f"Cannot write checkpoint {path}: {err.strerror or err}. Earlier checkpoints are intact. "
                "Free disk space or point trainer.logger.init_args.save_dir at a writable disk, then resume "
                "with --ckpt_path last."
            ) from err

    @reads_safely
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        # Always the safe loader, whatever the caller or an environment variable asks for.
        checkpoint = read_checkpoint(path)
        if isinstance(map_location, (str, torch.device)):
            return move_data_to_device(checkpoint, map_location)
        return checkpoint
