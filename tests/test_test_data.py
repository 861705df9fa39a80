"""The suite's own contract: real-data tests skip only outside CI, never silently under CI=true."""

import os
import subprocess
import sys

from conftest import REPO

# A real-data test that needs nothing but the CIFAR-10 pickles, in a module that imports neither torch nor
# Lightning: the two pytest runs below then take seconds.
REAL_DATA_TEST = "tests/test_test_data.py::test_the_cifar_pickles_are_where_the_suite_reads_them"


def test_the_cifar_pickles_are_where_the_suite_reads_them(cifar_root):
    found = {p.name for p in (cifar_root / "cifar-10-batches-py").iterdir()}
    assert {"batches.meta", "data_batch_1", "test_batch"} <= found, sorted(found)


def _pytest(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["TRANSFER_TEST_DATA"] = str(tmp_path / "no-data-here")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", REAL_DATA_TEST],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_missing_real_data_fails_under_ci_and_skips_with_a_reason_elsewhere(tmp_path):
    in_ci = _pytest(tmp_path, "true")
    assert in_ci.returncode == 1, in_ci.stdout[-2000:]
    assert "1 error" in in_ci.stdout and "CI must run this test" in in_ci.stdout

    local = _pytest(tmp_path, None)
    assert local.returncode == 0, local.stdout[-2000:]
    assert "1 skipped" in local.stdout
    assert "no-data-here" in local.stdout  # the reason names where it looked (-ra lists it)
