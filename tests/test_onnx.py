"""graphdl.onnx_io: export checked by onnx.checker and onnxruntime, import checked against
numpy and graphdl itself, and every way a file can be wrong."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import graphdl as gd
from graphdl.onnx_io import EXPORT


def optional(module: str):
    """The optional extra graphdl[onnx]: skipped without it, except in CI, which installs it
    (there a missing package must fail, not skip)."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="ONNX support is the optional extra graphdl[onnx]")


onnx = optional("onnx")
ort = optional("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402
from test_ops import CASES, _feeds, _graph, _id, _inputs, _wrt  # noqa: E402  (the op table that drives test_ops)

BATCHES = (1, 7, 64)


def run_ort(path: Path, basic: bool = False, **feeds: torch.Tensor) -> list[np.ndarray]:
    """Run a file with onnxruntime. `basic`: only its basic graph optimisations, for float64
    gradient graphs: its extended ones fuse Transpose+MatMul into a kernel it has for float
    only, and then refuse the model (onnxruntime 1.23)."""
    options = ort.SessionOptions()
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def assert_same(got: list, want: tuple | list, **tol: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.as_tensor(np.asarray(a)), b.detach(), **tol)


def disk_net(dtype: torch.dtype = torch.float32) -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    return gd.Sequential(gd.Linear(2, 25, gen, dtype), gd.Tanh(), gd.Linear(25, 25, gen, dtype), gd.ReLU(),
                         gd.Linear(25, 1, gen, dtype), gd.Sigmoid())


def data(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=gen, dtype=dtype), torch.rand(n, 1, generator=gen, dtype=dtype)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# -- export -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opset", [13, 17, 18])
def test_exported_model_is_valid_has_a_symbolic_batch_and_agrees_with_onnxruntime(tmp_path, dtype, opset):
    model = disk_net(dtype)
    path = tmp_path / "m.onnx"
    gd.export_onnx(model, path, opset=opset)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == opset
    assert dims(proto.graph.input[0]) == ["N", 2] and dims(proto.graph.output[0]) == ["N", 1]
    assert {t.name for t in proto.graph.initializer} == set(model.parameters())
    for n in BATCHES:  # one file, every batch size
        X, _ = data(n, dtype)
        assert_same(run_ort(path, x=X), [model.predict(X)])


@pytest.mark.parametrize("opset", [13, 18])
def test_gradient_graph_and_its_compiled_form_export_and_agree(tmp_path, opset):
    model = disk_net(torch.float64)
    grad_graph = gd.grad(model.graph(loss=gd.MSE()), wrt=list(model.parameters()))
    compiled = gd.compile(grad_graph)
    assert {n.op.name for n in compiled.graph.nodes} & {"addmm", "matmul_tn", "tanh_backward"}  # fused ops
    for graph in (grad_graph, compiled.graph):
        path = tmp_path / "grad.onnx"
        gd.export_onnx(graph, path, opset=opset)
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        for n in BATCHES:
            X, Y = data(n, torch.float64)
            assert_same(run_ort(path, basic=True, x=X, y=Y), compiled(x=X, y=Y))


def test_every_op_has_an_export_row():
    assert set(gd.OPS) <= set(EXPORT), f"ops without an ONNX row in onnx_io.EXPORT: {set(gd.OPS) - set(EXPORT)}"


# onnxruntime's CPU kernels for Conv, ConvTranspose and AveragePool are float32 only
# (1.23): the cases whose graphs use them run in float32 there.
FLOAT32_IN_ORT = {"conv1d", "conv2d", "conv_backward_input", "conv_backward_weight", "avg_pool2d",
                  "avg_pool2d_backward"}
OPSET_OF = {"dropout_mask": 18}  # its hash is made of bitwise ops, which ONNX has from opset 18


def _float32_graph(case, tensors: list[torch.Tensor]) -> gd.Graph:
    g = gd.Graph("case")
    out = case.build(*(g.param(f"a{i}", t.float()) for i, t in enumerate(tensors)))
    r = torch.rand(tuple(out.shape), generator=torch.Generator().manual_seed(7))
    g.output(gd.sum(gd.mul(out, g.param("r", r))))
    return g


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_each_op_and_its_gradient_graph_agree_with_onnxruntime(tmp_path, case):
    """The op table of test_ops drives this: every op's forward and backward IR, through ONNX."""
    tensors = _inputs(case, seed=3)
    float32 = case.op in FLOAT32_IN_ORT
    g = _float32_graph(case, tensors) if float32 else _graph(case, tensors)[0]
    feeds = {} if float32 else _feeds(case, tensors)
    tol = {"rtol": 1e-5, "atol": 1e-5} if float32 else {}
    for graph in (g, gd.grad(g, _wrt(case))):
        path = tmp_path / "op.onnx"
        gd.export_onnx(graph, path, opset=OPSET_OF.get(case.op, 17))
        assert_same(run_ort(path, basic=True, **feeds), gd.compile(graph, optimize=False)(**feeds), **tol)


def test_symbolic_dims_survive_in_reductions_and_broadcasts(tmp_path):
    """mean over the batch and its adjoint read N from the input's shape at run time."""
    g = gd.Graph("batchmean")
    x = g.input("x", (None, 3), torch.float64)
    w = g.param("w", torch.linspace(-1, 1, 3, dtype=torch.float64))
    g.output(gd.sum(gd.mean(gd.tanh(x * w), axis=0)))
    for graph in (g, gd.grad(g, wrt=["x", "w"])):
        path = tmp_path / "b.onnx"
        gd.export_onnx(graph, path)
        for n in BATCHES:
            X = torch.rand(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
            assert_same(run_ort(path, basic=True, x=X), gd.compile(graph)(x=X))


def test_the_variances_export_with_counts_past_float16s_range_and_below_the_correction(tmp_path):
    """var and correct_var count in float32 or float64 where x is a half dtype, and divide
    by n - correction clamped at 0, as their kernels (and torch.var) do."""
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.float16, (70000, 2), 0, 1), (torch.float64, (2, 3), 0, 3), (torch.float32, (5, 3), 0, 1)]
    for dtype, shape, axis, correction in cases:
        g = gd.Graph("v")
        x = g.input("x", (None, shape[1]), dtype)
        g.output(gd.var(x, axis=axis, correction=correction),
                 gd.ops.correct_var(gd.var(x, axis=axis), x, axis=axis, correction=correction))
        X = torch.randn(shape, generator=gen).to(dtype)
        path = tmp_path / "v.onnx"
        gd.export_onnx(g, path)
        got, want = run_ort(path, x=X), gd.compile(g)(x=X)
        assert all(torch.isfinite(w).all() == (shape[0] > correction) for w in want)
        assert_same(got, want, rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=0)


