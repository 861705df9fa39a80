"""transfer: finetune pretrained backbones from the command line.

Importing this package stays cheap (no torch, lightning or transformers) so that `transfer --help`
and `transfer --version` answer at once; the heavy modules are imported by the subcommands.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("transfer-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
