"""TrainStep (graphdl/step.py): fit's compiled training step, its planned optimizer
update (SGD.plan) and the capture of whole epochs as CUDA graphs.

The arena path must train exactly like the plain compiled step with `SGD.update` (the
reference loop below is fit's loop before the arena). Capture is checked twice: on CPU
with `RecordedGraphs`, a stand-in with a CUDA graph's semantics (capture records every
torch op with its arguments as they are then, Python numbers frozen, and leaves no
effect; replay re-runs the ops on the same tensors), which catches anything the captured
epoch would read from Python instead of from a device tensor; and on a real GPU, where
the tests skip without one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import graphdl as gd
import graphdl.step as step_module
from graphdl.step import TrainStep

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device; none here")


def disk_data(n: int = 103, seed: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=gen, dtype=dtype)
    Y = (((X - 0.5) ** 2).sum(1, keepdim=True) < 1 / (2 * math.pi)).to(dtype)
    return X.to(device), Y.to(device)


def net(device: str = "cpu", dtype: torch.dtype = torch.float32, act: type[gd.Layer] = gd.Tanh) -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Linear(2, 16, generator=gen, dtype=dtype), act(),
                          gd.Linear(16, 16, generator=gen, dtype=dtype), act(),
                          gd.Linear(16, 1, generator=gen, dtype=dtype))
    return model.to(device)


class ReferenceLoop:
    """fit's loop before the arena: the plain compiled gradient graph and SGD.update per
    batch, epoch by epoch (it reads the params' slots at every call)."""

    def __init__(self, model: gd.Sequential, optimizer: gd.SGD) -> None:
        self.model, self.optimizer = model, optimizer
        self.step = gd.compile(gd.grad(model.graph(gd.MSE()), list(model.parameters())))
        optimizer.reset(list(model.parameters().values()))

    def epoch(self, X, Y, batch_size: int, order, lr: float) -> float:
        params = list(self.model.parameters().values())
        Xe, Ye = (X[order.to(X.device)], Y[order.to(Y.device)]) if order is not None else (X, Y)
        total = 0.0
        with torch.inference_mode():
            for first in range(0, len(X), batch_size):
                out = self.step(x=Xe[first:first + batch_size], y=Ye[first:first + batch_size])
                self.optimizer.update(params, list(out[1:]), lr, overwrite_grads=True)
                total += float(out[0]) * len(Xe[first:first + batch_size])
        return total / len(X)


def reference_fit(model: gd.Sequential, X, Y, optimizer: gd.SGD, epochs: int, batch_size: int, shuffle: bool = True,
                  seed: int = 0, schedule: gd.Schedule | None = None) -> list[float]:
    loop, gen = ReferenceLoop(model, optimizer), torch.Generator().manual_seed(seed)
    return [loop.epoch(X, Y, batch_size, torch.randperm(len(X), generator=gen) if shuffle else None,
                       schedule(epoch, optimizer.lr) if schedule else optimizer.lr) for epoch in range(epochs)]


def assert_same_training(a: gd.Sequential, b: gd.Sequential, ha: list[float], hb: list[float], **tol: Any) -> None:
    for (name, p), q in zip(a.parameters().items(), b.parameters().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name, **tol)
    torch.testing.assert_close(torch.tensor(ha, dtype=torch.float64), torch.tensor(hb, dtype=torch.float64), **tol)


SETTINGS = [
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.0),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.5, weight_decay=0.01),
    dict(lr=0.05, momentum=0.0, weight_decay=0.01),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch_size,shuffle", [(7, True), (10, False), (200, True)])  # 103 = 14*7+5: a tail batch
def test_fit_trains_like_the_plain_step_with_sgd_update(settings, dtype, batch_size, shuffle):
    X, Y = disk_data(dtype=dtype)
    schedule = gd.StepDecay(every=1, factor=0.5)
    got, want = net(dtype=dtype), net(dtype=dtype)
    history = got.fit(X, Y, optimizer=gd.SGD(**settings), schedule=schedule, epochs=3, batch_size=batch_size,
                      shuffle=shuffle, seed=3, verbose=False)
    losses = reference_fit(want, X, Y, gd.SGD(**settings), 3, batch_size, shuffle, seed=3, schedule=schedule)
    assert_same_training(got, want, history["loss"], losses)


