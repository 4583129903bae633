"""graphdl.layers: what the Sequential builder and its layers say when they are misused;
Linear's init and size, Softmax, and Standardize (adapt, its statistics, training with it)."""

from __future__ import annotations

import math
import re

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


# -- layers beyond two dims: Flatten, Reshape, Embedding, and shapes tracked through a model -----------


def test_reshape_and_flatten_track_each_examples_shape_through_the_model():
    model = gd.Sequential(gd.Reshape((1, 8, 8)), gd.Flatten(start_dim=2), gd.Flatten(), gd.Linear(64, 3))
    assert model.input_shape == (64,) and model.output_shape == (3,)  # a Reshape first takes flat rows
    text = str(model.graph())
    assert "%0: f32[N,1,8,8] = reshape[shape=('N', 1, 8, 8)] x  # 0:Reshape" in text
    assert "%1: f32[N,1,64] = flatten[start_dim=2] %0  # 1:Flatten" in text and "%2: f32[N,64] = flatten %1" in text
    X = torch.rand(5, 64)
    torch.testing.assert_close(model.predict(X), X @ model.layers[3].weight + model.layers[3].bias)
    images = gd.Sequential(gd.Flatten(), gd.Linear(12, 2), input_shape=(3, 2, 2))
    assert images.graph().inputs["x"].shape == ("N", 3, 2, 2) and images.output_shape == (2,)
    assert gd.Sequential(gd.Reshape((4, -1)), input_shape=(8,)).output_shape == (4, 2)


def test_a_linear_layer_maps_the_last_dim_of_any_rank():
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Linear(3, 2, generator=gen), gd.Tanh(), input_shape=(4, 3))
    assert model.output_shape == (4, 2)
    X = torch.rand(5, 4, 3, generator=gen)
    layer = model.layers[0]
    torch.testing.assert_close(model.predict(X), torch.tanh(X @ layer.weight + layer.bias))


@pytest.mark.parametrize("layers, input_shape, message", [
    ([gd.Flatten(), gd.Linear(3, 2)], None,
     r"the shape of the model's input is unknown: layer 0 \(Flatten\(\)\) comes first and takes examples of any "
     r"shape; give the shape of one example \(the batch dim left out\), e.g. gd.Sequential\(..., input_shape="),
    ([gd.Reshape((2, 8)), gd.Linear(4, 2)], None,
     r"layer 1 \(Linear\(4, 2\)\) takes 4 features but layer 0 \(Reshape\(\(2, 8\)\)\) gives 8; make layer 1 "
     r"Linear\(8, \.\.\.\) or change layer 0"),
    ([gd.Linear(3, 6), gd.Reshape((4, -1))], None,
     r"(?s)layer 1 \(Reshape\(\(4, -1\)\)\) cannot take what layer 0 \(Linear\(3, 6\)\) gives: examples of shape "
     r"\[6\]: reshape %0\(x: f32\[N,6\]\): cannot reshape \[N,6\] to shape \(None, 4, -1\): 6 is not a multiple"),
    ([gd.Embedding(10, 4), gd.Flatten(), gd.Linear(12, 2)], None,
     r"(?s)layer 2 \(Linear\(12, 2\)\) takes 12 features but layer 0 \(Embedding\(10, 4\)\) gives 4.*hint: the model "
     r"takes examples of shape \[\], as its layers declare; if they have another shape, give it as input_shape="),
    ([gd.Linear(3, 2)], (4,), r"layer 0 \(Linear\(3, 2\)\) takes 3 features but the model's input is 4; make layer 0 "
                              r"Linear\(4, \.\.\.\) or change input_shape"),
    ([gd.Flatten(end_dim=2), gd.Linear(6, 2)], (2, 3, 4),
     r"layer 1 \(Linear\(6, 2\)\) takes 6 features but layer 0 \(Flatten\(start_dim=1, end_dim=2\)\) gives 4"),
])
def test_a_model_names_the_layer_whose_shape_does_not_chain(layers, input_shape, message):
    with pytest.raises(gd.GraphError, match=message):
        gd.Sequential(*layers, input_shape=input_shape).graph()


