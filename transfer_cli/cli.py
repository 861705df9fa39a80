"""The `transfer` LightningCLI: Lightning's subcommands and hooks, with checkpoints that describe
themselves, recipes by name, and stdout kept for data."""

import difflib
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rich
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transfer_cli.callbacks.checkpoint_policy import RunCheckpoint
from transfer_cli.callbacks.finetuning import FinetuningPolicy
from transfer_cli.callbacks.interrupt import InterruptCheckpoint
from transfer_cli.callbacks.nonfinite import NonFiniteLossGuard
from transfer_cli.callbacks.prediction_writer import PredictionWriter, output_format
from transfer_cli.callbacks.progress import print_metrics, progress_bar
from transfer_cli.callbacks.rng_state import RandomState
from transfer_cli.checkpoint import CheckpointMetadata, install_safe_loaders, read_checkpoint
from transfer_cli.checkpoint_io import AtomicCheckpointIO
from transfer_cli.entry import SUBCOMMANDS
from transfer_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, ConfigError, Interrupted
from transfer_cli.lightning_private import LightningCLIBase, stream_predictions
from transfer_cli.noise import drop_lightning_tips, forgiving_stderr
from transfer_cli.recipes import check_config_files, explain_parser_error, recipe_names, resolve_config_args
from transfer_cli.report.run_summary import RunSummary
from transfer_cli.report.table import print_summary
from transfer_cli.report.writer import check_report_target, report_document, write_json_stdout, write_report
from transfer_cli.restore import Restored, restore
from transfer_cli.runs import (
    check_new_or_resumed,
    check_resumable,
    check_same_classes,
    check_writable,
    continue_in_run,
    default_precision,
    fill_logger_defaults,
    keep_metrics,
    remove_empty_run,
    resolve_last,
    run_dir,
)

CKPT_SUBCOMMANDS = ("validate", "test", "predict")


