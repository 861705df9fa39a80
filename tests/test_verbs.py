"""The verb table: every verb is in the usage text, reached through the console entry point, and
held to the same exit-code contract."""

import pytest

from transfer_cli import entry
from transfer_cli.entry import VERBS, _usage, main
from transfer_cli.errors import DataError

from conftest import run_transfer


def test_the_usage_text_lists_every_verb_of_the_table():
    usage = _usage()
    for verb, (summary, _) in VERBS.items():
        assert f"  {verb}" in usage and summary in usage


def test_backbones_is_a_verb_of_the_console_script(tmp_path):
    listed = run_transfer("backbones", "--family", "torchvision", "resnet", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.split()
    assert "resnet50" in names and "resnet18" in names and all("resnet" in n for n in names)

    bad = run_transfer("backbones", "--family", "keras", cwd=tmp_path)
    assert bad.returncode == 2 and "keras" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stdout == ""


# Adding a verb is one function and one table entry -------------------------------------------------


def greet(name: str, /, *, times: int = 1, shout: bool = False) -> int | None:
    """Greet someone, once per line on stdout.

    Args:
        name: Who to greet.
        times: How many lines.
        shout: In capitals.
    """
    if name == "nobody":
        raise DataError("nobody is there to greet (name): give a name.")
    for _ in range(times):
        print(f"hello {name}".upper() if shout else f"hello {name}")
    return 5 if name == "five" else None


def passthrough(args: list[str]) -> int:
    """A verb that parses fit's flags through the LightningCLI itself gets the arguments as given."""
    print(repr(args))
    return 0


@pytest.fixture()
def with_test_verbs(monkeypatch):
    verbs = {
        **VERBS,
        "greet": ("Greet someone: NAME [--times N]", "test_verbs:greet"),
        "raw": ("Pass the arguments on", "test_verbs:passthrough"),
    }
    monkeypatch.setattr(entry, "VERBS", verbs)


def test_a_function_in_the_table_is_a_verb_whose_signature_is_its_command_line(with_test_verbs, capsys):
    assert "greet" in entry._usage() and "Greet someone: NAME [--times N]" in entry._usage()
    assert main(["greet", "ada", "--times", "2", "--shout", "true"]) == 0
    assert capsys.readouterr().out == "HELLO ADA\nHELLO ADA\n"
    assert main(["greet", "five"]) == 5  # the function's own exit code
    assert main(["raw", "--trainer.devices", "2", "x"]) == 0
    assert capsys.readouterr().out == "hello five\n['--trainer.devices', '2', 'x']\n"


def test_a_function_verbs_help_comes_from_its_signature_and_docstring(with_test_verbs, capsys):
    assert main(["greet", "--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: transfer greet ")
    for text in ("Greet someone, once per line on stdout.", "name", "Who to greet.", "--times", "How many lines."):
        assert text in shown
    assert main(["backbones", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--family" in shown and "pattern" in shown and "huggingface" in shown


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["greet"], 2, "name"),  # a missing positional argument
        (["greet", "ada", "--times", "two"], 2, "--times"),
        (["greet", "ada", "--tims", "2"], 2, "Did you mean --times?"),
        (["greet", "nobody"], 3, "nobody is there to greet"),  # the function's own TransferError
    ],
)
def test_a_function_verbs_errors_have_the_exit_codes_of_every_verb(with_test_verbs, capsys, args, code, said):
    assert main(args) == code
    captured = capsys.readouterr()
    assert said in captured.err and "Traceback" not in captured.err and captured.out == ""
    assert captured.err.startswith("transfer: error: ")
