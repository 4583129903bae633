"""graphdl's optimizers (SGD, Adam, AdamW, RMSprop, Adagrad) and learning-rate schedules.

Each optimizer follows torch.optim's update rule, defaults and argument names, and updates
the live param tensors in place with one fused multi-tensor kernel where torch has one
that is right for the params' dtype and device (`_fused_sgd_`, `_fused_adam_`,
`_fused_adamw_`, `_fused_adagrad_`: the kernels behind torch.optim's `fused=True`), else
with a few `torch._foreach_*` ops: either way a handful of kernel launches per step
whatever the number of params, and no host sync (step counts and rates live in tensors).

They share one protocol (`Optimizer`), which is all that the training step, fit, its
checkpoints and data-parallel training use:

- `reset(params, names)`, `carry(before, after, params, names)`: the per-param state
  (moments, velocities, step counts), made afresh or kept across a change of the model;
- `plan(params, grads)` -> a function applying one update, at the rate of `set_lr`;
  `update` and `step` apply one directly;
- `state_tensors()` (every state tensor: snapshots, broadcasts), `state_dict()` /
  `load_state_dict()` (named and checked, for checkpoints) and `config()`.

Parameter groups: every optimizer takes `groups=`, per-param overrides of its settings,
as a list of {"params": [names], setting: value} or a function (name, tensor) ->
{setting: value} or None. Names are the model's ("0.weight", "2.bias"): a list may name
a tied tensor by any of its places, a function is called once per tensor, with its first
place's name. A name that matches nothing is refused, listing the names there are. A
group's "lr" keeps its ratio to the optimizer's lr, so a schedule scales every group
alike, as torch's multiplicative schedulers do.
"""

from __future__ import annotations

from .base import Optimizer, check_apart, check_updatable, checked_optimizer
from .kernels import fused_works
from .optimizers import SGD, Adagrad, Adam, AdamW, RMSprop
from .schedules import Constant, CosineDecay, ExponentialDecay, LinearWarmup, OneCycle, PerStep, Schedule, StepDecay

__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "checked_optimizer", "check_apart", "check_updatable",
    "Schedule", "Constant", "StepDecay", "ExponentialDecay", "CosineDecay", "LinearWarmup", "OneCycle", "PerStep",
    "fused_works",
]
