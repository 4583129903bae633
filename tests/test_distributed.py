"""Data-parallel training: graphdl.distributed, the allreduce pass and fit(distributed=True).

The multi-process tests start real gloo processes on 127.0.0.1 with torchrun's
environment (tests/distributed_worker.py, launched once for the module) or torchrun
itself (two "nodes"), each with bounded timeouts and cleaned up whatever happens.
"""

from __future__ import annotations

import fractions
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import numpy as np
import pytest
import torch
import torch.distributed as dist

import graphdl as gd
from graphdl.checkpoint import read_checkpoint
from graphdl.passes import pipeline

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 120  # a bound, never reached when things work (the machine may be loaded)


# -- launching ranks ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    return env


def _run_all(commands: list[tuple[list[str], dict[str, str]]], cwd: Path) -> list[tuple[int, str, str]]:
    """Run the commands side by side; return (exit code, stdout, stderr) of each. Every
    process is killed if the bound passes or anything fails."""
    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in commands]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def launch_workers(world: int, out: Path, *args: str) -> list[tuple[int, str, str]]:
    """`world` ranks of tests/distributed_worker.py, in torchrun's environment."""
    port = str(_free_port())
    return _run_all([([sys.executable, str(Path(worker.__file__)), str(out), *args],
                      _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                     for r in range(world)], out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, str, str]], list[dict]]:
    out = tmp_path_factory.mktemp("two_ranks")
    runs = launch_workers(2, out)
    for r, (code, _, err) in enumerate(runs):
        assert (r, code) in ((0, 0), (1, -9)), f"rank {r} exited with {code}:\n{err[-3000:]}"
    return out, runs, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _close(got: object, want: object) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def _params(model: gd.Sequential) -> dict[str, list]:
    return {k: v.tolist() for k, v in model.parameters().items()}


# -- two ranks train as one process -------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_train_as_one_process(two_ranks):
    """Shuffled, momentum, weight decay, a schedule, global batches of 5 split 3 + 2, and a
    last batch of 1 that leaves rank 1 empty: params, History, predict and evaluate match."""
    _, _, results = two_ranks
    X, Y = worker.data()
    alone = worker.model()
    history = alone.fit(X, Y, verbose=False, validation_data=worker.validation(), **worker.settings())
    for rank in results:
        assert rank["world_size"] == 2
        for name, value in _params(alone).items():
            _close(rank["params"][name], value)
        for key, values in history.items():
            _close(rank["history"][key], values)
        _close(rank["predict"], alone.predict(X).tolist())
        scores = alone.evaluate(X, Y, metrics=worker.METRICS)
        assert set(rank["evaluate"]) == set(scores) == {"loss", "accuracy", "mae", "f1", "r2", "error"}
        for key, value in scores.items():
            _close(rank["evaluate"][key], value)
        BX, BY = worker.binary_data()
        auc = worker.binary_model().evaluate(BX, BY, metrics=["auc", "precision"])
        assert 0.5 < auc["auc"] < 1 and 0 < auc["precision"] <= 1
        gathered = (rank["auc"]["auc"], rank["auc"]["precision"])
        assert gathered == pytest.approx((auc["auc"], auc["precision"]), rel=1e-12)
        _close(rank["auc"]["loss"], auc["loss"])
    # The ranks sum the same gradients, so they hold the very same bits.
    assert results[0]["params"] == results[1]["params"]
    assert results[0]["history"] == results[1]["history"]


@pytest.mark.slow
def test_ranks_keep_batchnorm_and_dropout_state_alike(two_ranks):
    """Each rank normalises its share with its own batch statistics (as DDP does), and the
    running statistics' next values are averaged over the ranks by their shares, so every
    rank ends with the same state: the same running statistics and the same Dropout key.
    A rank left with no rows (the last batch of 1) feeds a row of zeros with no weight."""
    _, _, ranks = two_ranks
    states = [r["state"] for r in ranks]
    assert states[0] == states[1]
    assert states[0]["4.key"] == 20.0  # 4 epochs of 5 global batches
    running = torch.tensor(states[0]["2.running_var"])
    assert torch.isfinite(running).all() and not torch.equal(running, torch.ones(2))
    # Not one process's run: the batch statistics of shares of 3 and 2 rows are not those of
    # the 5, and each rank draws the masks of its rows by their place in its share.
    assert ranks[0]["stateful"]["loss"] == ranks[1]["stateful"]["loss"]
    assert all(math.isfinite(v) for v in ranks[0]["stateful"]["loss"])