def test_output_names_never_collide_with_inputs(tmp_path):
    g = gd.Graph("names")
    x = g.input("output", (None, 2))
    g.output(gd.relu(x), x)  # an input returned as it is, too
    path = tmp_path / "n.onnx"
    gd.export_onnx(g, path)
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["output0", "output1"]
    X = torch.randn(4, 2)
    assert_same(run_ort(path, output=X), [X.relu(), X])


def test_export_of_an_op_without_a_row_names_the_op_and_node(tmp_path, monkeypatch):
    monkeypatch.delitem(EXPORT, "tanh")
    with pytest.raises(gd.GraphError, match=r"node %2 \(tanh\) has no ONNX mapping.*\n.*EXPORT"):
        gd.export_onnx(disk_net(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", [12, 10_000, "17", True])
def test_a_bad_opset_is_a_value_error_naming_it(tmp_path, opset):
    with pytest.raises(ValueError, match="opset must be an int from 13"):
        gd.export_onnx(disk_net(), tmp_path / "m.onnx", opset=opset)



def test_an_opset_is_read_as_a_whole_number_so_a_numpy_int_is_one(tmp_path):
    """opset goes through checks.whole, which takes any integral number that is not a bool."""
    gd.export_onnx(disk_net(), tmp_path / "m.onnx", opset=np.int64(17))
    assert onnx.load(tmp_path / "m.onnx").opset_import[0].version == 17

def test_export_refuses_what_is_not_a_model_and_a_graph_without_outputs(tmp_path):
    with pytest.raises(gd.GraphError, match="takes a gd.Sequential or gd.Graph, got Sequential"):
        gd.export_onnx(torch.nn.Sequential(), tmp_path / "m.onnx")
    g = gd.Graph("empty")
    gd.relu(g.input("x", (None, 2)))
    with pytest.raises(gd.GraphError, match=r"graph empty has no outputs.*graph\.output"):
        gd.export_onnx(g, tmp_path / "m.onnx")


# -- import -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_import_of_graphdls_own_export_agrees(tmp_path, dtype):
    model = disk_net(dtype)
    gd.export_onnx(model, tmp_path / "m.onnx")
    g = gd.import_onnx(tmp_path / "m.onnx")
    assert g.inputs["x"].shape == ("N", 2) and g.inputs["x"].dtype == dtype
    assert list(g.params) == list(model.parameters())
    fn = gd.compile(g)
    for n in BATCHES:
        X, _ = data(n, dtype)
        torch.testing.assert_close(fn(x=X)[0], model.predict(X), rtol=0, atol=0)
    # the loss graph too (Sub, Mul, ReduceMean come back as primitives)
    gd.export_onnx(model.graph(loss=gd.MSE()), tmp_path / "loss.onnx")
    X, Y = data(7, dtype)
    (loss,) = gd.compile(gd.import_onnx(tmp_path / "loss.onnx"))(x=X, y=Y)
    torch.testing.assert_close(loss, model.evaluate(X, Y)["loss"] * torch.ones((), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_survive_export_and_import_bit_for_bit(tmp_path, dtype):
    model = disk_net(dtype)
    gd.export_onnx(model, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")), full_check=True)
    g = gd.import_onnx(tmp_path / "m.onnx")
    for name, t in model.parameters().items():
        assert g.params[name].dtype == dtype and torch.equal(g.params[name].data, t)
    grad_graph = gd.grad(model.graph(loss=gd.MSE()), wrt=list(model.parameters()))  # a const of this dtype
    gd.export_onnx(grad_graph, tmp_path / "g.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / "g.onnx")), full_check=True)


def _numpy_mlp(x: np.ndarray, w: list[np.ndarray]) -> np.ndarray:
    """What the hand-built model computes: Gemm layers as other exporters write them."""
    w0, b0, w1, b1, w2, b2 = w
    h = np.maximum(0.5 * x @ w0.T + 2.0 * b0, 0)  # transB=1, alpha 0.5, beta 2
    h = np.tanh(h @ w1.T + b1)
    return 1 / (1 + np.exp(-(h @ w2 + b2)))  # transB=0


def _hand_built(path: Path, opset: int = 13) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(s).astype(np.float32) for s in [(8, 3), (8,), (5, 8), (5,), (5, 2), (2,)]]
    names = ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    nodes = [
        helper.make_node("Gemm", ["input", "fc0.weight", "fc0.bias"], ["h0"], name="/fc0/Gemm",
                         transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h0"], ["h1"], name="/act0/Relu"),
        helper.make_node("Gemm", ["h1", "fc1.weight", "fc1.bias"], ["h2"], name="/fc1/Gemm", transB=1),
        helper.make_node("Tanh", ["h2"], ["h3"], name="/act1/Tanh"),
        helper.make_node("Gemm", ["h3", "fc2.weight", "fc2.bias"], ["h4"], name="/fc2/Gemm"),
        helper.make_node("Sigmoid", ["h4"], ["probs"], name="/act2/Sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "main_graph", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch_size", 2])],
        [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.tobytes(), raw=True) for n, a in zip(names, w)])
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return w


def test_import_of_a_hand_built_gemm_model_agrees_with_numpy(tmp_path):
    w = _hand_built(tmp_path / "h.onnx")
    g = gd.import_onnx(tmp_path / "h.onnx")
    assert g.name == "main_graph" and g.inputs["input"].shape == ("N", 3)
    assert g.params["fc0.weight"].shape == (8, 3)  # as the file holds it, read through a transpose
    fn = gd.compile(g)
    for n in BATCHES:
        x = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
        (got,) = fn(input=torch.from_numpy(x))
        np.testing.assert_allclose(got.numpy(), _numpy_mlp(x, w), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.numpy(), run_ort(tmp_path / "h.onnx", input=torch.from_numpy(x))[0],
                                   rtol=1e-5, atol=1e-6)


def test_imported_graph_prints_parses_back_renders_differentiates_and_trains(tmp_path):
    _hand_built(tmp_path / "h.onnx")
    g = gd.import_onnx(tmp_path / "h.onnx")
    text = str(g)
    assert "# 0:Gemm" in text and str(gd.parse(text)) == text
    assert len(gd.to_dot(g).body) > len(g.nodes)
    y = g.input("y", (None, 2))
    g.output(gd.mse(g.outputs[0], y))
    grads = gd.grad(g, wrt=list(g.params), of=1)
    step = gd.compile(grads)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    target = torch.sigmoid(x @ torch.ones(3, 2))
    losses = []
    for _ in range(50):  # plain SGD on the imported params, in place
        out = step(input=x, y=target)
        losses.append(out[1].item())
        for p, dp in zip(g.params.values(), out[2:]):
            p.data -= 1.0 * dp
    assert losses[-1] < 0.1 * losses[0]  # 0.110 -> 0.005


def _model(nodes, inputs, outputs, initializers=(), opset=13):
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def _save(tmp_path: Path, model) -> Path:
    path = tmp_path / "t.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _f64(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.DOUBLE, shape)


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_import_of_reductions_in_both_opset_forms_and_the_other_ops(tmp_path, opset):
    """ReduceSum/ReduceMean read axes from the attribute (before 13/18) or the input (after)."""
    def reduce(op, x, out, axes, since, keepdims):
        if opset >= since:
            return [helper.make_node("Constant", [], [out + "_axes"], value=helper.make_tensor(
                "", TensorProto.INT64, [len(axes)], axes)),
                helper.make_node(op, [x, out + "_axes"], [out], keepdims=keepdims)]
        return [helper.make_node(op, [x], [out], axes=axes, keepdims=keepdims)]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
        helper.make_node("Transpose", ["at"], ["a2"]),
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("", TensorProto.DOUBLE, [], [2.0])),
        helper.make_node("Div", ["a2", "two"], ["b"]),
        helper.make_node("Exp", ["b"], ["c"]),
        helper.make_node("Sub", ["c", "x0"], ["d"]),
        helper.make_node("Abs", ["d"], ["e"]),
        helper.make_node("Log", ["e"], ["f"]),
        helper.make_node("Neg", ["f"], ["g"]),
        helper.make_node("Mul", ["g", "b"], ["h"]),
        helper.make_node("Identity", ["h"], ["i"]),
        *reduce("ReduceSum", "i", "s", [1], 13, 1),
        *reduce("ReduceMean", "i", "m", [0], 18, 0),
        helper.make_node("Add", ["s", "m"], ["out"]),  # [N,1] + [4] -> [N,4]
    ]
    model = _model(nodes, [_f64("x", ["n", 3])], [_f64("out", ["n", 4])],
                   [helper.make_tensor("w", TensorProto.DOUBLE, [3, 4], np.linspace(-1, 1, 12)),
                    helper.make_tensor("x0", TensorProto.DOUBLE, [], [0.25])], opset=opset)
    onnx.checker.check_model(model, full_check=True)
    path = _save(tmp_path, model)
    fn = gd.compile(gd.import_onnx(path))
    w = np.linspace(-1, 1, 12).reshape(3, 4)
    for n in BATCHES:
        x = np.random.default_rng(n).standard_normal((n, 3))
        b = (x @ w) / 2
        i = -np.log(np.abs(np.exp(b) - 0.25)) * b
        want = i.sum(1, keepdims=True) + i.mean(0)
        (got,) = fn(x=torch.from_numpy(x))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


# -- files and ops that cannot be imported -------------------------------------------------


def test_an_unsupported_op_names_the_op_its_node_and_the_opset(tmp_path):
    model = _model([helper.make_node("Sqrt", ["x"], ["y"], name="the_root")], [_f64("x", ["N", 2])],
                   [_f64("y", ["N", 2])], opset=17)
    with pytest.raises(gd.GraphError, match=r"t\.onnx: ONNX node 0 \('the_root'\) is a Sqrt \(opset 17\), which "
                                            r"graphdl cannot import; it imports Abs, Add"):
        gd.import_onnx(_save(tmp_path, model))


def test_an_op_of_another_domain_and_an_unknown_attribute_are_refused(tmp_path):
    custom = _model([helper.make_node("Relu", ["x"], ["y"], domain="com.example")], [_f64("x", ["N", 2])],
                    [_f64("y", ["N", 2])])
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(gd.GraphError, match=r"is a com\.example\.Relu \(opset 13\)"):
        gd.import_onnx(_save(tmp_path, custom))
    odd = _model([helper.make_node("Relu", ["x"], ["y"], name="r", flavour=3)], [_f64("x", ["N", 2])],
                 [_f64("y", ["N", 2])])
    with pytest.raises(gd.GraphError, match=r"ONNX node 0 \('r'\), a Relu \(opset 13\): attribute 'flavour' is "
                                            "not supported"):
        gd.import_onnx(_save(tmp_path, odd))


def test_any_transpose_imports_as_a_permute(tmp_path):
    model = _model([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])], [_f64("x", ["N", 2, 3])],
                   [_f64("y", [2, "N", 3])])
    g = gd.import_onnx(_save(tmp_path, model))
    assert [n.op.name for n in g.nodes] == ["permute"] and g.outputs[0].shape == (2, "N", 3)
    X = torch.rand(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(gd.compile(g)(x=X)[0], X.permute(1, 0, 2))


def test_a_shape_mismatch_in_the_file_names_the_onnx_node(tmp_path):
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_f64("x", ["N", 2])],
                   [_f64("y", ["N", 4])], [helper.make_tensor("w", TensorProto.DOUBLE, [3, 4], np.zeros(12))])
    with pytest.raises(gd.GraphError, match=r"ONNX node 0 \('mm'\), a MatMul \(opset 13\): matmul .* inner dims "
                                            r"differ \(2 vs 3\)"):
        gd.import_onnx(_save(tmp_path, model))


