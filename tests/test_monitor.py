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
    before = graph.output_labels
    add_monitors(graph, list(model.parameters()), ("update_ratio",))  # measured around the update, not in the IR
    assert graph.output_labels == before


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


# -- with main's training features: callbacks, clipping, accumulation, optimizers, schedules -------


def _grouped_reference(lr: float, batch_size: int, accumulate: int, clip_norm: float):
    """fit's loop (unshuffled, plain SGD) with accumulation and clip_norm written out: each
    batch's gradient norm and dead fraction, each update's ‖Δw‖/‖w‖, averaged per epoch."""
    model, (X, Y) = net(), data()
    names = list(model.parameters())
    params = list(model.parameters().values())
    forward = model.graph(gd.MSE(), training=True)
    relu_out = next(n for n in forward.nodes if n.op is gd.relu).out
    forward.output(relu_out)
    step = gd.compile(gd.grad(forward, names))
    layers = {"0:Linear": "0", "2:Linear": "2", "4:Linear": "4"}
    batch: dict[str, list[float]] = {}
    starts = list(range(0, len(X), batch_size))
    for group in range(0, len(starts), accumulate):
        firsts = starts[group:group + accumulate]
        sizes = [min(batch_size, len(X) - f) for f in firsts]
        total = [torch.zeros_like(p) for p in params]
        for first, size in zip(firsts, sizes):
            loss, relu, *grads = step(x=X[first:first + size], y=Y[first:first + size])
            for layer, k in layers.items():
                g = math.sqrt(sum(float(grads[names.index(f"{k}.{p}")].double().square().sum())
                                  for p in ("weight", "bias")))
                batch.setdefault(f"grad_norm/{layer}", []).append(g)
            batch.setdefault("dead_relu/1:ReLU", []).append(float((relu.sum(0) <= 0).double().mean()))
            for t, g in zip(total, grads):
                t += g * (size / sum(sizes))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in total]))
        scale = min(1.0, float(clip_norm / (norm + 1e-6)))
        before = [p.clone() for p in params]
        for p, t in zip(params, total):
            p -= lr * scale * t
        for layer, k in layers.items():
            moved = math.sqrt(sum(float((params[names.index(f"{k}.{p}")] - before[names.index(f"{k}.{p}")])
                                        .double().square().sum()) for p in ("weight", "bias")))
            held = math.sqrt(sum(float(before[names.index(f"{k}.{p}")].double().square().sum())
                                 for p in ("weight", "bias")))
            batch.setdefault(f"update_ratio/{layer}", []).append(moved / held)
    return {key: sum(v) / len(v) for key, v in batch.items()}, {k: v.clone() for k, v in model.parameters().items()}


def test_monitoring_with_accumulation_clipping_and_callbacks_is_what_a_loop_computes(tmp_path):
    """grad_norm is each batch's gradient as backward made it (before clipping), the mean
    over the epoch's batches; update_ratio is each update's real step (the group's
    averaged, clipped gradient), the mean over its updates; and the callbacks' logs have
    every monitored key, which they may watch."""
    expected, params = _grouped_reference(lr=0.5, batch_size=7, accumulate=2, clip_norm=0.05)
    model, (X, Y) = net(), data()
    seen = []
    callbacks = [gd.CSVLogger(tmp_path / "log.csv"), gd.EarlyStopping(monitor="grad_norm/4:Linear", patience=5),
                 gd.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(dict(logs)))]
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.5), epochs=1, batch_size=7, shuffle=False, verbose=False,
                        monitor=ALL, accumulate=2, clip_norm=0.05, callbacks=callbacks)
    for key, value in expected.items():
        assert history[key] == [pytest.approx(value, rel=1e-4)], key
        assert seen[0][key] == history[key][0]
    for name, value in model.parameters().items():
        torch.testing.assert_close(value, params[name])
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert "update_ratio/2:Linear" in header and "dead_relu/1:ReLU" in header
    with pytest.raises(ValueError, match=r"EarlyStopping monitors 'grad_norm/9:Linear', which the logs will not "
                                         r"have \(they have loss, lr, grad_norm/0:Linear"):
        net().fit(X, Y, verbose=False, monitor=["grad_norm"], callbacks=[gd.EarlyStopping("grad_norm/9:Linear")])


