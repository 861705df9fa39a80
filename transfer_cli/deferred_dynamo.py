"""Keep `import lightning` and `import torchvision` from importing torch._dynamo, which nothing needs
until something is compiled.

Importing torch._dynamo (with sympy, torch.fx's symbolic shapes, torch.distributed's tensor and FSDP
modules) takes as long as importing torch itself: about 2 of the 7 seconds every `transfer` process
spent importing on a 2-core CPU (benchmarks/README.md). Lightning imports it for one class,
`from torch._dynamo import OptimizedModule` (isinstance checks on compiled modules), and for
`torch.compiler.disable` on a few of its methods; torchvision imports `torch._dynamo.utils` for one
function, `is_compile_supported`, called inside `roi_align`.

While `deferred()` is open, `torch._dynamo` and `torch._dynamo.utils` are stand-ins that answer exactly
those names without the real import:

- `OptimizedModule` is a class whose isinstance and issubclass tests ask the real class once
  torch._dynamo is loaded; before that no object can be one (torch.compile loads it).
- `disable(fn)` returns `fn` wrapped so that it runs as the real `torch._dynamo.disable(fn)` does once
  torch._dynamo is loaded, and as `fn` before (nothing is being compiled then).
- `is_compile_supported` imports the real function on first call.

Any other name, and any other `torch._dynamo.*` submodule, imports the real torch._dynamo at once
and removes the stand-ins, so a newer Lightning or torchvision that needs more of it only starts slower,
never differently. The stand-ins are removed when the block ends: everything imported later (and
torch.compile, `--model.compile`) gets the real module. TRANSFER_LEAN_IMPORTS=0 turns this off with
the torchmetrics one (lean_imports.py).
"""

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

DYNAMO = "torch._dynamo"
_STANDS: dict[str, types.ModuleType] = {}


def is_loaded() -> bool:
    """Whether the real torch._dynamo has been imported in this process."""
    module = sys.modules.get(DYNAMO)
    return module is not None and not isinstance(module, _StandIn)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Imports inside the block see the stand-ins for torch._dynamo (see the module docstring)."""
    from transfer_cli.lean_imports import enabled

    if DYNAMO in sys.modules or not enabled():
        yield
        return
    import torch  # the parent package first, as an ordinary import loads it

    dynamo, utils = _StandIn(DYNAMO), _StandIn(f"{DYNAMO}.utils")
    # Where the real ones live (found, not executed): find_spec, __file__ and __path__ answer as theirs.
    spec = importlib.machinery.PathFinder.find_spec(DYNAMO, torch.__path__)
    utils_spec = spec and importlib.machinery.PathFinder.find_spec(f"{DYNAMO}.utils", spec.submodule_search_locations)
    for stand_in, real_spec in ((dynamo, spec), (utils, utils_spec)):
        if real_spec is not None:
            stand_in.__spec__, stand_in.__file__ = real_spec, real_spec.origin
    dynamo.__path__ = list(spec.submodule_search_locations) if spec else []  # _RealOnDemand sees imports first
    dynamo.OptimizedModule = OptimizedModule
    dynamo.disable = disable
    utils.is_compile_supported = is_compile_supported
    _STANDS.update({DYNAMO: dynamo, f"{DYNAMO}.utils": utils})
    sys.modules.update(_STANDS)
    finder = _RealOnDemand()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)
        _remove_stand_ins()


def _remove_stand_ins() -> None:
    for name, stand_in in list(_STANDS.items()):
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
    _STANDS.clear()


def _real(name: str) -> types.ModuleType:
    _remove_stand_ins()
    return importlib.import_module(name)


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real(self.__name__), name)


class _RealOnDemand(importlib.abc.MetaPathFinder):
    """`import torch._dynamo.X` for an X without a stand-in: the real package, then its real X."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith(f"{DYNAMO}.") or name in _STANDS or not isinstance(sys.modules.get(DYNAMO), _StandIn):
            return None
        parent = _real(DYNAMO)
        if name not in sys.modules:  # not imported by the package itself: found (or not) the ordinary way
            return importlib.machinery.PathFinder.find_spec(name, parent.__path__)
        # The import system is already past its sys.modules check: hand it the module just imported.
        return importlib.util.spec_from_loader(name, _Imported(sys.modules[name]))


class _Imported(importlib.abc.Loader):
    def __init__(self, module: types.ModuleType):
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set ours; the module keeps its own


def _real_optimized_module() -> type | None:
    # The name Lightning imports, wherever torch defines it.
    return getattr(sys.modules[DYNAMO], "OptimizedModule", None) if is_loaded() else None


class _AsksTheRealClass(type):
    def __instancecheck__(cls, instance: Any) -> bool:
        real = _real_optimized_module()
        return real is not None and isinstance(instance, real)

    def __subclasscheck__(cls, subclass: type) -> bool:
        real = _real_optimized_module()
        return real is not None and issubclass(subclass, real)


class OptimizedModule(metaclass=_AsksTheRealClass):
    """Stands for torch._dynamo.OptimizedModule in isinstance and issubclass tests."""


def disable(fn: Any = None, recursive: bool = True, **options: Any) -> Any:
    if isinstance(fn, (type, sys.modules["torch"].nn.Module)):
        # torch._dynamo patches a class in place and wraps a module in an OptimizedModule: the real one.
        return _real(DYNAMO).disable(fn, recursive, **options)
    if fn is None:
        return lambda function: disable(function, recursive, **options)
    real: list[Any] = []

    @functools.wraps(fn)
    def disabled_once_dynamo_is_loaded(*args: Any, **kwargs: Any) -> Any:
        if not is_loaded():
            return fn(*args, **kwargs)
        if not real:
            real.append(sys.modules[DYNAMO].disable(fn, recursive, **options))
        return real[0](*args, **kwargs)

    # What dynamo reads off a disabled function: it calls this one as it calls the real wrapper.
    disabled_once_dynamo_is_loaded._torchdynamo_disable = True
    disabled_once_dynamo_is_loaded._torchdynamo_disable_msg = options.get("reason")
    disabled_once_dynamo_is_loaded._torchdynamo_disable_recursive = recursive
    disabled_once_dynamo_is_loaded._torchdynamo_orig_callable = fn
    disabled_once_dynamo_is_loaded._torchdynamo_wrapper_id = id(disabled_once_dynamo_is_loaded)
    return disabled_once_dynamo_is_loaded


def is_compile_supported(device_type: Any) -> bool:
    return _real(f"{DYNAMO}.utils").is_compile_supported(device_type)
