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