@pytest.mark.slow
def test_two_ranks_train_with_adam_as_one_process(two_ranks):
    """AdamW (AMSGrad, a group) with a warm-up schedule per step, clipping of the summed
    gradients and accumulation over global batches: the ranks end where one process does."""
    _, _, results = two_ranks
    X, Y = worker.data()
    alone = worker.model()
    history = alone.fit(X, Y, verbose=False, **worker.adam_settings())
    for rank in results:
        for name, value in _params(alone).items():
            _close(rank["adam"]["params"][name], value)
        for key, values in history.items():
            _close(rank["adam"]["history"][key], values)
    assert results[0]["adam"] == results[1]["adam"]


@pytest.mark.slow
def test_only_rank_0_prints_and_writes(two_ranks):
    out, runs, _ = two_ranks
    assert [line.split(" - ")[0] for line in runs[0][1].splitlines()] == [f"Epoch {e}/4" for e in range(1, 5)]
    assert runs[1][1] == ""
    assert (out / "saved_by_rank0.gdl").exists() and not (out / "saved_by_rank1.gdl").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # no torn writes left behind


@pytest.mark.slow
def test_divergence_stops_every_rank_alike(two_ranks):
    _, _, results = two_ranks
    X, Y = worker.data()
    alone = worker.model()
    with pytest.raises(gd.DivergedError) as single:
        alone.fit(X, Y, verbose=False, **worker.diverging_settings())
    first, second = (r["diverged"] for r in results)
    assert first["message"] == second["message"]
    assert (first["epoch"], first["batch"]) == (second["epoch"], second["batch"]) == (single.value.epoch,
                                                                                      single.value.batch)
    for name, value in _params(alone).items():  # both keep the last finite params, as one process does
        _close(first["params"][name], value)


@pytest.mark.slow
def test_params_near_the_largest_float_are_not_taken_for_divergence(two_ranks):
    """Each rank checks its params' finiteness in the epoch's one collective: summing the
    ranks' largest magnitudes (2e38 + 2e38) would overflow float32 and report a finite
    run as diverged."""
    _, _, results = two_ranks
    huge, X, Y = worker.huge_weight_model()
    alone = huge.fit(X, Y, verbose=False, epochs=1, batch_size=worker.BATCH, seed=1)
    for rank in results:
        assert isinstance(rank["huge_weight"], dict), rank["huge_weight"]
        _close(rank["huge_weight"]["loss"], alone["loss"])


@pytest.mark.slow
def test_ranks_with_different_settings_all_refuse(two_ranks):
    _, _, results = two_ranks
    for r in results:
        assert "rank 1 has batch_size=6 but rank 0 has 5" in r["mismatch"]


@pytest.mark.slow
def test_a_killed_rank_is_named_and_the_run_resumes(two_ranks):
    """Rank 1 is killed mid-epoch: rank 0 stops with a RankLostError naming it, well within
    the timeout (30 s); resuming from the last checkpoint reproduces the uninterrupted run."""
    out, runs, results = two_ranks
    assert runs[1][0] == -9
    lost = results[0]["lost"]
    assert lost["ranks"] == [1] and "rank 1 of 2 stopped sending heartbeats" in lost["message"], lost["message"]
    assert lost["seconds"] < 30
    X, Y = worker.data(worker.FAULT_N)
    resumed, uninterrupted = worker.model(), worker.model()
    done = read_checkpoint(out / "fault.gdl", worker.model(), worker.fault_settings()["optimizer"],
                           list(gd.History(metrics=[])), validation=False).epoch
    assert done >= worker.KILL_AT_EPOCH  # the checkpoint of the last epoch finished before the kill
    h1 = resumed.fit(X, Y, epochs=done + 2, resume=out / "fault.gdl", verbose=False, **worker.fault_settings())
    h2 = uninterrupted.fit(X, Y, epochs=done + 2, verbose=False, **worker.fault_settings())
    assert h1 == {**h2, "loss": h1["loss"]}  # the same epochs and rates
    _close(h1["loss"], h2["loss"])
    for name, value in _params(uninterrupted).items():
        _close(_params(resumed)[name], value)


