"""One test per private Lightning (or rich) behaviour that transfer_cli/lightning_private.py relies on, each
named after that behaviour: after an upgrade, the failing names say exactly what moved.

In-process and small: Lightning's own demo model, trainers that run a few batches at most.
"""

import inspect
import io
import logging
import pickle
import sys

import pytest
import rich
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel, DemoModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy, fsdp
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, IterableDataset

from transfer_cli import lightning_private, noise
from transfer_cli.callbacks.progress import TerminalProgressBar
from transfer_cli.checkpoint import install_safe_loaders
from transfer_cli.lightning_private import (
    LightningCLIBase,
    ModelCheckpointHooks,
    deals_distributed_samplers,
    logging_step,
    logs_this_step,
    stream_predictions,
)


def _trainer(tmp_path, **kwargs) -> Trainer:
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}
    return Trainer(default_root_dir=tmp_path, **{**quiet, **kwargs})


# Checkpoint loading -------------------------------------------------------------------------------


def test_strategy_load_checkpoint_hands_the_file_to_checkpoint_io_with_weights_only():
    calls = []

    class Recording:
        def load_checkpoint(self, path, **kwargs):
            calls.append((path, kwargs))
            return {}

    strategy = SingleDeviceStrategy(device=torch.device("cpu"), checkpoint_io=Recording())
    inspect.unwrap(Strategy.load_checkpoint)(strategy, "model.ckpt", weights_only=True)
    assert calls == [("model.ckpt", {"weights_only": True})]


def test_sharding_strategies_override_load_checkpoint_with_a_weights_only_parameter():
    overriding = {cls.__name__ for cls in lightning_private._subclasses(Strategy) if "load_checkpoint" in vars(cls)}
    # These read the file past checkpoint_io, which is why every override is wrapped.
    assert {"Strategy", "FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"} <= overriding
    for cls in lightning_private._subclasses(Strategy):
        if "load_checkpoint" in vars(cls):
            assert "weights_only" in inspect.signature(inspect.unwrap(vars(cls)["load_checkpoint"])).parameters, cls


class _Payload:
    def __reduce__(self):
        return (print, ("the payload ran",))


def test_fsdp_reads_full_checkpoints_with_lazy_load(tmp_path):
    source = inspect.getsource(inspect.unwrap(fsdp.FSDPStrategy.load_checkpoint))
    assert "_lazy_load(" in source and hasattr(fsdp, "_lazy_load")
    install_safe_loaders()
    assert fsdp._lazy_load is lightning_private.load_plain_data
    plain, payload = tmp_path / "plain.ckpt", tmp_path / "payload.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    torch.save({"state_dict": {}, "x": _Payload()}, payload)
    assert torch.equal(fsdp._lazy_load(plain)["state_dict"]["w"], torch.ones(2))
    with pytest.raises(pickle.UnpicklingError):
        fsdp._lazy_load(payload)


# ModelCheckpoint ---------------------------------------------------------------------------------


def test_model_checkpoint_saves_on_train_epoch_end_when_there_is_no_validation(tmp_path):
    trainer = _trainer(tmp_path)
    assert ModelCheckpointHooks().saves_on_train_epoch_end(trainer) is True
    assert ModelCheckpointHooks(save_on_train_epoch_end=False).saves_on_train_epoch_end(trainer) is False


def test_model_checkpoint_skips_saving_outside_fit_and_at_the_step_it_last_saved(tmp_path):
    trainer, callback = _trainer(tmp_path), ModelCheckpointHooks()
    assert callback.last_saved_step == 0  # nothing to save before the first step
    trainer.state.fn = TrainerFn.VALIDATING
    callback._last_global_step_saved = -1
    assert callback.skips_saving(trainer)
    trainer.state.fn = TrainerFn.FITTING
    assert not callback.skips_saving(trainer)
    callback._last_global_step_saved = trainer.global_step
    assert callback.skips_saving(trainer)


def test_trainer_logger_connector_says_when_logged_metrics_are_written_at_the_step_the_loop_counts(tmp_path):
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((logs_this_step(trainer), logging_step(trainer)))

    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=4, log_every_n_steps=2, logger=CSVLogger(tmp_path), callbacks=[Probe()],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert [step for _, step in seen] == [0, 1, 2, 3]
    assert [logs for logs, _ in seen] == [False, True, False, True]  # steps 2 and 4 of log_every_n_steps=2


