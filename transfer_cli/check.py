"""`transfer check`: everything fit would resolve and refuse, and one measured step, before the GPU hour.

The configuration goes through the real TransferCLI with fit's arguments; only the `fit` subcommand is
replaced, so check runs the same parse, the same hooks and the same pre-training checks as fit
(TransferCLI.fit_checks), but collects every failure instead of stopping at the first, and never
calls Trainer.fit on the run's trainer: no run directory, no config.yaml, no checkpoint.
"""

import contextlib
import json
import sys
from typing import Any

import lightning as L
from jsonargparse import Namespace

from transfer_cli.check_report import config_changes, data_summary, model_summary, render
from transfer_cli.errors import EXIT_OK, DataError, WeightsUnavailableError, as_transfer_error

HELP = """\
usage: transfer check --config R [fit's flags] [--json] [--find_batch_size]

Resolve everything `transfer fit` would, without training and without writing anything, and report:
the settings that differ from the recipe, the data (examples per split and per class, classes with few
examples, unreadable files), the model (parameters in total and trainable under the finetuning
strategy, the head, the preprocessing), and one measured training step and evaluation step on the
requested accelerator and precision, with peak memory and the estimated time per epoch and per run.
Every problem fit would refuse is listed with its exit code, all of them in one report.

options:
  --json              write the report as JSON to stdout (the human report still goes to stderr)
  --find_batch_size   also find the largest batch size that fits (doubling, as Lightning's
                      BatchSizeFinder does; a size fits when two training steps run, and on CUDA when
                      the peak stays under 90% of the device's memory) and print it as a flag to add
  -h, --help          this text

Every other flag is fit's (`transfer fit --help`), e.g. --config, --data.root, --trainer.accelerator.
Exit code: 0 when fit would run; otherwise the code of the first problem listed (2 config, 3 data,
4 checkpoint, 6 resources), problems listed in the order fit meets them.
"""


class Problems:
    """Failures fit would stop at, in the order fit meets them; each once."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.wants_download = False  # data.download asked for: missing data is for `transfer fetch`

    def add(self, err: BaseException) -> None:
        cause = as_transfer_error(err)
        if cause is None:
            raise err
        message = str(cause)
        if isinstance(cause, WeightsUnavailableError) or (self.wants_download and isinstance(cause, DataError)):
            message += " `transfer fetch` with the same flags downloads every file this config needs."
        if all(item["message"] != message for item in self.items):
            self.items.append({"exit_code": cause.exit_code, "kind": type(cause).__name__, "message": message})

    @contextlib.contextmanager
    def collect(self, stand_in: bool = False):
        """Record our errors; re-raise others, unless a stand-in (NoData, NoModel) may have caused them."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - add() re-raises what is not ours
            if not stand_in or as_transfer_error(err) is not None:
                self.add(err)

    @property
    def exit_code(self) -> int:
        return self.items[0]["exit_code"] if self.items else EXIT_OK


class NoData(L.LightningDataModule):
    """Stands in for a datamodule that cannot be built, so the model can still be checked."""

    def __init__(self, class_names: list[str] | None = None):
        super().__init__()
        self.class_names = class_names or ["class_0", "class_1"]


class NoModel(L.LightningModule):
    """Stands in for a model that cannot be built, so the data can still be checked."""

    def __init__(self, class_names: list[str] | None = None):
        super().__init__()


