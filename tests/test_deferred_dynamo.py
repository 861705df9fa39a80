"""torch._dynamo stays unimported while Lightning and torchvision import, and what they took from it
still behaves as the real thing once something is compiled (transfer_cli/deferred_dynamo.py)."""

import subprocess
import sys

import pytest

# Lightning and torchvision imported under the stand-ins, then a real compile: each name they took
# must answer as torch._dynamo's own does. backend="eager": dynamo's tracing, no C++ compiler.
COMPILED_AFTERWARDS = """
import torch
from transfer_cli import deferred_dynamo

def twice(x):
    return x * 2

with deferred_dynamo.deferred():
    import lightning.pytorch
    import torchvision.ops
    from lightning.fabric.wrappers import OptimizedModule, _unwrap_compiled
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
    skipped = torch.compiler.disable(twice)
    assert not deferred_dynamo.is_loaded()
assert not deferred_dynamo.is_loaded()
assert skipped(torch.ones(1)).item() == 2.0
assert isinstance(_ResultCollection.log, type(twice))

boxes = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]])
pooled = torchvision.ops.roi_align(torch.arange(16.0).view(1, 1, 4, 4), boxes, output_size=2)
assert pooled.shape == (1, 1, 2, 2), pooled.shape

module = torch.nn.Linear(2, 2)
assert not isinstance(module, OptimizedModule)
compiled = torch.compile(module, backend="eager")
assert deferred_dynamo.is_loaded()
assert isinstance(compiled, OptimizedModule) and issubclass(type(compiled), OptimizedModule)
assert _unwrap_compiled(compiled)[0] is module
assert not isinstance(module, OptimizedModule)

# disable() kept its meaning: a whole-graph compile of a caller must stop at the disabled function.
def calls_skipped(x):
    return skipped(x) + 1

try:
    torch.compile(calls_skipped, backend="eager", fullgraph=True)(torch.ones(1))
except Exception as error:
    # dynamo's own words for a disabled function (not an error about the wrapper around it)
    assert "Skip calling" in str(error) or "Skip inlining" in str(error), error
else:
    raise AssertionError("the disabled function was traced into")
assert torch.compile(calls_skipped, backend="eager")(torch.ones(1)).item() == 3.0
print("ok")
"""

# Anything else of torch._dynamo, asked for inside the block, is the real module at once.
ANYTHING_ELSE = """
import sys, torch
from transfer_cli import deferred_dynamo

with deferred_dynamo.deferred():
    import torch._dynamo.config as config
    assert deferred_dynamo.is_loaded()
    assert isinstance(config.cache_size_limit, int)
    import torch._dynamo
    assert torch._dynamo.reset is sys.modules["torch._dynamo"].reset
print("ok")
"""

ATTRIBUTE = """
import sys, torch
from transfer_cli import deferred_dynamo

with deferred_dynamo.deferred():
    stand_in = sys.modules["torch._dynamo"]
    reset = stand_in.reset
    assert deferred_dynamo.is_loaded() and reset is sys.modules["torch._dynamo"].reset
    assert sys.modules["torch._dynamo"] is not stand_in
print("ok")
"""


A_CLASS = """
import torch
from transfer_cli import deferred_dynamo

with deferred_dynamo.deferred():
    @torch.compiler.disable  # the real disable patches a class in place: still a class
    class Kept:
        pass

    assert deferred_dynamo.is_loaded()
assert isinstance(Kept(), Kept)
print("ok")
"""


@pytest.mark.parametrize(
    "script",
    [COMPILED_AFTERWARDS, ANYTHING_ELSE, ATTRIBUTE, A_CLASS],
    ids=["compiled", "submodule", "attribute", "class"],
)
def test_stand_ins_answer_as_torch_dynamo_does(script, tmp_path):
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
