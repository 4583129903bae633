"""The passes: each one's rewrites, its `changed` flag, `verify()` after it, and the same
outputs before and after, on hand-written and on random (hypothesis) graphs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from strategies import build_pass_graph, pass_feeds, pass_programs

import graphdl as gd
from graphdl.passes import PASSES, cse, dce, fold, fuse, pipeline, plan_inplace, simplify

PASS_FNS = dict(PASSES)


def run(graph: gd.Graph, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The graph's outputs exactly as written (no passes)."""
    return gd.compile(graph, optimize=False)(**feeds)


def apply(graph: gd.Graph, pass_fn: Callable) -> tuple[gd.Graph, bool]:
    """Run a pass on a copy; check verify() and that `changed` says whether the IR changed."""
    work, _ = graph.copy()
    before = str(work)
    out, changed = pass_fn(work)
    out.verify()
    assert changed == (str(out) != before), f"{pass_fn.__name__}: changed={changed} disagrees with the IR"
    return out, changed


def ops_of(graph: gd.Graph) -> list[str]:
    return [n.op.name for n in graph.nodes]


def net(act: Callable = gd.tanh, width: int = 4, dtype: torch.dtype = torch.float64) -> gd.Graph:
    """A 2-width-width-1 MLP with an MSE loss."""
    gen = torch.Generator().manual_seed(0)
    g = gd.Graph("net")
    h = g.input("x", (None, 2), dtype)
    y = g.input("y", (None, 1), dtype)
    dims = [2, width, width, 1]
    for k, (i, o) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = g.param(f"fc{k}.weight", torch.randn(i, o, generator=gen, dtype=dtype))
        b = g.param(f"fc{k}.bias", torch.randn(o, generator=gen, dtype=dtype))
        h = gd.add(gd.matmul(h, w), b)
        if k < len(dims) - 2:
            h = act(h)
    g.output(gd.mse(h, y))
    return g


def net_feeds(n: int = 5, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.rand(n, 2, generator=gen, dtype=dtype), "y": torch.rand(n, 1, generator=gen, dtype=dtype)}


# -- DCE --------------------------------------------------------------------------------


def test_dce_drops_dead_chains_and_reports_it():
    g = net()
    x = g.inputs["x"]
    gd.tanh(gd.neg(x))  # a dead chain of two
    out, changed = apply(g, dce)
    assert changed and len(out.nodes) == len(g.nodes) - 2
    _, changed = apply(out, dce)
    assert not changed


# -- CSE --------------------------------------------------------------------------------


def test_cse_merges_duplicates_and_their_users_in_one_sweep():
    g = gd.Graph("dup")
    x = g.input("x", (None, 3), torch.float64)
    w = g.param("w", torch.randn(3, 3, dtype=torch.float64))
    a, b = gd.tanh(gd.matmul(x, w)), gd.tanh(gd.matmul(x, w))
    g.output(gd.sum(gd.add(a, b)))
    out, changed = apply(g, cse)
    assert changed and ops_of(out).count("matmul") == 1 and ops_of(out).count("tanh") == 1
    feeds = {"x": torch.randn(4, 3, dtype=torch.float64)}
    assert torch.equal(run(g, feeds)[0], run(out, feeds)[0])
    assert not apply(out, cse)[1]


def test_cse_keeps_different_attrs_and_signed_zeros_apart():
    g = gd.Graph("attrs")
    x = g.input("x", (3, 4))
    g.output(gd.sum(x, axis=0), gd.sum(x, axis=1), gd.mul(x, g.const(0.0)), gd.mul(x, g.const(-0.0)))
    out, changed = apply(g, cse)
    assert not changed and len(out.nodes) == len(g.nodes)


# -- constant folding ---------------------------------------------------------------------


def test_fold_turns_constant_subgraphs_into_one_constant():
    g = gd.Graph("consts")
    x = g.input("x", (None, 2), torch.float64)
    c = gd.sub(gd.mul(g.const(3.0, torch.float64), g.const(0.5, torch.float64)), g.const(1.0, torch.float64))
    g.output(gd.mul(x, gd.exp(c)))
    out, changed = apply(g, fold)
    out, _ = dce(out)
    consts = [n for n in out.nodes if n.op.name == "const"]
    assert changed and len(consts) == 1 and consts[0].attrs["dtype"] == "f64"
    assert consts[0].attrs["value"] == pytest.approx(torch.exp(torch.tensor(0.5, dtype=torch.float64)).item())
    feeds = {"x": torch.rand(3, 2, dtype=torch.float64)}
    assert torch.equal(run(g, feeds)[0], run(out, feeds)[0])
    assert str(gd.parse(str(out))) == str(out)


def test_fold_leaves_non_finite_results_alone():
    g = gd.Graph("inf")
    x = g.input("x", (2,))
    g.output(gd.mul(x, gd.div(g.const(1.0), g.const(0.0))))
    _, changed = apply(g, fold)
    assert not changed


# -- algebraic simplification ------------------------------------------------------------


