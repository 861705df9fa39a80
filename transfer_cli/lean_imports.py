"""Keep `import lightning` from importing transformers, torchvision, scipy and matplotlib via torchmetrics.

Lightning imports torchmetrics (to read its version), and torchmetrics' package imports every metric
module at once; the modules for BERTScore, CLIP, ARNIQA, detection, audio and plots import
transformers, torchvision, scipy.signal and matplotlib when they are installed, which they are here.
That was about a third of the time `transfer predict` took to its first row (benchmarks/RESULTS.md).

torchmetrics decides those imports by truth-testing availability flags (lightning_utilities
`RequirementCache` objects in `torchmetrics.utilities.imports`) and, for scipy, by calling
`package_available`. `torchmetrics_without_extras` has both answer "not installed" for the heavy
packages while the package imports, then lets the flags check again: the metrics transfer uses
(accuracy, mean) are unaffected, and the heavy packages are imported later by whoever needs them (a
torchvision backbone, a HuggingFace one, the report's plots). The price: in a `transfer` process,
torchmetrics' own metrics built on those packages lose what their modules import at the top (their
`.plot()`, BERTScore, CLIP, ARNIQA, detection IoUs); a model of your own that uses them runs with
TRANSFER_LEAN_IMPORTS=0. If torchmetrics changed its layout, nothing is held back and the import is
simply slower.
"""

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

# Substrings of the flag names in torchmetrics.utilities.imports whose packages stay out of start-up.
HEAVY_EXTRAS = ("TRANSFORMERS", "TORCHVISION", "MATPLOTLIB", "SCIPY", "SCIPI")
HEAVY_PACKAGES = ("scipy",)  # asked through lightning_utilities' package_available


def enabled() -> bool:
    """TRANSFER_LEAN_IMPORTS=0 turns off this module's trim and deferred_dynamo's stand-ins."""
    return os.environ.get("TRANSFER_LEAN_IMPORTS", "1") != "0"


def torchmetrics_without_extras() -> None:
    """Import torchmetrics (if nobody has yet) without importing its optional heavy packages."""
    if "torchmetrics" in sys.modules or not enabled():
        return
    flags = _hold_flags()
    try:
        with _packages_unavailable(HEAVY_PACKAGES):
            import torchmetrics  # noqa: F401  (the import whose cost this module exists to cut)
    finally:
        for flag in flags:
            # RequirementCache computes `available` on first use and keeps it as an attribute:
            # removing ours makes the next truth test look at what is really installed.
            flag.__dict__.pop("available", None)
    utilities = sys.modules.get("torchmetrics.utilities")
    if utilities is not None and not hasattr(utilities, "imports"):  # as an ordinary import binds it
        utilities.imports = sys.modules["torchmetrics.utilities.imports"]


def _hold_flags() -> list:
    name = "torchmetrics.utilities.imports"
    try:
        package = importlib.util.find_spec("torchmetrics")
        if package is None or package.origin is None:
            return []
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(os.path.dirname(package.origin), "utilities", "imports.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # torchmetrics' own `from ...imports import X` now finds this one
        spec.loader.exec_module(module)
    except Exception:  # a torchmetrics we do not know: import it the ordinary way
        sys.modules.pop(name, None)
        return []
    flags = [
        value
        for key, value in vars(module).items()
        if any(extra in key for extra in HEAVY_EXTRAS) and hasattr(value, "_check_available")
    ]
    for flag in flags:
        flag.available = False
    return flags


@contextlib.contextmanager
def _packages_unavailable(names: tuple[str, ...]) -> Iterator[None]:
    try:
        from lightning_utilities.core import imports
    except ImportError:
        yield
        return
    original = imports.package_available

    def package_available(package_name: str) -> bool:
        return package_name not in names and original(package_name)

    imports.package_available = package_available
    try:
        yield
    finally:
        imports.package_available = original
        if getattr(sys.modules.get("torchmetrics"), "package_available", None) is package_available:
            sys.modules["torchmetrics"].package_available = original