class TransferCLI(LightningCLIBase):
    def __init__(self, args: list[str] | None = None, run: bool = True):
        self._restored: Restored | None = None  # the --ckpt checkpoint, read once
        # --ckpt_path files already checked -> whether they carry Lightning hyper_parameters to merge.
        self._checked_ckpt_paths: dict[Path, bool] = {}
        self._resumed_run: Path | None = None
        given = sys.argv[1:] if args is None else args
        self.only_subcommand = given[0] if run and given and given[0] in SUBCOMMANDS else None
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # Resuming writes into the run directory it resumes, whose config.yaml is the same run's.
            save_config_kwargs={"overwrite": True},
            # Runs go to <default_root_dir or ./runs>/<recipe>/version_N: an empty save_dir and no name
            # are filled in by runs.fill_logger_defaults, so any value given on the command line wins.
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "", "name": None},
                }
            },
            seed_everything_default=42,
            auto_configure_optimizers=False,
            # Lightning would dump the whole parsed config into every model's hparams for
            # `load_from_checkpoint`; transfer restores from its own metadata (restore.py) and the
            # dump cost a few tenths of a second of every start-up.
            load_from_checkpoint_support=False,
            # Errors come back as exceptions and are reported as one paragraph, not a usage dump.
            parser_kwargs={
                "prog": "transfer",
                "exit_on_error": False,
                **{c: {"exit_on_error": False} for c in self.subcommands()},
            },
            args=args,
            run=run,
        )

    # Parser -----------------------------------------------------------------------------------

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FinetuningPolicy, "finetuning")
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

    def extend_subcommand_parser(self, parser: LightningArgumentParser, subcommand: str) -> None:
        if subcommand in CKPT_SUBCOMMANDS:
            parser.add_argument(
                "--ckpt",
                type=str | None,
                default=None,
                help="A checkpoint written by `transfer fit`: its model, classes and preprocessing are used.",
            )
        if subcommand in ("validate", "test"):
            parser.set_defaults({"verbose": False})  # Lightning's result table would go to stdout
            parser.add_argument(
                "--report",
                type=str | None,
                default=None,
                help="Write an evaluation report to this new (or empty) directory: metrics.json, per_class.csv, "
                "confusion_matrix.png, calibration.png, errors.jsonl; - writes metrics.json to stdout.",
            )
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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        args = list(sys.argv[1:] if args is None else args)
        args = resolve_config_args(args)
        check_config_files(args)
        _check_something_to_run(args)
        args = self._with_checkpoint_config(args)
        subcommand = next((a for a in args if a in SUBCOMMANDS), None)
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as err:
            options = self.option_names(self.subcommand_parsers.get(subcommand, parser))
            message = explain_parser_error(err, options)
            raise ConfigError(f"{message}\nSee `transfer {subcommand or 'SUBCOMMAND'} --help`.") from None
        chosen = self.config.get("subcommand")  # the parser's answer, not a guess from the words given
        config = self.config[chosen] if chosen else self.config
        _check_trainer_names(config.get("trainer"))
        _fit_devices_to_launcher(config.get("trainer"))
        _check_data_ranges(config.get("data"))

    def parse_ckpt_path(self) -> None:
        # Lightning would torch.load a --ckpt_path here to merge hyper_parameters, which transfer's models
        # never save, and fail with a traceback on a truncated or foreign file. fit checks the checkpoint
        # itself (runs.check_resumable), with exit 4 and before a run directory exists; elsewhere a path
        # given in a YAML file (not seen by _with_checkpoint_config) is checked before Lightning parses it.
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            return
        ckpt_path = (self.config[subcommand] if subcommand else self.config).get("ckpt_path")
        if ckpt_path is None or not Path(str(ckpt_path)).expanduser().is_file():
            self.merge_ckpt_hyperparameters()
        elif self._check_ckpt_path(ckpt_path):
            # Only a checkpoint with hyper_parameters (not one of ours) gives Lightning anything to read
            # again; the trainer reads the file once more when it restores the weights.
            self.merge_ckpt_hyperparameters()

    def _check_ckpt_path(self, ckpt_path: str) -> bool:
        """Refuse an unsafe --ckpt_path file before anything is built, reading each file once;
        returns whether it carries Lightning hyper_parameters."""
        key = Path(str(ckpt_path)).expanduser().resolve()
        if key not in self._checked_ckpt_paths:
            checkpoint = read_checkpoint(ckpt_path, option="--ckpt_path")
            self._checked_ckpt_paths[key] = bool(checkpoint.get("hyper_parameters"))
        return self._checked_ckpt_paths[key]

    def _with_checkpoint_config(self, args: list[str]) -> list[str]:
        """With --ckpt, the checkpoint's own config goes first, so any flag given still overrides it.

        Every checkpoint is checked here, before anything is built: --ckpt, and Lightning's own
        --ckpt_path when it names a file (`last` is resolved later and read by the trainer, whose
        every loader goes through read_checkpoint).
        """
        install_safe_loaders()
        subcommand = next((a for a in args if a in SUBCOMMANDS), None)
        ckpt_path = _option_value(args, "--ckpt_path")
        # Lightning's ckpt_path also takes words it resolves itself, and model-registry names.
        lightning_word = ckpt_path in (None, "last", "best", "hpc", "null", "None") or ckpt_path.startswith("registry")
        if subcommand is not None and not lightning_word:
            self._check_ckpt_path(ckpt_path)
        ckpt = _option_value(args, "--ckpt")
        if subcommand not in CKPT_SUBCOMMANDS or ckpt is None:
            return args
        self._restored = restore(ckpt)
        # Prediction reads --input; the training data need not exist on this machine.
        config = self._restored.cli_config(keep_machine_specific=subcommand != "predict")
        # The data config goes first, so any config or flag given overrides it (another root, batch
        # size). The model goes after the last config given: the weights come from the checkpoint, so a
        # recipe stacked with --ckpt must not swap its architecture; explicit flags still apply.
        at = args.index(subcommand) + 1
        late = _after_last_config(args, at)
        model, data = yaml.safe_dump({"model": config["model"]}), yaml.safe_dump({"data": config["data"]})
        return [*args[:at], "--config", data, *args[at:late], "--config", model, *args[late:]]

    # Hooks ------------------------------------------------------------------------------------

    def _subconfig(self) -> Any:
        """The parsed config of the running subcommand (or the whole config with run=False)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        if self.subcommand in CKPT_SUBCOMMANDS and config.get("ckpt") is not None and self._restored is None:
            # Its own config must be read before every other config, so it cannot come from one of them.
            raise ConfigError(
                f"ckpt: {config.ckpt} is set in a config file; give it on the command line instead: "
                f"`transfer {self.subcommand} --ckpt {config.ckpt} ...`."
            )
        if self.subcommand == "predict":
            if config.get("input") is None:
                raise ConfigError("transfer predict needs --input: an image, a folder, a text file, or - for stdin.")
            # `--input=~/photos`: the shell expands no tilde after `=`.
            config.input = _expand_user(config.input)
            config.output = _expand_user(config.output)
            check_predict_output(config.input, config.output)
            config.data.init_args.predict_input = config.input
            _check_predict_devices(config)
        if self.subcommand != "fit":
            # Only training makes a run directory; evaluating or predicting leaves no files behind.
            config.trainer.logger = False
            self.save_config_callback = None
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)
        if self.subcommand == "fit":
            self._place_run(config)

    def _place_run(self, config: Any) -> None:
        """Where a fit writes, which checkpoint it resumes, and whether it continues an earlier run there."""
        fill_logger_defaults(config.trainer.logger, config.trainer.default_root_dir, config.get("config"))
        if config.get("ckpt_path") == "last":
            config.ckpt_path = resolve_last(config)
        if config.get("ckpt_path"):
            continue_in_run(config, config.ckpt_path)
        self._resumed_run = check_new_or_resumed(config)

    def after_instantiate_classes(self) -> None:
        # Downloads (and a missing data directory) surface here, before any work or output; Lightning's
        # own call in fit then finds the data in place.
        self.datamodule.prepare_data()
        if self._restored is None:
            self.datamodule.connect(self.model.backbone)
            return
        self._restored.connect(self.datamodule, self.model)
        check_same_classes(self._restored.class_names, self.datamodule, self._subconfig().ckpt)
        self._restored.load_weights(self.model)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._subconfig()
        parser = self.subcommand_parser(self.subcommand)
        callbacks = [self.get_config(self.config_init, key) for key in parser.callback_keys]
        if self.subcommand == "fit":
            # Only fit writes checkpoints. The dump is of the whole config: for a text checkpoint that
            # includes its tokenizer files, whose YAML round trip costs a predict a noticeable part of a second.
            dump = yaml.safe_load(parser.dump(config, skip_none=False))
            callbacks.append(CheckpointMetadata(dump["model"], dump["data"]))
            callbacks += [NonFiniteLossGuard(), InterruptCheckpoint(), RandomState()]
            callbacks.append(RunSummary())  # after InterruptCheckpoint: curves at an interrupt need its last.ckpt
        given = self.get_config(self.config_init, "trainer", default={}).get("callbacks")
        if config.trainer.enable_progress_bar is not False and not _has_progress_bar(given):
            # Given at construction, so Lightning does not add its own bar writing to stdout.
            callbacks.append(progress_bar())
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(config.output, config.topk, config.skip_bad_inputs))
        trainer_config = {**self.get_config(self.config_init, "trainer", default={}), **kwargs}
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        trainer_config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return self.instantiate_trainer_with(trainer_config, callbacks)

    # Subcommands: Lightning's, with its ways of stopping turned into our exit codes ------------

    def fit_checks(self, ckpt_path: str | None) -> list[Callable[[], None]]:
        """What fit verifies before it trains, in order. fit stops at the first failure; `transfer check`
        runs every one and reports them all, so the two can never disagree."""
        checks = [self._check_devices, lambda: self.datamodule.setup("fit")]
        if ckpt_path:
            checks.append(lambda: check_resumable(ckpt_path, self.model, self.datamodule))
        # log_dir is None in fast_dev_run; reading it creates nothing (the logger makes its directory lazily).
        checks.append(lambda: check_writable(self.trainer.log_dir or self.trainer.default_root_dir))
        return checks

    def _check_devices(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, FinetuningPolicy):
                # Before Lightning starts the other processes: an error after that ends them all at once.
                processes = self.trainer.num_devices * self.trainer.num_nodes
                callback.check_devices(processes, self.trainer.strategy)

    def fit(self, **kwargs: Any) -> None:
        # Data errors surface here, before the logger creates a run directory or workers start.
        for check in self.fit_checks(kwargs.get("ckpt_path")):
            check()
        if self._resumed_run is not None:
            keep_metrics(self._resumed_run)
            # Expected when a run continues in its own directory; a new run there was refused before.
            warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
        try:
            self._run(self.trainer.fit, **kwargs)
        except BaseException:
            if self._resumed_run is None and self.trainer.global_step == 0 and self.trainer.is_global_zero:
                remove_empty_run(run_dir(self.trainer))
            raise

    def validate(self, **kwargs: Any) -> None:
        self._check_report()
        self.datamodule.setup("validate")
        self._run(self.trainer.validate, **kwargs)

    def test(self, **kwargs: Any) -> None:
        self._check_report()
        self.datamodule.setup("test")
        self._run(self.trainer.test, **kwargs)

    def _check_report(self) -> None:
        """Before any evaluation runs: a report needs a classifier and a new or empty directory."""
        report = self._subconfig().get("report")
        if report is not None and not hasattr(self.model, "report_states"):
            raise ConfigError(
                f"--report needs a classifier; {type(self.model).__name__} has no classes to report on. "
                "Drop --report (the loss is printed on stderr)."
            )
        check_report_target(report)

    def predict(self, **kwargs: Any) -> None:
        output = self.config.predict.get("output")
        if output not in (None, "-"):
            check_writable(Path(output).parent)
        # The writer needs no batch indices, which Lightning cannot know for a stream it did not batch.
        warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices.*")
        # Rows of batch n go out before batch n+1 is read: a stream's producer may be waiting for them.
        stream_predictions(self.trainer)
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
            self._report("validate")

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            self._report("test")

    def _report(self, subcommand: str) -> None:
        """The summary table on stderr, and the report where --report asks for one."""
        evaluation = getattr(self.model, "evaluation", None)
        if evaluation is None:  # a model without classes (the autoencoder)
            print_metrics(subcommand, _epoch_metrics(self.trainer))
            return
        config = self._subconfig()
        print_summary(subcommand, evaluation["metrics"])
        report = config.get("report")
        if report is None:
            return
        data = yaml.safe_load(self.subcommand_parser(subcommand).dump(config, skip_none=False))["data"]
        document = report_document(subcommand, config.get("ckpt"), data, evaluation["metrics"])
        if report == "-":
            write_json_stdout(document)
        else:
            print(f"report: {write_report(report, document, evaluation['errors'])}", file=sys.stderr)


def _given(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith((name + "=", name + ".")) for a in args)


def _check_something_to_run(args: list[str]) -> None:
    """Say what a subcommand needs when it is missing, instead of jsonargparse's "required: fit.data"."""
    subcommand = next((a for a in args if a in SUBCOMMANDS), None)
    if subcommand is None or any(a in ("-h", "--help") for a in args):
        return
    has_config = _given(args, "--config") or _given(args, "-c")
    if subcommand == "predict" and not _given(args, "--ckpt"):
        raise ConfigError(
            "transfer predict needs --ckpt on the command line: a checkpoint written by `transfer fit` "
            "(transfer predict --ckpt model.ckpt --input PATH|-). A ckpt in a config file is not read: the "
            "checkpoint's own config must come before every other."
        )
    if subcommand in ("validate", "test") and not _given(args, "--ckpt") and not has_config:
        raise ConfigError(
            f"transfer {subcommand} needs --ckpt: a checkpoint written by `transfer fit` "
            f"(transfer {subcommand} --ckpt model.ckpt), or a --config with a model and data."
        )
    if subcommand == "fit" and not has_config and not (_given(args, "--model") and _given(args, "--data")):
        raise ConfigError(
            f"transfer fit needs a recipe: --config NAME or FILE.yaml (recipes: {', '.join(recipe_names())}), "
            "or --model CLASS and --data CLASS."
        )


