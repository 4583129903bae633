"""graphdl.layers: what the Sequential builder and its layers say when they are misused."""

from __future__ import annotations

import pytest
import torch
from messages import message, names

import graphdl as gd

HERE = r"test_layers\.py:\d+"  # "created at" must point at the test's own line


def test_layer_scope_is_named_in_builder_errors():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    with g.scope("2:Linear"):
        msg = message(gd.matmul, x, g.param("2.weight", torch.zeros(3, 4)))
    names(msg, r"created at .*\(in layer 2:Linear\)")


def test_sequential_builder_errors_name_the_layer_and_the_users_line():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 1))
    model.layers[2].weight = torch.zeros(25, 1, dtype=torch.float64)  # e.g. loaded from a float64 model
    msg = message(lambda: model.predict(torch.rand(4, 2)))
    names(msg, r"^matmul %3\(%2: f32\[N,25\], 2.weight: f64\[25,1\]\)", rf"created at .*{HERE} \(in layer 2:Linear\)",
          r"dtypes differ", "hint: make every input of the op the same dtype")


def test_a_layer_weight_of_the_wrong_shape_is_refused_where_it_is_assigned():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 1))
    with pytest.raises(gd.GraphError, match=r"Linear\(25, 1\)\.weight must have shape \[25, 1\], got \[1, 25\]; "
                                            r"did you mean to transpose it \(tensor\.T\)\?"):
        model.layers[2].weight = torch.zeros(1, 25)  # e.g. loaded from torch.nn.Linear, which stores [out, in]
    with pytest.raises(gd.GraphError, match=r"Linear\(2, 25\)\.bias must have shape \[25\], got \[2\]"):
        model.layers[0].bias = torch.zeros(2)
    assert model.layers[2].weight.shape == (25, 1)  # the layer kept what it had
