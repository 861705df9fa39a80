"""Training checkpoints of earlier versions, made to resume under this one."""

from typing import Any

from transfer_cli.backbones.base import Backbone


def drop_former_parameters(checkpoint: dict[str, Any], backbone: Backbone, group: str = "backbone") -> None:
    """Remove, in place, the optimizer state of backbone tensors that are no longer parameters.

    torch's Optimizer.load_state_dict pairs saved and current parameters by position and refuses a
    group of another size. A checkpoint whose backbone group lists the former parameters (for
    example a HuggingFace pooler, since held as buffers) loses those entries and their state; the
    rest of the optimizer state (moments, step counts) resumes as saved.
    """
    former = backbone.former_parameter_names()
    if former is None:
        return
    current = {name for name, _ in backbone.named_parameters()}
    gone = [position for position, name in enumerate(former) if name not in current]
    for state in checkpoint.get("optimizer_states") or []:
        for saved in state.get("param_groups", []):
            if saved.get("name") != group or len(saved["params"]) != len(former):
                continue
            ids = saved["params"]
            for position in gone:
                state.get("state", {}).pop(ids[position], None)
            saved["params"] = [pid for position, pid in enumerate(ids) if position not in set(gone)]