@pytest.mark.parametrize("build, left", [
    (lambda x, c: gd.mul(x, c(1.0)), []),
    (lambda x, c: gd.mul(c(1.0), x), []),
    (lambda x, c: gd.add(x, c(0.0)), []),
    (lambda x, c: gd.add(c(0.0), x), []),
    (lambda x, c: gd.sub(x, c(0.0)), []),
    (lambda x, c: gd.div(x, c(1.0)), []),
    (lambda x, c: gd.sub(c(0.0), x), ["neg"]),
    (lambda x, c: gd.mul(x, c(-1.0)), ["neg"]),
    (lambda x, c: gd.neg(gd.neg(x)), []),
    (lambda x, c: gd.transpose(gd.transpose(x)), []),
    (lambda x, c: gd.add(x, gd.neg(gd.tanh(x))), ["tanh", "sub"]),
    (lambda x, c: gd.sub(x, gd.neg(gd.tanh(x))), ["tanh", "add"]),
    (lambda x, c: gd.broadcast_like(gd.tanh(x), x), ["tanh"]),
    (lambda x, c: gd.sum_to(x, (3, 4)), []),
    (lambda x, c: gd.sum_to(gd.tanh(x), (4,)), ["tanh", "sum"]),
])
def test_simplify_rules(build, left):
    g = gd.Graph("simple")
    x = g.input("x", (3, 4), torch.float64)
    built = build(x, lambda v: g.const(v, torch.float64))
    g.output(gd.sum(gd.mul(built, gd.tanh(x))))  # keep the result away from the output
    out, changed = apply(g, simplify)
    out, _ = dce(out)
    assert changed
    assert [op for op in ops_of(out) if op != "const"] == [*left, "tanh", "mul", "sum"]
    feeds = {"x": torch.randn(3, 4, dtype=torch.float64)}
    torch.testing.assert_close(run(g, feeds), run(out, feeds), rtol=0, atol=0)


def test_simplify_never_returns_a_param_or_input_as_an_output():
    g = gd.Graph("keep")
    x = g.input("x", (3, 4))
    w = g.param("w", torch.ones(4))
    g.output(gd.mul(w, g.const(1.0)), gd.add(x, g.const(0.0)))
    _, changed = apply(g, simplify)
    assert not changed  # else the caller would get the live param tensor back
    g.output(gd.mul(gd.tanh(x), g.const(1.0)))
    out, changed = apply(g, simplify)
    assert changed and out.outputs[2].node.op.name == "tanh"


# -- fusion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("act, fused", [(gd.tanh, "tanh_backward"), (gd.relu, "relu_backward"),
                                        (gd.sigmoid, "sigmoid_backward")])