@pytest.mark.slow
def test_two_nodes_on_localhost_run_the_example(tmp_path, capsys):
    """torchrun's multi-node launch (c10d rendezvous), as two one-process "nodes" on
    127.0.0.1: the example trains data-parallel, prints its result once and matches one process."""
    port = _free_port()
    args = ["--epochs", "2", "--no-plots", "--save", str(tmp_path / "disk.gdl")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "graphdl-test"]
    runs = _run_all([([*torchrun, "--node-rank", str(k), str(ROOT / "examples" / "disk_graph.py"), *args], _env())
                     for k in range(2)], tmp_path)
    for code, _, err in runs:
        assert code == 0, err[-3000:]
    printed = runs[0][1] + runs[1][1]
    assert printed.count("test error:") == 1 and printed.count("wrote ") == 1
    assert (tmp_path / "disk.gdl").exists()
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import disk_graph
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    try:
        disk_graph.main([*args[:-1], str(tmp_path / "alone.gdl")])
    finally:
        torch.set_num_threads(threads)
    alone = capsys.readouterr().out
    for key in ("train error:", "test error:"):
        assert [ln for ln in printed.splitlines() if ln.startswith(key)] == \
               [ln for ln in alone.splitlines() if ln.startswith(key)]


# -- without a process group --------------------------------------------------------------


def test_a_world_of_one_runs_distributed_calls_as_one_process(monkeypatch):
    """The same script under plain python: init() is rank 0 of 1, and distributed=True
    trains, predicts and evaluates exactly as distributed=False."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert gd.distributed.init() == (0, 1) and not gd.distributed.is_initialized()
    X, Y = worker.data()
    results = []
    for distributed in (True, False):
        model = worker.model()
        history = model.fit(X, Y, batch_size=20, epochs=2, seed=0, distributed=distributed, verbose=False)
        results.append((history, model.predict(X, distributed=distributed),
                        model.evaluate(X, Y, distributed=distributed), model.state()))
    (h1, p1, e1, s1), (h2, p2, e2, s2) = results
    assert h1 == h2 and e1 == e2 and torch.equal(p1, p2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_a_rank_of_several_that_did_not_join_says_to_call_init(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not gd.distributed.is_initialized()
    X, Y = worker.data()
    for call in (lambda m: m.fit(X, Y, distributed=True, verbose=False), lambda m: m.predict(X, distributed=True),
                 lambda m: m.evaluate(X, Y, distributed=True)):
        with pytest.raises(ValueError, match=r"one of 2 ranks torchrun launched, but has not joined them: call "
                                             r"gd.distributed.init\(\)"):
            call(worker.model())


def test_distributed_settings_of_the_wrong_type_name_the_argument():
    X, Y = worker.data()
    with pytest.raises(ValueError, match="distributed must be True or False"):
        worker.model().fit(X, Y, distributed=1)
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        gd.distributed.init(timeout=0)
    with pytest.raises(ValueError, match="resume must be a file path"):
        worker.model().fit(X, Y, resume=3)



@pytest.mark.parametrize("timeout", [0, -1.0, True, "30", float("inf"), float("nan"), 10**400])
def test_init_reads_its_timeout_as_a_real_number_of_seconds(monkeypatch, timeout):
    """checks.real reads it: any finite real number above 0 (10**400 is not one a float holds)."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0, got "):
        gd.distributed.init(timeout=timeout)


def test_init_takes_a_timeout_of_any_real_type_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert gd.distributed.init(timeout=np.float64(2.5)) == (0, 1)
    assert gd.distributed.init(timeout=fractions.Fraction(1, 2)) == (0, 1)


def test_torchruns_numbers_are_ascii_digits(monkeypatch):
    """'²'.isdigit() is True, but int() cannot read it: such a LOCAL_RANK or MASTER_PORT is refused by name."""
    monkeypatch.setenv("LOCAL_RANK", "²")
    with pytest.raises(ValueError, match="environment variable LOCAL_RANK='²' must be a whole number"):
        gd.distributed._env_int("LOCAL_RANK", 0)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "²")
    assert gd.distributed._store_address() is None