@pytest.mark.parametrize("make, message", [
    (lambda: gd.Reshape(64), r"shape must be a tuple of whole numbers \(the batch dim left out\), such as \(1, 8, 8\)"),
    (lambda: gd.Reshape((-1, -1)), "has more than one -1"),
    (lambda: gd.Reshape((0, 2)), "shape must be a whole number >= 1"),
    (lambda: gd.Reshape((2.0, 2)), "shape must be a whole number"),
    (lambda: gd.Flatten(start_dim=0), "start_dim=0 would merge the batch dim into the examples"),
    (lambda: gd.Flatten(end_dim=1.5), "end_dim must be a whole number"),
    (lambda: gd.Embedding(0, 3), "num_embeddings must be a whole number >= 1"),
    (lambda: gd.Embedding(3, 2, dtype=torch.int64), "Embedding: dtype torch.int64 is not supported"),
    (lambda: gd.GELU("erf"), "approximate must be 'none' or 'tanh', got 'erf'"),
    (lambda: gd.LeakyReLU(float("nan")), "negative_slope must be a finite number"),
    (lambda: gd.LeakyReLU("0.1"), "negative_slope must be a finite number, got '0.1'"),
    (lambda: gd.Sequential(gd.Linear(2, 1), input_shape=3), r"input_shape must be the shape of one example"),
    (lambda: gd.Sequential(gd.Linear(2, 1), input_shape=(0,)), r"input_shape\[0\] must be a whole number >= 1"),
])
def test_layer_settings_are_checked_where_they_are_given(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_embedding_holds_pytorchs_layout_and_init():
    torch.manual_seed(0)
    layer = gd.Embedding(400, 50)
    assert layer.weight.shape == (400, 50) and layer.weight.dtype == torch.float32
    assert abs(layer.weight.mean().item()) < 0.02 and abs(layer.weight.std().item() - 1.0) < 0.02  # N(0, 1)
    a, b = (gd.Embedding(5, 3, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight, torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(gd.GraphError, match=r"Embedding\(5, 3\)\.weight must have shape \[5, 3\], got \[3, 5\]"):
        a.weight = torch.zeros(3, 5)


@pytest.mark.parametrize("input_shape, X", [(None, torch.tensor([3, 0, 3])), ((2,), torch.tensor([[1, 4], [0, 0]])),
                                            ((2, 2), torch.tensor([[[1, 4], [2, 2]]]))])
def test_embedding_picks_rows_for_indices_of_any_rank(input_shape, X):
    model = gd.Sequential(gd.Embedding(5, 3, dtype=torch.float64), input_shape=input_shape)
    assert model.graph().inputs["x"].dtype == torch.int64
    assert model.output_shape == (*X.shape[1:], 3)
    torch.testing.assert_close(model.predict(X), model.layers[0].weight[X])


def test_an_index_out_of_range_is_refused_naming_the_layer():
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Embedding(10, 4, generator=gen), gd.Flatten(), gd.Linear(8, 1, generator=gen),
                          input_shape=(2,))
    X, Y = torch.tensor([[1, 2], [3, 10]]), torch.rand(2, 1)
    for call in (lambda: model.predict(X), lambda: model.evaluate(X, Y), lambda: model.fit(X, Y, verbose=False),
                 lambda: model.fit(Y.new_zeros(2, 2).long(), Y, validation_data=(X, Y), verbose=False)):
        msg = message(call)
        names(msg, r"X(_val)?\[1, 1\] is 10, not an index of layer 0 \(Embedding\(10, 4\)\): indices run from 0 to 9")
    names(message(model.predict, torch.tensor([[-1, 0]])), r"X\[0, 0\] is -1, not an index of layer 0")
    # Compiled directly, the kernel's own check is named with the node and its layer
    names(message(gd.compile(model.graph()), x=X), r"running `%0: f32\[N,2,4\] = index_select 0.weight, x  "
          r"# 0:Embedding` failed: IndexError", r"\(in layer 0:Embedding\)")


def test_indices_of_the_wrong_dtype_are_named_with_the_fix():
    model = gd.Sequential(gd.Embedding(10, 4), input_shape=(2,))
    names(message(model.predict, torch.zeros(3, 2)), r"input x is f32\[3,2\] but the graph declares i64\[N,2\]; "
          r"convert it with .to\(torch.int64\)")
    names(message(lambda: gd.Sequential(gd.Linear(3, 6), gd.Embedding(3, 2)).graph()),
          r"index_select %2\(1.weight: f32\[3,2\], %1: f32\[N,6\]\): input 1, %1, holds indices, so it must be i64",
          r"\(in layer 1:Embedding\)")


@pytest.mark.parametrize("layer, ref", [
    (gd.GELU(), torch.nn.GELU()), (gd.GELU(approximate="tanh"), torch.nn.GELU(approximate="tanh")),
    (gd.LeakyReLU(), torch.nn.LeakyReLU()), (gd.LeakyReLU(0.2), torch.nn.LeakyReLU(0.2)), (gd.SiLU(), torch.nn.SiLU()),
])
def test_activation_layers_compute_what_torch_does_at_any_rank(layer, ref):
    X = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    model = gd.Sequential(layer, input_shape=(3, 2, 2))
    torch.testing.assert_close(model.predict(X), ref(X))
    assert model.output_shape == (3, 2, 2)


def test_a_models_tracked_shapes_are_those_its_graph_builds():
    """output_shape, which Sequential.add checks with, against the shape rules of the graph itself."""
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Embedding(7, 4, generator=gen), gd.Reshape((2, -1)), gd.GELU(), gd.Flatten(),
                          gd.LeakyReLU(0.3), gd.Linear(12, 5, generator=gen), gd.SiLU(), gd.Reshape((5, 1)),
                          input_shape=(3,))
    g = model.graph()
    assert model.output_shape == g.outputs[0].shape[1:] == (5, 1)
    for k in range(1, len(model.layers) + 1):
        prefix = gd.Sequential(*model.layers[:k], input_shape=(3,))
        assert prefix.output_shape == prefix.graph().outputs[0].shape[1:]


# -- convolution, pooling, normalisation, dropout -----------------------------------------


def _cnn(p: float = 0.25, seed: int = 7) -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    return gd.Sequential(gd.Reshape((1, 8, 8)), gd.Conv2d(1, 16, 3, padding=1, generator=gen), gd.BatchNorm2d(16),
                         gd.ReLU(), gd.MaxPool2d(2), gd.Dropout(p, seed=seed), gd.Flatten(),
                         gd.Linear(16 * 4 * 4, 10, generator=gen))


def test_conv_layers_hold_pytorchs_layout_and_init():
    """Conv2d at position k owns "{k}.weight" [out, in/groups, kh, kw] and "{k}.bias" [out],
    uniform in +-1/sqrt(fan_in) as torch's kaiming_uniform_(a=sqrt(5)) draws them: the
    same spread as torch's own Conv2d."""
    model = gd.Sequential(gd.Reshape((4, 9, 9)), gd.Conv2d(4, 64, (3, 2), groups=2), gd.Conv2d(64, 8, 1, bias=False))
    params = model.parameters()
    assert {name: tuple(t.shape) for name, t in params.items()} == {
        "1.weight": (64, 2, 3, 2), "1.bias": (64,), "2.weight": (8, 64, 1, 1)}
    bound = 1 / math.sqrt(2 * 3 * 2)
    torch_conv = torch.nn.Conv2d(4, 64, (3, 2), groups=2)
    for mine, theirs in ((params["1.weight"], torch_conv.weight), (params["1.bias"], torch_conv.bias)):
        assert mine.abs().max() <= bound and mine.abs().max() > 0.9 * bound
        assert mine.std().item() == pytest.approx(theirs.detach().std().item(), rel=0.25)
    assert gd.Conv1d(3, 5, 4).weight.shape == (5, 3, 4) and gd.Conv1d(3, 5, 4).bias.shape == (5,)
    assert model.output_shape == (8, 7, 8)


def test_batchnorm_running_statistics_are_state_not_parameters():
    model = gd.Sequential(gd.Reshape((3, 2, 2)), gd.BatchNorm2d(3), gd.Flatten(), gd.LayerNorm(12), gd.Dropout(0.1))
    assert list(model.parameters()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert list(model.state()) == ["1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias",
                                   "4.key"]
    assert model.state()["4.key"].dtype == torch.float64 and model.graph().inputs["x"].dtype == torch.float32


def test_the_mode_is_in_the_graph_and_its_text():
    """The training graph normalises with the batch's statistics, drops, and returns the
    buffers' next values; the inference graph reads the running statistics and does not
    drop. Both print and parse back, and the Dropout's key is declared in both (it is
    model state, which model files hold)."""
    model = _cnn()
    train, infer = model.graph(gd.CrossEntropy(), training=True), model.graph()
    train_text, infer_text = str(train), str(infer)
    assert "dropout_mask[p=0.25, seed=7] 5.key" in train_text and "dropout_mask" not in infer_text
    assert "batch_norm %1, 2.running_mean, 2.running_var, 2.weight, 2.bias" in infer_text
    assert re.search(r"= var\[axis=\(0, 2, 3\)\] %1\b", train_text)  # the batch's variance, then the unbiased one
    assert "correct_var[axis=(0, 2, 3)] %3, %1" in train_text
    assert train.output_labels == ("", "next/2.running_mean", "next/2.running_var", "next/5.key")
    assert "5.key: f64[]" in infer_text and infer.outputs and len(infer.outputs) == 1
    for text in (train_text, infer_text):
        assert str(gd.parse(text)) == text


def test_dropout_drops_p_in_training_and_is_the_identity_in_predict():
    model = gd.Sequential(gd.Dropout(0.3, seed=1), input_shape=(50, 40))
    X = torch.rand(20, 50, 40) + 1
    (dropped, next_key) = gd.compile(model.graph(training=True))(x=X)
    kept = (dropped != 0).double().mean().item()
    assert abs(kept - 0.7) < 5 * (0.21 / X.numel()) ** 0.5
    torch.testing.assert_close(dropped[dropped != 0], (X / 0.7)[dropped != 0])
    assert float(next_key) == 1.0
    assert torch.equal(model.predict(X), X)


def test_dropout_is_reproduced_by_its_seed_and_the_model():
    gen = torch.Generator().manual_seed(3)
    X, labels = torch.rand(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    runs = []
    for seed in (7, 7, 8):
        model = _cnn(0.5, seed)
        model.fit(X, labels, loss=gd.CrossEntropy(), epochs=2, batch_size=16, seed=0, verbose=False)
        runs.append(model.state())
    assert all(torch.equal(a, b) for a, b in zip(runs[0].values(), runs[1].values(), strict=True))
    assert not torch.equal(runs[0]["7.weight"], runs[2]["7.weight"])
    torch.manual_seed(11)
    a = gd.Dropout()
    torch.manual_seed(11)
    assert gd.Dropout().seed == a.seed != gd.Dropout().seed  # drawn from torch's RNG, as weights are


def test_a_cnn_saves_and_loads_with_its_state(tmp_path):
    model = gd.Sequential(gd.Reshape((2, 6)), gd.Conv1d(2, 4, 3, padding=(1,), dilation=1, bias=False),
                          gd.BatchNorm1d(4), gd.LayerNorm((4, 6)), gd.Dropout(0.2), gd.Reshape((4, 2, 3)),
                          gd.Conv2d(4, 2, (1, 2), stride=(1, 1)), gd.AvgPool2d((2, 1), padding=(1, 0)),
                          gd.MaxPool2d(1, stride=2), gd.Flatten())
    with torch.no_grad():
        for t in model.state().values():
            t.copy_(torch.randn_like(t).abs() + 0.5 if t.dim() else torch.tensor(5.0, dtype=t.dtype))
    path = tmp_path / "cnn.gdl"
    model.save(path)
    again = gd.load(path)
    assert again.config() == model.config() and str(again.graph()) == str(model.graph())
    assert all(torch.equal(a, b) for a, b in zip(again.state().values(), model.state().values(), strict=True))
    X = torch.randn(5, 12)
    assert torch.equal(again.predict(X), model.predict(X))
    assert str(again.graph(gd.MSE(), training=True)) == str(model.graph(gd.MSE(), training=True))


@pytest.mark.parametrize("make, message", [
    (lambda: gd.Conv2d(0, 4, 3), "in_channels must be a whole number >= 1, got 0"),
    (lambda: gd.Conv2d(3, 4, 3, stride=0), "stride must be a whole number >= 1, got 0"),
    (lambda: gd.Conv2d(3, 4, (3, 3, 3)), r"kernel_size must be an int or 2 ints \(one per spatial dim\)"),
    (lambda: gd.Conv2d(3, 4, 3, groups=2), "groups=2 must divide both in_channels=3 and out_channels=4"),
    (lambda: gd.Conv1d(3, 4, 3, padding=-1), "padding must be a whole number >= 0, got -1"),
    (lambda: gd.Conv2d(3, 4, 3, bias=1), "bias must be True or False, got 1"),
    (lambda: gd.MaxPool2d(2, padding=2), "padding=2 must be at most half of kernel_size=2"),
    (lambda: gd.AvgPool2d(0), "kernel_size must be a whole number >= 1, got 0"),
    (lambda: gd.BatchNorm2d(4, momentum=1.5), r"momentum must be in \[0.0, 1.0\], got 1.5"),
    (lambda: gd.BatchNorm1d(4, eps=0), "eps must be > 0"),
    (lambda: gd.LayerNorm(()), "normalized_shape must name at least one dim"),
    (lambda: gd.Dropout(1.5), r"p must be in \[0.0, 1.0\], got 1.5"),
    (lambda: gd.Dropout(seed=-1), "seed must be a whole number"),
])
def test_conv_layer_settings_are_checked_where_they_are_given(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layers, shape, parts", [
    ([gd.Reshape((1, 8, 8)), gd.Conv2d(2, 4, 3)],
     None, [r"layer 1 \(Conv2d\(2, 4, kernel_size=3\)\) cannot take what layer 0 \(Reshape\(\(1, 8, 8\)\)\) gives",
            r"x has 1 channel but the weight \[4,2,3,3\] takes 2",
            "hint: make the layer's in_channels 1, or make the layer before it give 2 channels"]),
    ([gd.Reshape((1, 2, 2)), gd.Conv2d(1, 4, 3)],
     None, [r"the kernel \[3,3\] spans 3 along H \(dim 2\) but the input is only 2 there, 2 padded",
            "hint: use a smaller kernel, padding of at least 1 along H, or a larger input"]),
    ([gd.Linear(4, 8), gd.Conv2d(8, 4, 3)],
     None, [r"x \[N,8\] must be 4-d, \[N, C, H, W\]", r"gd.Reshape\(\(C, H, W\)\)"]),
    ([gd.Reshape((4, 8, 8)), gd.BatchNorm2d(3)],
     None, [r"it normalises 3 channels \(dim 1\) but the values have 4", r"hint: make it BatchNorm2d\(4\)"]),
    ([gd.Linear(4, 8), gd.BatchNorm2d(8)],
     None, [r"BatchNorm2d takes \[N, C, H, W\] values, not examples of shape \[8\]",
            r"hint: use BatchNorm1d for \[N, C\] or \[N, C, L\]"]),
    ([gd.Reshape((4, 2, 2)), gd.MaxPool2d(3)],
     None, [r"the pooling window 3 spans 3 along H \(dim 2\) but the input is only 2 there"]),
    ([gd.LayerNorm(5)], (4, 6), [r"it normalises examples ending in \[5\]", "hint: make normalized_shape the last"]),
])
def test_a_conv_model_names_the_layer_the_shapes_and_the_fix(layers, shape, parts):
    names(message(lambda: gd.Sequential(*layers, input_shape=shape)), *parts)
