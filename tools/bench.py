"""Training-loop benchmark: graphdl's fit against PyTorch eager, a hand-written torch loop
and JAX (per-step jit and a whole epoch in one lax.scan), plus compile and start-up.

Every contender runs the same training loop on the same data from the same weights: a
2 -> width -> width -> width -> 1 net (tanh or relu hidden, MSE loss, SGD with momentum
0.9) over n points of the disk task, n a multiple of the batch (n = batch * max(4,
ceil(1000 / batch))), every epoch shuffled by the same permutation (torch.randperm from
one seeded generator, as fit draws it), and after every epoch the mean loss over the
epoch's batches and the accuracy on the whole training set, read to the host:

  graphdl   gd.Sequential.fit itself (its compiled TrainStep: arena, planned update;
            on CUDA the epoch captured as a CUDA graph)
  eager     nn.Sequential + autograd + torch.optim.SGD
  hand      plain torch written by hand: addmm forward, manual backward, _foreach update
  jax       a jitted step per batch; the batch sliced inside the jit (dynamic_slice)
  jax-scan  a whole epoch as one jitted lax.scan over the batches
  compiled  torch.compile(model, mode="reduce-overhead") of the eager model (CUDA, or
            --torch-compile)
  graphdl-uncaptured  (CUDA) fit with GRAPHDL_CUDA_GRAPHS=0

Timing runs in one subprocess per net, pinned to one CPU core with one torch thread and
XLA's CPU client on one thread (XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1"); the contenders alternate block by block, a block
being a whole training run of some epochs, and each contender's median block time per
step is reported (wall clock, and the process's CPU time, which shared machines disturb
less). Ratios come from the same run. The contenders' per-epoch losses and accuracies
must agree ("agree"). Peak memory runs each contender in a process of its own, above a
baseline process. JAX is optional (`pip install -e ".[bench]"`); without it the JAX
columns are skipped with a note.

With --tanh it instead times tanh on the step's and the accuracy pass's sizes, torch's
kernel against the formulas torch's faster kernels allow and JAX's jitted tanh, with
each one's largest error in ulp, then the cost per element of tanh and exp (MKL's VML,
where torch has MKL) against exp2 and sigmoid (torch's own loops), naming the processor
(why fit keeps torch.tanh: see docs/performance.md).

With --compile-scaling it instead times the compiler on gradient graphs of deep nets
(about 1k, 10k and 100k nodes), stage by stage, per node, to show that its cost grows
linearly with graph size.

    PYTHONPATH=. python tools/bench.py                 # the full table
    PYTHONPATH=. python tools/bench.py --quick --configs 25:5,25:100
    PYTHONPATH=. python tools/bench.py --startup       # the disk example's wall time, split
    PYTHONPATH=. python tools/bench.py --compile-scaling
    PYTHONPATH=. python tools/bench.py --tanh
    PYTHONPATH=. python tools/bench.py --optimizers --quick --configs 25:5,256:256

With --optimizers it instead times, for each of graphdl's optimizers, its planned update
alone (on the fit step's gradient buffers) and fit's whole step with it.

docs/performance.md shows what each of these printed on this project's machine, and
what it means.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

CONFIGS = [(25, 5), (25, 100), (256, 256), (1024, 1024)]  # (width, batch)
LR, MOMENTUM, SEED = 0.01, 0.9, 0
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

Train = Callable[[int], list[tuple[float, float]]]  # epochs -> [(mean loss, accuracy)] per epoch


# -- the task -------------------------------------------------------------------------------


def points(batch: int) -> int:
    """The data size for a batch size: a whole number of batches, about 1,000 points."""
    return batch * max(4, math.ceil(1000 / batch))


def initial_weights(width: int, seed: int = 0):
    """[(W [in,out], b [out])] per layer: the same start for every contender."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    dims = [2, width, width, width, 1]
    layers = []
    for i, o in zip(dims[:-1], dims[1:], strict=True):
        bound = 1 / i ** 0.5  # nn.Linear's default init range
        w = (torch.rand(i, o, generator=gen) * 2 - 1) * bound
        layers.append((w, (torch.rand(o, generator=gen) * 2 - 1) * bound))
    return layers


def disk_data(n: int, device: str, seed: int = 1):
    """Points in [0,1]^2 labelled 1 inside the disk of radius 1/sqrt(2*pi) at (0.5, 0.5)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen)
    y = (((x - 0.5) ** 2).sum(1, keepdim=True) < 1 / (2 * math.pi)).float()
    return x.to(device), y.to(device)


def permutations(n: int):
    """The epochs' permutations, in order: what fit(seed=SEED) draws."""
    import torch
    gen = torch.Generator().manual_seed(SEED)
    return lambda: torch.randperm(n, generator=gen)


def _accuracy(pred, y):
    return ((pred > 0.5) == (y > 0.5)).float().mean()


def build_model(layers, act: str):
    """The net as a gd.Sequential holding copies of `layers`' weights."""
    import graphdl as gd
    mods = []
    for k, (w, b) in enumerate(layers):
        lin = gd.Linear(*w.shape)
        lin.weight, lin.bias = w.clone(), b.clone()
        mods.append(lin)
        if k < len(layers) - 1:
            mods.append(gd.Tanh() if act == "tanh" else gd.ReLU())
    return gd.Sequential(*mods)


