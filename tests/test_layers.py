"""graphdl.layers: what the Sequential builder and its layers say when they are misused;
Linear's init and size, Softmax, and Standardize (adapt, its statistics, training with it)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import _classifier, _torch_sgd_losses, _torch_twin
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


# -- Linear and Softmax -----------------------------------------------------------------------------


def test_linear_init_follows_pytorch_bounds():
    torch.manual_seed(0)
    layer = gd.Linear(16, 200)
    bound = 1 / math.sqrt(16)
    for t in (layer.weight, layer.bias):
        assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(gd.Linear(3, 4, generator=gen_a).weight, gd.Linear(3, 4, generator=gen_b).weight)


def test_a_layer_too_big_for_memory_says_so_instead_of_failing_in_the_allocator():
    with pytest.raises(ValueError, match=r"Linear\(100000, 1000000\) needs 373 GiB .* use smaller widths"):
        gd.Linear(100_000, 1_000_000)


def test_softmax_layer_outputs_probability_rows():
    gen = torch.Generator().manual_seed(1)
    logits = _classifier(gen, 4, torch.float32)
    probs = gd.Sequential(*logits.layers, gd.Softmax())
    X = torch.randn(9, 2, generator=gen)
    torch.testing.assert_close(probs.predict(X), torch.softmax(logits.predict(X), 1))
    assert str(probs.graph()).splitlines()[-3:-1] == ["  %5: f32[N,4] = softmax %4  # 3:Softmax", "  return %5"]


# -- Standardize: preprocessing inside the model ----------------------------------------------------


def test_standardize_adapts_to_the_data_in_float64():
    X = torch.tensor([[1e4 + 0.5, -2.0], [1e4 + 1.5, 0.0], [1e4 + 2.5, 5.0]], dtype=torch.float32)
    layer = gd.Standardize().adapt(X)
    assert isinstance(layer, gd.Standardize) and layer.in_features == layer.out_features == 2
    ref = X.double()
    torch.testing.assert_close(layer.mean, ref.mean(0).float(), rtol=0, atol=0)
    torch.testing.assert_close(layer.std, ref.std(0, correction=0).float(), rtol=0, atol=0)  # population std
    out = gd.Sequential(layer).predict(X)
    torch.testing.assert_close(out, ((ref - ref.mean(0)) / ref.std(0, correction=0)).float())


def test_a_constant_feature_is_centred_not_divided_by_zero():
    X = torch.tensor([[3.0, 1.0], [3.0, 2.0], [3.0, 4.0]])
    layer = gd.Standardize().adapt(X)
    assert layer.std[0] == 1.0
    out = gd.Sequential(layer).predict(torch.tensor([[3.0, 1.0], [5.0, 1.0]]))
    assert torch.isfinite(out).all() and out[:, 0].tolist() == [0.0, 2.0]
    assert gd.Standardize().adapt(torch.ones(1, 3)).std.tolist() == [1.0, 1.0, 1.0]  # one example


@pytest.mark.parametrize("X, message", [
    (torch.tensor([[1.0, float("nan")], [2.0, 3.0]]), r"X has NaN or inf values, first at X\[0, 1\] = nan"),
    (torch.tensor([[1.0, 2.0], [float("inf"), 3.0]]), r"first at X\[1, 0\] = inf"),
    (torch.ones(3), r"2-d torch.Tensor \[examples, features\].*got shape \[3\]"),
    (torch.ones(0, 2), "at least one example"),
    ([[1.0, 2.0]], "got list"),
    (torch.ones(3, 2, device="meta"), "X is on the meta device"),
    (torch.ones(3, 2, dtype=torch.complex64), "X is complex"),
    (torch.eye(2).to_sparse(), "X is a sparse_coo tensor"),
])
def test_adapt_refuses_data_it_cannot_learn_from(X, message):
    with pytest.raises(ValueError, match=message):
        gd.Standardize().adapt(X)
    layer = gd.Standardize(2)
    with pytest.raises(ValueError, match="X has 3 features but this Standardize takes 2"):
        layer.adapt(torch.ones(4, 3))


def _standardized(gen: torch.Generator, X: torch.Tensor) -> gd.Sequential:
    return gd.Sequential(gd.Standardize().adapt(X), gd.Linear(2, 5, generator=gen), gd.Tanh(),
                         gd.Linear(5, 1, generator=gen))


def test_standardize_statistics_are_not_trained():
    gen = torch.Generator().manual_seed(2)
    X = torch.rand(40, 2, generator=gen) * 10 + 5
    Y = (X[:, :1] > 10).float()
    model = _standardized(gen, X)
    stats = {k: v.clone() for k, v in model.state().items() if k.startswith("0.")}
    assert list(model.parameters()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert list(model.state()) == ["0.mean", "0.std", *model.parameters()]
    model.fit(X, Y, loss=gd.BCEWithLogits(), optimizer=gd.SGD(lr=0.5, momentum=0.9, weight_decay=0.1), epochs=3,
              batch_size=8, verbose=False)
    assert all(torch.equal(model.state()[k], v) for k, v in stats.items())
    step = model._cache[("step", gd.BCEWithLogits())].graph
    assert "0.mean" in step.params and not any("0.mean" in label for label in step.output_labels)
    text = str(model.graph())
    assert "0.mean: f32[2], 0.std: f32[2]" in text and "= sub x, 0.mean  # 0:Standardize" in text
    dot = gd.to_dot(model.graph()).source
    assert 'label="0.mean\\nf32[2]"' in dot and 'label="0.std\\nf32[2]"' in dot


def test_standardize_trains_like_torch_on_standardised_inputs():
    """The same net, once with Standardize inside and raw inputs, once without it and
    inputs standardised by hand: the same training, to float tolerance."""
    gen = torch.Generator().manual_seed(5)
    X = torch.rand(30, 2, generator=gen, dtype=torch.float64) * 100
    Y = torch.randint(0, 3, (30,), generator=gen)
    inside = gd.Sequential(gd.Standardize(dtype=torch.float64).adapt(X), *_classifier(gen, 3, torch.float64).layers)
    twin = _torch_twin(gd.Sequential(*inside.layers[1:]))
    history = inside.fit(X, Y, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.2, momentum=0.5), epochs=3,
                         batch_size=7, shuffle=False, verbose=False)
    scaled = (X - X.mean(0)) / X.std(0, correction=0)
    expected = _torch_sgd_losses(twin, torch.nn.CrossEntropyLoss(), scaled, Y, 3, 7, 0.2, 0.5)
    assert history["loss"] == pytest.approx(expected, rel=1e-12)


def test_adapting_again_after_fit_is_seen_by_the_compiled_model():
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(20, 2, generator=gen)
    model = _standardized(gen, X)
    model.fit(X, torch.rand(20, 1, generator=gen), epochs=1, verbose=False)
    before = model.predict(X)
    layer = model.layers[0]
    layer.adapt(X * 3 + 1)  # new tensors in the layer's slots, which the compiled functions read
    after = model.predict(X)
    bare = gd.Sequential(*model.layers[1:])
    torch.testing.assert_close(after, bare.predict((X - layer.mean) / layer.std))
    assert not torch.allclose(before, after)


def test_standardize_without_statistics_says_to_adapt():
    model = gd.Sequential(gd.Standardize(), gd.Linear(2, 1))
    with pytest.raises(gd.GraphError, match=r"Standardize has no statistics yet; call .adapt\(X\)"):
        model.predict(torch.rand(3, 2))
    identity = gd.Sequential(gd.Standardize(2))
    assert torch.equal(identity.predict(torch.tensor([[1.0, -2.0]])), torch.tensor([[1.0, -2.0]]))


def test_standardize_scales_a_small_feature_and_refuses_a_std_its_dtype_cannot_hold():
    gen = torch.Generator().manual_seed(0)
    X = torch.stack([torch.randn(500, generator=gen), 3e-5 + 1e-6 * torch.randn(500, generator=gen)], 1)
    out = gd.Sequential(gd.Standardize().adapt(X)).predict(X)
    torch.testing.assert_close(out.double().std(0, correction=0), torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=0)
    assert torch.equal(gd.Standardize().adapt(torch.full((4, 2), 0.1)).std, torch.ones(2))  # constant: left as is
    with pytest.raises(ValueError, match=r"feature 1 has std 1e-09, which torch.float16 cannot hold"):
        gd.Standardize(dtype=torch.float16).adapt(torch.tensor([[0.0, 1.0], [1.0, 1.0 + 2e-9]], dtype=torch.float64))


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


@pytest.mark.parametrize("std, shown", [(torch.zeros(2), "feature 0 is 0.0"),
                                        (torch.tensor([1.0, float("nan")]), "feature 1 is nan"),
                                        (torch.tensor([-2.0, 1.0]), "feature 0 is -2.0")])
def test_standardize_refuses_a_std_it_cannot_divide_by_wherever_it_comes_from(tmp_path, std, shown):
    layer = gd.Standardize(2)
    with pytest.raises(gd.GraphError, match=f"std must be finite and > 0 .*{shown}"):
        layer.std = std
    model = gd.Sequential(gd.Standardize(2), gd.Linear(2, 1))
    path = tmp_path / "m.gdl"
    model.save(path)
    import safetensors
    import safetensors.torch
    with safetensors.safe_open(str(path), "pt") as f:  # the file, with std replaced
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["0.std"] = std
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(gd.GraphError, match=f"std must be finite and > 0 .*{shown}"):
        gd.load(path)