def test_integer_inputs_and_inconsistent_outputs_are_refused(tmp_path):
    ints = _model([helper.make_node("Identity", ["ids"], ["y"])],
                  [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N"])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, ["N"])])
    with pytest.raises(gd.GraphError, match="input 'ids' is of ONNX type INT32; graphdl takes float, double, "
                                            "float16 and bfloat16 inputs, and int64 indices"):
        gd.import_onnx(_save(tmp_path, ints))
    wrong = _model([helper.make_node("Relu", ["x"], ["y"])], [_f64("x", ["N", 2])], [_f64("y", ["N", 3])])
    with pytest.raises(gd.GraphError, match=r"output 'y' is declared \[None, 3\] but graphdl computes \[N,2\]"):
        gd.import_onnx(_save(tmp_path, wrong))


def _one_initializer(tensor) -> object:
    return _model([helper.make_node("Add", ["x", "w"], ["y"])], [_f64("x", ["N", 2])], [_f64("y", ["N", 2])],
                  [tensor])


@pytest.mark.parametrize("elem, dtype", [(TensorProto.FLOAT, torch.float32), (TensorProto.DOUBLE, torch.float64),
                                         (TensorProto.FLOAT16, torch.float16), (TensorProto.BFLOAT16, torch.bfloat16)])
def test_initializers_in_typed_fields_read_like_raw_bytes(tmp_path, elem, dtype):
    values = [0.5, -1.25, 3.0, 1024.0]
    tensor = helper.make_tensor("w", elem, [2, 2], values)  # float_data / double_data / int32_data (16-bit bits)
    assert not tensor.raw_data
    x = helper.make_tensor_value_info("x", elem, ["N", 2])
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [helper.make_tensor_value_info("y", elem,
                                                                                                   ["N", 2])], [tensor])
    g = gd.import_onnx(_save(tmp_path, model))
    assert torch.equal(g.params["w"].data, torch.tensor(values, dtype=dtype).reshape(2, 2))
    if elem in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        tensor.int32_data[0] = 70_000  # not 16 bits
        model.graph.initializer[0].CopyFrom(tensor)
        with pytest.raises(gd.GraphError, match="16-bit values outside 0..65535"):
            gd.import_onnx(_save(tmp_path, model))


def test_huge_declared_dims_are_refused_before_anything_is_allocated(tmp_path):
    huge = helper.make_tensor("w", TensorProto.DOUBLE, [2], np.zeros(2).tobytes(), raw=True)
    huge.dims[:] = [2**31, 2**31, 2]  # onnx.helper checks sizes; a crafted file need not
    with pytest.raises(gd.GraphError, match=r"initializer 'w' declares dims \[2147483648, 2147483648, 2\] "
                                            r"\(9223372036854775808 x 8 bytes\) but holds 16 bytes; the file "
                                            "is corrupt"):
        gd.import_onnx(_save(tmp_path, _one_initializer(huge)))
    typed = helper.make_tensor("w", TensorProto.DOUBLE, [2], [1.0, 2.0])
    typed.dims[:] = [10**12]
    with pytest.raises(gd.GraphError, match=r"declares dims \[1000000000000\] \(1000000000000 values\) but holds 2"):
        gd.import_onnx(_save(tmp_path, _one_initializer(typed)))
    negative = helper.make_tensor("w", TensorProto.DOUBLE, [2], [1.0, 2.0])
    negative.dims[0] = -2
    with pytest.raises(gd.GraphError, match=r"negative dims \[-2\]"):
        gd.import_onnx(_save(tmp_path, _one_initializer(negative)))


def test_weights_in_an_external_file_are_refused(tmp_path):
    tensor = helper.make_tensor("w", TensorProto.DOUBLE, [2], np.zeros(2).tobytes(), raw=True)
    onnx.external_data_helper.set_external_data(tensor, location="../../etc/passwd")
    tensor.ClearField("raw_data")
    with pytest.raises(gd.GraphError, match="keeps its data in an external file"):
        gd.import_onnx(_save(tmp_path, _one_initializer(tensor)))


@pytest.mark.parametrize("content, message", [
    (b"", "is not an ONNX model: the file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "is not an ONNX model"),
    (b"graph tiny(x: f32[N,2]) {\n  return x\n}\n", "is not an ONNX model"),
    (b"\x08\x07", "is not an ONNX model: it lacks an ONNX model's IR version, graph or opset"),
])
def test_a_non_onnx_file_is_a_graph_error(tmp_path, content, message):
    path = tmp_path / "not.onnx"
    path.write_bytes(content)
    with pytest.raises(gd.GraphError, match=message):
        gd.import_onnx(path)


def test_a_corrupt_or_truncated_onnx_file_is_a_graph_error(tmp_path):
    gd.export_onnx(disk_net(), tmp_path / "m.onnx")
    whole = (tmp_path / "m.onnx").read_bytes()
    for cut in (len(whole) // 3, len(whole) // 2, len(whole) - 7):
        (tmp_path / "cut.onnx").write_bytes(whole[:cut])
        with pytest.raises(gd.GraphError, match=r"cut\.onnx: "):
            gd.import_onnx(tmp_path / "cut.onnx")
    rng = np.random.default_rng(0)
    for _ in range(30):  # flipped bytes: a GraphError or a graph, never another exception
        mangled = bytearray(whole)
        for i in rng.integers(0, len(whole), 8):
            mangled[i] ^= int(rng.integers(1, 256))
        (tmp_path / "bad.onnx").write_bytes(bytes(mangled))
        try:
            gd.import_onnx(tmp_path / "bad.onnx")
        except gd.GraphError:
            pass


def test_a_name_that_is_not_utf8_is_a_graph_error(tmp_path):
    """ONNX is proto2, whose parser returns such a string as bytes instead of failing."""
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="NODENAME")], [_f64("x", ["N", 2])],
                   [_f64("y", ["N", 2])])
    path = tmp_path / "t.onnx"
    path.write_bytes(model.SerializeToString().replace(b"NODENAME", b"NODE\xff\xfeME"))
    with pytest.raises(gd.GraphError, match=r"the field onnx\.NodeProto\.name holds text that is not UTF-8"):
        gd.import_onnx(path)