def test_trainer_deals_dataloaders_a_distributed_sampler_under_a_distributed_strategy_even_on_one_device(tmp_path):
    loader = DataLoader(range(8), batch_size=2, shuffle=True)
    ddp = _trainer(tmp_path, strategy="ddp", devices=1)
    assert deals_distributed_samplers(ddp) and ddp._data_connector._requires_distributed_sampler(loader)
    off = _trainer(tmp_path, strategy="ddp", devices=1, use_distributed_sampler=False)
    assert not deals_distributed_samplers(off) and not off._data_connector._requires_distributed_sampler(loader)
    single = _trainer(tmp_path, devices=1)
    assert not deals_distributed_samplers(single) and not single._data_connector._requires_distributed_sampler(loader)


def test_model_checkpoint_monitor_candidates_hold_the_epoch_and_step(tmp_path):
    candidates = ModelCheckpointHooks().monitor_candidates(_trainer(tmp_path))
    assert {"epoch", "step"} <= set(candidates) and all(torch.is_tensor(candidates[k]) for k in ("epoch", "step"))


def test_model_checkpoint_writes_last_ckpt_through_save_last_checkpoint(tmp_path):
    written = []

    class Recording(ModelCheckpointHooks):
        def save_last_checkpoint(self, trainer, monitor_candidates):
            written.append(trainer.global_step)
            super().save_last_checkpoint(trainer, monitor_candidates)

    callback = Recording(dirpath=tmp_path, save_last=True)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[callback])
    trainer.fit(BoringModel())
    assert written and written[-1] == trainer.global_step == 4
    assert (tmp_path / "last.ckpt").is_file() and callback.last_saved_step == 4


# Rich progress bar -------------------------------------------------------------------------------


@pytest.fixture()
def terminal_console():
    """rich's global console, made a terminal (writing to a buffer) for the test: only then does Live redirect."""
    yield {"force_terminal": True, "file": io.StringIO()}
    rich.reconfigure()


def _start(bar: RichProgressBar, tmp_path) -> None:
    trainer = _trainer(tmp_path, callbacks=[bar], enable_progress_bar=True)
    bar.setup(trainer, BoringModel(), "predict")
    bar.on_predict_start(trainer, trainer.lightning_module)  # Lightning starts its Live here


def test_rich_progress_bar_live_redirects_stdout_which_we_undo(tmp_path, terminal_console):
    stdout = sys.stdout
    plain = RichProgressBar(console_kwargs=terminal_console)
    _start(plain, tmp_path)
    try:
        assert sys.stdout is not stdout  # rich's FileProxy: what `transfer predict > file` must not get
    finally:
        plain.progress.stop()
    assert sys.stdout is stdout

    ours = TerminalProgressBar(console_kwargs=terminal_console)
    _start(ours, tmp_path)
    try:
        assert sys.stdout is stdout and ours.progress.live.is_started
        ours.progress.stop()
        ours.progress.start()  # a later stage restarts the same Live
        assert sys.stdout is stdout
    finally:
        ours.progress.stop()


# Prediction loop ---------------------------------------------------------------------------------


class _Counted(IterableDataset):
    """An input of unknown length that records how many items have been read."""

    def __init__(self, n: int):
        self.n, self.read = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            yield torch.full((1, 2), float(i))


class _Doubler(LightningModule):
    def predict_step(self, batch, batch_idx):
        return batch * 2


