"""`transfer VERB --help` from a cache, so it answers without importing torch and Lightning.

A verb's help is built from the signatures of Lightning's Trainer and of our classes, which takes
importing all of them: seconds, where a user at a shell expects an instant answer. The text depends
only on the installed packages, on transfer's own source and on the terminal width, so it is kept
under the user's cache directory keyed by exactly those, and built again whenever one changes. Only
the bare `transfer VERB --help` (or `-h`) is served from the cache: with any other argument (a
`--config` whose values become the defaults shown) the help is built as before.

TRANSFER_HELP_CACHE=0 turns the cache off; TRANSFER_CACHE_DIR moves it (default
$XDG_CACHE_HOME/transfer, else ~/.cache/transfer).
"""

import contextlib
import hashlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The installed packages whose code or docstrings end up in some verb's help.
PACKAGES = (
    "transfer-cli",
    "torch",
    "lightning",
    "jsonargparse",
    "docstring-parser",
    "transformers",
    "timm",
    "torchvision",
)


def is_plain_help(args: list[str]) -> bool:
    return len(args) == 2 and args[1] in ("-h", "--help")


def cached_help(args: list[str], build: Callable[[], int]) -> int:
    """Print the help for `args` (a verb and -h/--help), from the cache or from `build`, which prints it."""
    path = _entry(args)
    if path is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            sys.stdout.write(path.read_text(encoding="utf-8"))
            sys.stdout.flush()
            return 0
    with _recorded_stdout() as recorded:
        code = build()
    if code == 0 and path is not None and recorded.getvalue():
        store(path, recorded.getvalue())
    return code


def cache_root() -> Path:
    """transfer's folder of caches (help texts here, the CPU layouts of memory_format.py)."""
    base = os.environ.get("TRANSFER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "transfer"
    )
    return Path(base)


def cache_dir() -> Path:
    return cache_root() / "help"


def _entry(args: list[str]) -> Path | None:
    if os.environ.get("TRANSFER_HELP_CACHE", "1") == "0":
        return None
    # sys.prefix: two environments share the cache folder; the Python version: argparse's formatting changes.
    stamp = (args[0], sys.version, sys.prefix, _versions(), _source_stamp(), _width())
    key = hashlib.sha256(repr(stamp).encode()).hexdigest()[:32]
    return cache_dir() / f"{args[0]}-{key}.txt"


def _versions() -> tuple[str, ...]:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return tuple(found)


def _source_stamp() -> tuple[tuple[str, int, int], ...]:
    """Every source file of the package with its size and modification time: an editable install
    changes its help without changing its version."""
    root = Path(__file__).resolve().parent
    stamp = []
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            stat = path.stat()
            stamp.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return tuple(stamp)


def _width() -> int:
    # argparse wraps help to the terminal (or $COLUMNS) width.
    return shutil.get_terminal_size().columns


class _Tee(io.TextIOBase):
    def __init__(self, stream: io.TextIOBase):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def getvalue(self) -> str:
        return self.copy.getvalue()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def _recorded_stdout() -> Iterator[_Tee]:
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield tee


def store(path: Path, text: str) -> None:
    """Written whole or not at all (a rename): two processes asking at once never read half of it. A folder
    that cannot be written leaves nothing, and no error: every cache here can be built again."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".help-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
