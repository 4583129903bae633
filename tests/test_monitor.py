"""Gradient health in History (graphdl/monitor.py, through fit's `monitor=`): per-layer
gradient norms, update-to-weight ratios and dead ReLUs, computed in the step as IR and
read in the epoch's one host sync; against a loop that computes them batch by batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import graphdl as gd
from graphdl.monitor import add_monitors

ALL = ["grad_norm", "update_ratio", "dead_relu"]


def net() -> gd.Sequential:
    torch.manual_seed(0)
    return gd.Sequential(gd.Linear(2, 16), gd.ReLU(), gd.Linear(16, 8), gd.Tanh(), gd.Linear(8, 1))


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(60, 2, generator=gen) - 0.5, torch.rand(60, 1, generator=gen)


def _reference(lr: float, epochs: int, batch_size: int) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """fit's loop (unshuffled, plain SGD) written out batch by batch: each layer's gradient
    norm, lr·‖g‖/‖w‖ and dead fraction per batch, averaged per epoch; and the final params."""
    model, (X, Y) = net(), data()
    names = list(model.parameters())
    params = list(model.parameters().values())
    forward = model.graph(gd.MSE())
    relu_out = next(n for n in forward.nodes if n.op is gd.relu).out
    forward.output(relu_out)  # to see which units are dead
    step = gd.compile(gd.grad(forward, names))
    series: dict[str, list[float]] = {}
    for _ in range(epochs):
        batch: dict[str, list[float]] = {}
        for first in range(0, len(X), batch_size):
            loss, relu, *grads = step(x=X[first:first + batch_size], y=Y[first:first + batch_size])
            for layer in ("0:Linear", "2:Linear", "4:Linear"):
                k = layer.split(":")[0]
                g = math.sqrt(sum(float(grads[names.index(f"{k}.{p}")].double().square().sum())
                                  for p in ("weight", "bias")))
                w = math.sqrt(sum(float(params[names.index(f"{k}.{p}")].double().square().sum())
                                  for p in ("weight", "bias")))
                batch.setdefault(f"grad_norm/{layer}", []).append(g)
                batch.setdefault(f"update_ratio/{layer}", []).append(lr * g / w)
            batch.setdefault("dead_relu/1:ReLU", []).append(float((relu.sum(0) <= 0).double().mean()))
            gd.SGD(lr=lr).update(params, grads, lr, overwrite_grads=True)
        for key, values in batch.items():
            series.setdefault(key, []).append(sum(values) / len(values))
    return series, {k: v.clone() for k, v in model.parameters().items()}


def test_the_monitored_series_are_what_a_batch_by_batch_loop_computes():
    expected, params = _reference(lr=0.5, epochs=3, batch_size=7)
    model, (X, Y) = net(), data()
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.5), epochs=3, batch_size=7, shuffle=False, verbose=False,
                        monitor=ALL)
    monitored = {k: v for k, v in history.items() if "/" in k}
    assert list(monitored) == [f"{m}/{layer}" for m in ("grad_norm", "update_ratio")
                               for layer in ("0:Linear", "2:Linear", "4:Linear")] + ["dead_relu/1:ReLU"]
    for key, values in expected.items():
        assert monitored[key] == pytest.approx(values, rel=1e-5), key
    assert 0 < max(monitored["dead_relu/1:ReLU"]) < 1  # some units are dead, and not all
    for name, value in model.parameters().items():  # the reference trains as fit does, to float tolerance
        torch.testing.assert_close(value, params[name])


def test_monitoring_does_not_change_training():
    X, Y = data()
    plain, watched = net(), net()
    h1 = plain.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=4, batch_size=8, seed=3, verbose=False)
    h2 = watched.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=4, batch_size=8, seed=3, verbose=False,
                     monitor=ALL)
    assert h1["loss"] == h2["loss"]
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters().values(), watched.parameters().values()))
    assert not any("/" in key for key in h1)  # without monitor, History is as it was


class _Syncs(TorchFunctionMode):
    """Counts the calls that read a tensor on the host (each a sync on CUDA)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("epochs", [1, 3])
def test_monitoring_adds_no_host_sync(epochs):
    """One read an epoch either way, however many batches: the monitored values ride in
    the sync the loss already pays for."""
    X, Y = data()
    counts = []
    for monitor in (None, ALL):
        model = net()
        model.fit(X, Y, epochs=1, batch_size=6, verbose=False, monitor=monitor)  # compiled outside the count
        with _Syncs() as syncs:
            model.fit(X, Y, epochs=epochs, batch_size=6, verbose=False, monitor=monitor)
        counts.append(syncs.count)
    assert counts[0] == counts[1] >= epochs  # (the count sees the epoch's read: it is not blind)


def test_the_monitors_are_ir_in_the_steps_graph_and_absent_without_monitor():
    model = net()
    plain = gd.TrainStep(model, gd.MSE(), gd.SGD())
    watched = gd.TrainStep(model, gd.MSE(), gd.SGD(), monitor=["grad_norm", "dead_relu"])
    assert plain.monitored == () and len(plain.compiled.graph.outputs) == 1 + 6
    assert watched.monitored == ("gg/0:Linear", "gg/2:Linear", "gg/4:Linear", "dead/1:ReLU")
    assert "# monitor" in str(watched.compiled.graph) and "monitor" not in str(plain.compiled.graph)
    assert watched.capture is False
    graph = gd.grad(model.graph(gd.MSE()), list(model.parameters()))
    before = len(graph.outputs)
    add_monitors(graph, list(model.parameters()), ("update_ratio",))
    graph.verify()
    assert graph.output_labels[before:] == ("gg/0:Linear", "ww/0:Linear", "gg/2:Linear", "ww/2:Linear",
                                            "gg/4:Linear", "ww/4:Linear")


def test_a_checkpointed_run_resumes_its_monitored_series(tmp_path):
    X, Y = data()
    whole = net().fit(X, Y, epochs=4, batch_size=8, seed=1, verbose=False, monitor=["grad_norm"])
    path = tmp_path / "run.gdl"
    model = net()
    model.fit(X, Y, epochs=2, batch_size=8, seed=1, verbose=False, monitor=["grad_norm"], checkpoint=path)
    resumed = model.fit(X, Y, epochs=4, batch_size=8, seed=1, verbose=False, monitor=["grad_norm"], resume=path)
    assert resumed["grad_norm/2:Linear"] == whole["grad_norm/2:Linear"]


@pytest.mark.parametrize("monitor", ["grad_norm", ["grad_norm", "grad_norm"], ["norm"], [3]])
def test_a_bad_monitor_is_named(monitor):
    X, Y = data()
    with pytest.raises(ValueError, match=r"monitor must be a list of distinct names from 'grad_norm', "
                                         r"'update_ratio', 'dead_relu', e\.g\. monitor=\['grad_norm', "
                                         r"'update_ratio'\], got"):
        net().fit(X, Y, verbose=False, monitor=monitor)
    with pytest.raises(ValueError, match="monitor is not available with distributed=True yet"):
        gd.TrainStep(net(), gd.MSE(), gd.SGD(), distributed=True, monitor=["grad_norm"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_monitoring_on_cuda_matches_the_cpu():
    X, Y = data()
    on_cpu = net().fit(X, Y, epochs=2, batch_size=8, seed=0, verbose=False, monitor=ALL)
    on_gpu = net().to("cuda").fit(X.cuda(), Y.cuda(), epochs=2, batch_size=8, seed=0, verbose=False, monitor=ALL)
    for key in on_cpu:
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-3, abs=1e-6), key