def test_fit_trains_transposed_and_sliced_params_like_the_plain_step():
    """Params in odd layouts take the multi-tensor update; it must agree too."""
    X, Y = disk_data()
    got, want = net(), net()
    for model in (got, want):
        lin = model.layers[2]
        lin.weight = lin.weight.mT.contiguous().mT  # transposed memory, same values
        model.layers[0].bias = torch.stack([model.layers[0].bias] * 2, 1)[:, 0]  # a strided slice
    settings = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.001)
    history = got.fit(X, Y, optimizer=gd.SGD(**settings), epochs=2, batch_size=8, seed=1, verbose=False)
    losses = reference_fit(want, X, Y, gd.SGD(**settings), 2, 8, seed=1)
    assert_same_training(got, want, history["loss"], losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_planned_update_follows_update_across_rates(dtype, settings):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen).to(dtype), torch.randn(3, generator=gen).to(dtype)]
    ref = [p.clone() for p in params]
    planned, plain = gd.SGD(**settings), gd.SGD(**settings)
    plain.reset(ref)
    grads = [torch.empty_like(p) for p in params]
    apply = planned.plan(params, grads)
    for lr in (0.1, 0.1, 0.0, 1e-60, 0.3):  # a rate of 0, and one whose inverse overflows float32
        g = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        for buf, value in zip(grads, g, strict=True):
            buf.copy_(value)
        planned.set_lr(lr)
        apply()
        plain.update(ref, [t.clone() for t in g], lr, overwrite_grads=True)
        tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else {}
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p, r, **tol)


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_a_gradient_made_at_each_call_is_copied_into_the_arena_and_updated_as_planned(monkeypatch, clip_norm):
    """A convolution's weight gradient comes from a kernel with no out= form: the arena
    copies it into a buffer of its own and the update, planned once on that buffer, makes
    the same steps as the optimizer's plain update of the fresh gradients."""
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Conv2d(2, 3, 3, padding=1, generator=gen), gd.ReLU(), gd.Flatten(),
                          gd.Linear(3 * 4 * 4, 2, generator=gen), input_shape=(2, 4, 4))
    X, Y = torch.randn(12, 2, 4, 4, generator=gen), torch.randn(12, 2, generator=gen)
    twin = gd.from_torch(model.to_torch(), input_shape=(2, 4, 4))
    plans = []
    optimizer = gd.SGD(lr=0.1, momentum=0.9)
    planned = optimizer.plan
    monkeypatch.setattr(optimizer, "plan", lambda *a: plans.append(1) or planned(*a))
    step = TrainStep(model, gd.MSE(), optimizer, clip_norm=clip_norm)
    for _ in range(3):
        step.epoch(X, Y, 4, None, 0.1)
    assert step._arenas[4].take is not None and len(plans) == 1  # planned once, for the one batch size
    reference, grads_of = gd.SGD(lr=0.1, momentum=0.9), gd.compile(gd.grad(twin.graph(loss=gd.MSE()),
                                                                           list(twin.parameters())))
    params = list(twin.parameters().values())
    reference.reset(params)
    for _ in range(3):
        for first in range(0, 12, 4):
            grads = list(grads_of(X[first:first + 4], Y[first:first + 4])[1:])
            if clip_norm is not None:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                grads = [g * min(1.0, clip_norm / (norm.item() + 1e-6)) for g in grads]
            reference.update(params, grads, 0.1, overwrite_grads=True)
    for got, want in zip(model.parameters().values(), params, strict=True):
        torch.testing.assert_close(got, want)