def _reads_at_each_batch(tmp_path, streaming: bool) -> list[tuple[int, int]]:
    data, seen = _Counted(4), []

    class Watch(Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append((batch_idx, data.read))

    trainer = _trainer(tmp_path, callbacks=[Watch()])
    if streaming:
        stream_predictions(trainer)
    trainer.predict(_Doubler(), DataLoader(data, batch_size=None), return_predictions=False)
    return seen


def test_prediction_loop_reads_one_batch_ahead_on_inputs_of_unknown_length_which_we_stop(tmp_path):
    # Lightning's own loop has read batch n+1 before batch n's rows go out: a stream's producer would wait.
    assert _reads_at_each_batch(tmp_path, streaming=False)[:3] == [(0, 2), (1, 3), (2, 4)]
    assert _reads_at_each_batch(tmp_path, streaming=True) == [(0, 1), (1, 2), (2, 3), (3, 4)]


# LightningCLI ------------------------------------------------------------------------------------


class _ProbeCLI(LightningCLIBase):
    marker = Callback()

    def extend_subcommand_parser(self, parser, subcommand):
        self.extended = [*getattr(self, "extended", []), subcommand]
        if subcommand == "fit":
            parser.add_argument("--extra", type=int, default=0)

    def parse_ckpt_path(self):
        self.ckpt_hook = (self.config.get("subcommand"), hasattr(self, "trainer"))
        super().parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        config = {**self.get_config(self.config_init, "trainer", default={}), **kwargs}
        return self.instantiate_trainer_with(config, [self.marker])

    def fit(self, **kwargs):
        self.fit_kwargs = kwargs  # parsed and built is all these tests need


@pytest.fixture(scope="module")
def probe_cli(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("cli") / "hparams.ckpt"
    torch.save({"hyper_parameters": {"out_dim": 7}}, ckpt)
    args = ["fit", "--extra", "3", "--ckpt_path", str(ckpt), "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    argv, sys.argv = sys.argv, ["transfer"]  # Lightning warns when both argv and args carry arguments
    try:
        return _ProbeCLI(DemoModel, BoringDataModule, args=args, save_config_callback=None)
    finally:
        sys.argv = argv


def test_lightning_cli_builds_each_subcommand_parser_in_prepare_subcommand_parser(probe_cli):
    assert probe_cli.extended == ["fit", "validate", "test", "predict"]
    assert probe_cli.config.fit.extra == 3


def test_lightning_cli_keeps_subcommand_parsers_by_name(probe_cli):
    assert set(probe_cli.subcommand_parsers) == {"fit", "validate", "test", "predict"}
    assert probe_cli.subcommand_parser("fit") is probe_cli.subcommand_parsers["fit"]
    assert probe_cli.subcommand_parser(None) is probe_cli.parser


def test_lightning_cli_get_reads_a_key_of_the_running_subcommand(probe_cli):
    assert probe_cli.get_config(probe_cli.config, "extra") == 3
    assert probe_cli.get_config(probe_cli.config, "absent", default="d") == "d"


def test_lightning_cli_parses_ckpt_path_hyperparameters_after_parsing_before_instantiation(probe_cli):
    assert probe_cli.ckpt_hook == ("fit", False)
    assert probe_cli.config.fit.model.out_dim == 7 and probe_cli.model.l1.out_features == 7


def test_lightning_cli_instantiate_trainer_adds_callbacks_to_the_configured_ones(probe_cli):
    assert probe_cli.marker in probe_cli.trainer.callbacks
    assert probe_cli.fit_kwargs["ckpt_path"].endswith("hparams.ckpt")


def test_argparse_keeps_a_parsers_actions_in_underscore_actions(probe_cli):
    names = LightningCLIBase.option_names(probe_cli.subcommand_parser("fit"))
    assert {"--extra", "--trainer.max_epochs", "--ckpt_path"} <= set(names)


# Lightning's log lines ---------------------------------------------------------------------------


def test_lightning_tips_are_logged_at_info_on_the_rank_zero_loggers_we_filter(tmp_path):
    """noise.drop_lightning_tips filters loggers by name; the adverts must still come through one of them."""
    from lightning_utilities.core import rank_zero

    assert rank_zero.log.name in noise._RANK_ZERO_LOGGERS
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in noise._RANK_ZERO_LOGGERS]
    filters = {logger: logger.filters[:] for logger in loggers}  # an in-process CLI run earlier installs ours
    for logger in loggers:
        logger.filters = [f for f in logger.filters if not isinstance(f, noise._DropAdverts)]
        logger.addHandler(handler)
    try:
        _trainer(tmp_path, logger=CSVLogger(tmp_path))
        assert any("Tip:" in r.getMessage() and "litlogger" in r.getMessage() for r in records)
        records.clear()
        noise.drop_lightning_tips()
        _trainer(tmp_path, logger=CSVLogger(tmp_path))
        assert not any("Tip:" in r.getMessage() for r in records)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.filters = filters[logger]


# DistributedDataParallel -------------------------------------------------------------------------


def test_ddp_strategy_configure_ddp_wraps_the_module_again_and_the_replaced_wrap_is_released():
    """rewrap_ddp: a one-process gloo group stands in for several (the wrapping is the same)."""
    import weakref

    import torch.distributed as dist
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    from transfer_cli.lightning_private import rewrap_ddp

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = BoringModel()
        model.layer.bias.requires_grad_(False)  # frozen when first wrapped
        strategy = DDPStrategy(accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")])
        strategy.connect(model)
        strategy.configure_ddp()
        first = weakref.ref(strategy.model)
        assert isinstance(first(), DistributedDataParallel)
        model.layer.bias.requires_grad_(True)
        rewrap_ddp(strategy)
        assert first() is None  # its reducer, and the autograd hooks it registered, are gone
        assert isinstance(strategy.model, DistributedDataParallel) and strategy.model.module is model
        assert strategy.lightning_module is model
        for _ in range(2):  # a reducer left behind would mark the gradients ready twice and fail here
            strategy.model(torch.randn(4, 32)).sum().backward()
        assert model.layer.bias.grad is not None
    finally:
        if started_here:
            dist.destroy_process_group()
