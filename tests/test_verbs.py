"""The verb table: every verb is in the usage text, reached through the console entry point, and
held to the same exit-code contract."""

from transfer_cli.entry import VERBS, _usage

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