def test_train_step_binds_a_param_assigned_between_epochs():
    X, Y = disk_data()
    got, want = net(), net()
    step = TrainStep(got, gd.MSE(), gd.SGD(lr=0.1, momentum=0.9))
    loop = ReferenceLoop(want, gd.SGD(lr=0.1, momentum=0.9))
    for epoch in range(3):
        if epoch == 1:
            for model in (got, want):
                model.layers[2].weight = torch.linspace(-0.3, 0.3, 256).reshape(16, 16).mT  # a new tensor in the slot
        with torch.inference_mode():
            step.epoch(X, Y, 10, None, 0.1)
        loop.epoch(X, Y, 10, None, 0.1)
    assert step.params[2] is got.layers[2].weight  # updated in place: the tensor now in the slot
    assert_same_training(got, want, [0.0], [0.0])


@pytest.mark.parametrize("kwargs, named", [
    (dict(optimizer=0.1), "optimizer must be a graphdl optimizer"),
    (dict(capture="yes"), "capture must be None"),
    (dict(distributed=1), "distributed must be True or False"),
])
def test_train_step_names_a_wrong_argument(kwargs, named):
    with pytest.raises(ValueError, match=named):
        TrainStep(net(), gd.MSE(), **{"optimizer": gd.SGD(), **kwargs})


@pytest.mark.parametrize("args, named", [
    (("net", gd.MSE()), "model must be a graphdl model such as gd.Sequential, got str"),  # was: no .parameters
    ((None, None), "loss must be a graphdl loss"),  # was grad's "output 0 is not a scalar"
])
def test_train_step_names_a_wrong_model_or_loss(args, named):
    model, loss = args
    with pytest.raises(ValueError, match=named):
        TrainStep(net() if model is None else model, loss, gd.SGD())


def test_train_step_calls_name_a_wrong_feed_rate_or_batch_size():
    """A step called directly checks what fit checks once: torch's own errors (mat1 and mat2
    shapes cannot be multiplied, split_size) and a negative or string rate got through."""
    step = TrainStep(net(), gd.MSE(), gd.SGD())
    X, Y = torch.rand(10, 2), torch.rand(10, 1)
    for call, named in [(lambda: step(X[:, :1], Y, 0.1), "input x is f32\\[10,1\\]"),
                        (lambda: step(X, Y, "0.1"), "lr must be a finite number"),
                        (lambda: step.epoch(X, Y, 5, None, -1.0), "lr must be in"),
                        (lambda: step.steps([(X, Y)], float("nan")), "lr must be a finite number"),
                        (lambda: step.epoch(X, Y, 0, None, 0.1), "batch_size must be a whole number >= 1"),
                        (lambda: step.epoch(X.double(), Y, 5, None, 0.1), "convert it with .to\\(torch.float32\\)"),
                        (lambda: step.epoch(X, Y[:4], 5, None, 0.1), "N")]:
        with pytest.raises(ValueError, match=named):
            call()
    before = [p.clone() for p in step.params]
    assert step.epoch(X, Y, 5, None, 0.1).shape == (2,)  # the checks leave good data alone
    assert any(not torch.equal(a, b) for a, b in zip(before, step.params))


# -- capture, on CPU, with a stand-in that has a CUDA graph's semantics ----------------------