def test_a_missing_file_is_a_graph_error(tmp_path):
    with pytest.raises(gd.GraphError, match="no such file"):
        gd.import_onnx(tmp_path / "absent.onnx")


@pytest.mark.slow
def test_import_graphdl_never_imports_onnx_and_a_missing_onnx_says_how_to_install(tmp_path, monkeypatch):
    probe = "import sys, graphdl; print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "onnx", None)  # what a missing package looks like to `import onnx`
    for call in (lambda: gd.export_onnx(disk_net(), tmp_path / "m.onnx"), lambda: gd.import_onnx(tmp_path / "m")):
        with pytest.raises(ImportError, match=r"pip install graphdl\[onnx\]"):
            call()


def test_classification_ops_export_and_softmax_imports(tmp_path):
    g = gd.Graph("cls")
    x = g.input("x", (None, 3), torch.float64)
    y = g.input("y", (None, 3), torch.float64)
    apply = gd.ops.apply
    g.output(apply(gd.OPS["softmax"], x), apply(gd.OPS["log_softmax"], x),
             apply(gd.OPS["cross_entropy"], x, y), apply(gd.OPS["bce_with_logits"], x * 30.0, y))
    gd.export_onnx(g, tmp_path / "cls.onnx")
    X = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Y = torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1)
    assert_same(run_ort(tmp_path / "cls.onnx", x=X, y=Y), gd.compile(g)(x=X, y=Y))
    forward = gd.Graph("sm")
    xs = forward.input("x", (None, 3), torch.float64)
    forward.output(apply(gd.OPS["softmax"], xs), apply(gd.OPS["log_softmax"], xs))
    gd.export_onnx(forward, tmp_path / "sm.onnx")
    assert_same(gd.compile(gd.import_onnx(tmp_path / "sm.onnx"))(x=X), [torch.softmax(X, -1),
                                                                      torch.log_softmax(X, -1)])


