"""graphdl.functional: layers called on graph values and `gd.Model`, trained against
torch.nn twins (same weights, same batches, the same Dropout masks, torch.optim.SGD and
autograd as the oracle) in training and inference mode, with fit's callbacks,
checkpoints, sample weights and model files, and the errors of what it refuses."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from helpers import _torch_sgd_losses, _TwinDropout
from messages import message, names

import graphdl as gd


def _linear(gen: torch.Generator, i: int, o: int, dtype: torch.dtype) -> gd.Linear:
    return gd.Linear(i, o, generator=gen, dtype=dtype)


def _twin_linear(layer: gd.Linear) -> torch.nn.Linear:
    """torch's Linear with the layer's weights (torch stores weight as [out, in])."""
    lin = torch.nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(layer.weight.T)
        lin.bias.copy_(layer.bias)
    return lin


def _residual(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[gd.Model, list[gd.Linear]]:
    gen = torch.Generator().manual_seed(seed)
    layers = [_linear(gen, 4, 16, dtype), _linear(gen, 16, 16, dtype), _linear(gen, 16, 1, dtype)]
    g = gd.Graph("residual")
    x = g.input("x", (None, 4), dtype)
    h = layers[0](x)
    h = h + gd.tanh(layers[1](h))  # a skip connection, with the functional ops
    return gd.Model(x, layers[2](h)), layers


class _ResidualTwin(torch.nn.Module):
    def __init__(self, layers: list[gd.Linear]) -> None:
        super().__init__()
        self.lins = torch.nn.ModuleList(_twin_linear(layer) for layer in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lins[0](x)
        return self.lins[2](h + torch.tanh(self.lins[1](h)))


def _torch_fit(twin: torch.nn.Module, X: tuple[torch.Tensor, ...], Y: torch.Tensor, epochs: int, batch_size: int,
               lr: float, momentum: float) -> list[float]:
    """Plain torch training on batches in order: per-epoch mean batch loss (MSE)."""
    return _torch_sgd_losses(twin, torch.nn.functional.mse_loss, X, Y, epochs, batch_size, lr, momentum)


def _assert_same_linear(layer: gd.Linear, lin: torch.nn.Linear, tol: dict) -> None:
    torch.testing.assert_close(layer.weight, lin.weight.detach().T, **tol)
    torch.testing.assert_close(layer.bias, lin.bias.detach(), **tol)


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_residual_mlp_trains_to_the_weights_of_its_torch_twin(dtype):
    model, layers = _residual(dtype)
    twin = _ResidualTwin(layers)
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.rand(30, 4, generator=gen, dtype=dtype), torch.rand(30, 1, generator=gen, dtype=dtype)
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.05, momentum=0.9), epochs=4, batch_size=7, shuffle=False,
                        verbose=False)  # 30 = 4*7 + 2: a partial batch
    expected = _torch_fit(twin, (X,), Y, epochs=4, batch_size=7, lr=0.05, momentum=0.9)
    assert history["loss"] == pytest.approx(expected, rel=TOLERANCE[dtype]["rtol"] * 10)
    for layer, lin in zip(layers, twin.lins, strict=True):
        _assert_same_linear(layer, lin, TOLERANCE[dtype])
    assert model.dtype() == dtype and model.graph().inputs["x"].dtype == dtype
    torch.testing.assert_close(model.predict(X), twin(X).detach(), **TOLERANCE[dtype])


def test_the_graph_numbers_layers_by_first_call_and_reads_as_a_sequential_does():
    model, _ = _residual()
    assert str(model.graph()) == """\
