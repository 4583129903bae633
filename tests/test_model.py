"""graphdl.model: Sequential's params, graph, layer list and methods; params are live (what
a layer is given is what every entry point uses), and one tensor is one param."""

from __future__ import annotations

import inspect
import pydoc

import pytest
import torch
from helpers import _net, _tied, _torch_twin
from messages import message, names

import graphdl as gd


def test_sequential_names_params_and_chains_widths():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 25), gd.Tanh(), gd.Linear(25, 1))
    model.add(gd.Sigmoid())
    params = model.parameters()
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert params["2.weight"].shape == (25, 25) and params["4.bias"].shape == (1,)
    assert params["0.weight"] is model.layers[0].weight  # live tensors
    with pytest.raises(gd.GraphError, match=r"layer 2 \(Linear\(30, 1\)\) takes 30 features but layer 0 "):
        gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(30, 1))


def test_graph_is_tagged_by_layer():
    model = gd.Sequential(gd.Linear(2, 3), gd.ReLU(), gd.Linear(3, 1))
    g = model.graph(loss=gd.MSE())
    assert [n.scope for n in g.nodes] == ["0:Linear", "0:Linear", "1:ReLU", "2:Linear", "2:Linear", "loss"]
    assert list(g.inputs) == ["x", "y"]
    assert str(gd.parse(str(g))) == str(g)


def test_model_file_dtypes_are_checked_by_name():
    for name in ("float8_e4m3fn", "Tensor", "no_such_dtype"):
        with pytest.raises(gd.GraphError, match=rf"layer 0 \(Linear\): bad settings .*{name}"):
            gd.Sequential.from_config([{"type": "Linear", "in_features": 2, "out_features": 1, "dtype": name}])
    model = gd.Sequential.from_config([{"type": "Linear", "in_features": 2, "out_features": 1, "dtype": "bfloat16"}])
    assert model.layers[0].weight.dtype == torch.bfloat16


# -- the first hour: help() shows what fit, predict and evaluate take -------------------------------


@pytest.mark.parametrize("method, names", [
    ("fit", ["X", "Y", "loss", "optimizer", "schedule", "epochs", "batch_size", "shuffle", "validation_data", "seed",
             "verbose", "metrics", "threads", "distributed", "checkpoint", "resume", "callbacks", "validation_split",
             "clip_norm", "clip_value", "accumulate", "sample_weight", "class_weight", "monitor"]),
    ("predict", ["X", "threads", "distributed"]),
    ("evaluate", ["X", "Y", "loss", "metrics", "threads", "distributed", "sample_weight"]),
])
def test_methods_show_their_real_signatures_and_docs(method, names):
    fn = getattr(gd.Sequential, method)
    params = inspect.signature(fn).parameters
    assert list(params)[1:] == names
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values())  # no **kwargs hiding them
    doc = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    for name in names:
        assert f"{name}:" in doc or f"{name}, " in doc, name


# -- params are live: what a layer is given is what predict, fit and save use -----------------------


