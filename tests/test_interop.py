"""graphdl.interop: torch nn.Sequential in (from_torch) and out (Sequential.to_torch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import graphdl as gd

ROOT = Path(__file__).resolve().parent.parent


def torch_net(dtype: torch.dtype = torch.float32, bias: bool = True) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8, bias=bias), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 1), torch.nn.Sigmoid()).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_torch_and_back_predict_the_same(dtype):
    net = torch_net(dtype)
    model = gd.from_torch(net)
    assert [type(layer).__name__ for layer in model.layers] == ["Linear", "Tanh", "Linear", "ReLU", "Linear",
                                                                 "Sigmoid"]
    back = model.to_torch()
    assert isinstance(back, torch.nn.Sequential)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    with torch.no_grad():
        for n in (1, 7, 64):
            X = torch.rand(n, 2, dtype=dtype, generator=torch.Generator().manual_seed(n))
            torch.testing.assert_close(model.predict(X), net(X), **tol)
            torch.testing.assert_close(back(X), net(X), rtol=0, atol=0)  # the very same weights and modules
    for t in model.parameters().values():
        assert t.dtype == dtype and t.is_contiguous()
    for k in (0, 2, 4):
        assert torch.equal(model.parameters()[f"{k}.weight"], net[k].weight.T)  # gd holds [in, out]
        assert torch.equal(back[k].weight, net[k].weight) and back[k].weight.dtype == dtype


def test_weights_are_copies_both_ways():
    net = torch_net()
    model = gd.from_torch(net)
    back = model.to_torch()
    w = model.parameters()["0.weight"]
    before = w.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        back[0].weight.add_(1.0)
    assert torch.equal(w, before)
    w.zero_()
    assert back[0].weight.abs().sum() > 0 and net[0].weight.abs().sum() > 0
    assert not w.requires_grad  # graphdl-owned, outside autograd
    assert all(p.requires_grad for p in back.parameters())  # trainable by torch, as any nn.Module


def test_a_linear_without_bias_gets_a_zero_bias_and_identity_is_dropped():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.Identity(),
                              torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    model = gd.from_torch(net)
    assert [type(layer).__name__ for layer in model.layers] == ["Linear", "ReLU", "Linear"]
    assert torch.equal(model.parameters()["0.bias"], torch.zeros(4))
    X = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(X), net(X))
    single = gd.from_torch(torch.nn.Linear(3, 1))  # one module alone is a one-layer model
    assert len(single.layers) == 1


def test_conversion_runs_no_torch_module():
    """graphdl reads torch modules and builds them, but never computes with them."""
    net = torch_net()
    calls = []
    for m in net.modules():
        m.register_forward_pre_hook(lambda module, args: calls.append(module))
    gd.from_torch(net).to_torch()
    assert calls == []


def test_conversion_leaves_the_global_rng_alone():
    net = torch_net()
    state = torch.get_rng_state()
    gd.from_torch(net).to_torch()
    assert torch.equal(torch.get_rng_state(), state)


def test_an_imported_model_trains_and_goes_back_with_the_trained_weights():
    net = torch_net()
    model = gd.from_torch(net)
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(200, 2, generator=gen)
    Y = 0.2 + 0.6 * X[:, :1] * X[:, 1:]
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.5, momentum=0.9), epochs=10, batch_size=20, seed=0,
                        verbose=False)
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    with torch.no_grad():
        torch.testing.assert_close(model.to_torch()(X), model.predict(X))
        assert not torch.allclose(net(X), model.predict(X))  # the torch original did not move


def test_an_unsupported_module_is_named_with_its_position():
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.PReLU()))
    with pytest.raises(gd.GraphError, match=re.escape("from_torch: module 1.1 (PReLU(num_parameters=1)) has "
                                                      "no graphdl layer; graphdl takes Linear, ReLU, Tanh, Sigmoid")):
        gd.from_torch(net)
    with pytest.raises(gd.GraphError, match="takes a torch.nn.Module"):
        gd.from_torch([torch.nn.Linear(2, 4)])


def test_mixed_dtypes_and_widths_that_do_not_chain_are_refused():
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1).double())
    with pytest.raises(gd.GraphError, match=r"module 1 \(Linear.*\) is torch.float64 but module 0 .* is "
                                            r"torch.float32"):
        gd.from_torch(mixed)
    broken = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(5, 1))
    with pytest.raises(gd.GraphError, match=r"module 1 \(Linear.*\): layer 1 .* takes 5 features"):
        gd.from_torch(broken)


def test_a_layer_without_a_torch_module_is_named_with_its_position():
    class Square(gd.Layer):
        def forward(self, build, x):
            return x * x

    model = gd.Sequential(gd.Linear(2, 3), Square())
    with pytest.raises(gd.GraphError, match=r"to_torch: layer 1 \(Square\(\)\) has no torch module"):
        model.to_torch()
    with pytest.raises(gd.GraphError, match="to_torch takes a gd.Sequential"):
        gd.to_torch(torch.nn.Linear(2, 3))


def test_softmax_maps_both_ways():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Softmax(dim=1))
    model = gd.from_torch(net)
    assert type(model.layers[1]) is gd.Softmax
    X = torch.randn(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(X), net(X))
        torch.testing.assert_close(model.to_torch()(X), net(X))
    with pytest.raises(gd.GraphError, match="normalises across the batch"):
        gd.from_torch(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Softmax(dim=0)))


def test_the_docs_round_trip_runs(tmp_path, monkeypatch):
    """docs/files.md's "PyTorch and ONNX" snippet, executed as written."""
    for module in ("onnx", "onnxruntime"):
        pytest.importorskip(module, reason="the snippet exports ONNX: the optional extra graphdl[onnx]")
    page = (ROOT / "docs" / "files.md").read_text()
    section = page.split("## PyTorch and ONNX", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert code, "docs/files.md's PyTorch and ONNX section has no python snippet"
    monkeypatch.chdir(tmp_path)
    for snippet in code:
        exec(compile(snippet, "docs/files.md", "exec"), {})
    assert (tmp_path / "m.onnx").exists()


def test_a_tie_survives_the_trip_to_torch_and_back():
    gen = torch.Generator().manual_seed(0)
    model = gd.Sequential(gd.Linear(4, 4, generator=gen), gd.Tanh(), gd.Linear(4, 4, generator=gen))
    model.layers[2].weight = model.layers[0].weight
    net = model.to_torch()
    assert net[2].weight is net[0].weight and len(list(net.parameters())) == 3  # one shared torch Parameter
    X = torch.rand(5, 4)
    torch.testing.assert_close(net(X).detach(), model.predict(X))
    back = gd.from_torch(net)
    assert back.ties() == {"2.weight": "0.weight"} and back.layers[2].weight is back.layers[0].weight
    torch.testing.assert_close(back.predict(X), model.predict(X))


def test_a_module_used_twice_in_torch_is_one_tensor_in_graphdl():
    shared = torch.nn.Linear(3, 3)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)  # named_children() lists it once: the third was lost
    back = gd.from_torch(net)
    assert len(back.layers) == 3 and back.ties() == {"2.weight": "0.weight", "2.bias": "0.bias"}
    assert len(back.parameters()) == 2
    X = torch.rand(4, 3)
    torch.testing.assert_close(back.predict(X), net(X).detach())