def compile_disk(act: str = "tanh"):
    """Build + grad + passes + codegen of the reference net: what the compile target counts."""
    import graphdl as gd
    model = build_model(initial_weights(25), act)
    return gd.compile(gd.grad(model.graph(loss=gd.MSE()), list(model.parameters())))


# -- the contenders: each returns train(epochs), a whole run from the initial weights ---------


def make_graphdl(layers, act: str, device: str, batch: int, captured: bool = True) -> Train:
    """gd.Sequential.fit, the model built once (its compiled step is cached on it) and its
    weights reset before each run."""
    import graphdl as gd
    model = build_model([(w.to(device), b.to(device)) for w, b in layers], act)
    linears = [m for m in model.layers if isinstance(m, gd.Linear)]
    X, Y = disk_data(points(batch), device)

    def train(epochs: int) -> list[tuple[float, float]]:
        for lin, (w, b) in zip(linears, layers, strict=True):
            lin.weight, lin.bias = w.to(device).clone(), b.to(device).clone()
        if not captured:
            os.environ["GRAPHDL_CUDA_GRAPHS"] = "0"
        try:
            h = model.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=LR, momentum=MOMENTUM), epochs=epochs,
                          batch_size=batch, shuffle=True, seed=SEED, verbose=False)
        finally:
            os.environ.pop("GRAPHDL_CUDA_GRAPHS", None)
        return list(zip(h["loss"], h["accuracy"], strict=True))
    return train


def _torch_loop(step: Callable, evaluate: Callable, X, Y, batch: int) -> Callable[[int], list]:
    """The epoch loop the torch contenders share: shuffle, a step per batch, then the
    mean loss and the accuracy read in one sync."""
    import torch

    def run(epochs: int) -> list[tuple[float, float]]:
        draw = permutations(len(X))
        history = []
        for _ in range(epochs):
            order = draw().to(X.device)
            Xe, Ye = X.index_select(0, order), Y.index_select(0, order)
            losses = [step(x, y) for x, y in zip(Xe.split(batch), Ye.split(batch), strict=True)]
            history.append(tuple(torch.stack([torch.stack(losses).mean(), evaluate()]).tolist()))
        return history
    return run


def _eager_model(layers, act: str, device: str):
    import torch
    from torch import nn
    mods: list[nn.Module] = []
    for k, (w, _) in enumerate(layers):
        mods.append(nn.Linear(*w.shape))
        if k < len(layers) - 1:
            mods.append(nn.Tanh() if act == "tanh" else nn.ReLU())
    model = nn.Sequential(*mods).to(device)

    def reset() -> None:
        with torch.no_grad():
            for lin, (w, b) in zip(model[::2], layers, strict=True):
                lin.weight.copy_(w.t())
                lin.bias.copy_(b)
    return model, reset


