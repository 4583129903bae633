"""One rank of the data-parallel tests; tests/test_distributed.py starts two of these
with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python tests/distributed_worker.py OUT [--device cuda] [--backend nccl] [--only-train]

Each rank writes what it saw to OUT/rank{r}.json (params, History, scores, the errors it
raised), which the test compares with one process running the same settings. The last
scenario kills rank 1 mid-epoch; rank 0 records the error that names it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import graphdl as gd  # noqa: E402

# 21 rows in global batches of 5: 5, 5, 5, 5, 1. Two ranks split a batch of 5 as 3 + 2,
# and the last batch leaves rank 1 with nothing (it must still take part).
N, BATCH, EPOCHS = 21, 5, 4
FAULT_N, FAULT_BATCH, KILL_AT_EPOCH = 400, 4, 2


def data(n: int = N, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return torch.rand(n, 3, generator=gen).to(device), torch.rand(n, 2, generator=gen).to(device)


def model(device: str = "cpu") -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    return gd.Sequential(gd.Linear(3, 8, generator=gen), gd.Tanh(), gd.Linear(8, 2, generator=gen)).to(device)


METRICS = ["accuracy", "mae", "f1", "r2"]  # a count, a mean, per-class counts, sums of squares: summed over ranks


def settings() -> dict:
    """Shuffled, momentum, weight decay and a schedule: everything that could drift apart."""
    return dict(optimizer=gd.SGD(lr=0.2, momentum=0.9, weight_decay=0.01), schedule=gd.StepDecay(2, 0.5),
                epochs=EPOCHS, batch_size=BATCH, shuffle=True, seed=3, metrics=METRICS)


def stateful_model(device: str = "cpu") -> gd.Sequential:
    """BatchNorm's running statistics and Dropout's key: state the ranks must keep alike."""
    gen = torch.Generator().manual_seed(2)
    return gd.Sequential(gd.Reshape((1, 3)), gd.Conv1d(1, 2, 2, padding=1, generator=gen), gd.BatchNorm1d(2),
                         gd.Tanh(), gd.Dropout(0.3, seed=4), gd.Flatten(), gd.Linear(8, 2, generator=gen)).to(device)


def binary_data(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    X = torch.rand(N, 3, generator=gen)
    return X.to(device), (X.sum(1, keepdim=True) + 0.3 * torch.randn(N, 1, generator=gen) > 1.5).float().to(device)


def binary_model(device: str = "cpu") -> gd.Sequential:
    """A fair classifier of `binary_data`: logit sum(x) - 1.5 (plus a little noise)."""
    gen = torch.Generator().manual_seed(1)
    model = gd.Sequential(gd.Linear(3, 1, generator=gen))
    model.layers[0].weight = torch.ones(3, 1) + 0.1 * torch.randn(3, 1, generator=gen)
    model.layers[0].bias = torch.tensor([-1.5])
    return model.to(device)


def adam_settings() -> dict:
    """Adam's moments and step counts, groups, a per-step schedule, clipping and accumulation."""
    return dict(optimizer=gd.AdamW(lr=0.02, amsgrad=True, groups=[{"params": ["0.bias"], "weight_decay": 0.0}]),
                schedule=gd.LinearWarmup(3, then=gd.CosineDecay(steps=6)), clip_norm=0.5, accumulate=2,
                epochs=3, batch_size=BATCH, shuffle=True, seed=7)


def validation(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    X, Y = data(7, device)
    return X, Y


def fault_settings() -> dict:
    return dict(optimizer=gd.SGD(lr=0.05, momentum=0.9), batch_size=FAULT_BATCH, seed=11)


def huge_weight_model() -> tuple[gd.Sequential, torch.Tensor, torch.Tensor]:
    """A model with a finite weight near float32's largest (2e38) on a feature that is
    always 0, so it never moves and the loss stays finite: nothing diverges."""
    m = model()
    m.layers[0].weight[2, 0] = 2e38
    X, Y = data()
    X[:, 2] = 0
    return m, X, Y


def diverging_settings() -> dict:
    return dict(optimizer=gd.SGD(lr=1e4), epochs=3, batch_size=BATCH, seed=5)


class KillAt:
    """A constant schedule that, on rank 1, kills this process shortly after `epoch` starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, epoch: int, base_lr: float) -> float:
        if epoch == self.epoch and gd.distributed.rank() == 1:
            threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return base_lr


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None)
    p.add_argument("--only-train", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    me = gd.distributed.init(backend=args.backend, timeout=30)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else "cpu"
    result: dict = {"rank": me.rank, "world_size": me.world_size}
    path = os.path.join(args.out, f"rank{me.rank}.json")

    def write() -> None:
        with open(path, "w") as f:
            json.dump(result, f)

    X, Y = data(device=device)
    m = model(device)
    history = m.fit(X, Y, distributed=True, verbose=True, validation_data=validation(device),
                    checkpoint=os.path.join(args.out, "train.gdl"), **settings())
    result["params"] = {k: v.tolist() for k, v in m.parameters().items()}
    result["history"] = dict(history)
    result["predict"] = m.predict(X, distributed=True).tolist()
    result["evaluate"] = m.evaluate(X, Y, metrics=METRICS, distributed=True)
    BX, BY = binary_data(device)  # AUC needs every row: gathered, not summed
    result["auc"] = binary_model(device).evaluate(BX, BY, metrics=["auc", "precision"], distributed=True)
    m.save(os.path.join(args.out, f"saved_by_rank{me.rank}.gdl"))
    stateful = stateful_model(device)
    result["stateful"] = dict(stateful.fit(X, Y, distributed=True, verbose=False, **settings()))
    result["state"] = {k: v.tolist() for k, v in stateful.state().items()}
    write()
    if args.only_train:
        return

    adam = model(device)
    history = adam.fit(X, Y, distributed=True, verbose=False, **adam_settings())
    result["adam"] = {"params": {k: v.tolist() for k, v in adam.parameters().items()}, "history": dict(history)}

    diverging = model(device)
    try:
        diverging.fit(X, Y, distributed=True, verbose=False, **diverging_settings())
    except gd.DivergedError as e:
        result["diverged"] = {"message": str(e), "epoch": e.epoch, "batch": e.batch, "history": dict(e.history),
                              "params": {k: v.tolist() for k, v in diverging.parameters().items()}}
    huge, HX, HY = huge_weight_model()
    try:
        history = huge.fit(HX, HY, distributed=True, verbose=False, epochs=1, batch_size=BATCH, seed=1)
        result["huge_weight"] = dict(history)
    except gd.DivergedError as e:
        result["huge_weight"] = str(e)
    try:
        model().fit(X, Y, distributed=True, verbose=False, epochs=1, batch_size=BATCH + me.rank)
    except ValueError as e:
        result["mismatch"] = str(e)
    write()

    FX, FY = data(FAULT_N)
    started = time.perf_counter()
    try:
        model().fit(FX, FY, distributed=True, verbose=False, epochs=1000, schedule=KillAt(KILL_AT_EPOCH),
                    checkpoint=os.path.join(args.out, "fault.gdl"), **fault_settings())
    except gd.distributed.RankLostError as e:
        result["lost"] = {"message": str(e), "ranks": e.lost, "seconds": time.perf_counter() - started}
    write()


if __name__ == "__main__":
    main()
