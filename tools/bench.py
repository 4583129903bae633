"""Training-step benchmark: graphdl against PyTorch eager and a hand-written torch loop.

For each net (in 2 -> width -> width -> width -> 1, tanh or relu hidden, MSE loss) it
times one full training step (forward, backward, SGD with momentum) of three contenders
that start from the same weights and see the same batches:

  graphdl  gd.Sequential's compiled gradient graph (`Compiled.fn`) then gd.SGD.step,
           as gd.fit runs each batch
  eager    nn.Sequential + autograd + torch.optim.SGD(momentum)
  hand     plain torch written by hand: addmm forward, manual backward, _foreach_ update

Timing runs in one subprocess per net with the contenders alternated block by block
(medians reported, ratios from the same run); peak memory runs each contender in a
subprocess of its own and reports its peak over a baseline process that only imports and
makes the data (ru_maxrss on CPU, torch.cuda.max_memory_allocated on CUDA). It also
times compiling the reference (disk) net: build + grad + passes + codegen.

With --compile-scaling it instead times the compiler on gradient graphs of deep nets
(about 1k, 10k and 100k nodes), stage by stage, per node, to show that its cost grows
linearly with graph size.

    PYTHONPATH=. python tools/bench.py               # the full table, one thread
    PYTHONPATH=. python tools/bench.py --quick --json
    PYTHONPATH=. python tools/bench.py --compile-scaling
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

CONFIGS = [(25, 5), (25, 100), (256, 256), (1024, 1024)]  # (width, batch)
CONTENDERS = ["graphdl", "eager", "hand"]
LR, MOMENTUM = 0.01, 0.9


# -- the three contenders -----------------------------------------------------------------


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


def make_batches(batch: int, count: int, device: str, seed: int = 1):
    """Points in [0,1]^2 labelled 1 inside the disk of radius 1/sqrt(2*pi) at (0.5, 0.5)."""
    import math

    import torch
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.rand(batch, 2, generator=gen)
        y = (((x - 0.5) ** 2).sum(1, keepdim=True) < 1 / (2 * math.pi)).float()
        out.append((x.to(device), y.to(device)))
    return out


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


def make_graphdl(layers, act: str, device: str) -> Callable:
    """What gd.fit does per batch: the compiled step's unchecked entry, then SGD.step."""
    import graphdl as gd
    model = build_model([(w.to(device), b.to(device)) for w, b in layers], act)
    params = list(model.parameters().values())
    run = gd.compile(gd.grad(model.graph(loss=gd.MSE()), list(model.parameters()))).fn
    opt = gd.SGD(lr=LR, momentum=MOMENTUM)
    opt.reset(params)

    def step(x, y):
        out = run(x, y)
        opt.update(params, list(out[1:]), LR, overwrite_grads=True)
        return out[0]
    return step


def make_eager(layers, act: str, device: str) -> Callable:
    import torch
    from torch import nn
    mods: list[nn.Module] = []
    for k, (w, b) in enumerate(layers):
        lin = nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            lin.bias.copy_(b)
        mods.append(lin)
        if k < len(layers) - 1:
            mods.append(nn.Tanh() if act == "tanh" else nn.ReLU())
    model = nn.Sequential(*mods).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    mse = nn.functional.mse_loss

    def step(x, y):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def make_hand(layers, act: str, device: str) -> Callable:
    import torch
    ws = [w.to(device).clone() for w, _ in layers]
    bs = [b.to(device).clone() for _, b in layers]
    params = [t for pair in zip(ws, bs, strict=True) for t in pair]
    bufs = [torch.zeros_like(p) for p in params]
    f = torch.tanh if act == "tanh" else torch.relu

    def step(x, y):
        acts = [x]
        for w, b in zip(ws[:-1], bs[:-1], strict=True):
            acts.append(f(torch.addmm(b, acts[-1], w)))
        d = torch.addmm(bs[-1], acts[-1], ws[-1]) - y
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
    return step


MAKERS = {"graphdl": make_graphdl, "eager": make_eager, "hand": make_hand}


# -- workers (one subprocess each) -------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def worker_time(width: int, batch: int, act: str, device: str, rounds: int, target_s: float) -> dict:
    """Median µs per step of each contender, alternated block by block, plus a check that
    their loss trajectories agree from the same start."""
    import torch
    layers = initial_weights(width)
    batches = make_batches(batch, 8, device)
    check = {}
    for name in CONTENDERS:
        step = MAKERS[name](layers, act, device)
        check[name] = [float(step(*batches[i % len(batches)])) for i in range(4)]
    steps = {name: MAKERS[name](layers, act, device) for name in CONTENDERS}
    per_block = {}
    for name, step in steps.items():  # warm up, and size a block to about target_s
        for i in range(3):
            step(*batches[i % len(batches)])
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < target_s / 4 or n < 2:
            step(*batches[n % len(batches)])
            n += 1
        _sync(device)
        per_step = (time.perf_counter() - t0) / n
        per_block[name] = max(1, int(target_s / per_step))
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for r in range(rounds):
        order = CONTENDERS[r % 3:] + CONTENDERS[:r % 3]  # rotate who goes first
        for name in order:
            step, n = steps[name], per_block[name]
            _sync(device)
            t0 = time.perf_counter()
            for i in range(n):
                step(*batches[i % len(batches)])
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / n * 1e6)
    ref = torch.tensor(check["eager"])
    agree = all(torch.allclose(torch.tensor(v), ref, rtol=1e-3, atol=1e-5) for v in check.values())
    return {"us": {k: statistics.median(v) for k, v in samples.items()}, "agree": agree,
            "losses": check, "threads": torch.get_num_threads()}