# -- beyond two dims: Embedding, Flatten, Unflatten and the new activations ---------------------------


def _sequence_torch(dtype: torch.dtype) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Flatten(), torch.nn.GELU(), torch.nn.Linear(12, 6),
                               torch.nn.LeakyReLU(0.2), torch.nn.Linear(6, 8), torch.nn.SiLU(),
                               torch.nn.Unflatten(1, (2, 4)), torch.nn.GELU(approximate="tanh"),
                               torch.nn.Flatten(), torch.nn.Linear(8, 2)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layers_beyond_2d_go_both_ways_keeping_the_numbers(dtype):
    net = _sequence_torch(dtype)
    model = gd.from_torch(net, input_shape=(3,))
    assert [type(layer).__name__ for layer in model.layers] == [
        "Embedding", "Flatten", "GELU", "Linear", "LeakyReLU", "Linear", "SiLU", "Reshape", "GELU", "Flatten", "Linear"]
    assert model.layers[4].negative_slope == 0.2 and model.layers[8].approximate == "tanh"
    assert torch.equal(model.parameters()["0.weight"], net[0].weight)  # the same layout: [num, dim]
    assert model.parameters()["0.weight"].data_ptr() != net[0].weight.data_ptr()  # a copy
    back = model.to_torch()
    assert [type(m).__name__ for m in back] == [type(m).__name__ for m in net]
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    with torch.no_grad():
        for n in (1, 7, 64):
            X = torch.randint(0, 11, (n, 3), generator=torch.Generator().manual_seed(n))
            torch.testing.assert_close(model.predict(X), net(X), **tol)
            torch.testing.assert_close(back(X), net(X), rtol=0, atol=0)
    assert torch.equal(back[0].weight, net[0].weight) and back[0].weight.requires_grad