# -- the render tool ----------------------------------------------------------------------


def test_graphdl_render_draws_an_onnx_file(tmp_path, capsys):
    from graphdl.cli import render_main

    _hand_built(tmp_path / "h.onnx")
    assert render_main([str(tmp_path / "h.onnx"), "-o", str(tmp_path / "h.dot")]) == 0
    source = (tmp_path / "h.dot").read_text()
    assert source.startswith("digraph") and "fc0.weight" in source and "0:Gemm" in source
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01garbage")
    assert render_main([str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "b.dot")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("graphdl-render: error: ") and "is not an ONNX model" in err and "Traceback" not in err


def test_a_meta_model_is_refused_saying_why(tmp_path):
    model = gd.Sequential(gd.Linear(2, 3)).to("meta")
    with pytest.raises(gd.GraphError, match="param 0.weight is on the meta device"):
        gd.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# -- beyond two dims: the layers' ops export, run in onnxruntime and import back -------------------------


def _sequence_net(dtype: torch.dtype = torch.float32) -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    return gd.Sequential(gd.Embedding(10, 4, gen, dtype), gd.Flatten(), gd.GELU(), gd.Linear(12, 6, gen, dtype),
                         gd.LeakyReLU(0.2), gd.Linear(6, 5, gen, dtype), gd.SiLU(), gd.Reshape((5, 1)),
                         gd.Softmax(dim=1), gd.GELU(approximate="tanh"), input_shape=(3,))


def _image_net() -> gd.Sequential:
    gen = torch.Generator().manual_seed(1)
    return gd.Sequential(gd.Reshape((1, 8, 8)), gd.Flatten(start_dim=2), gd.Flatten(), gd.Linear(64, 3, gen))


@pytest.mark.parametrize("opset", [17, 20])
def test_models_beyond_2d_export_with_a_symbolic_batch_and_import_back(tmp_path, opset):
    """Embedding (Gather of an int64 input), Flatten and Reshape (Reshape), GELU (the erf and tanh
    formulas, or Gelu from opset 20), LeakyReLU and SiLU, through onnxruntime and back."""
    for model, make in ((_sequence_net(), lambda n, gen: torch.randint(0, 10, (n, 3), generator=gen)),
                        (_image_net(), lambda n, gen: torch.rand(n, 64, generator=gen))):
        path = tmp_path / "m.onnx"
        gd.export_onnx(model, path, opset=opset)
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert dims(proto.graph.input[0]) == ["N", *model.input_shape]
        g = gd.import_onnx(path) if opset >= 20 or model.layers[-1].__class__ is gd.Linear else None
        for n in BATCHES:
            X = make(n, torch.Generator().manual_seed(n))
            want = model.predict(X)
            assert_same(run_ort(path, x=X), [want], rtol=1e-5, atol=1e-6)
            if g is not None:
                assert g.inputs["x"].dtype == X.dtype
                torch.testing.assert_close(gd.compile(g)(x=X)[0], want)


def test_a_gradient_graph_beyond_2d_exports_with_its_adjoints(tmp_path):
    """index_add (ScatterElements), unslice (Pad, spread by a step) and gelu_backward: the
    gradient graph of an Embedding, slices and a concat, through onnxruntime."""
    g = gd.Graph("adjoints")
    i = g.input("i", (None, 3), torch.int64)
    w = g.param("w", torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    h = gd.gelu(gd.index_select(w, i))  # [N,3,4]
    joined = gd.concat(gd.slice(h, 1, 0, 3, 2), gd.slice(h, 1, 1, 2), axis=1)  # [N,2,4] and [N,1,4]
    g.output(gd.sum(gd.tanh(joined) * gd.permute(h, (0, 1, 2))))
    gg = gd.grad(g, ["w"])
    assert {"index_add", "unslice", "gelu_backward"} <= {n.op.name for n in gg.nodes}
    path = tmp_path / "g.onnx"
    gd.export_onnx(gg, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    for n in BATCHES:
        ids = torch.randint(0, 6, (n, 3), generator=torch.Generator().manual_seed(n))  # repeated rows add up
        # onnxruntime has no float64 Erf: the export computes it in float32 (an error near 1e-7)
        assert_same(run_ort(path, basic=True, i=ids), gd.compile(gg)(i=ids), rtol=1e-6, atol=1e-6)


def test_import_of_shape_ops_as_other_exporters_write_them(tmp_path):
    """Reshape [-1, 64] of an [N,1,8,8] (the batch folded, as torch.onnx writes a flatten), a
    0 copying a dim, Flatten at axis 1, Concat, Slice with INT64_MAX ends, Gather of rows."""
    big = 2**63 - 1
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]),
             helper.make_node("Reshape", ["f", "keep"], ["k"]),  # [0, 8, 8]: 0 copies N
             helper.make_node("Flatten", ["k"], ["g"], axis=1),
             helper.make_node("Slice", ["g", "starts", "ends", "axes", "steps"], ["s"]),
             helper.make_node("Concat", ["s", "s"], ["c"], axis=1),
             helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("LeakyRelu", ["rows"], ["r"], alpha=0.3)]
    ints = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    model = _model(nodes, [_f64("x", ["N", 1, 8, 8]), helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                                       ["N", 2])],
                   [_f64("c", ["N", 64]), _f64("r", ["N", 2, 3])],
                   [ints("flat", [-1, 64]), ints("keep", [0, 8, 8]), ints("starts", [32]), ints("ends", [big]),
                    ints("axes", [1]), ints("steps", [1]),
                    helper.make_tensor("table", TensorProto.DOUBLE, [5, 3], np.arange(15.0))], opset=17)
    g = gd.import_onnx(_save(tmp_path, model))
    assert g.inputs["ids"].dtype == torch.int64 and g.outputs[0].shape == ("N", 64)
    X, ids = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.tensor([[0, 4], [1, 1], [2, 3], [4, 0]])
    c, r = gd.compile(g)(x=X, ids=ids)
    flat = X.reshape(4, 64)
    torch.testing.assert_close(c, torch.cat([flat[:, 32:], flat[:, 32:]], 1))
    torch.testing.assert_close(r, torch.nn.functional.leaky_relu(torch.arange(15.0, dtype=torch.float64)
                                                                 .reshape(5, 3)[ids], 0.3))
    assert_same(run_ort(tmp_path / "t.onnx", x=X, ids=ids), [c, r])