def test_the_update_ratio_is_the_step_adam_took_with_a_per_step_schedule_and_batch_logs():
    """Measured around the update, the ratio is the step of any optimizer: here Adam with
    a per-step warm-up, updating every other batch, checked against the params a batch-log
    callback reads after each step (which takes fit's path with batch logs too)."""
    model, (X, Y) = net(), data()
    snapshots = [[p.clone() for p in model.parameters().values()]]
    log = gd.LambdaCallback(on_batch_end=lambda batch, logs: snapshots.append(
        [p.clone() for p in model.parameters().values()]))
    history = model.fit(X, Y, optimizer=gd.Adam(lr=0.01), schedule=gd.LinearWarmup(4), epochs=2, batch_size=8,
                        shuffle=False, verbose=False, monitor=["update_ratio"], accumulate=2, callbacks=[log])
    names = list(model.parameters())
    batches = 8  # 60 rows in batches of 8; updates after batches 2, 4, 6 and 8 of each epoch
    for epoch in range(2):
        ratios: dict[str, list[float]] = {}
        for b in range(1, batches + 1, 2):
            before, after = snapshots[epoch * batches + b - 1], snapshots[epoch * batches + b + 1]
            for k in ("0", "2", "4"):
                idx = [names.index(f"{k}.weight"), names.index(f"{k}.bias")]
                moved = math.sqrt(sum(float((after[i] - before[i]).double().square().sum()) for i in idx))
                held = math.sqrt(sum(float(before[i].double().square().sum()) for i in idx))
                ratios.setdefault(f"update_ratio/{k}:Linear", []).append(moved / held)
        for key, values in ratios.items():
            assert history[key][epoch] == pytest.approx(sum(values) / len(values), rel=1e-4), (key, epoch)


def test_a_conv_nets_dead_units_and_norms_with_batch_norm_and_dropout():
    """In training mode the step's outputs are the loss, the buffers' next values, the
    gradients, then the monitored values; BatchNorm and Dropout keep updating their
    buffers as without monitor."""
    def cnn():
        torch.manual_seed(0)
        return gd.Sequential(gd.Conv2d(1, 3, 3, padding=1), gd.BatchNorm2d(3), gd.ReLU(), gd.Dropout(0.3),
                             gd.Flatten(), gd.Linear(3 * 4 * 4, 2), input_shape=(1, 4, 4))
    gen = torch.Generator().manual_seed(0)
    X, labels = torch.randn(24, 1, 4, 4, generator=gen), torch.randint(0, 2, (24,), generator=gen)
    plain, watched = cnn(), cnn()
    h1 = plain.fit(X, labels, loss=gd.CrossEntropy(), epochs=2, batch_size=8, seed=1, verbose=False)
    h2 = watched.fit(X, labels, loss=gd.CrossEntropy(), epochs=2, batch_size=8, seed=1, verbose=False, monitor=ALL)
    assert h1["loss"] == h2["loss"]
    assert all(torch.equal(a, b) for a, b in zip(plain.state().values(), watched.state().values()))
    layers = ("0:Conv2d", "1:BatchNorm2d", "5:Linear")
    expected = {f"{m}/{layer}" for m in ("grad_norm", "update_ratio") for layer in layers} | {"dead_relu/2:ReLU"}
    assert {k for k in h2 if "/" in k} == expected
    assert all(0 <= v <= 1 for v in h2["dead_relu/2:ReLU"]) and all(v > 0 for v in h2["grad_norm/0:Conv2d"])
    step = gd.TrainStep(watched, gd.CrossEntropy(), gd.SGD(), monitor=["grad_norm"])
    labels_ = step.compiled.graph.output_labels
    first = 1 + len(step.state)
    assert all(label.startswith("next/") for label in labels_[1:first])
    assert all(label.startswith("d/d") for label in labels_[first:first + len(step.params)])
    assert step.monitored == labels_[first + len(step.params):] == ("gg/0:Conv2d", "gg/1:BatchNorm2d", "gg/5:Linear")


def test_a_functional_model_is_monitored_and_each_relu_has_a_key_of_its_own():
    """A functional model trains through the same step: its layers' series, and one dead
    fraction per relu, those called outside any layer numbered ("relu", "relu.2")."""
    torch.manual_seed(0)
    g = gd.Graph("skip")
    x = g.input("x", (None, 2))
    h = gd.relu(gd.Linear(2, 8)(x))
    h = h + gd.relu(gd.Linear(8, 8)(h))
    model = gd.Model(x, gd.Linear(8, 1)(h))
    X, Y = data()
    history = model.fit(X, Y, loss=gd.MSE(), epochs=2, batch_size=8, verbose=False, monitor=ALL)
    assert {k for k in history if k.startswith("dead_relu/")} == {"dead_relu/relu", "dead_relu/relu.2"}
    assert {k for k in history if k.startswith("grad_norm/")} == {f"grad_norm/{k}:Linear" for k in range(3)}
    assert all(len(v) == 2 for k, v in history.items() if "/" in k)