def test_a_reshape_of_examples_beyond_rows_goes_to_torch_flattened_first():
    model = gd.Sequential(gd.Reshape((4, -1)), gd.Tanh(), input_shape=(2, 2, 2))
    back = model.to_torch()
    assert [type(m).__name__ for m in back[0]] == ["Flatten", "Unflatten"] and back[0][1].unflattened_size == (4, 2)
    X = torch.rand(3, 2, 2, 2)
    torch.testing.assert_close(back(X), model.predict(X))
    again = gd.from_torch(back, input_shape=(2, 2, 2))
    torch.testing.assert_close(again.predict(X), model.predict(X))


@pytest.mark.parametrize("module, message", [
    (torch.nn.Embedding(5, 2, padding_idx=0), r"module 0 \(Embedding\(5, 2, padding_idx=0\)\): padding_idx=0 "
                                              r"changes how torch's Embedding computes or trains"),
    (torch.nn.Embedding(5, 2, max_norm=1.0), r"max_norm=1.0 changes how"),
    (torch.nn.Flatten(0), r"module 0 \(Flatten\(start_dim=0, end_dim=-1\)\): start_dim=0 would merge the batch dim"),
    (torch.nn.Unflatten(2, (2, 2)), r"Unflatten\(dim=2\) is not supported; graphdl's Reshape unflattens rows"),
])
def test_torch_settings_graphdl_cannot_follow_are_refused_naming_the_module(module, message):
    with pytest.raises(gd.GraphError, match=message):
        gd.from_torch(torch.nn.Sequential(module), input_shape=(4,))


def test_an_embedding_of_sequences_needs_the_input_shape_from_torch():
    net = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Flatten(), torch.nn.Linear(6, 1))
    with pytest.raises(gd.GraphError, match=r"(?s)module 2 \(Linear.*takes 6 features but layer 0 "
                                            r"\(Embedding\(5, 2\)\) gives 2.*give it as input_shape= \(to "
                                            r"gd.Sequential or gd.from_torch\)"):
        gd.from_torch(net)
    assert gd.from_torch(net, input_shape=(3,)).output_shape == (1,)


def test_a_softmax_over_a_dim_of_examples_beyond_rows_keeps_torchs_dim():
    """torch's Softmax(dim=1) of [N, L, C] normalises L: graphdl's keeps that dim, not the last."""
    net = torch.nn.Sequential(torch.nn.Unflatten(1, (3, 4)), torch.nn.Softmax(dim=1))
    model = gd.from_torch(net, input_shape=(12,))
    assert repr(model.layers[1]) == "Softmax(dim=1)" and model.layers[1].config() == {"type": "Softmax", "dim": 1}
    X = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(X), net(X))
        torch.testing.assert_close(model.to_torch()(X), net(X))
    with pytest.raises(gd.GraphError, match=r"layer 1 \(Softmax\(dim=3\)\) cannot take .*: dim=3 is not a dim of "
                                            r"the examples' shape \[3,4\]"):
        gd.Sequential(gd.Reshape((3, 4)), gd.Softmax(dim=3))
    with pytest.raises(ValueError, match="dim=0 would normalise across the batch"):
        gd.Softmax(0)


