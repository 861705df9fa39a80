"""A training checkpoint of an earlier version, whose backbone had parameters it now holds as buffers,
resumes with the optimizer state of every parameter that remains, each on its own parameter."""

import torch
from torch import nn

from transfer_cli.backbones.base import Backbone
from transfer_cli.optimizer_state import drop_former_parameters


class Layers(Backbone):
    """Three layers; `held` names the middle one's tensors, which this version keeps as buffers."""

    def __init__(self, hold_middle: bool):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.middle, self.last = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.num_features = 2
        self.hold_middle = hold_middle
        if hold_middle:
            for name, param in list(self.middle.named_parameters()):
                delattr(self.middle, name)
                self.middle.register_buffer(name, param.detach())

    def forward(self, inputs):
        return self.last(self.first(inputs))

    def former_parameter_names(self):
        return (
            None
            if not self.hold_middle
            else [f"{m}.{p}" for m in ("first", "middle", "last") for p in ("weight", "bias")]
        )


def _trained_state(backbone: Backbone, head: nn.Module) -> dict:
    groups = [
        {"params": list(head.parameters()), "name": "head"},
        {"params": list(backbone.parameters()), "name": "backbone"},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    for _ in range(2):
        loss = head(backbone.first(torch.randn(4, 3))).sum() + sum(p.sum() for p in backbone.parameters())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer.state_dict()


def test_the_remaining_parameters_get_their_own_moments_when_held_ones_sit_mid_group():
    head = nn.Linear(3, 2)
    old_backbone = Layers(hold_middle=False)
    checkpoint = {"optimizer_states": [_trained_state(old_backbone, head)]}
    saved = checkpoint["optimizer_states"][0]
    # Positions in the old groups: head 0-1, backbone first 2-3, middle 4-5 (now buffers), last 6-7.
    expected = {name: saved["state"][i]["exp_avg"].clone() for i, name in [(2, "first.weight"), (7, "last.bias")]}

    new_backbone = Layers(hold_middle=True)
    drop_former_parameters(checkpoint, new_backbone)
    groups = [
        {"params": list(head.parameters()), "name": "head"},
        {"params": list(new_backbone.parameters()), "name": "backbone"},
    ]
    resumed = torch.optim.AdamW(groups, lr=0.1)
    resumed.load_state_dict(checkpoint["optimizer_states"][0])  # refused before: the group sizes differ
    by_name = dict(new_backbone.named_parameters())
    for name, moment in expected.items():
        torch.testing.assert_close(resumed.state[by_name[name]]["exp_avg"], moment, rtol=0, atol=0)
    assert len(resumed.state) == 2 + 4  # the head's two and the backbone's four remaining tensors


def test_a_checkpoint_of_todays_layout_is_left_as_it_is():
    head, backbone = nn.Linear(3, 2), Layers(hold_middle=True)
    state = _trained_state(backbone, head)
    checkpoint = {"optimizer_states": [state]}
    before = [list(g["params"]) for g in state["param_groups"]]
    drop_former_parameters(checkpoint, backbone)
    assert [list(g["params"]) for g in checkpoint["optimizer_states"][0]["param_groups"]] == before
