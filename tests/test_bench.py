"""tools/bench.py: every contender trains the same net on the same data and batches, so
their per-epoch losses and accuracies agree; JAX is optional and skipped with a note."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).parent.parent / "tools" / "bench.py"


def _tool(name: str):
    """tools/<name>.py as a module (with tools/ on the path while it loads, for `import bench`)."""
    tools = str(BENCH.parent)
    sys.path.insert(0, tools)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(tools)
    return module


@pytest.fixture(scope="module")
def bench():
    return _tool("bench")


def test_data_is_a_whole_number_of_batches(bench):
    for batch in (1, 5, 7, 100, 256, 1024, 3000):
        n = bench.points(batch)
        assert n % batch == 0 and n >= 1000 and n // batch >= 4


@pytest.mark.slow
def test_contenders_train_alike(bench):
    """Same losses and accuracies epoch by epoch: the same net, data, shuffling and metrics."""
    names, _ = bench.contenders("cpu", torch_compile=False)
    result = bench.worker_time(width=8, batch=50, act="tanh", device="cpu", rounds=1, target_s=0.005, names=names)
    assert result["agree_each"] == {name: True for name in names}, result["history"]
    assert set(result["us"]) == set(names)


def test_jax_missing_is_a_note_not_a_failure(bench, monkeypatch):
    monkeypatch.setattr(bench, "_has_jax", lambda: False)
    names, notes = bench.contenders("cpu", torch_compile=False)
    assert names == ["graphdl", "eager", "hand"]
    assert any("JAX skipped: not installed" in note and ".[bench]" in note for note in notes)


def test_cuda_adds_the_uncaptured_step_and_torch_compile(bench):
    names, notes = bench.contenders("cuda", torch_compile=False)
    assert {"graphdl-uncaptured", "compiled"} <= set(names) and "jax" not in names
    assert any("JAX skipped" in note for note in notes)


@pytest.mark.slow
def test_tanh_formulas_report_their_errors(bench, monkeypatch):
    """docs/performance.md's reasons for keeping torch.tanh: the expm1 form is accurate, 2σ(2x)-1 is
    not near 0, and every way is timed at every size."""
    monkeypatch.setattr(bench, "TANH_SHAPES", [(4, 3)])
    results = bench.tanh_formulas()
    assert results["torch.tanh"]["ulp"] <= 1 and results["expm1 form"]["ulp"] <= 3
    assert results["2σ(2x)-1"]["ulp"] > 1000  # 1e-38 comes back as 0
    assert all(list(r["us"]) == ["4x3"] and r["us"]["4x3"] > 0 for r in results.values())


def test_kernel_paths_name_the_processor_and_each_kernel_cost(bench, capsys):
    """The line under --tanh's table that says why torch.tanh is slow here: the processor,
    and ns per element of tanh and exp (MKL's VML in an MKL build) against exp2 and
    sigmoid (torch's own loops)."""
    import torch
    paths = bench.kernel_paths()
    assert paths["cpu"] and paths["mkl"] == torch.backends.mkl.is_available()
    assert set(paths["kernels"]) == {"tanh", "exp", "exp2", "sigmoid"}
    assert all(v["ns"] > 0 for v in paths["kernels"].values())
    bench.print_tanh({"torch.tanh": {"us": {"4x3": 1.0}, "ulp": 0.5}}, paths)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    vml = "MKL VML" if paths["mkl"] else "torch's loop"
    assert last.startswith(f"ns per element on 1000x25, {paths['cpu']}: ") and "tanh " in last
    assert f"({vml})" in last and "exp2" in last and "(torch's loop)" in last


def test_ulps_are_float32_spacings_at_the_truth(bench):
    """An ulp is float32's spacing at the true value: 2^-23 on [1, 2), 2^-24 on [0.5, 1),
    2^-149 among the subnormals and at 0. eps * |truth| read one ulp just below 2 as 0.5,
    one at the subnormal 2^-149 as 8.4e6, and 0 / 0 (NaN) at truth == 0."""
    import torch
    truth = torch.tensor([1.0, 2 - 2.0**-23, 0.75, -0.75, 2.0**-149, 3 * 2.0**-149, 0.0], dtype=torch.float64)
    one_up = torch.nextafter(truth.float(), torch.tensor(float("inf")))
    assert bench.ulps(one_up, truth).tolist() == [1.0] * 7
    assert bench.ulps(truth.float(), truth).tolist() == [0.0] * 7
    assert bench.ulps(torch.tensor([1.0]), torch.tensor([1 + 2.0**-25], dtype=torch.float64)).item() == 0.25


def test_optimizers_mode_times_every_optimizer(bench):
    result = bench.worker_optimizers(width=8, batch=50, act="tanh", device="cpu", rounds=1, target_s=0.005)
    assert set(result["update_us"]) == set(result["step_us"]) == set(bench.OPTIMIZERS)
    assert all(v > 0 for v in [*result["update_us"].values(), *result["step_us"].values()])


def test_roofline_counts_the_steps_matmul_flops(bench):
    """8 * batch * MACs of the 2-w-w-w-1 net (the step's three products and its share of the
    epoch's accuracy pass), against torch.mm's measured rate here."""
    r = bench.roofline(16, 8, step_us=100.0)
    assert r["step_gflops"] == pytest.approx(8 * 8 * (2 * 16 + 2 * 16 * 16 + 16) / 100e-6 / 1e9)
    assert r["mm_gflops"] > 0 and r["fraction"] == pytest.approx(r["step_gflops"] / r["mm_gflops"])
    # the floor: those flops at the best rate, so a step of 100 µs reaching `fraction` of it
    assert r["floor_us"] == pytest.approx(100.0 * r["fraction"])


def test_inductor_tool_traces_the_generated_step():
    """tools/bench_inductor.py hands graphdl's generated gradient function to torch.compile.
    Dynamo must trace all of it in one graph (fullgraph), and the traced form must give
    graphdl's numbers: traced here with Dynamo's eager backend (no Inductor C++ build), so
    a change to the generated code that Dynamo cannot follow fails here, not in the tool."""
    import torch
    tool = _tool("bench_inductor")
    import graphdl as gd
    model = tool.bench.build_model(tool.bench.initial_weights(8), "tanh")
    x, y = tool.bench.disk_data(20, "cpu")
    plain = gd.compile(gd.grad(model.graph(loss=gd.MSE()), list(model.parameters())))
    torch._dynamo.reset()
    traced = torch.compile(tool.traceable(plain), backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        got, want = traced(x, y), plain.fn(x, y)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_epoch_tool_times_each_part_of_fits_epoch():
    """tools/bench_epoch.py wraps parts of fit's epoch by name: each must still be called
    (a renamed part would read 0), the parts of the steps fit inside them, and the
    wrappers come off afterwards."""
    import graphdl.step
    import graphdl.train
    tool = _tool("bench_epoch")
    before, run_before = graphdl.step.TrainStep.epoch, graphdl.train._Run.epoch
    r = tool.measure(width=4, batch=250, epochs=3)
    assert all(r[name] > 0 for _, _, name in tool.PARTS), r
    assert sum(r[name] for name in tool.INSIDE_STEPS) < r["steps"]
    assert r["setup"] > 0 and "first extra" in r  # (a fit call is more than its epochs)
    assert graphdl.step.TrainStep.epoch is before and graphdl.train._Run.epoch is run_before
