"""All-or-nothing output: everything is written in a hidden folder beside the final name and moved
into place only after the parity check passed; a failure or an interrupt leaves no file under the
final names."""

import os
import shutil
import tempfile
from pathlib import Path


class Staging:
    """A hidden temporary folder in the output's own folder (so the final moves are renames)."""

    def __init__(self, final: Path):
        self.final = final
        self.dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))

    def path(self, name: str) -> Path:
        """Where to write what will be `final.parent / name`."""
        return self.dir / name

    def commit(self, names: list[str]) -> None:
        """Move the written names into place, `final` last: its presence means the export is whole."""
        for name in sorted(names, key=lambda n: n == self.final.name):
            _usual_permissions(self.dir / name)
            target = self.final.parent / name
            if target.is_dir() and not target.is_symlink():
                # A directory cannot be replaced by a rename; the old one goes only once the new one is here.
                old = self.dir / f".old-{name}"
                os.rename(target, old)
            os.replace(self.dir / name, target)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _usual_permissions(path: Path) -> None:
    """The modes a plain `open()` would give under the user's umask (some writers make files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
