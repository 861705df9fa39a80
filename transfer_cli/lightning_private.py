"""Every use of a private Lightning API, and of the rich internals behind Lightning's rich bar, in one place.

Lightning does not promise to keep names with a leading underscore. Each one `transfer` relies on is
wrapped here in a small named function or class whose docstring states the upstream behaviour it
depends on; tests/test_lightning_private.py has one test per dependency, named after that behaviour,
so a Lightning (or rich) upgrade shows exactly what broke. The rest of `transfer` calls these names
and never reaches behind Lightning's public API itself.

Nothing here imports other `transfer` modules: policies (such as which reader is safe) are passed in.
"""

import functools
from argparse import ArgumentParser
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loops.fetchers import _DataFetcher, _PrefetchDataFetcher
from lightning.pytorch.loops.prediction_loop import _PredictionLoop

# Checkpoint loading -------------------------------------------------------------------------------


def reads_safely(load: Any) -> Any:
    """Marks a CheckpointIO.load_checkpoint that reads through the safe reader (see install_safe_loaders)."""
    load.transfer_reads_safely = True
    return load


def install_safe_loaders(read: Callable[[Any], Any]) -> None:
    """Make `read` (which refuses anything but plain data) the first reader of every checkpoint a trainer loads.

    Depends on: every strategy loads through `Strategy.load_checkpoint(path, weights_only=...)`; the
    base class hands the file to `self.checkpoint_io.load_checkpoint`; the sharding strategies (FSDP,
    ModelParallel, DeepSpeed) override it and read the file past the checkpoint_io, FSDP through the
    private `lightning.pytorch.strategies.fsdp._lazy_load` (an Unpickler of its own that runs any code a
    pickle names). Each such method is wrapped once; `_lazy_load` becomes a weights_only load.
    """
    from lightning.pytorch.strategies import Strategy, fsdp

    for cls in _subclasses(Strategy):
        load = vars(cls).get("load_checkpoint")
        if load is not None and not getattr(load, "transfer_reads_safely", False):
            cls.load_checkpoint = _checked_first(load, read, through_io=cls is Strategy)
    # Plain data loads as well eagerly; only a pickle that names code needed the lazy Unpickler.
    fsdp._lazy_load = load_plain_data


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def _checked_first(load: Any, read: Callable[[Any], Any], through_io: bool) -> Any:
    @functools.wraps(load)
    def load_checkpoint(self: Any, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # The base class hands the file to checkpoint_io; ours reads it safely, and once is enough.
        if not (through_io and getattr(self.checkpoint_io.load_checkpoint, "transfer_reads_safely", False)):
            read(checkpoint_path)  # refuses, before the strategy unpickles anything
        return load(self, checkpoint_path, weights_only=True)

    load_checkpoint.transfer_reads_safely = True
    return load_checkpoint


def load_plain_data(path: Any) -> Any:
    """What FSDP's `_lazy_load` is replaced with: torch.load of plain data only, onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ModelCheckpoint ---------------------------------------------------------------------------------


class ModelCheckpointHooks(ModelCheckpoint):
    """ModelCheckpoint with public names for the private parts of its last.ckpt logic (Lightning 2.5-2.6).

    Depends on: `_should_save_on_train_epoch_end(trainer)` (whether checkpoints are written at the end
    of a training epoch rather than after validation), `_should_skip_saving_checkpoint(trainer)` (not
    fitting, sanity checking, fast_dev_run, or this step already saved), `_last_global_step_saved`,
    `_monitor_candidates(trainer)` (the metrics a file name is formatted from), and Lightning writing
    last.ckpt through `_save_last_checkpoint(trainer, monitor_candidates)`, which lands in
    `save_last_checkpoint` here so subclasses override a public name.
    """

    def saves_on_train_epoch_end(self, trainer: L.Trainer) -> bool:
        return self._should_save_on_train_epoch_end(trainer)

    def skips_saving(self, trainer: L.Trainer) -> bool:
        return self._should_skip_saving_checkpoint(trainer)

    @property
    def last_saved_step(self) -> int:
        return self._last_global_step_saved

    def monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        return self._monitor_candidates(trainer)

    def save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        ModelCheckpoint._save_last_checkpoint(self, trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        self.save_last_checkpoint(trainer, monitor_candidates)


# Rich progress bar -------------------------------------------------------------------------------


class RichProgressBarHooks(RichProgressBar):
    """RichProgressBar with a public hook, `after_init_progress`, run each time it may have (re)started its display.

    Depends on: RichProgressBar creating and starting its rich `Progress` (and so a rich `Live`) in
    `_init_progress(trainer)`, called at the start of every stage.
    """

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        self.after_init_progress(trainer)

    def after_init_progress(self, trainer: L.Trainer) -> None:
        """Called after Lightning's `_init_progress`; `self.progress` is the live rich Progress, if any."""


def stop_redirecting_io(live: Any) -> None:
    """Give sys.stdout and sys.stderr back from a started rich `Live`, and keep its restarts from taking them.

    Depends on rich's Live: `start()` calls `_enable_redirect_io()`, which on a terminal replaces
    sys.stdout/sys.stderr with proxies into its console when `_redirect_stdout`/`_redirect_stderr` are
    set; `_disable_redirect_io()` puts the originals back. RichProgressBar gives no way to pass
    redirect_stdout=False.
    """
    live._disable_redirect_io()  # undo what start() just did
    live._redirect_stdout = live._redirect_stderr = False  # and keep later restarts from redoing it


# Prediction loop ---------------------------------------------------------------------------------


class StreamingPredictionLoop(_PredictionLoop):
    """Lightning's predict loop, minus its one-batch look-ahead on inputs of unknown length.

    To tell which batch is the last, Lightning reads batch n+1 before it runs batch n. On a stream
    that means batch n's rows wait for the producer's next lines: a request waiting for its answer
    would wait forever. Nothing here needs to know the last batch in advance.

    Depends on: `_PredictionLoop(trainer, inference_mode)`, whose `reset()` puts a `_PrefetchDataFetcher`
    in `self._data_fetcher` (its `length` None for an unsized loader) after reading the first batch
    into `fetcher.batches`, and `_DataFetcher.__next__` reading one batch and setting `done` at the end.
    """

    def reset(self) -> None:
        super().reset()  # has read the first batch, which the fetcher keeps
        if type(self._data_fetcher) is _PrefetchDataFetcher and self._data_fetcher.length is None:
            self._data_fetcher.__class__ = _NoLookAheadFetcher


class _NoLookAheadFetcher(_PrefetchDataFetcher):
    def __next__(self) -> Any:
        if self.batches:
            return self.batches.pop(0)
        return _DataFetcher.__next__(self)  # sets `done` when the input ends


def stream_predictions(trainer: L.Trainer) -> None:
    """Make the trainer's predict loop a StreamingPredictionLoop, keeping its inference mode."""
    trainer.predict_loop = StreamingPredictionLoop(trainer, trainer.predict_loop.inference_mode)


# LightningCLI ------------------------------------------------------------------------------------


def option_names(parser: ArgumentParser) -> list[str]:
    """Every option string of an argparse (jsonargparse) parser.

    Depends on argparse keeping its actions in the private list `parser._actions`.
    """
    return [o for action in getattr(parser, "_actions", []) for o in action.option_strings]


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes logged metrics at the coming training step.

    Depends on: `trainer._logger_connector.should_update_logs`, which Lightning's own LearningRateMonitor
    asks the same way (every `log_every_n_steps`, and at the last step).
    """
    return trainer._logger_connector.should_update_logs


def deals_distributed_samplers(trainer: L.Trainer) -> bool:
    """Whether Lightning replaces the sampler of the torch DataLoaders it is given with a DistributedSampler.

    Depends on: the data connector's `_requires_distributed_sampler` reads the private accelerator
    connector's `use_distributed_sampler` (Trainer(use_distributed_sampler=...)) and `is_distributed`
    (any distributed strategy, even on one device); it does so only for torch DataLoaders, and not for
    a loader whose sampler is already a DistributedSampler.
    """
    connector = trainer._accelerator_connector
    return bool(connector.use_distributed_sampler and connector.is_distributed)


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning's loggers index metrics by (optimizer steps taken, unlike `global_step` with
    several optimizers). Depends on: `trainer.fit_loop.epoch_loop._batches_that_stepped`."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class LightningCLIBase(LightningCLI):
    """LightningCLI with public names for the private methods and attributes a subclass needs (Lightning 2.5-2.6).

    Depends on: `self.subcommands()` being the table of the subcommands whose parsers are built;
    `_prepare_subcommand_parser(klass, subcommand, **kwargs)` building each subcommand's
    parser and `_subcommand_parsers` keeping them by name; `_parser(subcommand)` (None: the main parser);
    `_get(config, key, default)` reading a key of the running subcommand's config; `_parse_ckpt_path()`
    running after parsing and before instantiation, where Lightning loads a `--ckpt_path`'s
    hyper_parameters into the config; `_instantiate_trainer(config, callbacks)` building the Trainer
    with extra callbacks (and the config-saving callback). Subclasses override `extend_subcommand_parser`
    and `parse_ckpt_path` instead of the private methods.
    """

    # The one subcommand being run, when known before parsing: only its parser is built (each costs a
    # few tenths of a second, and start-up is what a user of `transfer predict` in a pipeline waits for).
    only_subcommand: str | None = None

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]  (an instance's view of the static table)
        every = LightningCLI.subcommands()
        return {self.only_subcommand: every[self.only_subcommand]} if self.only_subcommand in every else every

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        self.extend_subcommand_parser(parser, subcommand)
        return parser

    def extend_subcommand_parser(self, parser: LightningArgumentParser, subcommand: str) -> None:
        """Add options or defaults to one subcommand's parser, right after Lightning built it."""

    def subcommand_parser(self, subcommand: str | None) -> LightningArgumentParser:
        """The parser of `subcommand`, or the main parser for None."""
        return self._parser(subcommand)

    @property
    def subcommand_parsers(self) -> dict[str, LightningArgumentParser]:
        return self._subcommand_parsers

    def get_config(self, config: Any, key: str, default: Any = None) -> Any:
        """`key` of the running subcommand's part of `config` (or of `config` itself without one)."""
        return self._get(config, key, default)

    def _parse_ckpt_path(self) -> None:
        self.parse_ckpt_path()

    def parse_ckpt_path(self) -> None:
        """Runs between parsing and instantiation; by default Lightning's merge of a --ckpt_path's hyper_parameters."""
        self.merge_ckpt_hyperparameters()

    def merge_ckpt_hyperparameters(self) -> None:
        LightningCLI._parse_ckpt_path(self)

    def instantiate_trainer_with(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        """The Trainer from its init arguments, with `callbacks` added to those of the config."""
        return self._instantiate_trainer(config, callbacks)

    @staticmethod
    def option_names(parser: ArgumentParser) -> list[str]:
        return option_names(parser)


# DistributedDataParallel -------------------------------------------------------------------------


def rewrap_ddp(strategy: Any) -> None:
    """Wrap the strategy's LightningModule in a fresh DistributedDataParallel, exactly as it wrapped it
    at setup, after releasing the DistributedDataParallel it replaces.

    DDP registers its gradient all-reduce (the reducer's autograd hooks) for the parameters that
    require grad when it wraps the model; parameters made trainable later would train apart on every
    process (Lightning-AI/pytorch-lightning#20340). A new wrap registers them, and its constructor
    broadcasts rank 0's parameters and buffers, so the replicas start from the same state.

    Depends on: `DDPStrategy.configure_ddp()` wrapping `strategy.model` (which it requires to be the
    LightningModule itself) through `_setup_model` (the strategy's device ids and DDP kwargs) and
    `_register_ddp_hooks` (its communication hooks), and storing the result in `strategy.model`; and on
    a DistributedDataParallel's reducer removing its autograd hooks when it is destroyed. The old wrap
    must therefore be unreachable: if anything still holds it, its hooks would all-reduce every
    gradient a second time, so that is an error here rather than a silent double reduction.
    """
    import gc
    import weakref

    if strategy.model is strategy.lightning_module:  # not wrapped (yet)
        strategy.configure_ddp()
        return
    old = weakref.ref(strategy.model)
    strategy.model = strategy.lightning_module
    gc.collect()  # DDP objects hold reference cycles (its logger holds its reducer)
    if old() is not None:
        raise RuntimeError(
            "transfer: the DistributedDataParallel being replaced is still referenced; its gradient hooks "
            "would reduce every gradient twice."
        )
    strategy.configure_ddp()