def _check_trainer_names(trainer: Any) -> None:
    """Lightning checks these names only when the Trainer is built, with a ValueError (exit 1)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    if trainer is None:
        return
    known = {
        "accelerator": ["auto", "gpu", *AcceleratorRegistry.available_accelerators()],
        "strategy": ["auto", *StrategyRegistry.available_strategies()],
    }
    for key, names in known.items():
        value = trainer.get(key)
        if isinstance(value, str) and value.lower() not in names:
            close = difflib.get_close_matches(value.lower(), names, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"Unknown trainer.{key} {value!r}.{hint} Choose one of: {', '.join(sorted(names))}.")


def _fit_devices_to_launcher(trainer: Any) -> None:
    """Under torchrun, devices auto means one device per started process, and a count that disagrees
    with the processes started is refused here; Lightning would stop every process with a ValueError."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    if trainer is None or not TorchElasticEnvironment.detect():
        return
    per_node, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    if str(trainer.get("devices")) == "auto":
        trainer.devices = per_node
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    count = len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else None
    if count is not None and count * nodes != world:
        raise ConfigError(
            f"torchrun started {world} processes ({per_node} per node), but --trainer.devices {devices} and "
            f"--trainer.num_nodes {nodes} make {count * nodes}: give --trainer.devices {per_node} (torchrun's "
            "--nproc_per_node) and --trainer.num_nodes as torchrun's --nnodes, or leave devices auto."
        )