graph residual(x: f32[N,4]; 0.weight: f32[4,16], 0.bias: f32[16], 1.weight: f32[16,16], 1.bias: f32[16], \
2.weight: f32[16,1], 2.bias: f32[1]) {
  %0: f32[N,16] = matmul x, 0.weight  # 0:Linear
  %1: f32[N,16] = add %0, 0.bias  # 0:Linear
  %2: f32[N,16] = matmul %1, 1.weight  # 1:Linear
  %3: f32[N,16] = add %2, 1.bias  # 1:Linear
  %4: f32[N,16] = tanh %3
  %5: f32[N,16] = add %1, %4
  %6: f32[N,1] = matmul %5, 2.weight  # 2:Linear
  %7: f32[N,1] = add %6, 2.bias  # 2:Linear
  return %7
}"""
    assert list(model.parameters()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert model.graph(gd.MSE()).inputs.keys() == {"x", "y"}
    model.graph().verify()


def test_the_model_takes_only_what_its_output_needs_and_numbers_its_layers_so():
    """A layer called on the graph but not on the output's way is not the model's: an
    encoder and the whole net can be two models of one graph, each numbering its own."""
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    side, enc, head = gd.Linear(2, 3), gd.Linear(2, 4), gd.Linear(4, 1)
    side(x)  # called first (layer 0 of the graph), used by neither model
    h = enc(x)
    full, encoder = gd.Model(x, head(gd.relu(h))), gd.Model(x, h)
    assert full.layers == [enc, head] and encoder.layers == [enc]
    assert list(full.parameters()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert "side" not in str(full.graph()) and len(full.graph().nodes) == 5
    assert full.parameters()["0.weight"] is enc.weight is encoder.parameters()["0.weight"]


class _SharedTwin(torch.nn.Module):
    def __init__(self, first: gd.Linear, shared: gd.Linear, last: gd.Linear) -> None:
        super().__init__()
        self.first, self.shared, self.last = _twin_linear(first), _twin_linear(shared), _twin_linear(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.first(x))))
        return self.last(torch.tanh(self.shared(h)))


def test_a_layer_called_twice_is_one_param_whose_gradients_add_up():
    gen = torch.Generator().manual_seed(2)
    first, shared, last = _linear(gen, 3, 5, torch.float64), _linear(gen, 5, 5, torch.float64), \
        _linear(gen, 5, 1, torch.float64)
    g = gd.Graph("shared")
    x = g.input("x", (None, 3), torch.float64)
    h = gd.tanh(shared(gd.tanh(first(x))))
    model = gd.Model(x, last(gd.tanh(shared(h))))
    assert list(model.parameters()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert sum(v.name == "1.weight" for n in model.graph().nodes for v in n.inputs) == 2  # one param, read twice
    twin = _SharedTwin(first, shared, last)
    X, Y = torch.rand(12, 3, generator=gen, dtype=torch.float64), torch.rand(12, 1, generator=gen, dtype=torch.float64)
    (_, *grads) = gd.compile(gd.grad(model.graph(gd.MSE()), list(model.parameters())))(x=X, y=Y)
    torch.nn.functional.mse_loss(twin(X), Y).backward()
    expected = [twin.first.weight.grad.T, twin.first.bias.grad, twin.shared.weight.grad.T, twin.shared.bias.grad,
                twin.last.weight.grad.T, twin.last.bias.grad]
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    twin.zero_grad()
    model.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=3, batch_size=5, shuffle=False, verbose=False)
    _torch_fit(twin, (X,), Y, epochs=3, batch_size=5, lr=0.1, momentum=0.0)
    for layer, lin in ((first, twin.first), (shared, twin.shared), (last, twin.last)):
        _assert_same_linear(layer, lin, TOLERANCE[torch.float64])


def _two_inputs(seed: int = 3) -> tuple[gd.Model, list[gd.Linear], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layers = [_linear(gen, 4, 6, torch.float32), _linear(gen, 3, 6, torch.float32), _linear(gen, 6, 1, torch.float32)]
    scale = torch.rand(6, generator=gen) + 0.5
    g = gd.Graph("two")
    a, b = g.input("a", (None, 4)), g.input("b", (None, 3))
    h = gd.tanh(layers[0](a) + layers[1](b)) * g.param("scale", scale)  # a param of the graph's own, trained
    return gd.Model([a, b], layers[2](h)), layers, scale


class _TwoInputsTwin(torch.nn.Module):
    def __init__(self, layers: list[gd.Linear], scale: torch.Tensor) -> None:
        super().__init__()
        self.lins = torch.nn.ModuleList(_twin_linear(layer) for layer in layers)
        self.scale = torch.nn.Parameter(scale.clone())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lins[2](torch.tanh(self.lins[0](a) + self.lins[1](b)) * self.scale)


def test_several_inputs_train_as_the_torch_twin_fed_each():
    model, layers, scale = _two_inputs()
    twin = _TwoInputsTwin(layers, scale)
    gen = torch.Generator().manual_seed(4)
    Xa, Xb, Y = torch.rand(20, 4, generator=gen), torch.rand(20, 3, generator=gen), torch.rand(20, 1, generator=gen)
    assert model.input_names == ("a", "b") and model.in_features == 7
    torch.testing.assert_close(model.predict((Xa, Xb)), twin(Xa, Xb).detach())
    history = model.fit((Xa, Xb), Y, optimizer=gd.SGD(lr=0.1, momentum=0.5), epochs=3, batch_size=6, shuffle=False,
                        validation_data=((Xa[:5], Xb[:5]), Y[:5]), verbose=False)
    expected = _torch_fit(twin, (Xa, Xb), Y, epochs=3, batch_size=6, lr=0.1, momentum=0.5)
    assert history["loss"] == pytest.approx(expected, rel=1e-5)
    for layer, lin in zip(layers, twin.lins, strict=True):
        _assert_same_linear(layer, lin, TOLERANCE[torch.float32])
    torch.testing.assert_close(model.parameters()["scale"], twin.scale.detach(), **TOLERANCE[torch.float32])
    assert model.evaluate((Xa, Xb), Y)["loss"] == pytest.approx(
        torch.nn.functional.mse_loss(twin(Xa, Xb), Y).item(), rel=1e-5)
    text = str(model.graph())
    assert "graph two(x: f32[N,7]; " in text
    assert "%0: f32[N,4] = slice[axis=1, stop=4] x  # input:a\n" in text
    assert "%1: f32[N,3] = slice[axis=1, start=4, stop=7] x  # input:b\n" in text


def test_several_inputs_are_checked_one_by_one():
    model, _, _ = _two_inputs()
    Xa, Xb, Y = torch.rand(5, 4), torch.rand(5, 3), torch.rand(5, 1)
    cases = [
        (Xa, "X must be a tuple of 2 tensors, one per input \\(a, b\\), got a Tensor"),
        ((Xa,), "X must be a tuple of 2 tensors, one per input \\(a, b\\), got a tuple of length 1"),
        ((Xa, Xb[:, :2]), r"X\[1\] \(input b\) must be 2-d \[examples, 3\], got shape \[5, 2\]"),
        ((Xa, Xb.double()), r"X\[1\] \(input b\) is torch.float64, but input b is torch.float32; convert it"),
        ((Xa, Xb[:4]), r"X\[1\] \(input b\) has 4 examples on cpu, but the first input's tensor has 5 on cpu"),
        ((Xa, "b"), r"X\[1\] \(input b\) must be a torch.Tensor, got str"),
    ]
    bad = Xb.clone()
    bad[2, 1] = float("nan")
    cases.append(((Xa, bad), r"X\[1\] \(input b\) has NaN or inf values, first at \[2, 1\] = nan"))
    for X, expected in cases:
        with pytest.raises(ValueError, match=expected):
            model.predict(X)
    with pytest.raises(ValueError, match=r"validation_data\[0\]\[0\] \(input a\) must be 2-d"):
        model.fit((Xa, Xb), Y, validation_data=((Xa[:, :1], Xb), Y), verbose=False)
    with pytest.raises(ValueError, match="Y has 4 columns but the model outputs 1"):
        model.evaluate((Xa, Xb), torch.rand(5, 4))


def test_callbacks_checkpoints_and_resuming_take_the_very_steps_of_a_plain_fit(tmp_path):
    gen = torch.Generator().manual_seed(5)
    Xa, Xb, Y = torch.rand(24, 4, generator=gen), torch.rand(24, 3, generator=gen), torch.rand(24, 1, generator=gen)
    settings = dict(optimizer=gd.SGD(lr=0.05, momentum=0.9), schedule=gd.StepDecay(2, 0.5), batch_size=5, seed=7,
                    verbose=False, validation_data=((Xa[::3], Xb[::3]), Y[::3]), metrics=["mae"])
    plain, checkpointed, resumed = _two_inputs()[0], _two_inputs()[0], _two_inputs()[0]
    seen: list[float] = []
    h_plain = plain.fit((Xa, Xb), Y, epochs=4, callbacks=[
        gd.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs["val_loss"])),
        gd.ModelCheckpoint(tmp_path / "best.gdl", monitor="val_loss", save_best_only=True),
        gd.CSVLogger(tmp_path / "log.csv")], **settings)
    assert seen == h_plain["val_loss"] and len((tmp_path / "log.csv").read_text().splitlines()) == 5
    best = gd.load(tmp_path / "best.gdl")
    assert isinstance(best, gd.Model) and best.evaluate((Xa[::3], Xb[::3]), Y[::3])["loss"] == min(seen)
    path = tmp_path / "run.gdl"
    h_checkpointed = checkpointed.fit((Xa, Xb), Y, epochs=2, checkpoint=path, **settings)
    h_resumed = resumed.fit((Xa, Xb), Y, epochs=4, resume=path, **settings)
    assert h_checkpointed == {k: v[:2] for k, v in h_plain.items()}
    assert h_resumed == h_plain
    for a, b in zip(plain.state().values(), resumed.state().values(), strict=True):
        assert torch.equal(a, b)
    stopper = _two_inputs()[0]
    history = stopper.fit((Xa, Xb), Y, epochs=50, callbacks=[
        gd.EarlyStopping(monitor="loss", min_delta=1.0, patience=1, restore_best_weights=True)], **settings)
    assert len(history["loss"]) == 2 and stopper.history is history


def test_a_checkpoint_resumes_only_the_kind_of_model_that_wrote_it(tmp_path):
    X, Y = torch.rand(10, 4), torch.rand(10, 1)
    model, _ = _residual()
    model.fit(X, Y, epochs=1, checkpoint=tmp_path / "run.gdl", verbose=False)
    sequential = gd.Sequential(gd.Linear(4, 16), gd.Linear(16, 16), gd.Linear(16, 1))
    with pytest.raises(gd.GraphError, match="run.gdl: holds a functional model, not a sequential one; load it with "
                                            "gd.load"):
        sequential.fit(X, Y, epochs=2, resume=tmp_path / "run.gdl", verbose=False)
    with pytest.raises(gd.GraphError, match="holds a functional model, not a sequential one"):
        gd.model.load(tmp_path / "run.gdl")  # Sequential's own loader; gd.load reads both
    sequential.save(tmp_path / "seq.gdl")
    assert isinstance(gd.load(tmp_path / "seq.gdl"), gd.Sequential)


def _tied_after_building() -> tuple[gd.Model, list[gd.Linear]]:
    gen = torch.Generator().manual_seed(6)
    layers = [_linear(gen, 3, 3, torch.float64) for _ in range(2)] + [_linear(gen, 3, 1, torch.float64)]
    g = gd.Graph("tied")
    x = g.input("x", (None, 3), torch.float64)
    model = gd.Model(x, layers[2](gd.tanh(layers[1](gd.tanh(layers[0](x))))))
    layers[1].weight = layers[0].weight  # after building: one param from now on
    return model, layers


def _models() -> dict[str, gd.Model]:
    """A model of each kind of structure, with trained weights."""
    gen = torch.Generator().manual_seed(9)
    lins = [_linear(gen, 2, 2, torch.float32) for _ in range(2)]
    lins[1].weight = lins[0].weight  # before building: one param already
    g = gd.Graph("tied_when_built")
    x = g.input("x", (None, 2))
    std = gd.Standardize().adapt(torch.rand(30, 2) * 5)  # and a fixed buffer
    models = {"residual": _residual()[0], "two inputs": _two_inputs()[0],
              "tied after building": _tied_after_building()[0],
              "tied when built": gd.Model(x, lins[1](gd.relu(lins[0](std(x)))))}
    for model in models.values():
        model.fit(_inputs(model), torch.rand(10, model.out_features, dtype=model.dtype()), epochs=2, verbose=False)
    return models


def _inputs(model: gd.Model, n: int = 10) -> torch.Tensor | tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(10)
    parts = tuple(torch.rand(n, *shape, generator=gen, dtype=dtype) for _, shape, dtype in model._inputs)
    return parts if len(parts) > 1 else parts[0]


@pytest.mark.parametrize("kind", ["residual", "two inputs", "tied after building", "tied when built"])
def test_save_and_load_round_trip_reproduces_predict_bit_exactly(tmp_path, kind):
    model = _models()[kind]
    path = tmp_path / "model.gdl"
    model.save(path)
    loaded = gd.load(path)
    assert isinstance(loaded, gd.Model) and loaded.loss == gd.MSE()
    X = _inputs(model, 17)
    assert torch.equal(loaded.predict(X), model.predict(X))
    assert str(loaded.graph()) == str(model.graph()) and loaded.ties() == model.ties()
    assert loaded.config() == model.config() and loaded.input_names == model.input_names
    assert [type(a) for a in loaded.layers] == [type(b) for b in model.layers]
    for (name, a), (name_b, b) in zip(loaded.state().items(), model.state().items(), strict=True):
        assert name == name_b and torch.equal(a, b)
    if model.ties():  # a tie comes back as one tensor in two places, trained once
        place, owner = next(iter(model.ties().items()))
        held = {name: t for name, *_, t in loaded.places()}
        assert held[place] is held[owner]
    loaded.fit(X, torch.rand(17, model.out_features, dtype=model.dtype()), epochs=1, verbose=False)
    loaded.save(path)  # and it saves again


def test_a_tie_made_after_building_is_one_param_trained_as_the_torch_twin():
    model, layers = _tied_after_building()
    assert model.ties() == {"1.weight": "0.weight"}
    assert list(model.parameters()) == ["0.weight", "0.bias", "1.bias", "2.weight", "2.bias"]
    twin = torch.nn.ModuleList(_twin_linear(layer) for layer in layers)
    twin[1].weight = twin[0].weight

    def forward(x: torch.Tensor) -> torch.Tensor:
        return twin[2](torch.tanh(twin[1](torch.tanh(twin[0](x)))))

    twin.forward = forward
    gen = torch.Generator().manual_seed(11)
    X, Y = torch.rand(14, 3, generator=gen, dtype=torch.float64), torch.rand(14, 1, generator=gen, dtype=torch.float64)
    model.fit(X, Y, optimizer=gd.SGD(lr=0.2, momentum=0.9, weight_decay=0.01), epochs=3, batch_size=4, shuffle=False,
              verbose=False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)  # the shared weight once
    for _ in range(3):
        for s in range(0, 14, 4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(forward(X[s:s + 4]), Y[s:s + 4]).backward()
            opt.step()
    assert layers[1].weight is layers[0].weight
    for layer, lin in zip(layers, twin, strict=True):
        _assert_same_linear(layer, lin, TOLERANCE[torch.float64])


def test_a_tie_undone_after_building_is_refused_naming_both_places():
    gen = torch.Generator().manual_seed(12)
    a, b = _linear(gen, 2, 2, torch.float32), _linear(gen, 2, 1, torch.float32)
    c = gd.Linear(2, 2)
    c.weight = a.weight  # tied when built: the graph reads 0.weight for layer 1's weight
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    model = gd.Model(x, b(c(a(x))))
    assert model.ties() == {"1.weight": "0.weight"}
    c.weight = torch.rand(2, 2)
    msg = message(model.predict, torch.rand(3, 2))
    assert msg == ("1.weight (Linear(2, 2).weight) no longer holds the tensor of 0.weight, which the model's graph "
                   "reads in its place (they were one tensor when the model was built); give it 0.weight's tensor "
                   "again, or build the model again from the layers as they are now")
    with pytest.raises(gd.GraphError, match="no longer holds the tensor of 0.weight"):
        model.fit(torch.rand(3, 2), torch.rand(3, 1), verbose=False)
    c.weight = a.weight
    model.predict(torch.rand(3, 2))  # tied again: fine


def test_summary_lists_the_layers_their_shapes_and_params():
    model, _, _ = _two_inputs()
    assert model.summary(print_fn=None) == """\
