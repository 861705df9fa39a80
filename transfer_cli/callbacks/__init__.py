"""The callbacks `transfer` adds to a trainer, one job per module.

- checkpoint_policy: RunCheckpoint, when checkpoints (best and last.ckpt) are written during fit.
- interrupt: InterruptCheckpoint, a resumable last.ckpt on Ctrl-C or SIGTERM.
- nonfinite: NonFiniteLossGuard, a stop at the first NaN or infinite loss.
- rng_state: RandomState, the random generators carried through a checkpoint.
- progress: the progress bars on stderr (a rich bar on a terminal, plain lines otherwise) and the final
  metrics table.
- prediction_writer: PredictionWriter, predictions streamed out as JSON lines or CSV.
- finetuning: freezing, full finetuning or gradual unfreezing of the backbone.

Not callbacks, so elsewhere: the atomic, safe checkpoint file I/O (transfer_cli.checkpoint_io) and the
predict loop without look-ahead (transfer_cli.lightning_private, home of every private Lightning API).
Old paths (transfer_cli.safety, .progress, .writer) re-export these names: saved configs name them.
"""