def _check_data_ranges(data: Any) -> None:
    """Ranges that an `int`/`float` annotation cannot state; otherwise torch refuses them mid-setup,
    after the run directory exists, with a ValueError (exit 1)."""
    init_args = (data.get("init_args") if data is not None else None) or {}
    batch_size, fraction = init_args.get("batch_size"), init_args.get("val_fraction")
    if isinstance(batch_size, int) and batch_size < 1:
        raise ConfigError(f"data.init_args.batch_size must be 1 or more, got {batch_size}.")
    max_length = init_args.get("max_length")
    if isinstance(max_length, int) and max_length < 2:
        raise ConfigError(
            f"data.init_args.max_length must be 2 or more (tokens per example, special tokens included), "
            f"got {max_length}."
        )
    if isinstance(fraction, (int, float)) and not 0 <= fraction < 1:
        raise ConfigError(
            f"data.init_args.val_fraction must be at least 0 and below 1, got {fraction}: it is the fraction "
            "of the training examples held out for validation."
        )


def _option_value(args: list[str], name: str) -> str | None:
    """The value of an option as the parser will see it: a repeated option's last value wins."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def _after_last_config(args: list[str], start: int) -> int:
    """The position just after the last `--config FILE` at or after `start` (or `start` itself)."""
    at = start
    for i in range(start, len(args)):
        if args[i] in ("--config", "-c") and i + 1 < len(args):
            at = i + 2
        elif args[i].startswith("--config="):
            at = i + 1
    return at


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


def _check_predict_devices(config: Any) -> None:
    """Several devices share a file or folder by whole batches and rank 0 writes the rows out at the
    end (callbacks/prediction_shards.py). A stream's rows go out as its lines arrive, from one process."""
    if str(config.trainer.devices) == "auto":
        config.trainer.devices = 1
    if config.trainer.num_nodes != 1:
        raise ConfigError(
            "transfer predict runs on one machine: drop --trainer.num_nodes (--trainer.devices N spreads the "
            "input over that machine's devices)."
        )
    devices = config.trainer.devices
    one = str(devices) == "1" or (isinstance(devices, list) and len(devices) == 1)
    if config.input == "-" and not one:
        raise ConfigError(
            "transfer predict --input - (stdin) runs on one device: each row goes out as soon as its line is "
            "read. Drop --trainer.devices, or give a file or folder to spread over several devices."
        )