Model two, inputs a [N,4], b [N,3]
layer      output shape  params
0: Linear  [N,6]         30
1: Linear  [N,6]         24
2: Linear  [N,1]         7
Total params: 67
Trainable params: 67
Non-trainable params: 0"""
    tied, _ = _tied_after_building()
    assert "1: Linear  [N,3]         3 (1.weight is 0.weight)" in tied.summary(print_fn=None)
    assert repr(model) == ("Model two(a: f32[N,4], b: f32[N,3]) -> f32[N,1]\n  (0) Linear(4, 6)\n  (1) Linear(3, 6)\n"
                           "  (2) Linear(6, 1)")


def test_a_model_moves_draws_and_exports_as_a_sequential_does(tmp_path):
    model, _ = _residual()
    X = torch.rand(5, 4)
    before = model.predict(X)
    assert model.to("cpu") is model and torch.equal(model.predict(X), before)
    assert "0:Linear" in gd.to_dot(model.graph()).source
    gd.export_onnx(model, tmp_path / "m.onnx")  # one input: the forward graph as it is
    assert gd.import_onnx(tmp_path / "m.onnx").inputs.keys() == {"x"}


# -- training mode: BatchNorm and Dropout --------------------------------------------------


def _res_cnn(dtype: torch.dtype = torch.float64, p: float = 0.4) -> tuple[gd.Model, list[gd.Layer]]:
    """A residual CNN: conv, BatchNorm, ReLU and pooling, then a skip connection around
    Dropout and a conv, the skip reading the very value Dropout is called on (in inference
    the two are the same tensor; in training only Dropout's branch is masked)."""
    gen = torch.Generator().manual_seed(13)
    layers = [gd.Conv2d(2, 4, 3, padding=1, generator=gen, dtype=dtype), gd.BatchNorm2d(4, momentum=0.2, dtype=dtype),
              gd.MaxPool2d(2), gd.Dropout(p, seed=9), gd.Conv2d(4, 4, 3, padding=1, generator=gen, dtype=dtype),
              gd.Linear(4 * 3 * 3, 3, generator=gen, dtype=dtype)]
    conv1, bn, pool, drop, conv2, head = layers
    g = gd.Graph("rescnn")
    x = g.input("x", (None, 2, 6, 6), dtype)
    h = pool(gd.relu(bn(conv1(x))))  # [4, 3, 3]
    h = h + conv2(drop(h))
    return gd.Model(x, head(gd.flatten(h))), layers


class _ResCNNTwin(torch.nn.Module):
    def __init__(self, layers: list[gd.Layer]) -> None:
        super().__init__()
        from graphdl.interop import TORCH_LAYERS
        rows = {row.layer: row for row in TORCH_LAYERS}
        self.mods = torch.nn.ModuleList(_TwinDropout(layer) if isinstance(layer, gd.Dropout) else
                                        rows[type(layer)].to_module(layer) for layer in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, bn, pool, drop, conv2, head = self.mods
        h = pool(torch.relu(bn(conv1(x))))
        return head((h + conv2(drop(h))).flatten(1))


def _twin_state(twin: _ResCNNTwin) -> dict[str, torch.Tensor]:
    """The twin's tensors under the model's names (a Linear's weight as [in, out])."""
    return {f"{k}.{name}": t.T if isinstance(m, torch.nn.Linear) and name == "weight" else t
            for k, m in enumerate(twin.mods) for name, t in m.state_dict().items()
            if not name.endswith("num_batches_tracked")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("p", [0.0, 0.4], ids=["no-dropout", "dropout"])
def test_a_residual_cnn_trains_in_training_mode_and_predicts_in_inference_mode_as_its_torch_twin(dtype, p):
    """fit against the twin in train mode (the same weights, batches and Dropout masks,
    torch.optim.SGD): the losses per epoch, the weights, BatchNorm's running statistics and
    Dropout's key at the end; then predict and evaluate against the twin in eval mode."""
    gen = torch.Generator().manual_seed(14)
    X = torch.randn(26, 2, 6, 6, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3, (26,), generator=gen)
    model, layers = _res_cnn(dtype, p)
    twin = _ResCNNTwin(layers)
    history = model.fit(X, labels, loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.1, momentum=0.9), epochs=3,
                        batch_size=8, shuffle=False, verbose=False)  # 26 = 3*8 + 2: a partial batch
    expected = _torch_sgd_losses(twin, torch.nn.functional.cross_entropy, X, labels, 3, 8, 0.1, 0.9)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert history["loss"] == pytest.approx(expected, rel=tol["rtol"])
    state, theirs = model.state(), _twin_state(twin)
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "3.key",
                           "4.weight", "4.bias", "5.weight", "5.bias"]
    assert float(state.pop("3.key")) == (12.0 if p else 0.0) == twin.mods[3].key  # 3 epochs of 4 steps
    assert set(state) == set(theirs)
    for name, t in state.items():
        torch.testing.assert_close(t, theirs[name].detach(), **tol, msg=name)
    exact = _ResCNNTwin(layers).eval()  # the trained weights themselves, in inference mode
    with torch.no_grad():
        torch.testing.assert_close(model.predict(X), exact(X), **tol)
        assert model.evaluate(X, labels)["loss"] == pytest.approx(
            torch.nn.functional.cross_entropy(exact(X), labels).item(), rel=tol["rtol"])


def test_each_mode_builds_its_own_graph_from_the_one_the_layers_were_called_on():
    model, layers = _res_cnn(torch.float32)
    infer, train = str(model.graph()), str(model.graph(gd.CrossEntropy(), training=True))
    assert "%4: f32[] = const[value=1.0]  # 3:Dropout\n  %5: f32[N,4,3,3] = mul %3, %4  # 3:Dropout\n" in infer
    assert "conv2d[padding=1] %5, 4.weight" in infer and "add %3, %6\n" in infer  # the skip reads Dropout's input
    assert "dropout_mask" not in infer and "mean[" not in infer and "return %10\n" in infer
    assert "%19: f32[N,4,3,3] = dropout_mask[p=0.4, seed=9] 3.key, %16  # 3:Dropout" in train
    assert "mul %16, %19  # 3:Dropout\n" in train and "conv2d[padding=1] %20, 4.weight" in train
    assert "add %16, %21\n" in train  # the masked branch, and the skip unmasked
    assert train.endswith("return %26, %7 (next/1.running_mean), %13 (next/1.running_var), %18 (next/3.key)\n}")
    assert model.layer_inputs() == [(0, layers[0], (2, 6, 6)), (1, layers[1], (4, 6, 6)), (2, layers[2], (4, 6, 6)),
                                    (3, layers[3], (4, 3, 3)), (4, layers[4], (4, 3, 3)), (5, layers[5], (36,))]
    summary = model.summary(print_fn=None)
    assert "3: Dropout      [N,4,3,3]     1\n" in summary and "Non-trainable params: 9" in summary
    assert list(model.parameters()) == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias",
                                        "5.weight", "5.bias"]


