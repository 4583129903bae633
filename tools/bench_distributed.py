"""Data-parallel scaling: examples/second of `fit` on 1 process and on 2 (gloo, 127.0.0.1).

For each net (2 -> width -> width -> width -> 1, tanh, MSE, SGD with momentum) it runs
`fit` with the same global batch once in one process (distributed=False) and once in two
processes launched with torchrun's environment (distributed=True), each process with one
torch thread, the two runs alternated `--repeats` times. It reports the median of

  ex/s        training examples per second over the epochs after the first (an epoch
              is the steps plus fit's per-epoch accuracy over the training set)
  speed-up    2-process ex/s over 1-process ex/s
  wait        ms per step rank 0 spent blocked in allreduce_wait: communication the
              backward pass did not hide
  alone       ms one all-reduce of a step's gradient bytes takes by itself, with no
              training beside it: the communication's full cost
  cpu bound   2 x (CPU time per step of 1 process) / (CPU time per step of both ranks):
              the speed-up two cores to themselves would give if no rank ever waited.
              CPU time barely depends on what else runs on the machine, so this is the
              number to read when other work shares the cores

    PYTHONPATH=. python tools/bench_distributed.py
    PYTHONPATH=. python tools/bench_distributed.py --nets wide --repeats 5

docs/performance.md shows a run on this project's machine and where it stops paying off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time

# name: (width, global batch, examples, epochs)
NETS = {
    "disk": (25, 20, 1000, 6),  # the reference experiment's net and batch
    "mid": (256, 256, 4096, 5),
    "wide": (1024, 1024, 8192, 4),
}


def worker(width: int, batch: int, n: int, epochs: int, distributed: bool) -> dict:
    import torch

    import graphdl as gd
    torch.set_num_threads(1)
    gd.distributed.init()
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, 2, generator=gen)
    Y = (((X - 0.5) ** 2).sum(1, keepdim=True) < 1 / (2 * math.pi)).float()
    layers = [gd.Linear(2, width, generator=gen), gd.Tanh(), gd.Linear(width, width, generator=gen), gd.Tanh(),
              gd.Linear(width, width, generator=gen), gd.Tanh(), gd.Linear(width, 1, generator=gen)]
    model = gd.Sequential(*layers)
    starts: list[tuple[float, float]] = []

    def clock(epoch: int, base_lr: float) -> float:  # a constant schedule that notes when each epoch starts
        starts.append((time.perf_counter(), time.process_time()))
        return base_lr

    gd.distributed.stats.wait_s, gd.distributed.stats.reduced_bytes = 0.0, 0
    model.fit(X, Y, optimizer=gd.SGD(lr=0.01, momentum=0.9), schedule=clock, epochs=epochs, batch_size=batch,
              seed=0, verbose=False, distributed=distributed)
    starts.append((time.perf_counter(), time.process_time()))
    steps = -(-n // batch)
    seconds = starts[-1][0] - starts[1][0]  # the first epoch compiles and warms up
    result = {"ex_per_s": n * (epochs - 1) / seconds, "ms_per_step": seconds / (epochs - 1) / steps * 1e3,
              "cpu_ms_per_step": (starts[-1][1] - starts[1][1]) / (epochs - 1) / steps * 1e3}
    if distributed:
        result["wait_ms"] = gd.distributed.stats.wait_s / (epochs * steps) * 1e3
        result["mib"] = gd.distributed.stats.reduced_bytes / (epochs * steps) / 2**20
        flat = torch.zeros(sum(p.numel() for p in model.parameters().values()))
        for _ in range(3):
            torch.distributed.all_reduce(flat)
        t0 = time.perf_counter()
        reps = 20
        for _ in range(reps):
            torch.distributed.all_reduce(flat)
        result["alone_ms"] = (time.perf_counter() - t0) / reps * 1e3
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(net: str, procs: int) -> dict:
    """One measurement: `procs` processes (1: plain fit; 2: data-parallel): rank 0's result,
    with the CPU time of every rank added up."""
    job = json.dumps({"width": NETS[net][0], "batch": NETS[net][1], "n": NETS[net][2], "epochs": NETS[net][3],
                      "distributed": procs > 1})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    port = str(_free_port())
    ranks = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port) if procs > 1 else env for r in range(procs)]
    children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", job], env=e,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in ranks]
    try:
        outs = [c.communicate(timeout=600) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    for c, (_, err) in zip(children, outs):
        if c.returncode:
            raise SystemExit(f"{net} on {procs} processes failed:\n{err}")
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return {**results[0], "cpu_ms_per_step": sum(r["cpu_ms_per_step"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="docs/performance.md shows a run on this project's machine.")
    p.add_argument("--nets", default=",".join(NETS), help=f"comma-separated, from {', '.join(NETS)}")
    p.add_argument("--repeats", type=int, default=3, help="alternated runs per net; medians are reported")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print(json.dumps(worker(**json.loads(args._worker))))
        return
    rows = []
    if not args.json:
        print(f"{'net':>24} | {'1 proc ex/s':>11} {'2 procs ex/s':>12} {'speed-up':>8} | {'ms/step 1 / 2':>15} | "
              f"{'grads MiB':>9} {'wait ms':>8} {'alone ms':>8} | {'cpu bound':>9}")
    for net in args.nets.split(","):
        samples: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for procs in (1, 2):
                samples[procs].append(run(net, procs))
        med = {procs: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for procs, runs in samples.items()}
        speedups = [b["ex_per_s"] / a["ex_per_s"] for a, b in zip(samples[1], samples[2])]
        bound = 2 * med[1]["cpu_ms_per_step"] / med[2]["cpu_ms_per_step"]
        row = {"net": net, "width": NETS[net][0], "batch": NETS[net][1], "one": med[1], "two": med[2],
               "speedup": statistics.median(speedups), "speedups": speedups, "cpu_bound": bound}
        rows.append(row)
        if not args.json:
            width, batch = NETS[net][:2]
            label = f"{net} ({width}w, batch {batch})"
            print(f"{label:>24} | {med[1]['ex_per_s']:11.0f} {med[2]['ex_per_s']:12.0f} {row['speedup']:7.2f}x | "
                  f"{med[1]['ms_per_step']:7.2f} / {med[2]['ms_per_step']:6.2f} | {med[2]['mib']:9.2f} "
                  f"{med[2]['wait_ms']:8.2f} {med[2]['alone_ms']:8.2f} | {bound:8.2f}x", flush=True)
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
