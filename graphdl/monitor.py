"""Gradient health per layer, in fit's History: `fit(..., monitor=[...])`.

- "grad_norm": the L2 norm of the layer's gradients (all its params together), as the
  backward pass computed them for the batch (before clip_norm or clip_value, the norm
  PyTorch's clip_grad_norm_ returns; with accumulate, each batch's own),
  `history["grad_norm/2:Linear"]`;
- "update_ratio": ‖Δw‖ / ‖w‖, the size of the update the optimizer made to the layer's
  params against theirs before it (measured, so it is the real step of any optimizer,
  with its momentum, per-group rates, weight decay, clipping and accumulation: for plain
  SGD it is lr·‖g‖/‖w‖), `history["update_ratio/2:Linear"]`; a healthy run is often
  near 1e-3;
- "dead_relu": the fraction of a ReLU layer's units that are 0 for every example of the
  batch (a unit is an output feature, or a channel at one position of a feature map),
  `history["dead_relu/1:ReLU"]`.

Each is the mean over the epoch's batches ("update_ratio": over its updates). The
gradient norms and dead fractions are computed inside the step, as IR nodes appended to
its gradient graph (`add_monitors`: per layer the sum of squares of its gradients, per
ReLU layer the fraction of dead units, each a scalar output labelled "gg/<layer>" or
"dead/<layer>", after the loss, the buffers' next values and the gradients); the update
ratios around the update, from a copy of the params taken before it (`Watch`). The step
keeps each batch's values on the device, and fit reduces them (`epoch_values`) and reads
them in the one host sync an epoch already has. Without `monitor` the step's graph and
its update are as they were.
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
    """Append the monitored values to a gradient graph that outputs the gradients of `wrt`
    (labelled "d/d<name>", as `grad` makes them), as scalar outputs after every output it
    has; edits and returns `graph`. Their labels say what each is: "gg/<layer>" (the sum
    of squares of the layer's gradients), "dead/<layer>"."""
    position = {label: i for i, label in enumerate(graph.output_labels)}
    gradients = [graph.outputs[position[f"d/d{name}"]] for name in wrt]
    with graph.scope("monitor"):
        if "grad_norm" in monitor:
            for layer, members in param_layers(graph, wrt).items():
                graph.output(_squares([gradients[i] for i in members]), label=f"gg/{layer}")
        if "dead_relu" in monitor:
            seen: dict[str, int] = {}
            for node in [n for n in graph.nodes if n.op is relu and not n.backward and n.out.ndim]:
                alive = greater(reduce_sum(node.out, axis=0), 0.0)  # a unit is alive if one example lit it
                name = _label(node.scope or "relu")  # (gd.relu called outside any layer: "relu")
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:  # a second relu of one layer, or of none: "relu.2"
                    name = f"{name}.{seen[name]}"
                graph.output(sub(1.0, reduce_mean(alive)), label=f"dead/{name}")
    return graph


def param_layers(graph: Graph, wrt: list[str]) -> dict[str, list[int]]:
    """The layers of the params `wrt`, in their order: {layer: the positions in wrt of its params}."""
    layers: dict[str, list[int]] = {}
    for i, name in enumerate(wrt):
        layers.setdefault(_layer(graph.value(name)), []).append(i)
    return layers


def _layer(param: Value) -> str:
    """The layer a param belongs to: the scope of the first forward node that reads it."""
    scopes = [u.scope for u in param.users if not u.backward and u.scope and u.scope != "monitor"]
    return _label(scopes[0] if scopes else param.name)


def _label(text: str) -> str:
    """A layer's name as an output label takes it (letters, digits, _ . / : - ')."""
    return re.sub(r"[^A-Za-z0-9_./:'-]", "_", text)


def _squares(values: list[Value]) -> Value:
    total = reduce_sum(mul(values[0], values[0]))
    for v in values[1:]:
        total = add(total, reduce_sum(mul(v, v)))
    return total


class Watch:
    """What a monitored step keeps, on the device: each batch's monitored outputs (`rows`)
    and, for "update_ratio", each update's ‖Δw‖/‖w‖ per layer (`ratios`), measured
    against a copy of the params taken just before the update (`before_update`,
    `after_update`). No host sync."""

    def __init__(self, graph: Graph, names: list[str], params: list[torch.Tensor], first: int,
                 monitor: tuple[str, ...]) -> None:
        self.first = first  # the index of the first monitored output (after the gradients)
        self.labels: tuple[str, ...] = graph.output_labels[first:]
        self.params = params
        groups = param_layers(graph, names) if "update_ratio" in monitor else {}
        self.layers = list(groups)
        self.rows: list[torch.Tensor] = []
        self.ratios: list[torch.Tensor] = []
        self._before: list[torch.Tensor] = []
        self._members: torch.Tensor | None = None
        if groups:
            device = params[0].device if params else None
            members = torch.zeros(len(groups), len(params), dtype=torch.float64)
            for j, positions in enumerate(groups.values()):
                members[j, positions] = 1.0
            self._members = members.to(device)  # [layers, params]: which params each layer holds
            self._before = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    def batch(self, out: tuple[torch.Tensor, ...]) -> None:
        """Keep a batch's monitored outputs (in arena buffers the next batch overwrites)."""
        if self.labels:
            self.rows.append(torch.stack([v.reshape(()) for v in out[self.first:]]))

    def before_update(self) -> None:
        if self._before:
            torch._foreach_copy_(self._before, self.params)

    def after_update(self) -> None:
        if not self._before:
            return
        moved = torch.stack(torch._foreach_norm(torch._foreach_sub(self.params, self._before), 2.0)).double()
        held = torch.stack(torch._foreach_norm(self._before, 2.0)).double()
        tiny = torch.finfo(torch.float64).tiny  # a layer of zeros: a large ratio, not inf
        self.ratios.append((self._members @ moved.square()).sqrt() / (self._members @ held.square()).sqrt()
                           .clamp_min(tiny))

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batches' rows [batches, labels], the updates' ratios [updates, layers]), and forget them."""
        device = self.params[0].device if self.params else None
        rows = torch.stack(self.rows) if self.rows else torch.empty(0, len(self.labels), device=device)
        ratios = torch.stack(self.ratios) if self.ratios else \
            torch.empty(0, len(self.layers), dtype=torch.float64, device=device)
        self.rows, self.ratios = [], []
        return rows, ratios

    def keys(self, monitor: tuple[str, ...]) -> list[str]:
        """The History keys, in `epoch_values`' order."""
        return history_keys(self.labels, self.layers, monitor)