# -- nets beyond two dims -------------------------------------------------------------------


def _cnn() -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Conv2d(1, 4, 3, padding=1, generator=gen), gd.BatchNorm2d(4), gd.ReLU(),
                          gd.MaxPool2d(2), gd.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
                          gd.Dropout(0.3), gd.Conv2d(4, 4, (2, 1), stride=(1, 2), groups=2, generator=gen),
                          gd.LayerNorm((4, 4, 3)), input_shape=(1, 8, 8))
    with torch.no_grad():
        model.layers[1].running_mean.uniform_(-1, 1, generator=gen)
        model.layers[1].running_var.uniform_(0.5, 2, generator=gen)
    return model


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_a_cnn_exports_in_inference_mode_and_its_training_step_too(tmp_path, opset):
    """The forward graph (running statistics, no dropout) for every batch size; the training
    step (batch statistics, the masks, the buffers' next values, the gradients) from opset
    18, whose bitwise ops make the mask's hash; before it, that export names the opset."""
    model = _cnn()
    path = tmp_path / "cnn.onnx"
    gd.export_onnx(model, path, opset=opset)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    for n in BATCHES:
        X = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
        assert_same(run_ort(path, x=X), [model.predict(X)], rtol=1e-5, atol=1e-6)
    step = gd.grad(model.graph(gd.MSE(), training=True), list(model.parameters()))
    if opset < 18:
        with pytest.raises(gd.GraphError, match="dropout_mask .* needs the bitwise ops its hash is made of, from "
                                                "ONNX opset 18; export with opset=18 or later"):
            gd.export_onnx(step, path, opset=opset)
        return
    gd.export_onnx(step, path, opset=opset)
    X, Y = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.rand(7, 4, 4, 3)
    assert_same(run_ort(path, x=X, y=Y), gd.compile(step)(x=X, y=Y), rtol=1e-4, atol=1e-5)


