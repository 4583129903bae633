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


# -- one tensor is one param -------------------------------------------------------------------


def _tied() -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Linear(4, 4, generator=gen), gd.Tanh(), gd.Linear(4, 4, generator=gen), gd.Tanh(),
                          gd.Linear(4, 1, generator=gen))
    model.layers[2].weight = model.layers[0].weight
    return model


def test_a_tied_tensor_is_listed_once_and_is_one_value_in_the_ir():
    model = _tied()
    assert list(model.parameters()) == ["0.weight", "0.bias", "2.bias", "4.weight", "4.bias"]
    assert list(model.state()) == list(model.parameters()) and model.ties() == {"2.weight": "0.weight"}
    text = str(model.graph())
    assert "2.weight" not in text and text.count("0.weight") == 3  # declared once, read by layers 0 and 2
    assert "%3: f32[N,4] = matmul %2, 0.weight  # 2:Linear" in text


def test_the_same_memory_is_one_tensor_and_a_new_tensor_unties():
    model = _tied()
    model.layers[2].weight.data = model.layers[0].weight.data  # two tensor objects, one memory: still tied
    assert model.ties() == {"2.weight": "0.weight"}
    model.layers[2].weight = model.layers[0].weight.clone()
    assert model.ties() == {} and "2.weight" in model.parameters()


def test_a_tensor_cannot_be_both_trained_and_a_fixed_buffer():
    model = gd.Sequential(gd.Standardize(4), gd.Linear(4, 4))
    model.layers[1].bias = model.layers[0].mean
    names(message(model.parameters), r"1.bias holds the tensor that 0.mean holds, but 0.mean is a fixed buffer and "
          r"1.bias a trained param; give 1.bias its own tensor")


def test_moving_a_model_moves_a_tied_tensor_once():
    model = _tied().to("cpu")
    assert model.ties() == {"2.weight": "0.weight"}
    assert model.layers[2].weight is model.layers[0].weight


def test_a_weight_changed_behind_the_layers_back_is_named():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 1))
    model.layers[2].weight.data = torch.zeros(3, 3)  # .data = skips the layer's own shape check
    names(message(lambda: model.predict(torch.rand(4, 2))),
          r"2.weight \(Linear\(25, 1\)\.weight\) is now \[3, 3\], but the layer declares \[25, 1\]",
          r"changed behind the layer's back")


# -- Standardize's statistics -----------------------------------------------------------------


def test_standardize_scales_before_squaring_so_huge_features_keep_their_std():
    """1e160 squared is inf in float64: the std was inf and the feature mapped to 0."""
    X = torch.tensor([[1e160, 1.0], [3e160, 2.0], [5e160, 3.0]], dtype=torch.float64)
    layer = gd.Standardize(dtype=torch.float64).adapt(X)
    want = torch.tensor([(8 / 3) ** 0.5 * 1e160, (2 / 3) ** 0.5],
                                                             dtype=torch.float64)
    torch.testing.assert_close(layer.std, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.mean, torch.tensor([3e160, 2.0], dtype=torch.float64), rtol=1e-12, atol=0)
    z = gd.Sequential(layer).predict(X)
    assert bool(z.isfinite().all()) and float(z[:, 0].abs().max()) > 1.0  # the feature is seen, not zeroed


def test_standardize_refuses_statistics_its_dtype_cannot_hold_naming_the_feature():
    X = torch.tensor([[1.0, 1e300], [2.0, 3e300]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"adapt: feature 1 has mean 2e\+300, which torch.float32 cannot hold "
                                         r"\(it becomes inf\); rescale that feature or use a wider dtype"):
        gd.Standardize().adapt(X)
    tiny = torch.tensor([[1.0, 0.0], [2.0, 1e-300]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"feature 1 has std 5e-301, which torch.float32 cannot hold \(it becomes 0\)"):
        gd.Standardize().adapt(tiny)


def test_standardize_takes_the_dtype_of_the_statistics_it_holds():
    layer = gd.Standardize().adapt(torch.rand(5, 2))
    layer.mean, layer.std = layer.mean.double(), layer.std.double()  # converting a model by assignment
    assert layer.dtype == torch.float64 and layer.config()["dtype"] == "float64"
    assert layer.adapt(torch.rand(5, 2)).mean.dtype == torch.float64  # adapting again keeps the model's dtype