def test_a_layer_call_gives_a_value_of_its_own_even_when_it_passes_its_input_through():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    drop = gd.Dropout(0.5)
    d = drop(x)
    assert d is not x and d.node.scope == "0:Dropout" and str(d.node) == "%1: f32[N,3] = mul x, %0  # 0:Dropout"
    ints = g.input("i", (None, 2), torch.int64)
    passed = gd.Dropout(0.0)(ints)  # not a float: reshaped to its own shape
    assert str(passed.node) == "%2: i64[N,2] = reshape[shape=('N', 2)] i  # 1:Dropout"


def _chain(functional: bool) -> gd.Sequential | gd.Model:
    gen = torch.Generator().manual_seed(15)
    layers = [gd.Reshape((2, 4, 4)), gd.Conv2d(2, 3, 3, padding=1, generator=gen), gd.BatchNorm2d(3), gd.ReLU(),
              gd.Dropout(0.3, seed=21), gd.Flatten(), gd.Linear(48, 2, generator=gen), gd.BatchNorm1d(2)]
    if not functional:
        return gd.Sequential(*layers)
    g = gd.Graph("sequential")
    h = x = g.input("x", (None, 32))
    for layer in layers:
        h = layer(h)
    return gd.Model(x, h)


def test_a_chain_of_layer_calls_trains_bit_for_bit_as_the_sequential_of_those_layers():
    """The same layers, as a Sequential and as layer calls: the same IR in training mode
    (compiled, in inference too), and
    fit (shuffled, so each step's masks and running statistics are Sequential's own) gives
    the same History and state, bit for bit."""
    sequential, functional = _chain(False), _chain(True)
    assert str(functional.graph(gd.MSE(), training=True)) == str(sequential.graph(gd.MSE(), training=True))
    infer = (functional.graph(), sequential.graph())  # the model's has Dropout's x * 1, which compile drops
    assert "mul %3, %4  # 4:Dropout" in str(infer[0])
    assert str(gd.compile(infer[0]).graph) == str(gd.compile(infer[1]).graph)
    gen = torch.Generator().manual_seed(16)
    X, Y = torch.randn(40, 32, generator=gen), torch.randn(40, 2, generator=gen)
    settings = dict(optimizer=gd.Adam(lr=0.01), epochs=3, batch_size=7, seed=4, verbose=False,
                    validation_data=(X[:9], Y[:9]))
    assert functional.fit(X, Y, **settings) == sequential.fit(X, Y, **settings)
    for (name, a), (name_b, b) in zip(functional.state().items(), sequential.state().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    assert torch.equal(functional.predict(X), sequential.predict(X))


def test_a_cnn_saves_loads_and_resumes_exactly_with_its_running_statistics_and_key(tmp_path):
    gen = torch.Generator().manual_seed(17)
    X = torch.randn(30, 2, 6, 6, generator=gen)
    labels = torch.randint(0, 3, (30,), generator=gen)
    settings = dict(loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.05, momentum=0.9), batch_size=8, seed=2,
                    verbose=False, validation_data=(X[:10], labels[:10]))
    (plain, _), (checkpointed, _), (resumed, _) = (_res_cnn(torch.float32) for _ in range(3))
    h_plain = plain.fit(X, labels, epochs=4, **settings)
    h_checkpointed = checkpointed.fit(X, labels, epochs=2, checkpoint=tmp_path / "run.gdl", **settings)
    assert h_checkpointed == {k: v[:2] for k, v in h_plain.items()}
    assert resumed.fit(X, labels, epochs=4, resume=tmp_path / "run.gdl", **settings) == h_plain
    for (name, a), b in zip(plain.state().items(), resumed.state().values(), strict=True):
        assert torch.equal(a, b), name
    assert float(plain.state()["3.key"]) == 16.0  # 4 epochs of 4 steps
    plain.save(tmp_path / "cnn.gdl")
    loaded = gd.load(tmp_path / "cnn.gdl")
    assert torch.equal(loaded.predict(X), plain.predict(X)) and str(loaded.graph()) == str(plain.graph())
    assert str(loaded.graph(gd.CrossEntropy(), training=True)) == str(plain.graph(gd.CrossEntropy(), training=True))
    assert loaded.calls() == plain.calls() and loaded.layers[3].seed == 9
    for (name, a), (name_b, b) in zip(loaded.state().items(), plain.state().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    more = dict(settings, epochs=2, seed=5)  # training on draws the masks after the saved key, in both
    assert loaded.fit(X, labels, **more) == plain.fit(X, labels, **more)
    for a, b in zip(loaded.state().values(), plain.state().values(), strict=True):
        assert torch.equal(a, b)


def test_a_callback_stops_a_functional_fit_and_keeps_the_history():
    model, _ = _res_cnn(torch.float32)
    X, labels = torch.randn(12, 2, 6, 6), torch.randint(0, 3, (12,))
    stop = gd.LambdaCallback(on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", epoch == 1))
    history = model.fit(X, labels, loss=gd.CrossEntropy(), epochs=10, batch_size=4, callbacks=[stop], verbose=False)
    assert len(history["loss"]) == 2 and model.history is history and float(model.state()["3.key"]) == 6.0


def test_sample_and_class_weights_weigh_a_functional_models_loss_as_in_torch():
    model, layers = _residual(torch.float64)
    twin = _ResidualTwin(layers)
    gen = torch.Generator().manual_seed(18)
    X, Y = torch.rand(20, 4, generator=gen, dtype=torch.float64), torch.rand(20, 1, generator=gen, dtype=torch.float64)
    w = torch.rand(20, generator=gen, dtype=torch.float64) * 2
    assert model.graph(gd.losses.Weighted(gd.MSE())).inputs["y"].shape == ("N", 2)  # the targets, then the weight
    history = model.fit(X, Y, optimizer=gd.SGD(lr=0.1), epochs=2, batch_size=6, shuffle=False, sample_weight=w,
                        verbose=False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    expected = []
    for _ in range(2):
        total = 0.0
        for s in range(0, 20, 6):
            opt.zero_grad()
            value = (w[s:s + 6, None] * (twin(X[s:s + 6]) - Y[s:s + 6]) ** 2).mean()
            value.backward()
            opt.step()
            total += value.item() * len(X[s:s + 6])
        expected.append(total / 20)
    assert history["loss"] == pytest.approx(expected, rel=1e-12)
    for layer, lin in zip(layers, twin.lins, strict=True):
        _assert_same_linear(layer, lin, TOLERANCE[torch.float64])
    weighted = (w[:, None] * (twin(X) - Y) ** 2).mean().item()
    assert model.evaluate(X, Y, sample_weight=w)["loss"] == pytest.approx(weighted, rel=1e-12)
    two, _, _ = _two_inputs()
    Xa, Xb, labels = torch.rand(16, 4, generator=gen), torch.rand(16, 3, generator=gen), torch.randint(0, 2, (16,))
    by_class = two.fit((Xa, Xb), labels, loss=gd.BCEWithLogits(), class_weight={0: 0.5, 1: 3.0}, epochs=1,
                       seed=1, verbose=False, validation_data=((Xa[:6], Xb[:6]), labels[:6], w[:6].float()))
    assert by_class["val_loss"] == [pytest.approx(two.evaluate((Xa[:6], Xb[:6]), labels[:6],
                                                               sample_weight=w[:6].float())["loss"], rel=1e-6)]
    again, _, _ = _two_inputs()
    by_sample = again.fit((Xa, Xb), labels, loss=gd.BCEWithLogits(), sample_weight=0.5 + 2.5 * labels.float(),
                          epochs=1, seed=1, verbose=False)
    assert by_sample["loss"] == by_class["loss"]


def test_what_training_mode_cannot_build_is_refused_naming_the_layer():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    bn, drop = gd.BatchNorm1d(3), gd.Dropout(0.5)
    shared = gd.Model(x, bn(gd.tanh(bn(x))))  # one BatchNorm, called twice
    shared.predict(torch.rand(4, 3))  # inference reads the running statistics: fine
    assert message(shared.fit, torch.rand(4, 3), torch.rand(4, 3), verbose=False) == (
        "layer 0 (BatchNorm1d(3)) is called more than once, and in training each call gives its buffer "
        "0.running_mean a next value of its own (a step writes one); give each call a layer of its own")
    names(message(gd.Model(x, drop(drop(x))).graph, training=True), r"layer 0 \(Dropout\(p=0.5\)\) is called more")
    other = gd.BatchNorm1d(3)
    other.running_var = bn.running_var  # two layers, one buffer
    tied = gd.Model(x, other(bn(x)))
    names(message(tied.graph, training=True), r"layers 0 \(BatchNorm1d\(3\)\) and 1 \(BatchNorm1d\(3\)\) both update "
          r"0.running_var in training")
    one_row = gd.Model(x, gd.Linear(3, 1)(gd.BatchNorm1d(3)(x)))
    with pytest.raises(ValueError, match=r"layer 0 \(BatchNorm1d\(3\)\) would normalise 1 value per channel in a step "
                                         r"of 1 row: .* \(the last batch of the 9 rows\)"):
        one_row.fit(torch.rand(9, 3), torch.rand(9, 1), batch_size=4, verbose=False)


class _Pair(gd.Layer):
    """A layer that calls others on graph values inside its forward (not supported)."""

    def __init__(self) -> None:
        self.a = gd.Linear(2, 2)

    def forward(self, build: gd.layers.Build, x: gd.Value) -> gd.Value:
        return self.a(x)


def test_a_layer_that_calls_layers_inside_its_forward_is_refused():
    g = gd.Graph("g")
    names(message(_Pair(), g.input("x", (None, 2))), r"Linear\(2, 2\) was called on a graph value inside a layer's "
          r"forward; a layer made of others builds them with their forward\(build, x\)")


# -- what Model and layer calls refuse, before any work -----------------------------------------


def test_a_layer_is_called_on_graph_values():
    msg = message(gd.Linear(2, 1), torch.rand(3, 2))
    assert msg.startswith("Linear(2, 1) was called on a Tensor; a layer is called on a value of a graph (from "
                          "graph.input, an op or another layer), e.g. h = layer(x)")


def test_a_layer_call_names_the_node_and_the_layer_of_a_shape_mistake():
    g = gd.Graph("g")
    x = g.input("x", (None, 3))
    with pytest.raises(gd.GraphError) as err:
        gd.Linear(4, 2)(x)
    names(str(err.value), r"matmul %0\(x: f32\[N,3\], 0.weight: f32\[4,2\]\): \[N,3\] @ \[4,2\]: inner dims differ",
          r"created at .*test_functional.py:\d+ \(in layer 0:Linear\)")


def test_model_refuses_bad_inputs_and_outputs_before_any_work():
    g, other = gd.Graph("g"), gd.Graph("other")
    a, b = g.input("a", (None, 2)), g.input("b", (None, 2))
    w = g.param("w", torch.rand(2, 1))
    out = gd.matmul(a + b, w)
    elsewhere = gd.Linear(2, 1)(other.input("x", (None, 2)))
    assert message(gd.Model, a, elsewhere) == (
        "Model's output %1: f32[N,1] belongs to graph 'other', but its inputs to graph 'g'; build the output from "
        "the model's inputs, in their graph")
    assert message(gd.Model, a, out) == (
        "Model's output reads input b, not among its inputs (a); give every input it reads, e.g. gd.Model([a, b], out)")
    assert message(gd.Model, torch.rand(3, 2), out) == (
        "Model's inputs are graph inputs (graph.input(...)), got a Tensor")
    assert message(gd.Model, [a, b], torch.rand(3, 1)) == (
        "Model's output is a value of the graph (what an op or a layer gave), got a Tensor")
    names(message(gd.Model, w, out), r"but w: f32\[2,1\] is a param of graph g")
    names(message(gd.Model, [a, other.inputs["x"]], out), "Model's inputs belong to one graph")
    names(message(gd.Model, [a, b], [out, out]), "Model predicts one value .* got 2 outputs")
    names(message(gd.Model, [a, a], out), "Model's inputs name a twice")
    names(message(gd.Model, [a, b], gd.sum(out)), "must keep the batch dim N first")
    ints = g.input("i", (None, 2), torch.int64)
    names(message(gd.Model, [a, ints], a), r"several inputs must be rows \[N, features\] of one dtype")


def test_names_that_clash_with_the_models_are_refused():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    out = gd.matmul(x, g.param("y", torch.rand(2, 1)))
    assert message(gd.Model, x, out) == ("graph param 'y' has the name of the model's targets; give the param another "
                                         "name")
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    g.param("0.weight", torch.rand(2, 1))
    names(message(gd.Linear(2, 1), x), "graph g already has a param named '0.weight', the name its layer 0")


def test_a_trained_and_a_fixed_tensor_held_as_one_is_refused():
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    std = gd.Standardize(2)
    h = std(x)
    out = gd.Linear(2, 1)(h * g.param("m", std.mean))  # the buffer's tensor given to a trained param
    names(message(gd.Model, x, out), "m holds the tensor that 0.mean holds, but 0.mean is a fixed buffer and m a "
                                     "trained param")


def test_a_file_whose_ir_and_layers_disagree_is_refused(tmp_path):
    model, _ = _residual()
    path = tmp_path / "model.gdl"
    model.save(path)
    tensors = safetensors.torch.load_file(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        metadata = json.loads(f.read(length))["__metadata__"]
    layers, calls = json.loads(metadata["layers"]), json.loads(metadata["calls"])
    assert calls == [[0, "x", 0, 2], [1, 1, 2, 4], [2, 5, 6, 8]]  # each layer's call: on what, its nodes
    for edit, expected in [
        ({"layers": json.dumps([*layers[:2], {"type": "Tanh"}])}, r"the file holds weights \['2.bias', '2.weight'\] "
                                                                  "that its layers do not use"),
        ({"layers": json.dumps(layers[:2])}, "the file's calls name layer 2, but it has 2 layers"),
        ({"calls": json.dumps(calls[:2])}, r"layer 2 \(Linear\(16, 1\)\) is called nowhere in the file's calls"),
        ({"calls": json.dumps([calls[0], [1, 1, 2, 5], calls[2]])}, "the file's IR and its layer list disagree"),
        ({"calls": json.dumps([calls[0], [1, 1, 2, 4], [2, 5, 7, 8]])}, "the file's layer calls are not those its "
                                                                        "IR and layers make"),
        ({"calls": json.dumps([calls[1], calls[0], calls[2]])}, r"the file's call \[0, 'x', 0, 2\] does not span "
                                                                "nodes of the IR after the call before it"),
        ({"calls": json.dumps([[0, 3, 0, 2], *calls[1:]])}, "is on 3, which is no value of the IR defined before it"),
        ({"calls": json.dumps([[0, "x", 0]])}, r"a layer call must be \[layer, input, start, stop\]"),
        ({"layers": json.dumps([layers[1], layers[0], layers[2]])}, "the IR declares 0.weight f32\\[4,16\\], but "
                                                                    "layer 0 \\(Linear\\(16, 16\\)\\) holds"),
        ({"model": "graph"}, "holds a model of kind 'graph', which this graphdl does not know"),
        ({"ties": json.dumps({"1.bias": "0.bias"})}, r"the file holds weights \[.1.bias.\] that its layers do not "
                                                     "use"),
    ]:
        crafted = tmp_path / "crafted.gdl"
        safetensors.torch.save_file(tensors, crafted, metadata={**metadata, **edit})
        with pytest.raises(gd.GraphError, match=expected):
            gd.load(crafted)
    safetensors.torch.save_file(tensors, crafted, metadata={k: v for k, v in metadata.items() if k != "calls"})
    with pytest.raises(gd.GraphError, match="the layer calls must be a JSON list"):
        gd.load(crafted)


def test_a_layer_that_could_not_build_builds_once_it_can():
    """Standardize called before `adapt` is refused; adapted, the same layer builds, its
    statistics read as its own (fixed) params."""
    g = gd.Graph("g")
    x = g.input("x", (None, 2))
    std = gd.Standardize()
    names(message(std, x), "Standardize has no statistics yet; call .adapt")
    std.adapt(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    model = gd.Model(x, gd.Linear(2, 1)(std(x)))
    assert list(model.state()) == ["0.mean", "0.std", "1.weight", "1.bias"]
    assert list(model.parameters()) == ["1.weight", "1.bias"]