# -- the all-reduce as IR -----------------------------------------------------------------


def _step(bucket_mib: float | None = None) -> gd.Graph:
    m = worker.model()
    return gd.step.step_graph(m.graph(gd.MSE()), list(m.parameters()), bucket_mib)


def _collectives(graph: gd.Graph) -> list[tuple[str, tuple]]:
    index = {id(n.out): k for k, n in enumerate(graph.nodes)}
    return [(n.op.name, tuple(index.get(id(v), v.name) for v in n.inputs)) for n in graph.nodes if n.op.collective]


def test_allreduce_buckets_gradients_in_the_order_they_are_made():
    one = _step()  # the small net fits one bucket
    assert [op for op, _ in _collectives(one)] == ["allreduce_start", "allreduce_wait"]
    many = _step(bucket_mib=1e-9)  # a bucket per gradient
    many.verify()
    starts = [n for n in many.nodes if n.op.name == "allreduce_start"]
    assert len(starts) == 4
    for start in starts:  # each starts right after its gradient is made: overlap with the rest of the backward
        (grad,) = start.inputs
        assert many.nodes.index(start) == many.nodes.index(grad.node) + 1
    waits = [k for k, n in enumerate(many.nodes) if n.op.name == "allreduce_wait"]
    assert waits[0] > max(many.nodes.index(s) for s in starts)  # and waits only once all have started
    assert [v.node.op.name for v in many.outputs[1:]] == ["unpack"] * 4
    assert [v.shape for v in many.outputs[1:]] == [tuple(p.shape) for p in worker.model().parameters().values()]


def test_allreduce_prints_parses_and_draws():
    step = _step()
    text = str(step)
    assert "= allreduce_start " in text and "= allreduce_wait " in text
    assert re.search(r"= unpack\[offset=\d+, shape=\(3, 8\)\] %\d+  # grad allreduce", text)
    assert str(gd.parse(text)) == text
    dot = gd.to_dot(step).source
    drawn = [ln for ln in dot.splitlines() if "allreduce_" in ln and "label=" in ln]
    assert len(drawn) == 2 and all("shape=hexagon" in ln for ln in drawn)  # collectives stand out


