"""The contract of docs/contract.md end to end (build, print, parse, grad, compile, run), and
the rules every module keeps."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import graphdl as gd

TINY = """\
graph tiny(x: f32[N,2], y: f32[N,1]; w: f32[2,1], b: f32[1]) {
  %0: f32[N,1] = matmul x, w
  %1: f32[N,1] = add %0, b
  %2: f32[N,1] = tanh %1
  %3: f32[] = mse %2, y
  return %3
}"""


def tiny() -> gd.Graph:
    g = gd.Graph("tiny")
    x = g.input("x", (None, 2))
    y = g.input("y", (None, 1))
    w = g.param("w", torch.randn(2, 1))
    b = g.param("b", torch.zeros(1))
    out = gd.tanh(gd.add(gd.matmul(x, w), b))
    g.output(gd.mse(out, y))
    return g


def test_contract_snippet_runs_as_written():
    g = tiny()
    text = str(g)
    assert text == TINY
    assert str(gd.parse(text)) == text
    X, Y = torch.rand(8, 2), torch.rand(8, 1)
    (loss,) = gd.compile(g)(x=X, y=Y)
    gg = gd.grad(g, wrt=["w", "b"])
    loss2, dw, db = gd.compile(gg)(x=X, y=Y)
    w, b = (g.params[n].data.clone().requires_grad_() for n in ("w", "b"))
    ref = ((torch.tanh(X @ w + b) - Y) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(loss2, ref.detach())
    torch.testing.assert_close(dw, w.grad)
    torch.testing.assert_close(db, b.grad)


def test_graphdl_never_uses_torch_autograd_or_nn():
    root = pathlib.Path(gd.__file__).parent
    autograd = re.compile(r"torch\.autograd|from torch import autograd|requires_grad")
    nn = re.compile(r"torch\.nn\b|from torch import nn")
    # interop.py converts nn.Sequential to and from graphdl: it names torch.nn modules to read and
    # build them, and runs none (test_interop checks that no forward hook fires).
    offenders = [f"{p}:{i}" for p in root.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if autograd.search(line) or (nn.search(line) and p.name != "interop.py")]
    assert offenders == []


@pytest.mark.slow
def test_import_graphdl_loads_no_graph_library():
    """networkx was most of `import graphdl`'s own time (0.13 s of 0.16 s, then the first
    compile's 0.3 s); graphdl's graph walks are its own now, and importing it must not
    bring networkx back."""
    import subprocess
    import sys
    code = f"import sys, graphdl; graphdl.compile(graphdl.parse({TINY!r})); print('networkx' in sys.modules)"
    env = {**__import__("os").environ, "PYTHONPATH": str(pathlib.Path(gd.__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_diagnostics_name_the_node_and_change_nothing_fit_runs():
    """contract.md's diagnostics: a divergence names the IR node, op and layer of the first
    non-finite value; profiling neither trains nor changes the step's code; monitored
    series land in History; the IR goes to networkx."""
    import networkx

    class Log(gd.Layer):
        def forward(self, build, x):
            return gd.log(x)

    torch.manual_seed(0)
    X, Y = torch.rand(16, 2) - 0.5, torch.rand(16, 1)
    model = gd.Sequential(gd.Linear(2, 3), Log(), gd.Linear(3, 1))
    with pytest.raises(gd.DivergedError) as err:
        model.fit(X, Y, verbose=False)
    step = gd.TrainStep(model, gd.MSE(), gd.SGD())
    (k,) = [k for k, n in enumerate(step.compiled.graph.nodes) if n.op is gd.log]
    assert (err.value.node, err.value.op, err.value.layer, err.value.epoch, err.value.batch) == (f"%{k}", "log",
                                                                                                 "1:Log", 1, 1)
    net = gd.Sequential(gd.Linear(2, 4), gd.ReLU(), gd.Linear(4, 1))
    source = gd.TrainStep(net, gd.MSE(), gd.SGD()).arena_fn.source
    before = {name: t.clone() for name, t in net.state().items()}
    report = gd.profile(net, X, Y, steps=3)
    assert gd.TrainStep(net, gd.MSE(), gd.SGD()).arena_fn.source == source
    assert all(torch.equal(before[name], t) for name, t in net.state().items())
    assert abs(sum(g.seconds for g in report.by_layer()) - report.seconds) < 1e-12
    history = net.fit(X, Y, epochs=2, verbose=False, monitor=["grad_norm", "dead_relu"])
    assert len(history["grad_norm/2:Linear"]) == len(history["dead_relu/1:ReLU"]) == 2
    assert isinstance(net.graph().to_networkx(), networkx.DiGraph)
