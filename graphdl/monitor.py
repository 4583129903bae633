"""Gradient health per layer, in fit's History: `fit(..., monitor=[...])`.

- "grad_norm": the L2 norm of the layer's gradients (all its params together),
  `history["grad_norm/2:Linear"]`;
- "update_ratio": lr·‖g‖ / ‖w‖, the size of SGD's step against the weights' (without
  momentum it is the update itself; with momentum γ the steady update is about 1/(1−γ)
  times it), `history["update_ratio/2:Linear"]`; a healthy run is often near 1e-3;
- "dead_relu": the fraction of a ReLU layer's units that are 0 for every example of the
  batch, `history["dead_relu/1:ReLU"]`.

Each is the mean over the epoch's batches. They are computed inside the step, as IR
nodes appended to its gradient graph (`add_monitors`: per layer the sums of squares of
its gradients and weights, per ReLU layer the fraction of dead units, each a scalar
output labelled "gg/<layer>", "ww/<layer>" or "dead/<layer>"); the step keeps each
batch's on the device, and fit reduces them (`epoch_values`) and reads them in the one
host sync an epoch already has. Without `monitor` the step's graph is as it was.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .ir import Graph, Value
from .ops import add, greater, mul, reduce_mean, reduce_sum, relu, sub

MONITORS = ("grad_norm", "update_ratio", "dead_relu")


def checked_monitor(monitor: Any) -> tuple[str, ...]:
    """`monitor` as a tuple of names from MONITORS (None: none); else a ValueError saying what to pass."""
    if monitor is None:
        return ()
    if isinstance(monitor, str) or not isinstance(monitor, (list, tuple)) or not all(
            isinstance(m, str) and m in MONITORS for m in monitor) or len(set(monitor)) != len(monitor):
        raise ValueError(f"monitor must be a list of distinct names from {', '.join(map(repr, MONITORS))}, "
                         f"e.g. monitor=['grad_norm', 'update_ratio'], got {monitor!r}")
    return tuple(monitor)


def add_monitors(graph: Graph, wrt: list[str], monitor: tuple[str, ...]) -> Graph:
    """Append the monitored values to a gradient graph whose outputs are the loss and the
    gradients of `wrt` (what `grad` gives), as scalar outputs after them; edits and
    returns `graph`. Their labels say what each is: "gg/<layer>" (the sum of squares of
    the layer's gradients), "ww/<layer>" (of its params), "dead/<layer>"."""
    norms, weights = "grad_norm" in monitor or "update_ratio" in monitor, "update_ratio" in monitor
    gradients = graph.outputs[1:1 + len(wrt)]
    layers: dict[str, list[tuple[Value, Value]]] = {}
    for name, g in zip(wrt, gradients):
        param = graph.value(name)
        layers.setdefault(_layer(param), []).append((param, g))
    with graph.scope("monitor"):
        for layer, members in layers.items():
            if norms:
                graph.output(_squares([g for _, g in members]), label=f"gg/{layer}")
            if weights:
                graph.output(_squares([p for p, _ in members]), label=f"ww/{layer}")
        if "dead_relu" in monitor:
            for node in [n for n in graph.nodes if n.op is relu and not n.backward and n.out.ndim]:
                alive = greater(reduce_sum(node.out, axis=0), 0.0)  # a unit is alive if one example lit it
                graph.output(sub(1.0, reduce_mean(alive)), label=f"dead/{_label(node.scope or 'relu')}")
    return graph


def _layer(param: Value) -> str:
    """The layer a param belongs to: the scope of the first forward node that reads it."""
    scopes = [u.scope for u in param.users if not u.backward and u.scope]
    return _label(scopes[0] if scopes else param.name)


def _label(text: str) -> str:
    """A layer's name as an output label takes it (letters, digits, _ . / : - ')."""
    return re.sub(r"[^A-Za-z0-9_./:'-]", "_", text)


def _squares(values: list[Value]) -> Value:
    total = reduce_sum(mul(values[0], values[0]))
    for v in values[1:]:
        total = add(total, reduce_sum(mul(v, v)))
    return total


def history_keys(labels: tuple[str, ...], monitor: tuple[str, ...]) -> list[str]:
    """The History keys the monitored outputs `labels` give, in `epoch_values`' order."""
    layers = [label.split("/", 1)[1] for label in labels if label.startswith("gg/")]
    dead = [label.split("/", 1)[1] for label in labels if label.startswith("dead/")]
    keys = []
    for name in monitor:
        keys += [f"{name}/{layer}" for layer in (dead if name == "dead_relu" else layers)]
    return keys


def epoch_values(labels: tuple[str, ...], rows: torch.Tensor, lr: float,
                 monitor: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each History key's number for the epoch, a float64 0-d tensor on the device (not
    yet read): the mean over the batches, `rows` holding one row of the monitored
    outputs (in `labels`' order) per batch."""
    rows = rows.double()
    column = {label: rows[:, j] for j, label in enumerate(labels)}
    values: dict[str, torch.Tensor] = {}
    for key in history_keys(labels, monitor):
        name, layer = key.split("/", 1)
        if name == "grad_norm":
            values[key] = column[f"gg/{layer}"].sqrt().mean()
        elif name == "update_ratio":
            tiny = torch.finfo(torch.float64).tiny  # a layer of zeros: a large ratio, not inf
            values[key] = (lr * column[f"gg/{layer}"].sqrt() / column[f"ww/{layer}"].sqrt().clamp_min(tiny)).mean()
        else:
            values[key] = column[f"dead/{layer}"].mean()
    return values