def test_a_layer_given_a_new_tensor_is_one_model_everywhere(tmp_path):
    gen = torch.Generator().manual_seed(7)
    X, Y = torch.rand(12, 2, generator=gen), torch.rand(12, 1, generator=gen)
    model = _net(gen)
    model.predict(X)
    model.fit(X, Y, epochs=1, batch_size=4, verbose=False)  # compiled functions now cached
    new_w, new_b = torch.randn(2, 6, generator=gen), torch.randn(6, generator=gen)
    model.layers[0].weight, model.layers[0].bias = new_w, new_b
    fresh = _net(torch.Generator().manual_seed(0))  # a model that never had the old weights
    for p, q in zip(fresh.parameters().values(), model.parameters().values()):
        p.copy_(q)
    torch.testing.assert_close(model.predict(X), fresh.predict(X), rtol=0, atol=0)
    model.fit(X, Y, epochs=2, batch_size=4, seed=0, verbose=False)
    fresh.fit(X, Y, epochs=2, batch_size=4, seed=0, verbose=False)
    assert model.layers[0].weight is new_w  # trained in place: the tensor the user assigned
    for p, q in zip(model.parameters().values(), fresh.parameters().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    model.save(tmp_path / "m.gdl")
    torch.testing.assert_close(gd.load(tmp_path / "m.gdl").predict(X), model.predict(X), rtol=0, atol=0)


def test_a_layer_given_a_tensor_of_another_dtype_rebuilds_and_names_the_layer():
    model = _net(torch.Generator().manual_seed(0))
    model.predict(torch.rand(3, 2))
    model.layers[2].weight = torch.zeros(6, 5, dtype=torch.float64)
    with pytest.raises(gd.GraphError, match=r"matmul .* dtypes differ .*\n  created at .*\(in layer 2:Linear\)"):
        model.predict(torch.rand(3, 2))


def test_changing_the_layer_list_itself_rebuilds_the_compiled_functions():
    gen = torch.Generator().manual_seed(4)
    X, Y = torch.rand(6, 2, generator=gen), torch.rand(6, 1, generator=gen)
    model = _net(gen)
    model.predict(X)
    model.fit(X, Y, epochs=1, verbose=False)
    model.layers[1] = gd.ReLU()  # same shapes, another function
    model.layers[0] = gd.Linear(2, 6, generator=gen)
    model.layers.append(gd.Sigmoid())
    twin = _torch_twin(model)
    torch.testing.assert_close(model.predict(X), twin(X).detach())
    model.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=1, batch_size=6, verbose=False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(twin(X), Y).backward()
    opt.step()
    torch.testing.assert_close(model.layers[0].weight, twin[0].weight.detach().T)


def test_a_graph_from_the_model_shares_its_params():
    model = _net(torch.Generator().manual_seed(0))
    g = model.graph()
    g.params["0.weight"].data = torch.zeros(2, 6)
    assert torch.equal(model.layers[0].weight, torch.zeros(2, 6))


def test_a_weight_changed_behind_the_layers_back_is_named():
    model = gd.Sequential(gd.Linear(2, 25), gd.ReLU(), gd.Linear(25, 1))
    model.layers[2].weight.data = torch.zeros(3, 3)  # .data = skips the layer's own shape check
    names(message(lambda: model.predict(torch.rand(4, 2))),
          r"2.weight \(Linear\(25, 1\)\.weight\) is now \[3, 3\], but the layer declares \[25, 1\]",
          r"changed behind the layer's back")


# -- one tensor is one param ------------------------------------------------------------------------


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


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_tied_weight_trains_as_torchs_shared_parameter(nesterov):
    """Weight decay and momentum once per tensor, however many layers read it (twice,
    before: 0.135 off torch after 9 steps)."""
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Linear(4, 4, generator=gen), gd.Tanh(), gd.Linear(4, 4, generator=gen), gd.Tanh(),
                          gd.Linear(4, 1, generator=gen))
    model.layers[2].weight = model.layers[0].weight
    twin = _torch_twin(model)
    twin[2].weight = twin[0].weight  # torch's tie: one Parameter in two modules
    X, Y = torch.rand(27, 4, generator=gen), torch.rand(27, 1, generator=gen)
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.1), epochs=1,
                        batch_size=3, shuffle=False, verbose=False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    losses = []
    for first in range(0, 27, 3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(twin(X[first:first + 3]), Y[first:first + 3])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(list(twin.parameters())) == len(model.parameters()) == 5
    torch.testing.assert_close(model.layers[0].weight, twin[0].weight.detach().T, rtol=1e-5, atol=1e-6)
    assert model.layers[2].weight is model.layers[0].weight
    torch.testing.assert_close(model.layers[4].weight, twin[4].weight.detach().T, rtol=1e-5, atol=1e-6)
    assert history["loss"][0] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


# -- summary ---------------------------------------------------------------------------------------


def test_summary_lists_each_layers_shape_and_params_and_counts_a_tie_once(capsys):
    model = gd.Sequential(gd.Standardize(3), gd.Linear(3, 4), gd.ReLU(), gd.Linear(4, 4), gd.Tanh(),
                          gd.Linear(4, 4), gd.Linear(4, 2))
    model.layers[5].weight = model.layers[3].weight  # tied: one tensor in two places
    text = model.summary()
    assert capsys.readouterr().out == text + "\n"
    lines = text.splitlines()
    assert lines[1].split() == ["layer", "output", "shape", "params"]
    rows = [line.split() for line in lines[2:9]]
    assert [r[2] for r in rows] == ["[N,3]", "[N,4]", "[N,4]", "[N,4]", "[N,4]", "[N,4]", "[N,2]"]
    assert [r[3] for r in rows] == ["6", "16", "0", "20", "0", "4", "10"]  # 5.weight is 3.weight's: only the bias
    assert "(5.weight is 3.weight)" in lines[7]
    unique = sum(t.numel() for t in model.state().values())
    assert unique == 6 + 16 + 20 + 4 + 10
    assert f"Total params: {unique:,}" in text and "Trainable params: 50" in text and "Non-trainable params: 6" in text
    assert model.summary(print_fn=None) == text and capsys.readouterr().out == ""
    # the shapes are the IR's: they agree with what predict returns
    assert tuple(model.predict(torch.rand(7, 3)).shape) == (7, 2)