def make_eager(layers, act: str, device: str, batch: int, compiled: bool = False) -> Train:
    import torch
    model, reset = _eager_model(layers, act, device)
    net = torch.compile(model, mode="reduce-overhead") if compiled else model
    mse = torch.nn.functional.mse_loss
    X, Y = disk_data(points(batch), device)

    def train(epochs: int) -> list[tuple[float, float]]:
        reset()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def step(x, y):
            opt.zero_grad()
            loss = mse(net(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        def evaluate():
            with torch.no_grad():
                return _accuracy(net(X), Y)
        return _torch_loop(step, evaluate, X, Y, batch)(epochs)
    return train


def make_compiled(layers, act: str, device: str, batch: int) -> Train:
    return make_eager(layers, act, device, batch, compiled=True)


def make_hand(layers, act: str, device: str, batch: int) -> Train:
    import torch
    f = torch.tanh if act == "tanh" else torch.relu
    X, Y = disk_data(points(batch), device)

    def train(epochs: int) -> list[tuple[float, float]]:
        ws = [w.to(device).clone() for w, _ in layers]
        bs = [b.to(device).clone() for _, b in layers]
        params = [t for pair in zip(ws, bs, strict=True) for t in pair]
        bufs = [torch.zeros_like(p) for p in params]

        def forward(x):
            acts = [x]
            for w, b in zip(ws[:-1], bs[:-1], strict=True):
                acts.append(f(torch.addmm(b, acts[-1], w)))
            return acts, torch.addmm(bs[-1], acts[-1], ws[-1])

        def step(x, y):
            acts, out = forward(x)
            d = out - y
            loss = (d * d).mean()
            g = d * (2.0 / d.numel())
            grads = [None] * len(params)
            for k in reversed(range(len(ws))):
                a = acts[k]
                grads[2 * k] = a.t() @ g
                grads[2 * k + 1] = g.sum(0)
                if k:
                    g = g @ ws[k].t()
                    g = g * (1 - a * a) if act == "tanh" else g * (a > 0)
            torch._foreach_mul_(bufs, MOMENTUM)  # u <- momentum*u + lr*g; w <- w - u
            torch._foreach_add_(bufs, grads, alpha=LR)
            torch._foreach_sub_(params, bufs)
            return loss

        with torch.inference_mode():
            return _torch_loop(step, lambda: _accuracy(forward(X)[1], Y), X, Y, batch)(epochs)
    return train


def _jax_parts(layers, act: str, batch: int):
    """The net, loss and SGD step in JAX, and the data as JAX arrays."""
    import jax
    import jax.numpy as jnp
    f = jnp.tanh if act == "tanh" else jax.nn.relu
    X, Y = disk_data(points(batch), "cpu")
    X, Y = jnp.asarray(X.numpy()), jnp.asarray(Y.numpy())
    start = [(jnp.asarray(w.numpy()), jnp.asarray(b.numpy())) for w, b in layers]

    def forward(params, x):
        for w, b in params[:-1]:
            x = f(x @ w + b)
        w, b = params[-1]
        return x @ w + b

    def loss_fn(params, x, y):
        return jnp.mean((forward(params, x) - y) ** 2)

    def sgd(params, velocity, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        velocity = jax.tree.map(lambda u, g: MOMENTUM * u + LR * g, velocity, grads)
        return jax.tree.map(lambda p, u: p - u, params, velocity), velocity, loss

    accuracy = jax.jit(lambda params: jnp.mean(((forward(params, X) > 0.5) == (Y > 0.5)).astype(jnp.float32)))
    return X, Y, start, sgd, accuracy


def make_jax(layers, act: str, device: str, batch: int) -> Train:
    """A jitted step per batch, the batch sliced inside the jit from the shuffled data."""
    import jax
    import jax.numpy as jnp
    X, Y, start, sgd, accuracy = _jax_parts(layers, act, batch)
    shuffle = jax.jit(lambda perm: (X[perm], Y[perm]))

    @jax.jit
    def step(params, velocity, Xe, Ye, first):
        x = jax.lax.dynamic_slice_in_dim(Xe, first, batch)
        y = jax.lax.dynamic_slice_in_dim(Ye, first, batch)
        return sgd(params, velocity, x, y)

    def train(epochs: int) -> list[tuple[float, float]]:
        params, velocity = start, jax.tree.map(jnp.zeros_like, start)
        draw = permutations(int(X.shape[0]))
        history = []
        for _ in range(epochs):
            Xe, Ye = shuffle(jnp.asarray(draw().numpy()))
            losses = []
            for first in range(0, int(X.shape[0]), batch):
                params, velocity, loss = step(params, velocity, Xe, Ye, first)
                losses.append(loss)
            history.append(tuple(map(float, jax.device_get((jnp.mean(jnp.stack(losses)), accuracy(params))))))
        return history
    return train


def make_jax_scan(layers, act: str, device: str, batch: int) -> Train:
    """The whole epoch, shuffle included, as one jitted lax.scan over the batches."""
    import jax
    import jax.numpy as jnp
    X, Y, start, sgd, accuracy = _jax_parts(layers, act, batch)

    @jax.jit
    def epoch(params, velocity, perm):
        xs = X[perm].reshape(-1, batch, X.shape[1])
        ys = Y[perm].reshape(-1, batch, Y.shape[1])

        def body(carry, xy):
            params, velocity, loss = sgd(*carry, *xy)
            return (params, velocity), loss
        (params, velocity), losses = jax.lax.scan(body, (params, velocity), (xs, ys))
        return params, velocity, jnp.mean(losses)

    def train(epochs: int) -> list[tuple[float, float]]:
        params, velocity = start, jax.tree.map(jnp.zeros_like, start)
        draw = permutations(int(X.shape[0]))
        history = []
        for _ in range(epochs):
            params, velocity, loss = epoch(params, velocity, jnp.asarray(draw().numpy()))
            history.append(tuple(map(float, jax.device_get((loss, accuracy(params))))))
        return history
    return train


MAKERS = {"graphdl": make_graphdl, "eager": make_eager, "hand": make_hand, "jax": make_jax,
          "jax-scan": make_jax_scan, "compiled": make_compiled,
          "graphdl-uncaptured": lambda *a: make_graphdl(*a, captured=False)}


def contenders(device: str, torch_compile: bool) -> tuple[list[str], list[str]]:
    """The contenders this run has, and notes on those it leaves out."""
    names, notes = ["graphdl", "eager", "hand"], []
    if device.startswith("cuda"):
        names.insert(1, "graphdl-uncaptured")
    if device.startswith("cuda") or torch_compile:
        names.append("compiled")
    if device != "cpu":
        notes.append("JAX skipped: the installed jax runs on CPU only here")
    elif _has_jax():
        names += ["jax", "jax-scan"]
    else:
        notes.append('JAX skipped: not installed (pip install -c constraints.txt -e ".[bench]")')
    return names, notes


def _has_jax() -> bool:
    import importlib.util
    return importlib.util.find_spec("jax") is not None


# -- workers (one subprocess each) ------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _pin_one_cpu() -> None:
    """Run on one core, so that no contender gets a second one through helper threads."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


def worker_time(width: int, batch: int, act: str, device: str, rounds: int, target_s: float,
                names: list[str]) -> dict:
    """Median µs per step of each contender's whole training run, wall and CPU time,
    alternated block by block; and whether their per-epoch metrics agree."""
    layers = initial_weights(width)
    steps_per_epoch = points(batch) // batch
    runs = {name: MAKERS[name](layers, act, device, batch) for name in names}
    check = {name: train(3) for name, train in runs.items()}  # also warms up (compiles)
    epochs = {}
    for name, train in runs.items():  # size a block to about target_s
        _sync(device)
        t0 = time.perf_counter()
        train(2)
        _sync(device)
        per_epoch = (time.perf_counter() - t0) / 2
        epochs[name] = max(1, round(target_s / per_epoch))
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            steps = epochs[name] * steps_per_epoch
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runs[name](epochs[name])
            _sync(device)
            wall[name].append((time.perf_counter() - t0) / steps * 1e6)
            cpu[name].append((time.process_time() - c0) / steps * 1e6)
    ref = check["eager"]
    agree = {name: all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-5) and math.isclose(c, d, abs_tol=2.5e-3)
                       for (a, c), (b, d) in zip(h, ref, strict=True)) for name, h in check.items()}
    return {"us": {k: statistics.median(v) for k, v in wall.items()},
            "cpu_us": {k: statistics.median(v) for k, v in cpu.items()},
            "agree": all(agree.values()), "agree_each": agree, "history": check, "epochs_per_block": epochs}


OPTIMIZERS = {  # what --optimizers times, by name: the update's settings that cost the most work
    "SGD": "gd.SGD(lr=LR, momentum=MOMENTUM)",
    "Adam": "gd.Adam(lr=1e-3)",
    "AdamW": "gd.AdamW(lr=1e-3, amsgrad=True)",
    "RMSprop": "gd.RMSprop(lr=1e-3, momentum=MOMENTUM, centered=True)",
    "Adagrad": "gd.Adagrad(lr=1e-2)",
}


def worker_optimizers(width: int, batch: int, act: str, device: str, rounds: int, target_s: float) -> dict:
    """Per optimizer: the median µs of its planned update alone (on the fit step's gradient
    buffers), and of fit's whole step, alternated block by block."""
    import torch

    import graphdl as gd
    from graphdl.step import TrainStep
    layers = initial_weights(width)
    X, Y = disk_data(points(batch), device)
    steps_per_epoch = points(batch) // batch
    made = {name: eval(code, {"gd": gd, "LR": LR, "MOMENTUM": MOMENTUM}) for name, code in OPTIMIZERS.items()}
    update_us: dict[str, list[float]] = {name: [] for name in made}
    step_us: dict[str, list[float]] = {name: [] for name in made}
    updates = {}
    for name, code in OPTIMIZERS.items():  # the update a fit step runs, planned on its arena's gradient buffers
        opt = eval(code, {"gd": gd, "LR": LR, "MOMENTUM": MOMENTUM})
        step = TrainStep(build_model([(w.to(device), b.to(device)) for w, b in layers], act), gd.MSE(), opt,
                         capture=False)
        with torch.inference_mode():
            step.forward_backward(X[:batch], Y[:batch])
            updates[name] = step._arenas[batch].update
        opt.set_lr(1e-12)  # the same kernels, with the params barely moving however often it runs
    models = {name: build_model([(w.to(device), b.to(device)) for w, b in layers], act) for name in made}

    def run_fit(name: str, epochs: int) -> None:
        model = models[name]
        for lin, (w, b) in zip([m for m in model.layers if isinstance(m, gd.Linear)], layers, strict=True):
            lin.weight, lin.bias = w.to(device).clone(), b.to(device).clone()
        model.fit(X, Y, loss=gd.MSE(), optimizer=made[name], epochs=epochs, batch_size=batch, seed=SEED,
                  verbose=False)
    fits = {name: (lambda epochs, n=name: run_fit(n, epochs)) for name in made}
    epochs, calls = {}, {}
    for name, train in fits.items():  # size the blocks to about target_s / 2 each
        train(1)  # compiles
        _sync(device)
        t0 = time.perf_counter()
        train(1)
        _sync(device)
        epochs[name] = max(1, round(target_s / 2 / (time.perf_counter() - t0)))
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(20):
                updates[name]()
            _sync(device)
        calls[name] = max(20, round(target_s / 2 / ((time.perf_counter() - t0) / 20)))
    for r in range(rounds):
        names = list(made)
        for name in names[r % len(names):] + names[:r % len(names)]:
            with torch.inference_mode():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls[name]):
                    updates[name]()
                _sync(device)
            update_us[name].append((time.perf_counter() - t0) / calls[name] * 1e6)
            _sync(device)
            t0 = time.perf_counter()
            fits[name](epochs[name])
            _sync(device)
            step_us[name].append((time.perf_counter() - t0) / (epochs[name] * steps_per_epoch) * 1e6)
    return {"update_us": {k: statistics.median(v) for k, v in update_us.items()},
            "step_us": {k: statistics.median(v) for k, v in step_us.items()}}


def _peak(device: str) -> float:
    """Peak memory so far, in MiB."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_mem(width: int, batch: int, act: str, device: str, contender: str, names: list[str]) -> dict:
    """Peak memory of one contender training an epoch ("none": the baseline process).
    Every process first runs each contender on a width-1 net, so the code and lazy imports
    they pull in count in the baseline, and the difference to "none" is working memory."""
    import torch
    for name in names:
        MAKERS[name](initial_weights(1), act, device, 4)(1)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if contender != "none":
        MAKERS[contender](initial_weights(width), act, device, batch)(1)
        _sync(device)
    return {"peak_mib": _peak(device)}


def worker_compile(act: str, repeats: int) -> dict:
    compile_disk(act)  # first call pays imports and caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compile_disk(act)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times)}


# -- start-up: the disk example's wall time, split ---------------------------------------------


def startup(repeats: int) -> dict:
    """The wall time of `python examples/disk_graph.py --no-plots`, split (medians of
    `repeats` alternated runs): the interpreter's start and exit (`python -c pass`), the
    imports of torch and of graphdl (timed inside a process that only imports them),
    compile and training (what the example prints with --timings), and the rest
    (making the data, evaluating, saving the model, torch's teardown at exit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    imports = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); import graphdl; "
               "print(f'time: import_torch={t1 - t0}s import_graphdl={time.perf_counter() - t1}s')")
    parts: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as out:
        runs = {"start+exit": ["-c", "pass"], "imports": ["-c", imports],
                "total": [os.path.join(root, "examples", "disk_graph.py"), "--no-plots", "--timings", "--out", out]}
        for _ in range(repeats):
            for name, argv in runs.items():
                t0 = time.perf_counter()
                run = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, check=True)
                if name != "imports":
                    parts.setdefault(name, []).append(time.perf_counter() - t0)
                line = next((ln for ln in run.stdout.splitlines() if ln.startswith("time:")), "time:")
                for k, v in (p.split("=") for p in line.split()[1:]):
                    parts.setdefault(k, []).append(float(v.rstrip("s")))
    split = {k: statistics.median(v) for k, v in parts.items()}
    total = split.pop("total")
    return {**split, "rest": total - sum(split.values()), "total": total}


# -- tanh: torch's kernel against the other ways to compute it ---------------------------------

TANH_SHAPES = [(100, 25), (1000, 25), (256, 256)]  # the disk net's step at batch 100, its accuracy pass; width 256


def tanh_formulas() -> dict:
    """{name: {"us": {shape: median µs per call}, "ulp": largest error}}: torch.tanh, the
    formulas from torch's faster kernels (into a preallocated output, in place where they
    can be), oneDNN's tanh on its own layout, and JAX's jitted tanh when installed. The
    error is |got - tanh(x)| in float32 ulps of tanh(x) (`ulps`), against float64, over
    normally distributed values and values from 1e-38 to 30 in size, both signs."""
    import torch
    torch.set_num_threads(1)

    def via_sigmoid(x, out):  # 2σ(2x) - 1
        return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)

    def via_expm1(x, out):  # e / (e + 2), e = expm1(2x); x clamped where tanh(x) rounds to 1 anyway
        torch.clamp(x, max=9.1, out=out).mul_(2).expm1_()
        return out.div_(out + 2)

    import numpy as np
    same = lambda t: t  # noqa: E731
    ways: dict[str, tuple[Callable, Callable]] = {  # name: (prepare the input, compute into out)
        "torch.tanh": (same, lambda x, out: torch.tanh(x, out=out)),
        "2σ(2x)-1": (same, via_sigmoid), "expm1 form": (same, via_expm1)}
    if torch.backends.mkldnn.is_available():
        ways["oneDNN (to_mkldnn)"] = (same, lambda x, out: out.copy_(torch.tanh(x.to_mkldnn()).to_dense()))
    try:
        os.environ.setdefault("XLA_FLAGS", XLA_ONE_THREAD)
        import jax
        import jax.numpy as jnp
        jitted = jax.jit(jnp.tanh)
        ways["jax.jit(tanh)"] = (lambda t: jnp.asarray(t.numpy()), lambda x, out: jitted(x).block_until_ready())
    except ImportError:
        print("note: jax is not installed (pip install -e '.[bench]'); its tanh is skipped", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    sweep = torch.cat([torch.randn(10**6, generator=gen) * 3, torch.logspace(-38, 1.5, 10**5),
                       -torch.logspace(-38, 1.5, 10**5)])
    truth = torch.tanh(sweep.double())
    results = {}
    for name, (prepare, way) in ways.items():
        got = way(prepare(sweep), torch.empty_like(sweep))
        got = got if isinstance(got, torch.Tensor) else torch.from_numpy(np.array(got))  # JAX's, copied: read-only
        ulp = ulps(got, truth).max().item()
        us = {f"{shape[0]}x{shape[1]}": _us_per_call(way, prepare(torch.randn(*shape, generator=gen) * 2),
                                                      torch.empty(*shape)) for shape in TANH_SHAPES}
        results[name] = {"us": us, "ulp": ulp}
    return results


def _us_per_call(way: Callable, x, out) -> float:
    """Median µs of `way(x, out)` over 9 runs of 20 to 2,000 calls (200,000 elements' worth), after a warm-up."""
    calls = max(20, min(2000, 200_000 // math.prod(x.shape)))
    for _ in range(calls // 10):
        way(x, out)
    runs = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(calls):
            way(x, out)
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def kernel_paths() -> dict:
    """Why torch.tanh is slow here: {"cpu": the processor, "mkl": whether torch has MKL,
    "kernels": {name: {"path": where torch computes it, "ns": per element on [1000, 25]}}}.
    torch sends float tanh and exp (among others) to a vector math library, MKL's VML
    where torch is built with MKL (ATen's UnaryOpsKernel.cpp and cpu/vml.h), and computes
    exp2 and sigmoid in its own vectorised loops. MKL picks its code by processor; on this
    project's AMD EPYC the VML kernels are the slow ones (see docs/performance.md)."""
    import platform

    import torch
    torch.set_num_threads(1)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mkl = torch.backends.mkl.is_available()
    vml, own = "MKL VML" if mkl else "torch's loop", "torch's loop"
    x = torch.randn(1000, 25, generator=torch.Generator().manual_seed(0))
    kernels = {"tanh": (torch.tanh, vml), "exp": (torch.exp, vml), "exp2": (torch.exp2, own),
               "sigmoid": (torch.sigmoid, own)}
    ns = lambda f: _us_per_call(lambda x, out: f(x, out=out), x, torch.empty_like(x)) * 1e3 / x.numel()  # noqa: E731
    return {"cpu": cpu, "mkl": mkl, "kernels": {k: {"path": path, "ns": ns(f)} for k, (f, path) in kernels.items()}}


def ulps(got, truth):
    """|got - truth| in units in the last place of float32 at truth (float64): 2^(e - 23)
    for truth in [2^e, 2^(e+1)), and 2^-149 among the subnormals and at 0. Dividing by
    eps * |truth| instead reads up to 2x low within a binade, and high among subnormals
    (8.4e6 "ulp" for a subnormal off by one ulp), and 0 / 0 (NaN) at truth == 0."""
    import torch
    _, e = torch.frexp(truth)  # |truth| = m * 2^e, m in [0.5, 1)
    e = torch.where(truth == 0, -125, e.clamp(min=-125))  # -125: float32's smallest normal exponent, -126, plus one
    return (got.double() - truth).abs() / torch.ldexp(torch.ones_like(truth), (e - 24).double())


def print_tanh(results: dict, paths: dict) -> None:
    shapes = list(next(iter(results.values()))["us"])
    print(f"{'tanh, one thread':>20} | " + " ".join(f"{s + ' µs':>12}" for s in shapes) + " | largest error (ulp)")
    for name, r in results.items():
        print(f"{name:>20} | " + " ".join(f"{r['us'][s]:12.1f}" for s in shapes) + f" | {r['ulp']:.2f}")
    print(f"\nns per element on 1000x25, {paths['cpu']}: " +
          ", ".join(f"{k} {v['ns']:.2f} ({v['path']})" for k, v in paths["kernels"].items()))


# -- compiler cost against graph size --------------------------------------------------------

SCALING_NODES = [1_000, 10_000, 44_000, 100_000]  # gradient-graph sizes for --compile-scaling
TARGET_NODES, TARGET_S = 44_000, 3.0  # print + parse + grad + compile of 44k nodes in under 3 s
TARGET_GROWTH = 5 / 4  # 4x the nodes in at most 5x the time: time per node grows at most 1.25x
NODES_PER_LAYER = 12  # a Linear + Tanh layer adds about 12 nodes to the gradient graph
STAGES = ["build", "grad", "print", "parse", "compile"]
TARGETED = ["grad", "print", "parse", "compile"]  # the stages the 3 s target counts


def deep_net(depth: int, width: int = 4):
    """A Sequential of `depth` Linear + Tanh layers and a Linear head."""
    import torch

    import graphdl as gd
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [gd.Linear(width, width, generator=gen), gd.Tanh()]
    return gd.Sequential(*layers, gd.Linear(width, 1, generator=gen))


def time_stages(depth: int) -> tuple[int, dict[str, float]]:
    """CPU seconds of each compiler stage on the deep net's gradient graph, and its node
    count: build the forward graph, grad, print the gradient graph, parse the text,
    compile. CPU time (one thread), so that other work on a shared machine counts less."""
    import graphdl as gd
    marks = [time.process_time()]
    model = deep_net(depth)
    graph = model.graph(loss=gd.MSE())
    marks.append(time.process_time())
    grads = gd.grad(graph, list(model.parameters()))
    marks.append(time.process_time())
    text = str(grads)
    marks.append(time.process_time())
    gd.parse(text)
    marks.append(time.process_time())
    gd.compile(grads)
    marks.append(time.process_time())
    return len(grads.nodes), {stage: end - start for stage, start, end in zip(STAGES, marks, marks[1:])}


def compile_scaling(sizes: list[int], repeats: int) -> list[dict]:
    """One row per size: nodes and the best of `repeats` timings of each stage."""
    time_stages(2)  # imports and caches
    rows = []
    for nodes in sizes:
        depth = max(1, round(nodes / NODES_PER_LAYER))
        best: dict[str, float] = {}
        for _ in range(repeats):
            gc.collect()  # the last run's graphs (cycles: values point at their graph) go first
            count, seconds = time_stages(depth)
            best = {k: min(v, best.get(k, v)) for k, v in seconds.items()}
        rows.append({"nodes": count, "depth": depth, "s": best})
    return rows


def print_compile_scaling(rows: list[dict]) -> None:
    print("CPU µs per node of each stage (best of the runs)")
    print(f"{'grad nodes':>10} | " + " ".join(f"{s:>7}" for s in STAGES) + " |   total | "
          "time growth / node growth")
    for previous, row in zip([None, *rows], rows):
        per = " ".join(f"{row['s'][s] / row['nodes'] * 1e6:7.1f}" for s in STAGES)
        growth = ""
        if previous is not None:
            time_x = sum(row["s"].values()) / sum(previous["s"].values())
            nodes_x = row["nodes"] / previous["nodes"]
            growth = f"{time_x:6.1f}x / {nodes_x:4.1f}x = {time_x / nodes_x:.2f}"
        print(f"{row['nodes']:>10} | {per} | {sum(row['s'].values()) / row['nodes'] * 1e6:7.1f} | {growth}")
    k = SCALING_NODES.index(TARGET_NODES)
    before, target = rows[k - 1], rows[k]
    spent = sum(target["s"][s] for s in TARGETED)
    growth = (spent / target["nodes"]) / (sum(before["s"][s] for s in TARGETED) / before["nodes"])
    print(f"\n{target['nodes']:,}-node gradient graph: print + parse + grad + compile = {spent:.2f} s CPU "
          f"(target < {TARGET_S:.0f} s: {'met' if spent < TARGET_S else 'NOT met'})")
    print(f"from {before['nodes']:,} to {target['nodes']:,} nodes their time per node grows {growth:.2f}x "
          f"(target: at most {TARGET_GROWTH}x, i.e. 4x the nodes in at most 5x the time: "
          f"{'met' if growth <= TARGET_GROWTH else 'NOT met'})")


# -- orchestration ------------------------------------------------------------------------


def spawn(args: argparse.Namespace, job: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if job["kind"] == "mem":
        # A fixed glibc mmap threshold: every large tensor gets its own mapping, returned
        # to the OS when freed, so ru_maxrss follows the live bytes instead of whatever
        # the heap kept after glibc's adaptive threshold moved (which made peaks jumpy).
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(job),
                          "--threads", str(args.threads)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"worker {job} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory(args: argparse.Namespace, base: dict, names: list[str], repeats: int) -> dict[str, float]:
    """MiB each contender's process peaks above the baseline process; the median of
    `repeats` rounds of fresh processes (the allocator makes single readings jumpy)."""
    samples: dict[str, list[float]] = {c: [] for c in names}
    for _ in range(repeats):
        floor = spawn(args, {"kind": "mem", **base, "contender": "none", "names": names})["peak_mib"]
        for c in names:
            samples[c].append(spawn(args, {"kind": "mem", **base, "contender": c, "names": names})["peak_mib"] - floor)
    return {c: statistics.median(v) for c, v in samples.items()}


def run_worker(job: dict, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    if threads == 1:
        _pin_one_cpu()
    kind = job.pop("kind")
    return {"time": worker_time, "mem": worker_mem, "compile": worker_compile,
            "optimizers": worker_optimizers}[kind](**job)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="docs/performance.md shows each mode's output on this project's machine.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one pinned core)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--act", choices=["tanh", "relu"], default="tanh", help="hidden activation")
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--configs", default=None, help="width:batch pairs, e.g. 25:5,1024:1024")
    p.add_argument("--no-mem", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--torch-compile", action="store_true",
                   help="add torch.compile(mode='reduce-overhead') on CPU too (on CUDA it always runs)")
    p.add_argument("--startup", action="store_true", help="only time the disk example's start-up and exit")
    p.add_argument("--compile-scaling", action="store_true",
                   help="time grad/print/parse/compile per node on 1k, 10k, 44k and 100k-node gradient graphs")
    p.add_argument("--tanh", action="store_true", help="time and check tanh's formulas on the step's sizes")
    p.add_argument("--optimizers", action="store_true",
                   help="time each optimizer's planned update and fit's step with it (graphdl only)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print(json.dumps(run_worker(json.loads(args._worker), args.threads)))
        return
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    if args.startup:
        split = startup(3 if args.quick else 7)
        print(json.dumps(split) if args.json else "disk example, medians: " + ", ".join(
            f"{k} {v:.3f}s" for k, v in split.items()))
        return
    if args.tanh:
        results, paths = tanh_formulas(), kernel_paths()
        if args.json:
            print(json.dumps({"formulas": results, "kernels": paths}))
        else:
            print_tanh(results, paths)
        return
    if args.compile_scaling:
        import torch
        torch.set_num_threads(args.threads)
        rows = compile_scaling(SCALING_NODES, repeats=1 if args.quick else 3)
        if args.json:
            print(json.dumps({"rows": rows, "target_nodes": TARGET_NODES, "target_s": TARGET_S}))
        else:
            print_compile_scaling(rows)
        return
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; "
                             "run it on a machine with a GPU and a CUDA build of torch")
    configs = CONFIGS if not args.configs else [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    rounds, target = (5, 0.1) if args.quick else (15, 0.3)
    if args.optimizers:
        rows = [{"width": w, "batch": b, **spawn(args, {"kind": "optimizers", "width": w, "batch": b, "act": args.act,
                                                      "device": args.device, "rounds": rounds, "target_s": target})}
                for w, b in configs]
        if args.json:
            print(json.dumps({"threads": args.threads, "device": args.device, "rows": rows}))
            return
        for row in rows:
            print(f"width {row['width']}, batch {row['batch']} ({args.device}, {args.threads} thread"
                  f"{'s' if args.threads > 1 else ''}): µs per call, medians")
            print(f"  {'':10s} {'update':>8s} {'fit step':>9s}")
            for name in OPTIMIZERS:
                print(f"  {name:10s} {row['update_us'][name]:8.2f} {row['step_us'][name]:9.2f}")
        return
    names, notes = contenders(args.device, args.torch_compile)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    rows = []
    for width, batch in configs:
        base = {"width": width, "batch": batch, "act": args.act, "device": args.device}
        timing = spawn(args, {"kind": "time", **base, "rounds": rounds, "target_s": target, "names": names})
        row = {**base, **timing, "roofline": roofline(base["width"], base["batch"], timing["us"]["graphdl"])}
        if not args.no_mem:
            row["peak_mib"] = peak_memory(args, base, names, repeats=1 if args.quick else 3)
        rows.append(row)
        if not args.json:
            _print_row(row, names, first=len(rows) == 1)
    comp = spawn(args, {"kind": "compile", "act": args.act, "repeats": 7 if args.quick else 25})
    if args.json:
        print(json.dumps({"threads": args.threads, "device": args.device, "rows": rows, "compile_ms": comp,
                          "notes": notes}))
    else:
        print(f"\ncompile of the disk net (build + grad + passes + codegen): {comp['ms']:.2f} ms median "
              f"({comp['min_ms']:.2f} min)")


def roofline(width: int, batch: int, step_us: float) -> dict[str, Any]:
    """graphdl's achieved matmul rate on a step of the 2-w-w-w-1 net, and this machine's
    best rate on the step's largest product ([batch, w] @ [w, w]), one thread: the faster
    of the kernels graphdl chooses between (graphdl.ops.products: torch's mm, which is
    MKL's, and oneDNN's), each timed alternately, its fastest round. What a "step" times is an
    epoch's time over its steps, and an epoch is its steps and one accuracy pass over
    the training points (a forward of `batch` rows per step): so 8 * batch * MACs flops
    a step (2 in the forward, 2 in each of the two backward products, 2 in the accuracy
    pass), MACs = 2w + w² + w² + w per example."""
    import torch

    from graphdl.ops import products

    flops = 8 * batch * (2 * width + 2 * width * width + width)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(batch, width), torch.randn(width, width)
        out = torch.empty(batch, width)
        ways = products.mm.candidates(a, b, out=out)
        runs = max(3, min(200, int(2e8 / max(1, 2 * batch * width * width))))
        for way in ways * 2:
            way(a, b, out=out)
        times: dict[str, list[float]] = {w.__name__: [] for w in ways}
        for _ in range(5):
            for way in ways:
                start = time.perf_counter()
                for _ in range(runs):
                    way(a, b, out=out)
                times[way.__name__].append((time.perf_counter() - start) / runs)
    finally:
        torch.set_num_threads(before)
    # The fastest round of the fastest kernel, not a median: on a shared machine a slow
    # round is disturbance, and a rate that is too low would put the floor too high.
    best = min(times, key=lambda name: min(times[name]))
    gemm = 2 * batch * width * width / min(times[best]) / 1e9
    achieved = flops / (step_us * 1e-6) / 1e9
    # The floor: the step's flops all at the best rate and nothing else (no elementwise op,
    # no copy, no transposed operand). graphdl's products run on these kernels, so its step
    # takes no less, and floor / a contender's time is the lowest ratio to it that graphdl
    # could reach on this machine.
    floor_us = flops / (gemm * 1e9) * 1e6
    return {"step_gflops": achieved, "mm_gflops": gemm, "mm_kernel": best, "fraction": achieved / gemm,
            "floor_us": floor_us}


def _print_row(row: dict, names: list[str], first: bool) -> None:
    short = {"graphdl": "gd", "graphdl-uncaptured": "gd-plain", "jax-scan": "scan"}
    others = [n for n in names if n != "graphdl"]
    if first:
        print(f"{'net':>14} | " + " ".join(f"{short.get(n, n):>9}" for n in names) + " µs/step | "
              + " ".join(f"{short.get(n, n) + '/gd':>11}" for n in others) + " | cpu-time ratios | agree")
    us, cpu = row["us"], row["cpu_us"]
    net = f"{row['width']}w b{row['batch']}"
    print(f"{net:>14} | " + " ".join(f"{us[n]:9.1f}" for n in names) + "         | "
          + " ".join(f"{us[n] / us['graphdl']:11.2f}" for n in others) + " | "
          + " ".join(f"{cpu[n] / cpu['graphdl']:.2f}" for n in others) + f" | {row['agree']}", flush=True)
    if row.get("roofline"):
        r = row["roofline"]
        print(f"{'':>14} | roofline: gd's step does its matmuls at {r['step_gflops']:.1f} GF/s, "
              f"{r['fraction']:.0%} of the best GEMM here on [b,w]@[w,w], {r['mm_gflops']:.1f} GF/s "
              f"({r['mm_kernel']})", flush=True)
        if "jax" in us:
            print(f"{'':>14} | floor: its matmuls alone at that rate take {r['floor_us']:.1f} µs a step, "
                  f"so gd/jax can reach {r['floor_us'] / us['jax']:.2f} at best here", flush=True)
    if row.get("peak_mib"):
        print(f"{'':>14} | peak MiB above baseline: "
              + ", ".join(f"{n} {row['peak_mib'][n]:.1f}" for n in names), flush=True)


if __name__ == "__main__":
    main()
