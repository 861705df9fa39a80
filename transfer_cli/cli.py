"""The `transfer` LightningCLI: Lightning's subcommands and hooks, with checkpoints that describe
themselves, recipes by name, and stdout kept for data."""

import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import rich
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.checkpoint import CheckpointMetadata, config_from_checkpoint, load_weights, read_checkpoint
from transfer_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, ConfigError, Interrupted
from transfer_cli.finetuning import BackboneFinetuning
from transfer_cli.progress import print_metrics, progress_bar
from transfer_cli.recipes import check_config_files, resolve_config_args, summarize_parser_error
from transfer_cli.runs import check_same_classes, check_writable, default_precision, keep_metrics, resolve_last
from transfer_cli.safety import (
    AtomicCheckpointIO,
    InterruptCheckpoint,
    NonFiniteLossGuard,
    RandomState,
    RunCheckpoint,
)
from transfer_cli.writer import PredictionWriter, StreamingPredictionLoop, output_format

SUBCOMMANDS = ("fit", "validate", "test", "predict")
CKPT_SUBCOMMANDS = ("validate", "test", "predict")


class TransferCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True):
        self._checkpoint: dict[str, Any] | None = None
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # Resuming writes into the run directory it resumes, whose config.yaml is the same run's.
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "transfer"},
                }
            },
            seed_everything_default=42,
            auto_configure_optimizers=False,
            # Errors come back as exceptions and are reported as one paragraph, not a usage dump.
            parser_kwargs={
                "prog": "transfer",
                "exit_on_error": False,
                **{c: {"exit_on_error": False} for c in SUBCOMMANDS},
            },
            args=args,
            run=run,
        )

    # Parser -----------------------------------------------------------------------------------

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BackboneFinetuning, "finetuning")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{val_acc:.4f}",
            }
        )
        # The data states the classes once; the head is sized from them.
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in CKPT_SUBCOMMANDS:
            parser.add_argument(
                "--ckpt",
                type=str | None,
                default=None,
                help="A checkpoint written by `transfer fit`: its model, classes and preprocessing are used.",
            )
        if subcommand in ("validate", "test"):
            parser.set_defaults({"verbose": False})  # Lightning's result table would go to stdout
        if subcommand == "predict":
            parser.add_argument(
                "--input", type=str | None, default=None, help="Image/text file, folder, or - for stdin."
            )
            parser.add_argument(
                "--output", type=str | None, default=None, help="A .jsonl or .csv file (default: stdout)."
            )
            parser.add_argument("--topk", type=int, default=3, help="Number of top classes in each row.")
            parser.add_argument(
                "--skip_bad_inputs",
                type=bool,
                default=False,
                help="Write a row with an `error` field for an unreadable input and go on, instead of stopping.",
            )
            parser.set_defaults({"return_predictions": False})
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        args = list(sys.argv[1:] if args is None else args)
        args = resolve_config_args(args)
        check_config_files(args)
        args = self._with_checkpoint_config(args)
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as err:
            subcommand = next((a for a in args if a in SUBCOMMANDS), "SUBCOMMAND")
            raise ConfigError(f"{summarize_parser_error(str(err))}\nSee `transfer {subcommand} --help`.") from None

    def _with_checkpoint_config(self, args: list[str]) -> list[str]:
        """With --ckpt, the checkpoint's own config goes first, so any flag given still overrides it."""
        subcommand = next((a for a in args if a in SUBCOMMANDS), None)
        ckpt = _option_value(args, "--ckpt")
        if subcommand == "predict" and ckpt is None and not _asks_for_help(args):
            # Before parsing: the parser would name the model and data it misses, not the flag to give.
            raise ConfigError("transfer predict needs --ckpt: a checkpoint written by `transfer fit`.")
        if subcommand not in CKPT_SUBCOMMANDS or ckpt is None:
            return args
        self._checkpoint = read_checkpoint(ckpt)
        config = config_from_checkpoint(self._checkpoint, keep_data_root=subcommand != "predict")
        at = args.index(subcommand) + 1
        return [*args[:at], "--config", yaml.safe_dump(config), *args[at:]]

    # Hooks ------------------------------------------------------------------------------------

    def _subconfig(self) -> Any:
        """The parsed config of the running subcommand (or the whole config with run=False)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        if self.subcommand == "predict":
            if config.get("input") is None:
                raise ConfigError("transfer predict needs --input: an image, a folder, a text file, or - for stdin.")
            check_predict_output(config.input, config.output)
            config.data.init_args.predict_input = config.input
            # Rows stream in input order from one process; several would each write their own share.
            if str(config.trainer.devices) == "auto":
                config.trainer.devices = 1
            if str(config.trainer.devices) not in ("1", "[0]") or config.trainer.num_nodes != 1:
                raise ConfigError("transfer predict runs on one device: drop --trainer.devices/--trainer.num_nodes.")
        if self.subcommand != "fit":
            # Only training makes a run directory; evaluating or predicting leaves no files behind.
            config.trainer.logger = False
            self.save_config_callback = None
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            config.ckpt_path = resolve_last(config.trainer.logger)
            # Continue in the resumed run's own directory instead of opening a new version.
            run_dir = Path(config.ckpt_path).parent.parent
            config.trainer.logger.init_args.version = run_dir.name
            keep_metrics(run_dir)

    def after_instantiate_classes(self) -> None:
        self.datamodule.connect(self.model.backbone)
        if self._checkpoint is not None:
            ckpt = self._subconfig().ckpt
            check_same_classes(self._checkpoint["transfer"]["class_names"], self.datamodule, ckpt)
            load_weights(self.model, self._checkpoint, ckpt)
            stored = self._checkpoint["transfer"].get("preprocessing")
            if stored is not None and hasattr(self.datamodule, "use_preprocessing"):
                # What the model was trained with, even if a newer torchvision describes the weights anew.
                self.datamodule.use_preprocessing(ImagePreprocessing.from_dict(stored))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._subconfig()
        dump = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        callbacks.append(CheckpointMetadata(dump["model"], dump["data"]))
        if self.subcommand == "fit":
            callbacks += [NonFiniteLossGuard(), InterruptCheckpoint(), RandomState()]
        given = self._get(self.config_init, "trainer", default={}).get("callbacks")
        if config.trainer.enable_progress_bar is not False and not _has_progress_bar(given):
            # Given at construction, so Lightning does not add its own bar writing to stdout.
            callbacks.append(progress_bar())
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(config.output, config.topk, config.skip_bad_inputs))
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        trainer_config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return self._instantiate_trainer(trainer_config, callbacks)

    # Subcommands: Lightning's, with its ways of stopping turned into our exit codes ------------

    def fit(self, **kwargs: Any) -> None:
        # Data errors surface here, before the logger creates a run directory or workers start.
        self.datamodule.setup("fit")
        check_writable(self.trainer.log_dir or self.trainer.default_root_dir)  # log_dir is None in fast_dev_run
        self._run(self.trainer.fit, **kwargs)

    def validate(self, **kwargs: Any) -> None:
        self.datamodule.setup("validate")
        self._run(self.trainer.validate, **kwargs)

    def test(self, **kwargs: Any) -> None:
        self.datamodule.setup("test")
        self._run(self.trainer.test, **kwargs)

    def predict(self, **kwargs: Any) -> None:
        output = self.config.predict.get("output")
        if output not in (None, "-"):
            check_writable(Path(output).parent)
        # The writer needs no batch indices, which Lightning cannot know for a stream it did not batch.
        warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices.*")
        # Rows of batch n go out before batch n+1 is read: a stream's producer may be waiting for them.
        self.trainer.predict_loop = StreamingPredictionLoop(self.trainer, self.trainer.predict_loop.inference_mode)
        self._run(self.trainer.predict, **kwargs)

    def _run(self, fn: Any, **kwargs: Any) -> None:
        try:
            fn(**kwargs)
        except SIGTERMException as err:
            raise Interrupted("terminated (SIGTERM)", EXIT_TERMINATED) from err
        except SystemExit as err:
            # Lightning ends a Ctrl-C with sys.exit(1) after its graceful shutdown.
            if self.trainer.interrupted:
                raise Interrupted("interrupted (Ctrl-C)", EXIT_INTERRUPTED) from err
            raise

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        print_metrics("fit", _epoch_metrics(self.trainer))
        best = self.trainer.checkpoint_callback
        if best is not None and best.last_model_path and Path(best.last_model_path).is_file():
            print(f"checkpoints: {Path(best.last_model_path).parent}", file=sys.stderr)

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            print_metrics("validate", _epoch_metrics(self.trainer))

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            print_metrics("test", _epoch_metrics(self.trainer))


def _option_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def _asks_for_help(args: list[str]) -> bool:
    return any(a in ("-h", "--help") or a.startswith("--print_config") for a in args)


def check_predict_output(input_spec: str, output: str | None) -> None:
    """Refuse an --output that is the --input file itself (under any spelling or link): the rename at
    the end would replace the user's data with predictions. Checked before anything is read."""
    if output in (None, "-"):
        return
    output_format(Path(output))
    if input_spec == "-":
        return
    given, target = Path(input_spec), Path(output)
    same = given.resolve() == target.resolve()
    if not same and given.exists() and target.exists():
        same = os.path.samefile(given, target)  # hard links
    if same:
        raise ConfigError(
            f"--output {output} is the --input file: predictions would replace your input. "
            "Choose another --output file name."
        )


def _has_progress_bar(callbacks: Any) -> bool:
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return any(isinstance(c, ProgressBar) for c in callbacks if c is not None)


def _epoch_metrics(trainer: Trainer) -> dict[str, Any]:
    return {k: v for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}


def run(args: list[str] | None = None) -> None:
    # stdout is for data: Lightning's rich model summary prints through rich's global console.
    rich.reconfigure(stderr=True)
    for message in (
        r".*module\(s\) in eval mode.*",
        r".*LeafSpec.*is deprecated.*",
        r".*smaller than the logging interval.*",
        r".*exists and is not empty.*",
    ):
        # Expected with a frozen backbone / a short run; noise for users.
        warnings.filterwarnings("ignore", message=message)
    TransferCLI(args=args)