def history_keys(labels: tuple[str, ...], layers: list[str], monitor: tuple[str, ...]) -> list[str]:
    """The History keys of the monitored outputs `labels` and update ratios of `layers`."""
    norms = [label.split("/", 1)[1] for label in labels if label.startswith("gg/")]
    dead = [label.split("/", 1)[1] for label in labels if label.startswith("dead/")]
    per = {"grad_norm": norms, "update_ratio": layers, "dead_relu": dead}
    return [f"{name}/{layer}" for name in monitor for layer in per[name]]


def epoch_values(watch: Watch, monitor: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each History key's number for the epoch, a float64 0-d tensor on the device (not
    yet read): the mean over the epoch's batches (its updates, for "update_ratio")."""
    rows, ratios = watch.take()
    rows = rows.double()
    column = {label: rows[:, j] for j, label in enumerate(watch.labels)}
    layer = {name: j for j, name in enumerate(watch.layers)}
    values: dict[str, torch.Tensor] = {}
    for key in watch.keys(monitor):
        name, of = key.split("/", 1)
        if name == "grad_norm":
            values[key] = column[f"gg/{of}"].sqrt().mean()
        elif name == "update_ratio":
            values[key] = ratios[:, layer[of]].mean()
        else:
            values[key] = column[f"dead/{of}"].mean()
    return values


__all__ = ["MONITORS", "Watch", "add_monitors", "checked_monitor", "epoch_values", "history_keys", "param_layers"]
