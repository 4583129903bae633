"""graphdl's generated step compiled by torch.compile (Inductor) against graphdl's own.

graphdl lowers a graph to a plain Python function of torch calls, which is what
torch.compile takes. This times the training step's gradient function of the bench's
2-w-w-w-1 tanh net (forward, MSE, backward; not the update) three ways, one thread:

  graphdl    the step `fit` runs: the arena form, results written into buffers
             planned once, called as fit's loop calls it (`TrainStep._plain_steps`)
  plain      graphdl's plain form (`gd.compile(...).fn`, new tensors at every call)
  inductor   that plain form through torch.compile(fullgraph=True, dynamic=False),
             its aten calls made through torch.ops.aten so that Dynamo can trace them

and prints each one's median µs per call (alternated), the compile's seconds, and
whether Inductor's results agree with graphdl's. A run that compiles for the first time
on a machine pays Inductor's C++ build; a second run reads Inductor's on-disk cache.

    PYTHONPATH=. python tools/bench_inductor.py
    PYTHONPATH=. python tools/bench_inductor.py --configs 25:100
"""

from __future__ import annotations

import argparse
import builtins
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench  # noqa: E402

import graphdl as gd  # noqa: E402
from graphdl.ops import products  # noqa: E402


def traceable(compiled: gd.Compiled):
    """The same generated source, defined again with `aten` as torch.ops.aten (graphdl's
    own `aten` calls the kernels' C++ entries, which Dynamo cannot trace) and each matrix
    product as torch's own kernel (the choice among kernels, `graphdl.ops.choice`, looks
    its way up in Python at each call, which Dynamo cannot trace either; Inductor picks
    its own kernels for the products)."""
    kernels = types.SimpleNamespace(mm=products.mkl_mm, addmm=products.mkl_addmm,
                                    addmm_tanh=products.mkl_addmm_tanh)
    env = dict(compiled.fn.__globals__, aten=torch.ops.aten, products=kernels)
    namespace: dict = {}
    exec(builtins.compile(compiled.source, "<graphdl for inductor>", "exec"), env, namespace)  # noqa: S102
    return namespace[compiled.fn.__name__]


def measure(width: int, batch: int, rounds: int) -> dict:
    model = bench.build_model(bench.initial_weights(width), "tanh")
    x, y = bench.disk_data(batch, "cpu")
    names = list(model.parameters())
    plain = gd.compile(gd.grad(model.graph(loss=gd.MSE()), names))
    step = gd.TrainStep(model, gd.MSE(), gd.SGD(lr=bench.LR, momentum=bench.MOMENTUM))
    with torch.inference_mode():
        started = time.perf_counter()
        inductor = torch.compile(traceable(plain), fullgraph=True, dynamic=False)
        got = inductor(x, y)
        compile_s = time.perf_counter() - started
        want = plain.fn(x, y)
        agree = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, want, strict=True))
        arena = step._arena(batch)  # what fit's loop runs per batch, with the bindings it made once
        ways = {"graphdl": lambda: arena.run(x, y, arena.bindings), "plain": lambda: plain.fn(x, y),
                "inductor": lambda: inductor(x, y)}
        calls = max(5, int(2e7 / (batch * width * width)))
        for way in ways.values():
            way()
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                for _ in range(calls):
                    way()
                times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {"us": {k: statistics.median(v) for k, v in times.items()}, "compile_s": compile_s, "agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="25:5,25:100,256:256", help="width:batch,...")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'net':>12} | {'graphdl':>9} {'plain':>9} {'inductor':>9} µs/call | inductor/graphdl | compile s | agree")
    for config in args.configs.split(","):
        width, batch = map(int, config.split(":"))
        r = measure(width, batch, args.rounds)
        us = r["us"]
        print(f"{f'{width}w b{batch}':>12} | {us['graphdl']:9.1f} {us['plain']:9.1f} {us['inductor']:9.1f}         | "
              f"{us['inductor'] / us['graphdl']:16.2f} | {r['compile_s']:9.1f} | {r['agree']}", flush=True)


if __name__ == "__main__":
    main()