# -- nets beyond two dims ---------------------------------------------------------------------


def torch_cnn(dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """A torch CNN whose BatchNorms hold running statistics of their own (not 0 and 1)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (2, 6, 6)),
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Dropout(0.5),
        torch.nn.Conv2d(4, 6, (2, 1), stride=(1, 2), groups=2, bias=False), torch.nn.AvgPool2d(2, 1, padding=1),
        torch.nn.Flatten(), torch.nn.Unflatten(1, (6, 9)),
        torch.nn.Conv1d(6, 3, 3, padding="same", dilation=2), torch.nn.BatchNorm1d(3), torch.nn.LayerNorm(9),
        torch.nn.Flatten(), torch.nn.Linear(27, 5)).to(dtype)
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_cnn_from_torch_and_back_computes_the_same_in_both_modes(dtype):
    """predict is torch's eval mode (running statistics, no dropout); the training graph is
    its train mode (the batch's statistics, and the running ones' next values: torch's after
    that forward). Back in torch, every weight and running statistic is the same."""
    net, original = torch_cnn(dtype), torch_cnn(dtype)
    model = gd.from_torch(net)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Reshape", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout", "Conv2d", "AvgPool2d", "Flatten", "Reshape",
        "Conv1d", "BatchNorm1d", "LayerNorm", "Flatten", "Linear"]
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    X = torch.randn(9, 72, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.predict(X), net.eval()(X), **tol)
        model.layers[5].p = 0.0  # the masks differ from torch's: compare the training mode without them
        net[5].p = 0.0
        out, *stats = gd.compile(model.graph(training=True))(x=X)
        torch.testing.assert_close(out, net.train()(X), **tol)
    torch.testing.assert_close(stats, [net[2].running_mean, net[2].running_var, net[11].running_mean,
                                       net[11].running_var], **tol)
    back = model.to_torch()
    for mine, theirs in zip([m for m in back.modules() if list(m.parameters(recurse=False)) or list(m.buffers(False))],
                            [m for m in original if list(m.parameters()) or list(m.buffers())], strict=True):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items(), strict=True):
            if name != "num_batches_tracked":  # graphdl does not count batches; with a momentum torch does not read it
                assert torch.equal(a, b) and a.dtype == dtype, name
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(X), original.eval()(X), rtol=0, atol=0)


@pytest.mark.parametrize("module, message", [
    (torch.nn.Conv2d(1, 2, 3, padding_mode="reflect"), "padding_mode='reflect'"),
    (torch.nn.Conv2d(1, 2, 2, padding="same"), "padding='same' with an even kernel"),
    (torch.nn.MaxPool2d(2, ceil_mode=True), "ceil_mode=True"),
    (torch.nn.AvgPool2d(2, divisor_override=3), "divisor_override"),
    (torch.nn.BatchNorm2d(3, affine=False), "affine=False"),
    (torch.nn.BatchNorm1d(3, momentum=None), "momentum=None"),
    (torch.nn.LayerNorm(3, elementwise_affine=False), "no elementwise affine weight"),
])
def test_torch_options_graphdl_lacks_are_named(module, message):
    with pytest.raises(gd.GraphError, match=re.escape(message)):
        gd.from_torch(torch.nn.Sequential(module))


def test_two_torch_dropouts_become_two_streams_of_masks():
    model = gd.from_torch(torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Dropout(0.5)), input_shape=(4,))
    again = gd.from_torch(torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Dropout(0.5)), input_shape=(4,))
    assert model.layers[0].seed != model.layers[1].seed
    assert [layer.seed for layer in model.layers] == [layer.seed for layer in again.layers]