def test_fusion_of_a_training_step(act, fused):
    g = gd.grad(net(act), ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"])
    opt = pipeline(g.copy()[0])
    opt.verify()
    ops = ops_of(opt)
    tanh = act is gd.tanh  # tanh(addmm) is one op, addmm_tanh
    assert ops.count("addmm") == (1 if tanh else 3) and ops.count("addmm_tanh") == (2 if tanh else 0)
    assert ops.count(fused) == 2 and ops.count("mse_backward") == 1 and "tanh" not in ops
    assert ops.count("matmul_tn") == 3 and ops.count("matmul_nt") == 2
    assert not {"transpose", "matmul", "add", "sum_to", "broadcast_like", "greater"} & set(ops)
    feeds = net_feeds()
    torch.testing.assert_close(run(g, feeds), run(opt, feeds))
    assert str(gd.parse(str(opt))) == str(opt)


def test_fusion_needs_the_pattern_exactly():
    g = gd.Graph("near")
    x = g.input("x", (None, 3), torch.float64)
    w = g.param("w", torch.randn(3, 3, dtype=torch.float64))
    b = g.param("b", torch.randn(3, dtype=torch.float64))
    mm = gd.matmul(x, w)
    h = gd.add(mm, b)  # the product has a second use: no addmm, it would be computed twice
    y = gd.tanh(h)
    near_tanh = gd.mul(h, gd.sub(g.const(1.0, torch.float64), gd.mul(y, h)))  # y*h, not y*y
    near_relu = gd.mul(h, gd.greater(y, g.const(0.5, torch.float64)))  # threshold 0.5
    g.output(gd.sum(gd.add(gd.add(near_tanh, near_relu), mm)))
    kept = gd.matmul(x, gd.tanh(w))
    g.output(gd.add(kept, b), kept)  # a returned product would be computed twice too
    _, changed = apply(g, fuse)
    assert not changed


def test_a_batched_product_is_not_fused_into_the_matrix_kernels():
    """addmm and matmul_tn/nt take matrices: a Linear over [N,L,in] keeps matmul, add and
    the transposes, in its forward pass and its gradient."""
    g = gd.Graph("seq")
    x = g.input("x", (None, 4, 3), torch.float64)
    w = g.param("w", torch.randn(3, 2, dtype=torch.float64))
    b = g.param("b", torch.randn(2, dtype=torch.float64))
    g.output(gd.sum(gd.tanh(gd.add(gd.matmul(x, w), b))))
    gg = gd.grad(g, ["w", "b"])
    opt = pipeline(gg.copy()[0])
    opt.verify()
    ops = ops_of(opt)
    assert not {"addmm", "matmul_tn", "matmul_nt"} & set(ops) and ops.count("matmul") == 2
    feeds = {"x": torch.randn(5, 4, 3, dtype=torch.float64)}
    torch.testing.assert_close(gd.compile(gg, optimize=False)(**feeds), gd.compile(opt)(**feeds))


def test_grad_of_an_optimised_graph_matches_the_unoptimised_one():
    g = gd.grad(net(gd.tanh), ["fc1.weight"])
    d = g.outputs[1]
    g.output(gd.sum(gd.mul(d, d)))
    opt = pipeline(g.copy()[0])
    assert "tanh_backward" in ops_of(opt) and "mse_backward" in ops_of(opt)
    feeds = net_feeds()
    want = run(gd.grad(g, ["fc1.weight"], of=2), feeds)[-1]
    got = gd.compile(gd.grad(opt, ["fc1.weight"], of=2))(**feeds)[-1]
    torch.testing.assert_close(got, want)


# -- the pipeline --------------------------------------------------------------------------


def test_pipeline_logs_the_ir_after_each_pass_and_reaches_a_fixed_point():
    lines: list[str] = []
    opt = pipeline(gd.grad(net(), ["fc0.weight"]), log=lines.append)
    assert lines[0].startswith("// input\ngraph net(")
    assert any(m.startswith("// after fuse\ngraph net(") for m in lines)
    assert any(m == "// after cse: no change" for m in lines)
    for name, pass_fn in PASSES:  # nothing left to do
        assert not apply(opt, pass_fn)[1], name


def test_the_passes_treat_a_dropout_mask_as_the_pure_function_it_is():
    """A mask is a function of its key, seed, p and shape: CSE merges only masks of the same
    key and attrs (which are equal), keeps those of different keys or seeds apart, and
    fold never computes one at compile time; the training graph's result is unchanged."""
    g = gd.Graph("drop")
    x = g.input("x", (None, 6), torch.float64)
    key = g.param("key", torch.tensor(4.0, dtype=torch.float64))
    same = [gd.dropout_mask(key, x, p=0.5, seed=1) for _ in range(2)]
    apart = [gd.dropout_mask(key + 1.0, x, p=0.5, seed=1), gd.dropout_mask(key, x, p=0.5, seed=2)]
    g.output(gd.sum(x * same[0] + x * same[1] + x * apart[0] + x * apart[1]))
    feeds = {"x": torch.rand(5, 6, dtype=torch.float64)}
    merged, changed = apply(g, cse)
    assert changed and ops_of(merged).count("dropout_mask") == 3
    assert ops_of(apply(g, fold)[0]).count("dropout_mask") == 4
    torch.testing.assert_close(run(pipeline(g.copy()[0]), feeds), run(g, feeds), rtol=0, atol=0)
    masks = gd.Graph("masks")
    masks.output(gd.dropout_mask(masks.param("key", torch.tensor(0.0, dtype=torch.float64)),
                                 masks.input("x", (None, 6), torch.float64)))
    assert ops_of(apply(masks, dce)[0]) == ["dropout_mask"]  # a mask that is returned stays


# -- memory planning ------------------------------------------------------------------------


def test_inplace_plan_only_overwrites_dying_temporaries():
    g = gd.grad(net(gd.relu), ["fc0.weight", "fc1.weight"])
    opt = pipeline(g)
    plan = plan_inplace(opt, hoisted=set())
    assert plan, "the relus and relu_backwards should reuse their inputs"
    returned = {id(v) for v in opt.outputs}
    for k, i in plan.items():
        v = opt.nodes[k].inputs[i]
        assert v.node is not None and id(v) not in returned
        assert all(opt.nodes.index(u) <= k for u in v.users)  # nothing reads it later
        assert "transpose" not in {u.op.name for u in v.users}


EXACT = {"dce", "cse", "fold", "simplify"}  # these reorder no arithmetic: bit-identical results


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pass_programs())
def test_every_pass_keeps_random_forward_and_gradient_graphs_equal(program):
    g = build_pass_graph(*program)
    graphs = [g, gd.grad(g, ["w0", "w1", "b0", "b1", "x"])]
    feeds = pass_feeds()
    for graph in graphs:
        want = run(graph, feeds)
        for name, pass_fn in PASSES:
            out, _ = apply(graph, pass_fn)
            got = run(out, feeds)
            if name in EXACT:
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            else:
                torch.testing.assert_close(got, want, equal_nan=True)
        opt = pipeline(graph.copy()[0])
        opt.verify()
        torch.testing.assert_close(gd.compile(graph)(**feeds), want, equal_nan=True)
        torch.testing.assert_close(gd.compile(graph, reuse=False)(**feeds), want, equal_nan=True)
