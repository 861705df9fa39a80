"""Resumable, checked downloads into torch's cache, with progress on stderr."""

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from transfer_cli.errors import WeightsUnavailableError

try:
    import fcntl
except ImportError:  # Windows: no flock; one process per machine downloads there anyway in practice
    fcntl = None

T = TypeVar("T")
TIMEOUT_S = 30
CHUNK = 1 << 20
# torch hub's convention: `name-<first hex digits of the file's sha256>.ext` (resnet18-f37072fd.pth).
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def torch_cache_path(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url (and so TorchvisionBackbone) looks for a URL's file."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def download_file(url: str, dest: Path) -> None:
    """Download `url` to `dest` through `dest.part`: an interrupted download resumes where it stopped
    (an HTTP Range request; a server that ignores it sends the whole file again), and the file gets
    its final name only once complete and, where its name carries a sha256 prefix, checked."""
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
            dest.parent.mkdir(parents=True, exist_ok=True)  # once the server answers: no empty folders offline
            resumed = start > 0 and response.status == 206
            total = int(response.headers.get("Content-Length") or 0) + (start if resumed else 0)
            _copy(response, part, start if resumed else 0, total, dest.name)
    except urllib.error.HTTPError as err:
        if not (start and err.code == 416):  # 416: the part already holds the whole file
            raise
    _check(part, dest.name, url)
    part.replace(dest)


def _copy(response, part: Path, done: int, total: int, name: str) -> None:
    shown = 0.0
    with open(part, "ab" if done else "wb") as out:
        while chunk := response.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            if time.monotonic() - shown >= 1.0:
                shown = time.monotonic()
                _progress(name, done, total)
    _progress(name, done, total)


def _progress(name: str, done: int, total: int) -> None:
    of = f" of {total / 2**20:.1f} MiB ({100 * done / total:.0f}%)" if total else " MiB"
    print(f"transfer: {name}: {done / 2**20:.1f}{of if total else of.strip()}", file=sys.stderr, flush=True)


def _check(part: Path, name: str, url: str) -> None:
    match = HASH_IN_NAME.search(name)
    if match is None:
        return
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        part.unlink()
        raise WeightsUnavailableError(
            f"The file downloaded from {url} is corrupt: its sha256 does not start with {match.group(1)}, as its "
            "name says it must. The partial download was removed; run `transfer fetch` again."
        )


def fetch_once(root: Path, find: Callable[[], T | None], fetch: Callable[[], None]) -> T | None:
    """What `find` finds under `root`, after downloading it with `fetch` unless it is there.

    Every process of a multi-device run prepares its data (torchrun and SLURM start them all at once,
    each before any process group exists): the first to take this machine's lock for `root`
    downloads and unpacks, the others wait for it and then find the files in place, never a half
    unpacked archive. Lightning's own prepare_data (once per node, then a barrier) runs too late for
    the CLI, which reads the data before training starts.
    """
    with _machine_lock(root):
        found = find()
        if found is None:
            fetch()
            found = find()
    return found


@contextlib.contextmanager
def _machine_lock(root: Path) -> Iterator[None]:
    """An exclusive lock held by one process of this machine at a time, named after `root`'s real path
    (in the temporary folder: `root` itself may not exist yet)."""
    if fcntl is None:
        yield
        return
    key = hashlib.sha1(os.fsencode(root.expanduser().resolve())).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"transfer-download-{key}.lock"
    fd = _lock_file(path)
    if fd is None:  # no lock file this user may open: the download goes on unguarded, as before locks
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield
    finally:
        os.close(fd)


def _lock_file(path: Path) -> int | None:
    """The lock file opened for flock: shared by every user of the machine (another user's run on the same
    data root must wait too), so it is made writable by all; flock needs no write access to lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # made by another user, not writable for this one
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None
    except OSError:
        return None
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # past the umask; fails harmlessly on another user's file
    return fd