def _expand_user(path: str | None) -> str | None:
    return path if path in (None, "-") else os.path.expanduser(path)


def _has_progress_bar(callbacks: Any) -> bool:
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return any(isinstance(c, ProgressBar) for c in callbacks if c is not None)


def _epoch_metrics(trainer: Trainer) -> dict[str, Any]:
    return {k: v for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}


def run(args: list[str] | None = None) -> None:
    quiet_lightning()
    TransferCLI(args=args)


def quiet_lightning() -> None:
    """stderr for everything but data, and no noise: what every verb built on TransferCLI needs."""
    forgiving_stderr()
    # stdout is for data: Lightning's rich model summary prints through rich's global console.
    rich.reconfigure(stderr=True)
    drop_lightning_tips()
    for message in (
        r".*module\(s\) in eval mode.*",
        r".*LeafSpec.*is deprecated.*",
        r".*smaller than the logging interval.*",
        # transfer chooses loader workers itself: none for a model on the CPU (image files are decoded on threads
        # in this process, data/images.py ThreadDecoded) or for data already in memory (CIFAR-10).
        r".*_dataloader' does not have many workers.*",
        # The epoch's train loss is each process's own mean on purpose (model.py _log_epoch).
        r".*self\.log\('train_loss(_epoch)?', \.\.\., sync_dist=True\).*",
    ):
        # Expected with a frozen backbone / a short run; noise for users.
        warnings.filterwarnings("ignore", message=message)
