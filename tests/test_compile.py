"""compile: optimize=False, tracing the passes, the generated source, in-place reuse,
errors that name the IR line, and devices (cpu, and cuda when there is one); then feeds
and their messages, and outputs that own their memory."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from messages import message, names
from test_contract import tiny

import graphdl as gd

# "meta" runs every op for shapes and devices only: without a GPU it still catches a
# tensor made on the CPU meeting one on another device (torch refuses to mix them).
DEVICES = ["cpu", "meta", *(["cuda"] if torch.cuda.is_available() else [])]


def assert_matches(got: list[torch.Tensor], want: list[torch.Tensor], device: str) -> None:
    """Values on real devices; on meta, devices and shapes."""
    assert all(t.device.type == device for t in got)
    if device == "meta":
        assert [t.shape for t in got] == [t.shape for t in want]
    else:
        torch.testing.assert_close(list(got), [t.to(device) for t in want])


def mlp(act=gd.tanh, device: str = "cpu", dtype: torch.dtype = torch.float32) -> gd.Graph:
    gen = torch.Generator().manual_seed(0)
    g = gd.Graph("mlp")
    h = g.input("x", (None, 2), dtype)
    y = g.input("y", (None, 1), dtype)
    dims = [2, 8, 8, 1]
    for k, (i, o) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = g.param(f"fc{k}.weight", (torch.randn(i, o, generator=gen, dtype=dtype) * 0.5).to(device))
        b = g.param(f"fc{k}.bias", torch.randn(o, generator=gen, dtype=dtype).to(device))
        h = gd.add(gd.matmul(h, w), b)
        if k < len(dims) - 2:
            h = act(h)
    g.output(gd.mse(h, y))
    return g


def feeds(device: str = "cpu", n: int = 6, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.rand(n, 2, generator=gen, dtype=dtype).to(device),
            "y": torch.rand(n, 1, generator=gen, dtype=dtype).to(device)}


def autograd_reference(g: gd.Graph, data: dict[str, torch.Tensor], act) -> list[torch.Tensor]:
    """Loss and parameter gradients by torch.autograd (the oracle)."""
    params = {n: v.data.clone().requires_grad_() for n, v in g.params.items()}
    h = data["x"]
    for k in range(3):
        h = h @ params[f"fc{k}.weight"] + params[f"fc{k}.bias"]
        if k < 2:
            h = act(h)
    loss = ((h - data["y"]) ** 2).mean()
    return [loss.detach(), *torch.autograd.grad(loss, list(params.values()))]


def test_optimize_false_compiles_the_graph_exactly_as_written():
    g = gd.grad(mlp(), ["fc0.weight"])
    assert str(gd.compile(g, optimize=False).graph) == str(g)
    assert str(gd.compile(g).graph) != str(g)


def test_trace_prints_the_ir_after_each_pass_then_the_source():
    messages: list[str] = []
    fn = gd.compile(gd.grad(mlp(), ["fc0.weight"]), trace=messages.append)
    assert messages[0].startswith("// input\ngraph mlp(")
    assert any(m.startswith("// after fuse\n") and "addmm" in m for m in messages)
    assert messages[-1] == f"// source\n{fn.source}"


@pytest.mark.parametrize("act, torch_act", [(gd.tanh, torch.tanh), (gd.relu, torch.relu),
                                            (gd.sigmoid, torch.sigmoid)])
@pytest.mark.parametrize("device", DEVICES)
def test_optimised_training_step_matches_autograd(act, torch_act, device):
    want = autograd_reference(mlp(act, "cpu", torch.float64), feeds(dtype=torch.float64), torch_act)
    g = mlp(act, device, torch.float64)  # the same weights, on the device
    data = feeds(device, dtype=torch.float64)
    for options in ({}, {"optimize": False}, {"reuse": False}):
        fn = gd.compile(gd.grad(g, list(g.params)), **options)
        assert_matches(fn(**data), want, device)
        assert_matches(fn.fn(data["x"], data["y"]), want, device)  # the unchecked entry


def test_generated_source_is_readable_and_fused():
    src = gd.compile(gd.grad(mlp(), list(mlp().params))).source
    assert ("products.addmm_tanh(p1_fc0_bias, i0_x, p0_fc0_weight)  # %0: f32[N,8] = addmm_tanh fc0.bias, x, "
            "fc0.weight") in src
    assert "aten.tanh_backward" in src and "aten.mse_loss_backward" in src and ".mT" in src
    assert "torch.transpose" not in src and "expand_as" not in src
    assert "# c" in src and "const[value=1.0]" in src  # constants show up as comments
    assert "del " in src


def test_inplace_reuse_touches_no_feed_param_or_output():
    g = mlp(gd.relu)
    data = feeds()
    saved = {k: v.clone() for k, v in data.items()}
    params = {n: v.data.clone() for n, v in g.params.items()}
    fn = gd.compile(gd.grad(g, list(g.params)))
    assert ".relu_()" in fn.source and "grad_input=" in fn.source
    first = [t.clone() for t in fn(**data)]
    second = fn(**data)
    torch.testing.assert_close(list(second), first, rtol=0, atol=0)
    for k, v in data.items():
        assert torch.equal(v, saved[k])
    for n, v in g.params.items():
        assert torch.equal(v.data, params[n])
    assert torch.equal(fn(**data)[0], gd.compile(gd.grad(g, list(g.params)), reuse=False)(**data)[0])


def test_a_runtime_failure_names_the_ir_line(monkeypatch):
    g = mlp()
    fn = gd.compile(g)

    real = torch.addmm

    def failing(bias, a, b, **kwargs):  # what a kernel failing inside torch looks like: the second layer's
        if b.shape[0] == 8:
            raise RuntimeError("out of memory")
        return real(bias, a, b, **kwargs)

    monkeypatch.setattr(torch, "addmm", failing)
    monkeypatch.setenv("GRAPHDL_KERNELS", "default")  # (torch's addmm is the kernel every product calls)
    with pytest.raises(gd.GraphError, match=r"running `%\d+: f32\[N,8\] = addmm_tanh fc1.bias, %\d+, fc1.weight` "
                                            r"failed: RuntimeError: out of memory"):
        fn(**feeds())


@pytest.mark.parametrize("tensor", [torch.zeros(5, 5), torch.zeros(8, 8, dtype=torch.float64)])
def test_a_param_given_a_tensor_of_another_shape_or_dtype_is_refused_before_running(tensor):
    g = mlp()
    fn = gd.compile(g)
    g.params["fc1.weight"].data = tensor
    now = gd.checks.format_type(tensor.dtype, tuple(tensor.shape))
    with pytest.raises(gd.GraphError, match=re.escape(f"a param changed after compile (fc1.weight is now {now}, "
                                                      "declared f32[8,8]); compile the graph again")):
        fn(**feeds())


def test_a_param_swapped_for_a_new_tensor_is_read_at_each_call():
    g = mlp()
    fn = gd.compile(g)
    before = fn(**feeds())[0]
    g.params["fc2.bias"].data = g.params["fc2.bias"].data + 1.0
    assert not torch.equal(fn(**feeds())[0], before)


@pytest.mark.parametrize("device", DEVICES)
def test_constants_follow_the_feeds_when_the_graph_has_no_params(device):
    g = gd.Graph("free")
    x = g.input("x", (None, 3))
    g.output(gd.mean(gd.mul(gd.tanh(x), g.const(2.0))))
    fn = gd.compile(gd.grad(g, ["x"]))
    X = torch.rand(4, 3)
    Xr = X.clone().requires_grad_()
    ref = (torch.tanh(Xr) * 2.0).mean()
    ref.backward()
    assert_matches(fn(x=X.to(device)), [ref.detach(), Xr.grad], device)
    assert_matches(fn(x=X), [ref.detach(), Xr.grad], "cpu")  # and back: one lowering per device


@pytest.mark.parametrize("device", DEVICES)
def test_feeds_on_another_device_than_the_params_are_refused(device):
    fn = gd.compile(mlp(device=device))
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises(gd.GraphError, match="move it with"):
        fn(**feeds(other))


# -- every output owns its memory ---------------------------------------------------------


def test_the_same_value_output_twice_comes_back_as_two_tensors():
    g = gd.Graph("twice")
    x = g.input("x", (None, 3))
    e = gd.exp(x)
    g.output(e, e, gd.exp(x))  # CSE also makes the third the same value
    a, b, c = gd.compile(g)(x=torch.zeros(2, 3))
    a.add_(1.0)
    assert torch.equal(b, torch.ones(2, 3)) and torch.equal(c, torch.ones(2, 3))
    assert len({t.untyped_storage().data_ptr() for t in (a, b, c)}) == 3


def test_gradients_that_cse_makes_equal_are_separate_tensors():
    """Two biases in a row get the same gradient; updating one in place must not move the other."""
    g = gd.Graph("biases")
    x = g.input("x", (None, 3))
    b1, b2 = g.param("b1", torch.zeros(3)), g.param("b2", torch.zeros(3))
    g.output(gd.mean(gd.add(gd.add(x, b1), b2)))
    _, d1, d2 = gd.compile(gd.grad(g, ["b1", "b2"]))(x=torch.rand(4, 3))
    assert d1.untyped_storage().data_ptr() != d2.untyped_storage().data_ptr()
    want = d2.clone()
    d1.mul_(0.0)
    assert torch.equal(d2, want)


# -- params are live: whatever is assigned is what runs next -------------------------------


def test_a_param_assigned_after_grad_is_what_the_gradient_graph_reads():
    g = mlp()
    fn = gd.compile(gd.grad(g, ["fc1.weight"]))
    new = torch.randn(8, 8)
    g.params["fc1.weight"].data = new
    fresh = gd.compile(gd.grad(g, ["fc1.weight"]))
    for a, b in zip(fn(**feeds()), fresh(**feeds())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert g.params["fc1.weight"].data is new


def test_assigning_a_param_something_that_is_not_a_dense_float_tensor_is_refused():
    g = mlp()
    for bad, pattern in [(3.0, "must be a torch.Tensor"), (torch.zeros(8, 8, dtype=torch.int64), "dtype"),
                         (torch.zeros(8, 8).to_sparse(), r"sparse_coo tensor; convert it with \.to_dense\(\)")]:
        with pytest.raises(gd.GraphError, match=pattern):
            g.params["fc1.weight"].data = bad


# -- odd tensors: tensors that require grad, sparse feeds ------------------------------------


def test_feeds_and_params_that_require_grad_compute_without_a_tape():
    g = mlp()
    for v in g.params.values():
        v.data = v.data.clone().requires_grad_()
    data = {k: t.clone().requires_grad_() for k, t in feeds().items()}
    fn = gd.compile(gd.grad(g, list(g.params)))
    outs = fn(**data)
    assert all(not t.requires_grad and t.grad_fn is None for t in outs)
    plain = mlp()
    for a, b in zip(outs, gd.compile(gd.grad(plain, list(plain.params)))(**feeds())):
        torch.testing.assert_close(a, b)


def test_a_sparse_feed_is_refused_naming_the_fix():
    fn = gd.compile(mlp())
    data = feeds()
    data["x"] = data["x"].to_sparse()
    with pytest.raises(gd.GraphError, match=r"input x is a sparse_coo tensor; convert it with \.to_dense\(\)"):
        fn(**data)


def test_a_param_moved_to_another_device_after_compile_is_named():
    g = mlp()
    fn = gd.compile(g)
    g.params["fc1.weight"].data = g.params["fc1.weight"].data.to("meta")
    with pytest.raises(gd.GraphError, match=r"param changed after compile \(fc1.weight is now f32\[8,8\] on meta, "
                                            r"declared f32\[8,8\] on cpu\); compile the graph again"):
        fn(**feeds())


def test_params_share_live_tensors_with_compiled_functions():
    g = tiny()
    fn = gd.compile(g)
    X, Y = torch.rand(4, 2), torch.rand(4, 1)
    before = fn(x=X, y=Y)[0]
    g.params["w"].data.add_(1.0)  # training updates params in place
    after = fn(x=X, y=Y)[0]
    assert not torch.equal(before, after)


def test_batch_dimension_is_bound_at_run_time():
    fn = gd.compile(tiny())
    for n in (1, 5, 64):
        (loss,) = fn(x=torch.rand(n, 2), y=torch.rand(n, 1))
        assert loss.shape == ()


def test_compiled_source_is_kept_and_releases_values():
    fn = gd.compile(gd.grad(tiny(), ["w", "b"]))
    assert "products.mm(" in fn.source and "del " in fn.source
    assert fn.source.count("\n    v") >= len(fn.graph.nodes) - 3  # one line per node (consts hoisted)


def test_optimize_false_keeps_the_graph_as_written():
    g = tiny()
    g.const(3.0)  # dead
    assert len(gd.compile(g, optimize=False).graph.nodes) == len(g.nodes)
    optimised = gd.compile(g).graph  # the passes drop the dead const (and fuse matmul+add into addmm)
    assert len(optimised.nodes) < len(g.nodes) - 1
    assert all(n.op.name != "const" for n in optimised.nodes)


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"x": torch.rand(4, 2)}, "missing input 'y'"),
        ({"x": torch.rand(4, 2), "y": torch.rand(4, 1), "z": torch.rand(1)}, "no input 'z'"),
        ({"x": torch.rand(4, 3), "y": torch.rand(4, 1)}, r"x is f32\[4,3\] .*declares f32\[N,2\]"),
        ({"x": torch.rand(4), "y": torch.rand(4, 1)}, "rank 1"),
        ({"x": torch.rand(4, 2), "y": torch.rand(5, 1)}, "disagree on N"),
        ({"x": torch.rand(4, 2, dtype=torch.float64), "y": torch.rand(4, 1)}, "f64.*declares f32"),
        ({"x": [[1.0, 2.0]], "y": torch.rand(1, 1)}, "must be a torch.Tensor"),
    ],
)
def test_bad_feeds_raise_graph_errors_naming_the_input(feeds, message):
    with pytest.raises(gd.GraphError, match=message):
        gd.compile(tiny())(**feeds)


# -- outputs belong to the caller (regressions found in review) --------------------------


def test_outputs_never_alias_params_constants_or_views():
    g = gd.Graph("alias")
    x = g.input("x", (None, 2))
    w = g.param("w", torch.randn(3, 2))
    s = g.param("s", torch.ones(()))
    g.output(gd.add(gd.mean(gd.matmul(x, gd.transpose(w))), s), w, gd.transpose(w))
    gg = gd.grad(g, ["w", "s"])  # dw comes out of a transposed product; ds is the constant 1
    fn = gd.compile(gg)
    X = torch.randn(4, 2)
    _, w_out, wt_out, dw, ds = fn(x=X)
    for t in (w_out, wt_out, dw, ds):
        assert t.is_contiguous()
    w_out.add_(1.0)
    wt_out.add_(1.0)
    ds.add_(5.0)
    assert not torch.equal(w_out, w.data) and not torch.equal(wt_out, w.data.T)
    torch.testing.assert_close(wt_out - 1.0, w.data.T)
    assert fn(x=X)[4].item() == 1.0  # the caller's edit did not reach the next call


# -- compile and feeds ----------------------------------------------------------------------


def test_compile_something_that_is_not_a_graph_or_has_no_outputs():
    names(message(gd.compile, 3), "compile takes a gd.Graph, got int")
    names(message(gd.compile, gd.Graph("g")), "has no outputs; add one with graph.output")


@pytest.mark.parametrize("name", ["torch", "math", "c0", "P0", "def", "None", "lambda"])
def test_graph_names_that_clash_with_generated_code_still_compile(name):
    g = gd.Graph(name)
    x = g.input("x", (3,))
    g.output(gd.mul(gd.add(x, 2.0), g.param("w", torch.full((3,), 2.0))))
    (out,) = gd.compile(g)(x=torch.ones(3))
    assert torch.equal(out, torch.full((3,), 6.0))


@pytest.mark.parametrize("x, expect", [
    (np.zeros((4, 2), np.float32), r"input x must be a torch.Tensor \(f32\[N,2\]\), got ndarray; "
                                   r"convert it with torch.as_tensor\(x, dtype=torch.float32\)"),
    ([[1.0, 2.0]], "got list"),
    (1.0, "got float"),
    (torch.tensor(1.0), r"input x has rank 0 \(f32\[\]\) but the graph declares rank 2 \(f32\[N,2\]\)"),
    (torch.zeros(4, 2, dtype=torch.int64), r"input x is i64\[4,2\] .*convert it with .to\(torch.float32\)"),
    (torch.zeros(4, 3), r"dim 1 is 3, expected 2"),
])
def test_bad_feeds(x, expect):
    names(message(gd.compile(tiny()), x=x, y=torch.rand(4, 1)), "graph tiny: ", expect)


def test_feeds_given_twice_or_too_many():
    fn = gd.compile(tiny())
    names(message(fn, torch.rand(1, 2), x=torch.rand(1, 2)), "input x given both by position and by name")
    names(message(fn, torch.rand(1, 2), torch.rand(1, 1), torch.rand(1)), "takes 2 inputs .*got 3 positional")


def test_non_contiguous_feeds_are_fine():
    g = tiny()
    X, Y = torch.rand(2, 5).t(), torch.rand(5, 1)
    assert not X.is_contiguous()
    torch.testing.assert_close(gd.compile(g)(x=X, y=Y)[0], gd.compile(g)(x=X.contiguous(), y=Y)[0])


def test_run_time_failure_names_the_ir_line_where_it_was_made_and_a_changed_param():
    g = tiny()
    fn = gd.compile(g)
    g.params["w"].data.resize_(3, 3)  # in place, so the param keeps its tensor: caught before running
    msg = message(fn, x=torch.rand(1, 2), y=torch.rand(1, 1))
    names(msg, r"a param changed after compile \(w is now f32\[3,3\], declared f32\[2,1\]\); compile the graph "
          "again")
