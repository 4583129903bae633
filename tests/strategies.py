"""The random programs the property tests draw (hypothesis strategies), the graphs they
build, and the bounded settings the fuzzers run under. One place, so a new op or
pattern is added to the generators once.

- `programs` / `random_graph`: straight-line programs over [N,4], [N,1], [1,4] and [4]
  values and [4,4], [4,1] params, with broadcasting, reductions with axes, matmul chains
  and every loss; built in graphdl (`GD_LIB`) or in torch (`TORCH_LIB`) to compare.
- `pass_programs` / `build_pass_graph`: programs with the patterns the passes rewrite
  (constants, doubled negations and transposes, repeated steps, bias adds, transposed
  products).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import graphdl as gd
from graphdl.ops.registry import broadcast_shapes

# derandomize: the same examples every run, so CI cannot fail by chance; the example
# counts below are the budget.
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)


# -- random graphs for gradients against torch.autograd (test_fuzz) --------------------------
#
# A program is a list of steps over a pool of values with shapes [N,4], [N,1], [1,4], [4]
# and the params W [4,4], V [4,1]. Each step applies one op to pool values whose shapes
# fit, so every drawn program builds; unsafe ops get a safe domain (log of |a| + 0.5,
# division by |b| + 0.5) so the comparison is about the VJPs, not about overflow.

LEAVES = {"x": ("N", 4), "y": ("N", 1), "c": (1, 4), "b": (4,), "W": (4, 4), "V": (4, 1)}
UNARY = ["relu", "tanh", "sigmoid", "neg", "abs", "log", "exp"]
BINARY = ["add", "sub", "mul", "div"]


@st.composite
def programs(draw):
    shapes = [LEAVES[k] for k in ("x", "y", "c", "b")]
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "matmul", "reduce"]))
        a = draw(st.integers(0, len(shapes) - 1))
        sa = shapes[a]
        if kind == "unary":
            steps.append(("unary", draw(st.sampled_from(UNARY)), a))
            shapes.append(sa)
        elif kind == "binary":
            fits = [i for i, s in enumerate(shapes) if broadcast_shapes(sa, s) is not None]
            b = draw(st.sampled_from(fits))
            steps.append(("binary", draw(st.sampled_from(BINARY)), a, b))
            shapes.append(broadcast_shapes(sa, shapes[b]))
        elif kind == "matmul" and len(sa) == 2 and sa[1] == 4:
            w = draw(st.sampled_from(["W", "V"]))
            steps.append(("matmul", w, a))
            shapes.append((sa[0], LEAVES[w][1]))
        elif kind == "reduce" and len(sa) == 2:
            axis, keep = draw(st.sampled_from([0, 1, -1, (0, 1)])), draw(st.booleans())
            if not keep and axis != (0, 1):
                keep = draw(st.booleans())  # 1-d results are rarer: they broadcast with less
            steps.append(("reduce", draw(st.sampled_from(["sum", "mean"])), a, axis, keep))
            axes = {axis % 2} if isinstance(axis, int) else {0, 1}
            shapes.append(tuple(1 if i in axes else d for i, d in enumerate(sa)) if keep
                          else tuple(d for i, d in enumerate(sa) if i not in axes))
        else:
            steps.append(("unary", "tanh", a))
            shapes.append(sa)
    return steps, draw(st.sampled_from(["sum", "mean", "mse", "mae", "mbe"]))


def build_program(steps, loss, env, lib):
    pool = [env["x"], env["y"], env["c"], env["b"]]
    for step in steps:
        if step[0] == "unary":
            v = pool[step[2]]
            if step[1] == "log":
                pool.append(lib["log"](lib["add"](lib["abs"](v), 0.5)))
            elif step[1] == "exp":
                pool.append(lib["exp"](lib["tanh"](v)))
            else:
                pool.append(lib[step[1]](v))
        elif step[0] == "binary":
            a, b = pool[step[2]], pool[step[3]]
            if step[1] == "div":
                b = lib["add"](lib["abs"](b), 0.5)
            pool.append(lib[step[1]](a, b))
        elif step[0] == "matmul":
            pool.append(lib["matmul"](pool[step[2]], env[step[1]]))
        else:
            _, name, a, axis, keep = step
            pool.append(lib[name](pool[a], axis, keep))
    out = pool[-1]
    if loss in ("mse", "mae", "mbe"):
        return lib[loss](out, lib["mul"](out, 0.5))  # a target of the prediction's shape
    return lib[loss](out, None, False)


GD_LIB = {**{k: getattr(gd, k) for k in (*UNARY, *BINARY, "matmul")},
          "sum": lambda v, axis, keep: gd.sum(v, axis, keep), "mean": lambda v, axis, keep: gd.mean(v, axis, keep),
          "mse": gd.mse, "mae": gd.mae, "mbe": gd.mbe}
TORCH_LIB = {**{k: getattr(torch, k) for k in (*UNARY, *BINARY)}, "matmul": torch.mm,
             "sum": lambda v, axis, keep: v.sum() if axis is None else v.sum(axis, keepdim=keep),
             "mean": lambda v, axis, keep: v.mean() if axis is None else v.mean(axis, keepdim=keep),
             "mse": lambda a, b: ((a - b) ** 2).mean(), "mae": lambda a, b: (a - b).abs().mean(),
             "mbe": lambda a, b: (a - b).mean()}


def random_graph(program, seed: int, batch: int) -> tuple[gd.Graph, dict[str, torch.Tensor]]:
    """The float64 graph a drawn program builds, and its random data (the params hold theirs)."""
    steps, loss = program
    gen = torch.Generator().manual_seed(seed)
    data = {k: torch.randn([batch if d == "N" else d for d in shape], generator=gen, dtype=torch.float64)
            for k, shape in LEAVES.items()}
    g = gd.Graph("random")
    env = {k: g.input(k, [None if d == "N" else d for d in LEAVES[k]], torch.float64) for k in ("x", "y")}
    env.update({k: g.param(k, data[k]) for k in ("c", "b", "W", "V")})
    g.output(build_program(steps, loss, env, GD_LIB))
    return g, data


# -- random graphs with the patterns the passes rewrite (test_passes) ------------------------

PASS_UNARY = ["tanh", "relu", "sigmoid", "neg"]
PASS_BINARY = ["add", "sub", "mul"]
CONSTS = [0.0, 1.0, 2.0, -1.0, 0.5]


@st.composite
def pass_programs(draw):
    """A random straight-line program over [N,4] values, [4,4] weights and [4] biases,
    with the shapes the passes look for: constants, doubled negations and transposes,
    duplicated steps, const-only arithmetic, bias adds and transposed products."""
    steps = []
    n = 2
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["unary", "binary", "const", "constconst", "bias", "matmul", "matmul_t",
                                     "double", "repeat"]))
        a = draw(st.integers(0, n - 1))
        if kind == "repeat" and steps:
            steps.append(steps[draw(st.integers(0, len(steps) - 1))])
        elif kind == "unary":
            steps.append((kind, draw(st.sampled_from(PASS_UNARY)), a, None))
        elif kind == "binary":
            steps.append((kind, draw(st.sampled_from(PASS_BINARY)), a, draw(st.integers(0, n - 1))))
        elif kind in ("const", "constconst"):
            steps.append((kind, draw(st.sampled_from(PASS_BINARY)), a,
                          (draw(st.sampled_from(CONSTS)), draw(st.sampled_from(CONSTS)), draw(st.booleans()))))
        elif kind == "double":
            steps.append((kind, draw(st.sampled_from(["neg", "transpose"])), a, None))
        else:
            steps.append((kind, None, a, draw(st.integers(0, 1))))
        n += 1
    return steps, draw(st.sampled_from(["mse", "mean", "sum"]))


def build_pass_graph(steps, loss) -> gd.Graph:
    gen = torch.Generator().manual_seed(3)
    g = gd.Graph("random")
    x, y = g.input("x", (None, 4), torch.float64), g.input("y", (None, 4), torch.float64)
    ws = [g.param(f"w{i}", torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.5) for i in range(2)]
    bs = [g.param(f"b{i}", torch.randn(4, generator=gen, dtype=torch.float64)) for i in range(2)]
    fns = {"tanh": gd.tanh, "relu": gd.relu, "sigmoid": gd.sigmoid, "neg": gd.neg,
           "add": gd.add, "sub": gd.sub, "mul": gd.mul}
    values = [x, gd.tanh(gd.matmul(x, ws[0]))]
    for kind, name, a, b in steps:
        v = values[a]
        if kind == "unary":
            out = fns[name](v)
        elif kind == "binary":
            out = fns[name](v, values[b])
        elif kind == "const":
            c, _, first = b
            out = fns[name](g.const(c, torch.float64), v) if first else fns[name](v, g.const(c, torch.float64))
        elif kind == "constconst":
            c1, c2, _ = b
            out = gd.mul(v, fns[name](g.const(c1, torch.float64), g.const(c2, torch.float64)))
        elif kind == "double":
            if name == "transpose":
                out = gd.matmul(gd.transpose(gd.transpose(v)), ws[0])
            else:
                out = gd.neg(gd.neg(v))
        elif kind == "bias":
            out = gd.add(gd.matmul(v, ws[b]), bs[b])
        else:  # matmul_t: v @ w^T
            out = gd.matmul(v, gd.transpose(ws[b]))
        values.append(out)
    final = values[-1]
    g.output({"mse": lambda: gd.mse(final, y), "mean": lambda: gd.mean(gd.mul(final, y)),
              "sum": lambda: gd.sum(gd.mul(final, y))}[loss]())
    return g


def pass_feeds() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return {"x": torch.randn(5, 4, generator=gen, dtype=torch.float64),
            "y": torch.randn(5, 4, generator=gen, dtype=torch.float64)}