def test_onnx_export_refuses_collectives_saying_why(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(gd.GraphError, match="allreduce_start .* ONNX has no op for"):
        gd.export_onnx(_step(), tmp_path / "step.onnx")


def test_passes_keep_every_collective_in_its_order():
    step = _step(bucket_mib=1e-9)
    before = [op for op, _ in _collectives(step)]
    optimised = pipeline(step.copy()[0])
    optimised.verify()
    assert [op for op, _ in _collectives(optimised)] == before
    # Two all-reduces of the same value are two sums (CSE keeps both), one whose result
    # nobody reads still happens (DCE keeps it), and one of a constant runs at each call.
    g = gd.Graph("twice")
    w = g.param("w", torch.ones(2))
    c = g.const(2.0)
    first = gd.ops.allreduce_start(w, w)
    gd.ops.allreduce_start(w, w)
    gd.ops.allreduce_wait(gd.ops.allreduce_start(c))
    g.output(gd.ops.unpack(gd.ops.allreduce_wait(first), shape=(2,)))
    optimised = pipeline(g.copy()[0])
    assert [op for op, _ in _collectives(optimised)] == [op for op, _ in _collectives(g)]
    # compile computes constant nodes once, up front: never a collective (it would run once, on no group)
    assert any(ln.strip().startswith("v") and "allreduce_start(c" in ln for ln in gd.compile(g).source.splitlines())


def test_a_collective_in_flight_is_read_only_by_its_wait():
    g = gd.Graph("misuse")
    w = g.param("w", torch.ones(2))
    pending = gd.ops.allreduce_start(w)
    with pytest.raises(gd.GraphError, match="only allreduce_wait may read"):
        gd.add(pending, pending)
    with pytest.raises(gd.GraphError, match="only unpack may read"):
        gd.neg(gd.ops.allreduce_wait(pending))
    text = "graph t(; w: f32[2]) {\n  %0: f32[2] = allreduce_start w\n  %1: f32[2] = unpack[shape=(2,)] %0\n" \
           "  return %1\n}"
    with pytest.raises(gd.GraphError, match="line 3"):
        gd.parse(text)


def test_collectives_without_a_process_group_say_how_to_launch():
    g = gd.Graph("alone")
    w = g.param("w", torch.ones(2))
    g.output(gd.ops.unpack(gd.ops.allreduce_wait(gd.ops.allreduce_start(w)), shape=(2,)))
    with pytest.raises(gd.GraphError, match="needs a process group.*torchrun"):
        gd.compile(g)()


# -- a process group of one, in this process ---------------------------------------------


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_trains_as_fit_without_distributed(group_of_one):
    X, Y = worker.data()
    a, b = worker.model(), worker.model()
    ha = a.fit(X, Y, distributed=True, verbose=False, **worker.settings())
    hb = b.fit(X, Y, verbose=False, **worker.settings())  # no scale input, no all-reduce: other rounding
    for p, q in zip(a.parameters().values(), b.parameters().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ha.keys() == hb.keys() and all(ha[k] == pytest.approx(hb[k], rel=1e-5, abs=1e-6) for k in ha)
    assert gd.distributed.rank() == 0 and gd.distributed.world_size() == 1 and gd.distributed.is_main()


def test_the_compiled_allreduce_sums_over_the_group(group_of_one):
    m = worker.model()
    X, Y = worker.data()
    reduced = gd.compile(_step(bucket_mib=1e-9))(x=X, y=Y, scale=torch.tensor(1.0))
    plain = gd.compile(gd.grad(m.graph(gd.MSE()), list(m.parameters())))(x=X, y=Y)
    for got, want in zip(reduced, plain):
        torch.testing.assert_close(got, want)


# -- naming the lost rank -----------------------------------------------------------------


@pytest.mark.slow
def test_a_lost_rank_is_named_from_its_heartbeat(monkeypatch):
    """Rank 1's beat stops: lost. It beats but issued fewer collectives: stuck. The store
    itself is gone: its host, rank 0."""
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(gd.distributed, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(gd.distributed, "STORE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(gd.distributed, "rank", lambda: 0)
    monkeypatch.setattr(gd.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(gd.distributed._Heartbeat, "issued", 7)
    key = gd.distributed._beat_key
    store.set(key(0), "5 7")
    store.set(key(1), "3 6")  # never advances
    error = gd.distributed._lost(RuntimeError("Connection closed by peer"), "an all-reduce")
    assert error.lost == [1] and "rank 1 of 2 stopped sending heartbeats" in str(error)
    assert "Connection closed by peer" in str(error)

    beats = iter(range(100))
    monkeypatch.setattr(gd.distributed, "_read_beats", lambda s, w: {0: (0, 7), 1: (next(beats), 6)})
    error = gd.distributed._lost(RuntimeError("Timed out"), "an all-reduce")
    assert error.lost == [1] and "rank 1 of 2 still beating but behind: issued 6 collectives to this rank's 7" in \
        str(error)
    del store  # the store's host is gone
    error = gd.distributed._lost(RuntimeError("Timed out"), "an all-reduce")
    assert error.lost == [0] and "does not answer" in str(error)


# -- NCCL, one GPU per rank ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_ranks_train_as_one_process(world, tmp_path):
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("NCCL needs CUDA GPUs; this machine has none")
    if torch.cuda.device_count() < world:
        pytest.skip(f"{world} NCCL ranks need {world} GPUs (one per rank); this machine has "
                    f"{torch.cuda.device_count()}")
    runs = launch_workers(world, tmp_path, "--device", "cuda", "--backend", "nccl", "--only-train")
    for code, _, err in runs:
        assert code == 0, err[-3000:]
    X, Y = worker.data(device="cuda")
    alone = worker.model("cuda")
    history = alone.fit(X, Y, verbose=False, validation_data=worker.validation("cuda"), **worker.settings())
    for r in range(world):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        for name, value in _params(alone).items():
            _close(result["params"][name], value)
        for key, values in history.items():
            _close(result["history"][key], values)