def _cli_class() -> type:
    from transfer_cli.cli import TransferCLI

    class CheckCLI(TransferCLI):
        """fit's CLI, with `fit` replaced by the check and every refusal collected."""

        def __init__(self, args: list[str], find_batch_size: bool, problems: Problems, report: dict[str, Any]):
            # Given by the caller, so what was found survives a constructor that ends in an exception.
            self.problems, self.report = problems, report
            self.find_batch_size = find_batch_size
            self._cli_args = args
            super().__init__(args=["fit", *args])

        def before_instantiate_classes(self) -> None:
            # Before fit's hooks fill in defaults (precision, the run's logger): only what the user changed.
            self.report["config_changes"] = config_changes(self, self._cli_args)
            with self.problems.collect():
                super().before_instantiate_classes()
            data_args = self._subconfig().data.get("init_args")
            if data_args is not None and data_args.get("download"):
                # A check writes nothing, so it never downloads: missing data is reported, naming `fetch`.
                data_args.download = False
                self.problems.wants_download = True

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as err:  # noqa: BLE001
                self.problems.add(err)
                self._check_parts_apart()
                raise _Stop() from None

        def _check_parts_apart(self) -> None:
            """Build the data without the model and the model without the data, so a problem in one
            does not hide a problem in the other; then the trainer and fit's own checks on them."""
            class_names = None
            with self.problems.collect(stand_in=True):
                data = self._instantiate(model=NoModel)["data"]
                class_names = list(data.class_names)
                data.setup("fit")  # text data cannot tokenize without the model's tokenizer: skipped then
            with self.problems.collect(stand_in=True):
                self._instantiate(data=NoData, class_names=class_names)
            try:
                self.config_init = self._instantiate(data=NoData, model=NoModel)
                self.trainer = self.instantiate_trainer()
            except Exception as err:  # noqa: BLE001 - the trainer's own settings
                self.problems.add(err)
                return
            with self.problems.collect():
                self._check_devices()
            with self.problems.collect():
                self.fit_checks(None)[-1]()  # the output location

        def _instantiate(self, data: type | None = None, model: type | None = None, class_names=None) -> Any:
            config = self.config.clone()
            for key, cls in (("data", data), ("model", model)):
                if cls is not None:
                    init_args = Namespace(class_names=class_names) if cls is NoData else Namespace()
                    config["fit"][key] = Namespace(class_path=f"{__name__}.{cls.__name__}", init_args=init_args)
            return self.parser.instantiate_classes(config)["fit"]

        def after_instantiate_classes(self) -> None:
            with self.problems.collect():
                super().after_instantiate_classes()

        def fit(self, **kwargs: Any) -> None:
            for check in self.fit_checks(kwargs.get("ckpt_path")):
                with self.problems.collect():
                    check()
            if not self.problems.items:  # data that failed its checks has no splits to count
                self.report["data"] = data_summary(self.datamodule)
            self.report["model"] = model_summary(self.model, self.trainer)
            if self.problems.items:
                return  # a step on data or settings fit refuses would measure nothing fit will do
            from transfer_cli.check_device import measure

            with self.problems.collect():
                self.report["device"] = measure(self.model, self.datamodule, self.trainer, self.find_batch_size)

        def after_fit(self) -> None:
            pass

    return CheckCLI


class _Stop(Exception):
    """Ends the CLI after the parts were checked apart: there is nothing whole to measure."""


def _split_own_flags(args: list[str]) -> tuple[list[str], bool, bool]:
    rest, as_json, find = [], False, False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--json":
            as_json = True
        elif arg == "--find_batch_size" or arg.startswith("--find_batch_size="):
            value = arg.partition("=")[2]
            if not value and i + 1 < len(args) and args[i + 1].lower() in ("true", "false"):
                i, value = i + 1, args[i + 1]
            find = value.lower() != "false"
        else:
            rest.append(arg)
        i += 1
    return rest, as_json, find


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return EXIT_OK
    args, as_json, find_batch_size = _split_own_flags(args)
    from transfer_cli.cli import quiet_lightning

    quiet_lightning()
    problems, report = Problems(), {}
    # Lightning and the libraries under it print to stdout here and there; stdout is the report's.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            _cli_class()(args, find_batch_size, problems, report)
        except _Stop:
            pass
        except Exception as err:  # noqa: BLE001 - a parse error: nothing else can be checked
            problems.add(err)
    report.update(problems=problems.items, exit_code=problems.exit_code, ok=not problems.items)
    print(render(report), file=sys.stderr)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    return report["exit_code"]