def _peak(device: str) -> float:
    """Peak memory so far, in MiB."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_mem(width: int, batch: int, act: str, device: str, contender: str) -> dict:
    """Peak memory of one contender running a few steps ("none": the baseline process).
    Every process first runs each contender on a width-1 net, so the code and lazy imports
    they pull in (torch.optim's use torch._dynamo) count in the baseline, and the
    difference to "none" is working memory."""
    import torch
    tiny = initial_weights(1)
    for name in CONTENDERS:
        step = MAKERS[name](tiny, act, device)
        for x, y in make_batches(1, 2, device):
            step(x, y)
    layers = initial_weights(width)
    batches = make_batches(batch, 2, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if contender != "none":
        step = MAKERS[contender](layers, act, device)
        for i in range(5):
            step(*batches[i % 2])
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


def peak_memory(args: argparse.Namespace, base: dict, repeats: int) -> dict[str, float]:
    """MiB each contender's process peaks above the baseline process; the median of
    `repeats` rounds of fresh processes (the allocator makes single readings jumpy)."""
    samples: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    for _ in range(repeats):
        floor = spawn(args, {"kind": "mem", **base, "contender": "none"})["peak_mib"]
        for c in CONTENDERS:
            samples[c].append(spawn(args, {"kind": "mem", **base, "contender": c})["peak_mib"] - floor)
    return {c: statistics.median(v) for c, v in samples.items()}


def run_worker(job: dict, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    kind = job.pop("kind")
    return {"time": worker_time, "mem": worker_mem, "compile": worker_compile}[kind](**job)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--act", choices=["tanh", "relu"], default="tanh", help="hidden activation")
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--configs", default=None, help="width:batch pairs, e.g. 25:5,1024:1024")
    p.add_argument("--no-mem", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--compile-scaling", action="store_true",
                   help="time grad/print/parse/compile per node on 1k, 10k, 44k and 100k-node gradient graphs")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print(json.dumps(run_worker(json.loads(args._worker), args.threads)))
        return
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    if args.compile_scaling:
        import torch
        torch.set_num_threads(args.threads)
        rows = compile_scaling(SCALING_NODES, repeats=1 if args.quick else 3)
        if args.json:
            print(json.dumps({"rows": rows, "target_nodes": TARGET_NODES, "target_s": TARGET_S}))
        else:
            print_compile_scaling(rows)
        return
    configs = CONFIGS if not args.configs else [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    rounds, target = (5, 0.05) if args.quick else (15, 0.2)
    rows = []
    for width, batch in configs:
        base = {"width": width, "batch": batch, "act": args.act, "device": args.device}
        timing = spawn(args, {"kind": "time", **base, "rounds": rounds, "target_s": target})
        row = {**base, **timing}
        if not args.no_mem:
            row["peak_mib"] = peak_memory(args, base, repeats=1 if args.quick else 3)
        rows.append(row)
        if not args.json:
            _print_row(row, first=len(rows) == 1)
    comp = spawn(args, {"kind": "compile", "act": args.act, "repeats": 7 if args.quick else 25})
    if args.json:
        print(json.dumps({"threads": args.threads, "device": args.device, "rows": rows, "compile_ms": comp}))
    else:
        print(f"\ncompile of the disk net (build + grad + passes + codegen): {comp['ms']:.2f} ms median "
              f"({comp['min_ms']:.2f} min)")


def _print_row(row: dict, first: bool) -> None:
    if first:
        print(f"{'net':>22} | {'graphdl':>9} {'eager':>9} {'hand':>9} µs/step | {'eager/gd':>8} {'hand/gd':>8} "
              f"| peak MiB gd / eager / hand | agree")
    us = row["us"]
    mem = row.get("peak_mib")
    mem_s = " / ".join(f"{mem[c]:.1f}" for c in CONTENDERS) if mem else "-"
    net = f"{row['width']}w b{row['batch']} {row['act']}"
    print(f"{net:>22} | {us['graphdl']:9.1f} {us['eager']:9.1f} {us['hand']:9.1f}         | "
          f"{us['eager'] / us['graphdl']:8.2f} {us['hand'] / us['graphdl']:8.2f} | {mem_s:>26} | {row['agree']}",
          flush=True)


if __name__ == "__main__":
    main()
