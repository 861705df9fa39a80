"""`transfer export`: a checkpoint as an ONNX file, a torch.export program or safetensors weights,
proven by a parity check to compute what the checkpoint computes."""

from transfer_cli.export.command import export, main

__all__ = ["export", "main"]
