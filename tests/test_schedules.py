"""The learning-rate schedule: warmup from the first step, decay to zero at the last, and a resumed
run that is extended keeps learning."""

import math

import torch

from transfer_cli.schedules import WarmupDecay


def _lrs(scheduler: WarmupDecay, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])  # the lr the coming step uses
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def _scheduler(**kwargs) -> WarmupDecay:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupDecay(optimizer, **kwargs)


def test_linear_warmup_then_decay_to_zero():
    scheduler = _scheduler(warmup_fraction=0.3, decay="linear")
    scheduler.set_total_steps(10)
    lrs = _lrs(scheduler, 10)
    assert lrs[0] == 0.25 and lrs[2] == 0.75  # warmup of 3 steps starts above zero
    assert lrs[3] == 1.0 and lrs[-1] == 1.0 - 6 / 7
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))


def test_without_warmup_the_first_step_uses_the_full_rate():
    scheduler = _scheduler(warmup_fraction=0.0, decay="cosine")
    scheduler.set_total_steps(4)
    assert _lrs(scheduler, 2) == [1.0, 0.5 * (1 + math.cos(math.pi / 4))]


def test_an_extended_resume_keeps_its_own_length():
    first = _scheduler(warmup_fraction=0.0, decay="linear")
    first.set_total_steps(4)
    _lrs(first, 4)
    resumed = _scheduler(warmup_fraction=0.0, decay="linear")
    resumed.set_total_steps(8)  # the resumed run asks for twice as many steps
    resumed.load_state_dict(first.state_dict())
    assert resumed.total_steps == 8
    assert resumed.optimizer.param_groups[0]["lr"] == 0.5  # step 4 of 8, not 0
