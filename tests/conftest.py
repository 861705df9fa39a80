"""Shared test fixtures: real data from ../shared/data (or $TRANSFER_TEST_DATA), and CLI runners."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TRANSFER_TEST_DATA", REPO.parent / "shared" / "data"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_unless_ci(reason: str) -> None:
    """Skip a test whose real inputs are absent here; under CI the same absence fails the run, so a
    CI that lost its data (or the packaged model) cannot turn green by skipping what matters."""
    if in_ci():
        pytest.fail(f"{reason}; CI must run this test (CI=true)")
    pytest.skip(reason)


def _need(path: Path) -> Path:
    if not path.exists():
        skip_unless_ci(f"real test data not found at {path} (set TRANSFER_TEST_DATA)")
    return path


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    return _need(DATA / "cifar10")


@pytest.fixture(scope="session")
def imagefolder_root() -> Path:
    return _need(DATA / "cifar10" / "imagefolder_jpg")


@pytest.fixture(scope="session")
def mnli_root() -> Path:
    return _need(DATA / "mnli")


@pytest.fixture()
def offline_env(tmp_path, monkeypatch) -> dict[str, str]:
    """An environment with no network caches: torch and HuggingFace look only under tmp_path."""
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("TORCH_HOME", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, env[key])
    return env


# Tests send Ctrl-C (SIGINT) to the transfer processes they start. A shell that runs the suite in the
# background without job control (`pytest ... &` in a script) starts it with SIGINT ignored, and an
# ignored signal stays ignored in every child: give this process Python's own handler, so the children
# it starts get the default one and turn Ctrl-C into KeyboardInterrupt as in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

# The suite runs two test processes on two cores, and most tests start `transfer` processes of their
# own: with torch's default of one thread per core, their OpenMP threads spin waiting for each other's
# (the same tests took about 10% longer). Set OMP_NUM_THREADS to run them otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# `transfer VERB --help` keeps its text in a cache (transfer_cli.help_cache); the suite's goes to a
# folder of its own, never the user's ~/.cache.
os.environ.setdefault("TRANSFER_CACHE_DIR", tempfile.mkdtemp(prefix="transfer-test-cache-"))


def run_transfer(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None, timeout: int = 300
):
    """Run the real console entry point in a subprocess (the shell contract: exit code, stdout, stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "transfer_cli", *map(str, args)],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Small, fast image model for tests: ResNet18 (has BatchNorm) at 32 px, random weights.
def two_class_folder(imagefolder_root: Path, root: Path, per_class: int) -> Path:
    """An image folder (train/cat, train/dog) of links to the first real JPEGs of the shared folder."""
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for jpg in sorted((imagefolder_root / "train" / name).glob("*.jpg"))[:per_class]:
            (root / "train" / name / jpg.name).symlink_to(jpg)
    return root


TINY_IMAGE_BACKBONE = (
    "--model.init_args.backbone.init_args.name=resnet18",
    "--model.init_args.backbone.init_args.weights=null",
    "--model.init_args.backbone.init_args.image_size=32",
)


@pytest.fixture()
def decodes(tmp_path, monkeypatch):
    """Counts image decodes in this process, its threads and loader workers (forked: they append to a file)."""
    import transfer_cli.data.images as images

    log = tmp_path / "decodes.log"
    real = images.read_image

    def counted(path):
        with open(log, "a") as f:
            f.write(f"{path}\n")
        return real(path)

    monkeypatch.setattr(images, "read_image", counted)
    return lambda: len(log.read_text().splitlines()) if log.exists() else 0