def test_a_cnn_torch_exported_imports_and_computes_the_same(tmp_path):
    """What torch.onnx.export writes for these layers (its TorchScript exporter, eval mode;
    without constant folding BatchNormalization stays a node of its own) imports, and
    computes what the torch module does, for every batch size."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.AvgPool2d(2, 1, padding=1, count_include_pad=False), torch.nn.Dropout(0.2),
        torch.nn.Conv2d(4, 6, (2, 1), stride=(1, 2), groups=2, bias=False), torch.nn.Flatten(),
        torch.nn.LayerNorm(72), torch.nn.Linear(72, 3), torch.nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        for m in (net[1], net[10]):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    for fold in (True, False):
        path = tmp_path / f"torch{fold}.onnx"
        with torch.no_grad():
            with warnings.catch_warnings():  # torch says its TorchScript exporter is deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(net, (torch.rand(2, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                                  dynamic_axes={"x": {0: "N"}}, opset_version=17, do_constant_folding=fold)
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert {"Conv", "MaxPool", "AveragePool", "LayerNormalization", "Flatten"} <= set(ops)
        assert ops.count("BatchNormalization") == (1 if fold else 2)  # folding merges BatchNorm2d into its Conv
        graph = gd.import_onnx(path)
        fn = gd.compile(graph)
        for n in BATCHES:
            X = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                torch.testing.assert_close(fn(X)[0], net(X), rtol=1e-5, atol=1e-5)
