"""A tiny end-to-end demo of the functional API: build, print, differentiate, compile, train."""

import torch

import graphdl as gd

torch.manual_seed(0)
g = gd.Graph("tiny")
x = g.input("x", (None, 2))
y = g.input("y", (None, 1))
w = g.param("w", torch.randn(2, 1))
b = g.param("b", torch.zeros(1))
g.output(gd.mse(gd.tanh(gd.add(gd.matmul(x, w), b)), y))

step = gd.compile(gd.grad(g, wrt=["w", "b"]))
print(step.graph)
X = torch.rand(256, 2)
Y = torch.tanh(X @ torch.tensor([[1.5], [-2.0]]) + 0.3)
for epoch in range(200):
    loss, dw, db = step(x=X, y=Y)
    w.data.sub_(0.5 * dw)
    b.data.sub_(0.5 * db)
    if epoch % 50 == 0 or epoch == 199:
        print(f"epoch {epoch:3d}  loss {loss.item():.5f}")
