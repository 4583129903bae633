"""Every way a user changes a model reaches every compiled entry point the next time it
runs, or is refused with a clear error: each change (a column of the table below) is
applied to a model whose entry points have already compiled and run, and each entry
point must then give what it gives on a fresh model built as the changed one is.

The table is the property: change x entry point. A change that leaves no graph the
same (a layer replaced or added, a dtype changed) may instead be refused, for the entry
points that hold a graph of their own (a compiled gradient graph the user keeps), with a
GraphError that says to build it again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import graphdl as gd

CUDA = torch.cuda.is_available()


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(24, 2, generator=gen) * 4 - 1
    return X.to(dtype), torch.sin(X.sum(1, keepdim=True)).to(dtype)


def model() -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    X, _ = data()
    return gd.Sequential(gd.Standardize().adapt(X), gd.Linear(2, 6, generator=gen), gd.Tanh(),
                         gd.Linear(6, 6, generator=gen), gd.Tanh(), gd.Linear(6, 6, generator=gen), gd.Tanh(),
                         gd.Linear(6, 1, generator=gen))


def tensor(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def to_float64(m: gd.Sequential) -> None:
    for _, layer, short, _, t in m.places():
        setattr(layer, short, t.double())


def no_grad_edit(m: gd.Sequential) -> None:
    with torch.no_grad():
        m.layers[1].weight.mul_(1.5)
        m.layers[3].bias.add_(0.25)


# What a user does to a model, each in one line: the columns of the table.
CHANGES: dict[str, Callable[[gd.Sequential], None]] = {
    "assign": lambda m: setattr(m.layers[3], "weight", tensor(6, 6)),
    "assign transposed": lambda m: setattr(m.layers[3], "weight", tensor(6, 6).T),
    "assign a view": lambda m: setattr(m.layers[3], "weight", tensor(6, 12)[:, ::2]),
    ".data =": lambda m: setattr(m.layers[3].weight, "data", tensor(6, 6)),
    ".data = transposed": lambda m: setattr(m.layers[1].weight, "data", tensor(6, 2).T),
    ".data.copy_()": lambda m: m.layers[3].weight.data.copy_(tensor(6, 6)),
    "in place under no_grad": no_grad_edit,
    "adapt again": lambda m: m.layers[0].adapt(data()[0] * 3 + 1),
    "tie": lambda m: setattr(m.layers[5], "weight", m.layers[3].weight),
    "tie by .data": lambda m: setattr(m.layers[5].weight, "data", m.layers[3].weight.data),
    "replace a layer": lambda m: m.layers.__setitem__(4, gd.Sigmoid()),
    "replace a Linear": lambda m: m.layers.__setitem__(3, gd.Linear(6, 6, generator=torch.Generator())),
    "add a layer": lambda m: m.add(gd.Tanh()),
    "append to layers": lambda m: m.layers.append(gd.Sigmoid()),
    "convert to float64": to_float64,
}
if CUDA:
    CHANGES["move to cuda"] = lambda m: m.to("cuda")

# Changes after which a graph built before is no longer the model's.
STRUCTURAL = {"replace a layer", "replace a Linear", "add a layer", "append to layers", "convert to float64",
              "move to cuda"}


def fresh_copy(m: gd.Sequential) -> gd.Sequential:
    """A new model holding copies of what `m` holds now, ties included (one memo: a tensor
    held in two places is copied once), with nothing compiled yet."""
    memo: dict = {}
    return gd.Sequential(*(copy.deepcopy(layer, memo) for layer in m.layers))


def model_data(m: gd.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    X, Y = data(m.dtype())
    device = next(iter(m.state().values())).device
    return X.to(device), Y.to(device)


def assert_same_state(a: gd.Sequential, b: gd.Sequential) -> None:
    sa, sb = a.state(), b.state()
    assert list(sa) == list(sb) and a.ties() == b.ties()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-6, atol=1e-7, msg=name)


# The rows: each warms an entry point up on the model (so that what it compiled and bound
# is there to go stale), then, once the change is made, runs it on the model and on a
# fresh copy of the changed model.

def run_predict(m: gd.Sequential, fresh: gd.Sequential | None, warm: bool) -> None:
    X, _ = model_data(m)
    if warm:
        m.predict(X)
        return
    torch.testing.assert_close(m.predict(X), fresh.predict(X), rtol=0, atol=0)


def run_evaluate(m: gd.Sequential, fresh: gd.Sequential | None, warm: bool) -> None:
    X, Y = model_data(m)
    if warm:
        m.evaluate(X, Y, loss=gd.MSE(), metrics=["mae"])
        return
    assert m.evaluate(X, Y, loss=gd.MSE(), metrics=["mae"]) == fresh.evaluate(X, Y, loss=gd.MSE(), metrics=["mae"])


def run_fit(m: gd.Sequential, fresh: gd.Sequential | None, warm: bool) -> None:
    X, Y = model_data(m)
    if warm:  # a rate of 0 compiles and runs the step and leaves the weights as they are
        m.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=0.0, momentum=0.9), epochs=1, batch_size=5, verbose=False)
        return
    histories = [model.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
                           epochs=2, batch_size=5, seed=1, verbose=False) for model in (m, fresh)]
    assert histories[0] == histories[1]
    assert_same_state(m, fresh)


class StepRow:
    """A TrainStep made before the change and kept, as a user's own loop would."""

    def __init__(self) -> None:
        self.step: gd.TrainStep | None = None

    def __call__(self, m: gd.Sequential, fresh: gd.Sequential | None, warm: bool) -> None:
        X, Y = model_data(m)
        if warm:
            self.step = gd.TrainStep(m, gd.MSE(), gd.SGD(lr=0.05, momentum=0.9, weight_decay=0.01))
            self.step(X[:5], Y[:5], 0.0)
            return
        other = gd.TrainStep(fresh, gd.MSE(), gd.SGD(lr=0.05, momentum=0.9, weight_decay=0.01))
        for first in (0, 5, 10):
            losses = [s(X[first:first + 5], Y[first:first + 5], 0.05) for s in (self.step, other)]
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
        losses = [s.epoch(X, Y, 7, None, 0.05) for s in (self.step, other)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
        assert_same_state(m, fresh)


class GradRow:
    """A gradient graph the user compiled before the change and keeps calling."""

    def __init__(self) -> None:
        self.fn: gd.Compiled | None = None
        self.names: list[str] = []

    def __call__(self, m: gd.Sequential, fresh: gd.Sequential | None, warm: bool, change: str = "") -> None:
        X, Y = model_data(m)
        if warm:
            self.names = list(m.parameters())
            self.fn = gd.compile(gd.grad(m.graph(gd.MSE()), self.names))
            self.fn(x=X, y=Y)
            return
        if change in STRUCTURAL:
            with pytest.raises(gd.GraphError, match="build it again|compile the graph again"):
                self.fn(x=X, y=Y)
            return
        loss, *grads = self.fn(x=X, y=Y)
        names = list(fresh.parameters())
        want_loss, *want = gd.compile(gd.grad(fresh.graph(gd.MSE()), names))(x=X, y=Y)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        # A graph built before a tie has a gradient for each place; the param's is their sum.
        owners = {name: fresh.ties().get(name, name) for name in self.names}
        summed = {name: sum(g for old, g in zip(self.names, grads) if owners[old] == name) for name in names}
        for name, g in zip(names, want):
            torch.testing.assert_close(summed[name], g, rtol=1e-5, atol=1e-6, msg=name)


def run_save(m: gd.Sequential, fresh: gd.Sequential | None, warm: bool, path: str = "") -> None:
    X, _ = model_data(m)
    if warm:
        m.save(path)
        return
    m.save(path)
    loaded = gd.load(path).to(X.device)
    assert_same_state(loaded, fresh)  # (a file stores tensors contiguous: a layout's last-bit rounding may differ)
    torch.testing.assert_close(loaded.predict(X), fresh.predict(X), rtol=1e-6, atol=1e-7)


ENTRY_POINTS = ["predict", "evaluate", "fit", "TrainStep", "grad graph", "save"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_reaches_every_entry_point(change, entry, tmp_path):
    m = model()
    rows: dict[str, Callable[..., None]] = {
        "predict": run_predict, "evaluate": run_evaluate, "fit": run_fit, "TrainStep": StepRow(),
        "grad graph": GradRow(), "save": lambda m, f, warm: run_save(m, f, warm, str(tmp_path / "m.gdl")),
    }
    row = rows[entry]
    row(m, None, True)
    CHANGES[change](m)
    fresh = fresh_copy(m)
    if entry == "grad graph":
        row(m, fresh, False, change)
    else:
        row(m, fresh, False)


def test_the_table_changes_what_each_change_should():
    """Each change really changes the model (else the table would test nothing)."""
    X, _ = data()
    before = model().predict(X)
    for name, change in CHANGES.items():
        m = model()
        change(m)
        after = m.predict(model_data(m)[0])
        assert after.dtype != before.dtype or not torch.allclose(after.to("cpu"), before), name