class _Recorder(TorchDispatchMode):
    """Records every aten op run under it, with its arguments; remembers the old contents
    of every tensor an op writes, so that capture can leave no effect."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written = args[i] if i < len(args) else kwargs.get(arg.name)
                for t in tree_flatten(written)[0]:
                    if isinstance(t, torch.Tensor) and id(t) not in self.saved:
                        self.saved[id(t)] = (t, t.clone())
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class RecordedGraphs:
    """graphdl.step's CUDA hooks, on CPU, with a CUDA graph's semantics.

    capture(body) runs body under a recorder, then puts back every tensor it wrote (a
    captured graph has not run yet); replay runs the recorded ops again in order, on the
    tensors and with the Python values they were recorded with, writing each fresh
    result into the tensor capture returned for it (a graph's fixed addresses).
    """

    def __init__(self, fail: Exception | None = None, fail_in_warm_up: bool = False) -> None:
        self.fail, self.fail_in_warm_up = fail, fail_in_warm_up
        self.captures = 0
        self.replays = 0

    def available(self, device) -> bool:
        return True

    @contextmanager
    def side_stream(self):
        yield
        if self.fail is not None and self.fail_in_warm_up:  # after the warm-up steps changed the params
            raise self.fail

    def capture(self, body: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        if self.fail is not None:
            raise self.fail
        recorder = _Recorder()
        with recorder:
            result = body()
        for t, old in recorder.saved.values():
            t.copy_(old)
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            for func, args, kwargs, out in recorder.ops:
                fresh = func(*args, **kwargs)
                for old, new in zip(tree_flatten(out)[0], tree_flatten(fresh)[0], strict=True):
                    if isinstance(old, torch.Tensor) and old.data_ptr() != new.data_ptr():
                        old.copy_(new)
        return replay, result

    def staging(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64)

    def event(self) -> Any:
        return type("Event", (), {"record": lambda self: None, "synchronize": lambda self: None})()


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("batch_size,shuffle", [(7, True), (10, False)])
def test_captured_epochs_train_like_the_plain_step(monkeypatch, settings, batch_size, shuffle):
    """A new rate every epoch and a new permutation every epoch reach the captured
    graph only through device tensors: a rate or an order read from Python at capture
    time would replay the first epoch's."""
    graphs = RecordedGraphs()
    monkeypatch.setattr(step_module, "_GRAPHS", graphs)
    X, Y = disk_data()
    schedule = gd.StepDecay(every=1, factor=0.5)
    got, want = net(), net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capture applies: no fallback note
        history = got.fit(X, Y, optimizer=gd.SGD(**settings), schedule=schedule, epochs=4, batch_size=batch_size,
                          shuffle=shuffle, seed=5, verbose=False)
    losses = reference_fit(want, X, Y, gd.SGD(**settings), 4, batch_size, shuffle, seed=5, schedule=schedule)
    assert (graphs.captures, graphs.replays) == (1, 4)  # captured once, replayed every epoch
    assert_same_training(got, want, history["loss"], losses)


@pytest.mark.parametrize("batch_size", [103, 104, 500])
def test_a_batch_as_large_as_the_data_or_larger_is_captured(monkeypatch, batch_size):
    """The warm-up runs the sizes the epoch's batches really have: an arena of 500 rows
    run on the 103 the data has made torch resize its out= buffers, and fit dropped
    capture for the whole run with a note quoting an internal shape error."""
    graphs = RecordedGraphs()
    monkeypatch.setattr(step_module, "_GRAPHS", graphs)
    X, Y = disk_data()
    got, want = net(), net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capture applies: no fallback note
        history = got.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=batch_size, seed=2,
                          verbose=False)
    assert (graphs.captures, graphs.replays) == (1, 3)
    losses = reference_fit(want, X, Y, gd.SGD(lr=0.1, momentum=0.9), 3, batch_size, seed=2)
    assert_same_training(got, want, history["loss"], losses)


def test_an_arena_refuses_a_batch_of_another_size():
    """Its out= buffers would be resized under the prepared transposes that view them."""
    X, Y = disk_data()
    step = TrainStep(net(), gd.MSE(), gd.SGD(lr=0.1))
    arena = step._arena(10)
    with pytest.raises(RuntimeError, match="a batch of 7 rows reached the arena for 10"):
        arena((X[:7], Y[:7]))


@pytest.mark.parametrize("in_warm_up", [False, True], ids=["in-capture", "in-warm-up"])
def test_capture_that_fails_falls_back_with_one_note(monkeypatch, in_warm_up):
    """The fallback trains from the state before capture: warm-up steps are undone too."""
    graphs = RecordedGraphs(fail=RuntimeError("operation not permitted\nmore"), fail_in_warm_up=in_warm_up)
    monkeypatch.setattr(step_module, "_GRAPHS", graphs)
    X, Y = disk_data()
    got, want = net(), net()
    with pytest.warns(RuntimeWarning, match=r"not capturing .* \(RuntimeError: operation not permitted\); running it "
                                            r"uncaptured") as caught:
        history = got.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=10, seed=2,
                          verbose=False)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    losses = reference_fit(want, X, Y, gd.SGD(lr=0.1, momentum=0.9), 3, 10, seed=2)
    assert_same_training(got, want, history["loss"], losses)


def test_epoch_too_long_to_capture_runs_uncaptured_with_a_note(monkeypatch):
    graphs = RecordedGraphs()
    monkeypatch.setattr(step_module, "_GRAPHS", graphs)
    monkeypatch.setattr(step_module, "MAX_CAPTURED_STEPS", 5)
    X, Y = disk_data()
    with pytest.warns(RuntimeWarning, match="an epoch of 11 steps is more than the 5"):
        net().fit(X, Y, epochs=2, batch_size=10, verbose=False)
    assert graphs.captures == 0


def test_cpu_training_never_tries_to_capture(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("capture attempted on CPU")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", refuse)
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    X, Y = disk_data()
    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(X, Y, epochs=2, batch_size=10, verbose=False)
    assert TrainStep(model, gd.MSE(), gd.SGD()).capture is False


# -- capture on a real GPU ---------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("settings", SETTINGS[:3], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_cuda_captured_fit_matches_uncaptured_fit(monkeypatch, settings):
    X, Y = disk_data(n=1000, device="cuda")
    schedule = gd.CosineDecay(5)
    runs = {}
    for captured in (True, False):
        if not captured:
            monkeypatch.setenv("GRAPHDL_CUDA_GRAPHS", "0")
        model = net("cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback note: capture must apply on CUDA
            runs[captured] = model, model.fit(X, Y, optimizer=gd.SGD(**settings), schedule=schedule, epochs=5,
                                              batch_size=20, seed=0, verbose=False, validation_data=(X, Y))
    (a, ha), (b, hb) = runs[True], runs[False]
    assert_same_training(a, b, ha["loss"], hb["loss"], rtol=1e-4, atol=1e-5)
    assert ha["accuracy"] == pytest.approx(hb["accuracy"], abs=2e-3)


@needs_cuda
def test_cuda_train_step_captures_once_and_replays():
    X, Y = disk_data(n=1000, device="cuda")
    model = net("cuda")
    step = TrainStep(model, gd.MSE(), gd.SGD(lr=0.1, momentum=0.9))
    assert step.capture
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(3):
            losses = step.epoch(X, Y, 20, torch.randperm(1000, generator=gen), 0.1)
    assert len(step._epochs) == 1 and losses.shape == (50,) and losses.device.type == "cuda"
    assert bool(torch.isfinite(losses).all())


@needs_cuda
def test_cuda_captured_cnn_matches_uncaptured_with_its_state(monkeypatch):
    """A CNN with BatchNorm and Dropout on the GPU: the captured epochs draw each step's
    mask from the key on the device and move the running statistics, as uncaptured ones do
    (and as on the CPU: the mask is the same hash on every device)."""
    gen = torch.Generator().manual_seed(0)
    X, labels = torch.rand(200, 64, generator=gen), torch.randint(0, 10, (200,), generator=gen)
    runs = {}
    for device, captured in (("cuda", True), ("cuda", False), ("cpu", False)):
        monkeypatch.setenv("GRAPHDL_CUDA_GRAPHS", "1" if captured else "0")
        torch.manual_seed(1)
        model = gd.Sequential(gd.Reshape((1, 8, 8)), gd.Conv2d(1, 8, 3, padding=1), gd.BatchNorm2d(8), gd.ReLU(),
                              gd.MaxPool2d(2), gd.Dropout(0.25), gd.Flatten(), gd.Linear(128, 10)).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback note
            history = model.fit(X.to(device), labels.to(device), loss=gd.CrossEntropy(),
                                optimizer=gd.SGD(lr=0.05, momentum=0.9), epochs=3, batch_size=32, seed=0,
                                verbose=False)
        runs[(device, captured)] = history["loss"], {k: t.cpu() for k, t in model.state().items()}
    (la, sa), (lb, sb), (lc, sc) = runs[("cuda", True)], runs[("cuda", False)], runs[("cpu", False)]
    assert la == pytest.approx(lb, rel=1e-4) and lb == pytest.approx(lc, rel=1e-3)
    assert float(sa["5.key"]) == float(sb["5.key"]) == float(sc["5.key"]) == 21.0  # 3 epochs of 7 steps
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sb[name], sc[name], rtol=1e-3, atol=1e-4)


@needs_cuda
def test_cuda_fit_of_a_model_without_trainable_params_reads_its_epoch():
    """No params: the largest-magnitude check is a CPU 0 that must join the epoch's CUDA numbers."""
    X, Y = disk_data(n=100, device="cuda")
    model = gd.Sequential(gd.Standardize().adapt(X)).to("cuda")  # its mean and std are not trained
    history = model.fit(X, Y[:, :1].expand(-1, 2).contiguous(), epochs=2, batch_size=20, verbose=False)
    assert history.epochs == 2 and math.isfinite(history["loss"][-1])


def test_large_arenas_are_let_go_between_epochs_small_ones_kept():
    """fit evaluates the whole training set between epochs; a big arena kept alive meanwhile
    raised its peak memory by a third at width 1024."""
    X, Y = disk_data(n=600)
    for width, kept in ((16, True), (512, False)):
        gen = torch.Generator().manual_seed(0)
        model = gd.Sequential(gd.Linear(2, width, generator=gen), gd.Tanh(), gd.Linear(width, 1, generator=gen))
        step = TrainStep(model, gd.MSE(), gd.SGD(lr=0.01))
        with torch.inference_mode():
            step.epoch(X, Y, 300, None, 0.01)
        assert bool(step._arenas) is kept


def test_a_train_step_refuses_params_that_share_elements_before_any_update():
    """fit refused these; TrainStep trained the shared elements twice a step, silently, and
    an expanded param failed inside torch after part of an update."""
    X, Y = torch.rand(6, 3), torch.rand(6, 4)
    model = gd.Sequential(gd.Linear(3, 4), gd.Tanh(), gd.Linear(4, 4))
    buf = torch.zeros(6)
    model.layers[0].bias, model.layers[2].bias = buf[0:4], buf[2:6]
    with pytest.raises(ValueError, match="update those elements twice"):
        gd.TrainStep(model, gd.MSE(), gd.SGD(lr=0.1))(X, Y, 0.1)
    model = gd.Sequential(gd.Linear(3, 4), gd.Tanh(), gd.Linear(4, 2))
    model.layers[2].bias = torch.zeros(1).expand(2)
    before = model.layers[0].weight.clone()
    with pytest.raises(ValueError, match="param 2.bias"):
        gd.TrainStep(model, gd.MSE(), gd.SGD(lr=0.1))(X, Y[:, :2], 0.1)
    assert torch.equal(model.layers[0].weight, before)


def test_captured_epochs_update_batchnorm_and_dropout_state_as_the_plain_step(monkeypatch):
    """The buffers' next values are written inside the captured epoch, and the masks are
    made from the key on the device: a replay draws each step's fresh mask and moves the
    running statistics, as the uncaptured fit does, bit for bit."""
    def cnn() -> gd.Sequential:
        gen = torch.Generator().manual_seed(4)
        return gd.Sequential(gd.Reshape((1, 4, 4)), gd.Conv2d(1, 3, 3, padding=1, generator=gen), gd.BatchNorm2d(3),
                             gd.ReLU(), gd.MaxPool2d(2), gd.Dropout(0.5, seed=2), gd.Flatten(),
                             gd.Linear(12, 2, generator=gen))

    gen = torch.Generator().manual_seed(0)
    X, labels = torch.rand(30, 16, generator=gen), torch.randint(0, 2, (30,), generator=gen)
    settings = dict(loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=8, seed=1,
                    verbose=False)
    plain = cnn()
    plain_history = plain.fit(X, labels, **settings)
    graphs = RecordedGraphs()
    monkeypatch.setattr(step_module, "_GRAPHS", graphs)
    captured = cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capture applies: no fallback note
        history = captured.fit(X, labels, **settings)
    assert (graphs.captures, graphs.replays) == (1, 3)
    assert history["loss"] == plain_history["loss"]
    assert float(captured.state()["5.key"]) == 12.0  # 3 epochs of 4 steps
    for name, t in plain.state().items():
        assert torch.equal(captured.state()[name], t), name
