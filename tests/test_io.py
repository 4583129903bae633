"""Model and graph files: round trips, the exact format, atomic writes, hostile files."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch
from helpers import _tied

import graphdl as gd
from graphdl import io


def tiny(dtype: torch.dtype = torch.float32) -> gd.Graph:
    g = gd.Graph("tiny")
    x = g.input("x", (None, 2), dtype)
    y = g.input("y", (None, 1), dtype)
    torch.manual_seed(0)
    w = g.param("0.weight", torch.randn(2, 1, dtype=dtype))
    b = g.param("0.bias", torch.randn(1, dtype=dtype))
    with g.scope("0:Linear"):
        h = gd.add(gd.matmul(x, w), b)
    g.output(gd.mse(gd.tanh(h), y))
    return g


def run(g: gd.Graph) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    dtype = g.inputs["x"].dtype
    return gd.compile(g)(x=torch.rand(16, 2, dtype=dtype), y=torch.rand(16, 1, dtype=dtype))


# -- bare graphs ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_round_trip_is_bit_identical(tmp_path, dtype):
    g = tiny(dtype)
    gd.save_graph(g, tmp_path / "tiny.gdl")
    g2 = gd.load_graph(tmp_path / "tiny.gdl")
    assert str(g2) == str(g)
    for name, v in g.params.items():
        assert torch.equal(g2.params[name].data, v.data) and g2.params[name].data.dtype == dtype
    assert torch.equal(run(g2)[0], run(g)[0])
    g2.verify()


def test_graph_file_format_is_safetensors_with_our_metadata(tmp_path):
    g = tiny()
    path = tmp_path / "tiny.gdl"
    gd.save_graph(g, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "graphdl.graph", "version": "1", "ir": str(g)}
        assert sorted(f.keys()) == ["0.bias", "0.weight"]
    assert io.file_format(path) == "graphdl.graph"


def test_gradient_graph_round_trips(tmp_path):
    gg = gd.grad(tiny(), ["0.weight", "0.bias"])
    gd.save_graph(gg, tmp_path / "grad.gdl")
    loaded = gd.load_graph(tmp_path / "grad.gdl")
    assert str(loaded) == str(gg)
    assert all(torch.equal(a, b) for a, b in zip(run(loaded), run(gg), strict=True))


@pytest.mark.parametrize("name", ["tiny.txt", "tiny.gdir"])
def test_text_files_hold_the_ir_only(tmp_path, name):
    g = tiny()
    gd.save_graph(g, tmp_path / name)
    assert (tmp_path / name).read_text() == str(g) + "\n"
    loaded = gd.load_graph(tmp_path / name)
    assert str(loaded) == str(g)
    assert all(torch.count_nonzero(v.data) == 0 for v in loaded.params.values())  # no weights in text


def test_ir_text_is_recognised_by_content_whatever_the_name(tmp_path):
    (tmp_path / "graph.ir").write_text("// hand-written\n" + str(tiny()))
    assert io.file_format(tmp_path / "graph.ir") == "text"
    assert str(gd.load_graph(tmp_path / "graph.ir")) == str(tiny())


def test_bad_ir_text_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_text(str(tiny()).replace("tanh", "tahn"))
    with pytest.raises(gd.GraphError, match=r"bad\.txt: IR text, line 4: unknown op 'tahn'"):
        gd.load_graph(tmp_path / "bad.txt")


# -- hostile, broken and foreign files ------------------------------------------------


def _container(metadata: dict[str, str] | None, tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors, metadata=metadata)


def _good_metadata() -> dict[str, str]:
    return {"format": "graphdl.graph", "version": "1", "ir": str(tiny())}


def _as_model(data: bytes) -> bytes:
    """The same broken file, but claiming to be a model (so gd.load gets past the format check)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"].update(format="graphdl.model", layers='[{"type": "Linear", "in_features": 2, '
                                                                 '"out_features": 1}]')
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


def _good_tensors() -> dict[str, torch.Tensor]:
    return {n: v.data for n, v in tiny().params.items()}


# name: (the file's bytes, the message it must raise)
BAD_FILES = {
    "empty": (lambda: b"", "only 0 bytes long"),
    "random bytes": (lambda: bytes(range(7, 255)) * 3, "does not start with a safetensors header"),
    "json garbage": (lambda: struct.pack("<Q", 5) + b"{oops", "header is not JSON"),
    "json list": (lambda: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    "json nested deep": (lambda: struct.pack("<Q", 100_000) + b"[" * 100_000, "header is not JSON"),
    "pickle": (lambda: pickle.dumps({"0.weight": [1.0]}), "looks like a Python pickle"),
    "zip": (lambda: b"PK\x03\x04" + bytes(60), "looks like a zip archive"),
    "header length cut": (lambda: struct.pack("<Q", 900) + b"{", "truncated or not a graphdl model file"),
    "foreign safetensors": (lambda: _container(None, _good_tensors()), "without graphdl's metadata"),
    "other format name": (lambda: _container({**_good_metadata(), "format": "other"}, _good_tensors()),
                          "without graphdl's metadata"),
    "newer version": (lambda: _container({**_good_metadata(), "version": "2"}, _good_tensors()),
                      "format version '2' is not one this graphdl reads"),
    "no ir": (lambda: _container({"format": "graphdl.graph", "version": "1"}, _good_tensors()),
              "lacks its IR"),
    "model without layers": (lambda: _container({**_good_metadata(), "format": "graphdl.model"}, _good_tensors()),
                             "lacks its IR or layer list"),
    "header cut": (lambda: _container(_good_metadata(), _good_tensors())[:40], "truncated"),
    "weights cut": (lambda: _container(_good_metadata(), _good_tensors())[:-2], "truncated"),
    "broken ir": (lambda: _container({**_good_metadata(), "ir": "graph x("}, _good_tensors()),
                  "the IR stored in the file is invalid"),
    "missing weight": (lambda: _container(_good_metadata(), {"0.weight": torch.zeros(2, 1)}),
                       r"declares params \['0.bias'\] but the file holds no weights"),
    "extra weight": (lambda: _container(_good_metadata(), {**_good_tensors(), "9.weight": torch.zeros(1)}),
                     r"holds weights \['9.weight'\] that its IR does not declare"),
    "wrong shape": (lambda: _container(_good_metadata(), {**_good_tensors(), "0.weight": torch.zeros(1, 2)}),
                    r"weight '0.weight' is f32\[1,2\] but the IR declares f32\[2,1\]"),
    "wrong dtype": (lambda: _container(_good_metadata(), {**_good_tensors(), "0.bias": torch.zeros(1).double()}),
                    r"weight '0.bias' is f64\[1\] but the IR declares f32\[1\]"),
}

AS_MODEL = {"broken ir", "missing weight", "extra weight", "wrong shape", "wrong dtype"}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("loader", [gd.load_graph, gd.load], ids=["load_graph", "load"])
def test_bad_files_raise_graph_errors_saying_what_is_wrong(tmp_path, case, loader):
    make, message = BAD_FILES[case]
    data = make()
    if loader is gd.load and case in AS_MODEL:
        data = _as_model(data)
    path = tmp_path / "model.gdl"
    path.write_bytes(data)
    with pytest.raises(gd.GraphError, match=message) as info:
        loader(path)
    assert str(path) in str(info.value)


def test_a_header_length_that_starts_like_a_pickle_is_still_read(tmp_path):
    gd.save_graph(tiny(), tmp_path / "tiny.gdl")
    data = (tmp_path / "tiny.gdl").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + size].rstrip().ljust(0x380)  # safetensors pads its header with spaces too
    padded = struct.pack("<Q", 0x380) + header + data[8 + size:]
    assert padded[:2] == b"\x80\x03"  # what a protocol-3 pickle starts with
    (tmp_path / "tiny.gdl").write_bytes(padded)
    assert str(gd.load_graph(tmp_path / "tiny.gdl")) == str(tiny())


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(gd.GraphError, match="no such file; check the path"):
        gd.load(tmp_path / "nope.gdl")
    with pytest.raises(gd.GraphError, match="no such file"):
        io.file_format(tmp_path / "nope.gdl")
    with pytest.raises(gd.GraphError, match="is a folder"):
        gd.load_graph(tmp_path)
    with pytest.raises(gd.GraphError, match="folder .* does not exist"):
        gd.save_graph(tiny(), tmp_path / "missing" / "g.gdl")


class _Payload:
    """Unpickling this creates a marker file: proof that loading ran the stranger's code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_a_pickle_disguised_as_a_model_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    pickle.loads(payload).close()  # the payload is live: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()

    disguised = tmp_path / "disk.gdl"
    disguised.write_bytes(payload)
    for loader in (gd.load, gd.load_graph, io.file_format):
        with pytest.raises(gd.GraphError, match="never loads because unpickling can run code"):
            loader(disguised)
    torch.save({"0.weight": _Payload(str(marker))}, disguised)  # torch's zip+pickle container
    for loader in (gd.load, gd.load_graph):
        with pytest.raises(gd.GraphError, match="zip archive"):
            loader(disguised)
    assert not marker.exists()


# -- atomic writes ----------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_interrupted_save_leaves_the_old_file_whole(tmp_path, monkeypatch, step):
    path = tmp_path / "tiny.gdl"
    old = tiny()
    gd.save_graph(old, path)
    before = path.read_bytes()

    new = tiny()
    new.params["0.weight"].data.add_(1.0)
    monkeypatch.setattr(io.os, step, _boom)
    with pytest.raises(gd.GraphError, match="No space left on device; the previous file is unchanged"):
        gd.save_graph(new, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.equal(gd.load_graph(path).params["0.weight"].data, old.params["0.weight"].data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gdl"]  # no temp file left behind


def test_interrupt_mid_write_cleans_up_and_propagates(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gdl"
    gd.save_graph(tiny(), path)
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gd.save_graph(tiny(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gdl"]


def test_saved_files_get_normal_permissions(tmp_path):
    path = tmp_path / "tiny.gdl"
    gd.save_graph(tiny(), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(path, 0o640)
    gd.save_graph(tiny(), path)  # overwriting keeps the file's mode
    assert path.stat().st_mode & 0o777 == 0o640


def test_metadata_is_plain_strings(tmp_path):
    gd.save_graph(tiny(), tmp_path / "tiny.gdl")
    data = (tmp_path / "tiny.gdl").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    assert all(isinstance(v, str) for v in header["__metadata__"].values())


# -- model files ----------------------------------------------------------------------


def disk_model(dtype: torch.dtype = torch.float32) -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    return gd.Sequential(gd.Linear(2, 25, generator=gen, dtype=dtype), gd.ReLU(),
                         gd.Linear(25, 25, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(25, 1, generator=gen, dtype=dtype), gd.Sigmoid())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_round_trip_gives_bit_identical_params_and_predictions(tmp_path, dtype):
    model = disk_model(dtype)
    X = torch.rand(64, 2, dtype=dtype)
    Y = (X.sum(1, keepdim=True) > 1).to(dtype)
    model.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=0.1, momentum=0.5), epochs=2, batch_size=8, seed=0,
              verbose=False)  # trained weights, not just the initial ones
    model.save(tmp_path / "disk.gdl")
    loaded = gd.load(tmp_path / "disk.gdl")
    assert isinstance(loaded, gd.Sequential)
    assert loaded.config() == model.config()
    assert list(loaded.parameters()) == list(model.parameters())
    for name, t in model.parameters().items():
        assert torch.equal(loaded.parameters()[name], t) and loaded.parameters()[name].dtype == dtype
    assert torch.equal(loaded.predict(X), model.predict(X))
    assert str(loaded.graph(loss=gd.MSE())) == str(model.graph(loss=gd.MSE()))


def test_model_file_format(tmp_path):
    model = disk_model()
    model.save(tmp_path / "disk.gdl")
    with safetensors.safe_open(str(tmp_path / "disk.gdl"), framework="pt") as f:
        meta = f.metadata()
        assert meta.keys() == {"format", "version", "ir", "layers"}
        assert (meta["format"], meta["version"]) == ("graphdl.model", "1")
        assert meta["ir"] == str(model.graph())
        assert json.loads(meta["layers"]) == model.config()
        assert list(f.keys()) == sorted(model.parameters())
    assert io.file_format(tmp_path / "disk.gdl") == "graphdl.model"


def test_model_and_graph_files_say_which_loader_to_use(tmp_path):
    model = disk_model()
    model.save(tmp_path / "disk.gdl")
    forward = gd.load_graph(tmp_path / "disk.gdl")  # a model file's forward graph, with its weights
    assert str(forward) == str(model.graph())
    assert torch.equal(gd.compile(forward)(x=torch.ones(3, 2))[0], model.predict(torch.ones(3, 2)))
    gd.save_graph(model.graph(), tmp_path / "graph.gdl")
    with pytest.raises(gd.GraphError, match=r"holds a bare graph, not a model; load it with gd.load_graph"):
        gd.load(tmp_path / "graph.gdl")
    gd.save_graph(model.graph(), tmp_path / "graph.txt")
    with pytest.raises(gd.GraphError, match=r"holds IR text, not a model; load it with gd.load_graph"):
        gd.load(tmp_path / "graph.txt")


def _rewrite_layers(path, layers: str) -> None:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path.write_bytes(safetensors.torch.save(tensors, metadata={**meta, "layers": layers}))


@pytest.mark.parametrize("layers, message", [
    ("[{", "the layer list stored in the file is invalid"),
    ("[" * 100_000, "the layer list stored in the file is invalid"),
    ('{"type": "Linear"}', "expected a list of layer settings"),
    ('[{"type": "Conv3d"}]', "unknown layer type 'Conv3d'"),
    ('[{"type": "Linear", "in_features": 2, "out_features": 25, "dtype": "load"}]', "dtype 'load' is not one of"),
    ('[{"type": "Linear", "in_features": 2, "out_features": {"x": 1}}]', "plain numbers and strings"),
    ('[{"type": "Linear", "in_features": 2, "out_features": 7}]', r"weight '0.weight' is f32\[2,25\] but the "
                                                                  r"layers build f32\[2,7\]"),
    ('[{"type": "Linear", "in_features": 2, "out_features": 25}]', r"holds weights \['2.bias', '2.weight', "),
    ('[{"type": "ReLU"}, {"type": "Linear", "in_features": 2, "out_features": 25}]',
     "the layers build param '1.weight', which the file's IR does not declare"),
])
def test_a_layer_list_that_disagrees_with_the_weights_is_rejected(tmp_path, layers, message):
    path = tmp_path / "disk.gdl"
    disk_model().save(path)
    _rewrite_layers(path, layers)
    with pytest.raises(gd.GraphError, match=message):
        gd.load(path)


def test_huge_declared_shapes_are_checked_before_anything_is_allocated(tmp_path):
    path = tmp_path / "disk.gdl"
    disk_model().save(path)
    _rewrite_layers(path, '[{"type": "Linear", "in_features": 2, "out_features": 1000000000000}]')
    with pytest.raises(gd.GraphError, match=r"is f32\[2,25\] but the layers build f32\[2,1000000000000\]"):
        gd.load(path)  # 8 TB if it were allocated
    ir = str(tiny()).replace("0.weight: f32[2,1]", "0.weight: f32[2,1], big: f32[1000000,1000000]")
    path.write_bytes(_container({**_good_metadata(), "ir": ir}, _good_tensors()))
    with pytest.raises(gd.GraphError, match=r"declares params \['big'\] but the file holds no weights"):
        gd.load_graph(path)


def test_interrupted_model_save_leaves_the_old_model_loadable(tmp_path, monkeypatch):
    path = tmp_path / "disk.gdl"
    old = disk_model()
    old.save(path)
    new = disk_model()
    new.parameters()["0.weight"].add_(1.0)
    monkeypatch.setattr(io.os, "replace", _boom)
    with pytest.raises(gd.GraphError, match="the previous file is unchanged"):
        new.save(path)
    monkeypatch.undo()
    loaded = gd.load(path)
    assert torch.equal(loaded.parameters()["0.weight"], old.parameters()["0.weight"])


@pytest.mark.parametrize("path", [None, 0, "", b"x.gdl"])
def test_a_non_path_is_a_graph_error(path, tmp_path):
    model = gd.Sequential(gd.Linear(2, 1))
    g = model.graph()
    for call in (lambda: gd.load(path), lambda: gd.load_graph(path), lambda: gd.save_graph(g, path),
                 lambda: model.save(path)):
        with pytest.raises(gd.GraphError, match="expected a file path"):
            call()


def _trained_classifier() -> tuple[gd.Sequential, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    X, labels = torch.randn(30, 2, generator=gen) * 50 + 20, torch.randint(0, 3, (30,), generator=gen)
    model = gd.Sequential(gd.Standardize().adapt(X), gd.Linear(2, 8, generator=gen), gd.Tanh(),
                          gd.Linear(8, 3, generator=gen), gd.Softmax())
    model.fit(X, labels, loss=gd.BCEWithLogits(), epochs=2, batch_size=8, verbose=False)
    return model, X, labels


def test_a_model_file_holds_every_step_from_raw_input_and_the_loss(tmp_path):
    model, X, labels = _trained_classifier()
    model.save(tmp_path / "clf.gdl")
    loaded = gd.load(tmp_path / "clf.gdl")
    assert list(loaded.state()) == list(model.state()) and "0.mean" in loaded.state()
    assert all(torch.equal(loaded.state()[k], v) for k, v in model.state().items())
    assert torch.equal(loaded.predict(X), model.predict(X))
    assert loaded.loss == gd.BCEWithLogits()  # so evaluate reads predictions as logits, as fit did
    assert loaded.evaluate(X, labels) == model.evaluate(X, labels)
    with safetensors.safe_open(str(tmp_path / "clf.gdl"), framework="pt") as f:
        meta = f.metadata()
    assert meta["loss"] == "bce_with_logits"
    # The layer list alone rebuilds the stored IR exactly.
    assert str(gd.Sequential.from_config(json.loads(meta["layers"])).graph()) == meta["ir"]


def test_a_loss_the_file_names_must_be_known(tmp_path):
    model, _, _ = _trained_classifier()
    path = tmp_path / "clf.gdl"
    model.save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path.write_bytes(safetensors.torch.save(tensors, metadata={**meta, "loss": "focal"}))
    with pytest.raises(gd.GraphError, match=r"names loss 'focal', which this graphdl does not know"):
        gd.load(path)


@pytest.mark.parametrize("layers, differs", [
    # the file: the IR says tanh, the layer list says ReLU and adds a Sigmoid
    ('[{"type": "Linear", "in_features": 2, "out_features": 3}, {"type": "ReLU"}, '
     '{"type": "Linear", "in_features": 3, "out_features": 1}, {"type": "Sigmoid"}]',
     r"line 4 of the IR is `%2: f32\[N,3\] = tanh %1  # 1:Tanh`; "
     r"the layers build `%2: f32\[N,3\] = relu %1  # 1:ReLU`"),
    ('[{"type": "Linear", "in_features": 2, "out_features": 3}, {"type": "Tanh"}, '
     '{"type": "Linear", "in_features": 3, "out_features": 1}, {"type": "Sigmoid"}]',
     r"line 7 of the IR is `return %4`; the layers build `%5: f32\[N,1\] = sigmoid %4  # 3:Sigmoid`"),
    ('[{"type": "Linear", "in_features": 2, "out_features": 3}, {"type": "Sigmoid"}, '
     '{"type": "Linear", "in_features": 3, "out_features": 1}]',
     r"line 4 of the IR is `%2: .* = tanh %1  # 1:Tanh`; the layers build `.* = sigmoid %1  # 1:Sigmoid`"),
])
def test_a_layer_list_that_rebuilds_another_network_than_the_ir_is_rejected(tmp_path, layers, differs):
    path = tmp_path / "m.gdl"
    gd.Sequential(gd.Linear(2, 3), gd.Tanh(), gd.Linear(3, 1)).save(path)
    _rewrite_layers(path, layers)  # the same params, so only the IR can tell
    with pytest.raises(gd.GraphError, match=rf"{path}: the file's IR and its layer list disagree \({differs}\), so "
                                            "the model would not be the network the IR describes"):
        gd.load(path)
    assert str(gd.load_graph(path)) == str(gd.Sequential(gd.Linear(2, 3), gd.Tanh(), gd.Linear(3, 1)).graph())


def test_load_leaves_torch_global_rng_alone(tmp_path):
    model = disk_model()
    model.save(tmp_path / "disk.gdl")
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    loaded = gd.load(tmp_path / "disk.gdl")
    gd.load_graph(tmp_path / "disk.gdl")
    assert torch.equal(torch.get_rng_state(), before)
    for name, t in loaded.parameters().items():  # real tensors holding the file's weights, one storage each
        assert t.device.type == "cpu" and torch.equal(t, model.parameters()[name])
    storages = [t.untyped_storage().data_ptr() for t in loaded.parameters().values()]
    assert len(set(storages)) == len(storages)


def test_loaded_weights_are_writable_tensors_of_their_own(tmp_path):
    """A loaded model holds the tensors safetensors decoded (no second copy); training
    writes them in place, so each load must get its own."""
    disk_model().save(tmp_path / "disk.gdl")
    first, second = gd.load(tmp_path / "disk.gdl"), gd.load_graph(tmp_path / "disk.gdl")
    first.parameters()["0.weight"].add_(1.0)
    assert torch.equal(second.params["0.weight"].data, disk_model().parameters()["0.weight"])
    assert torch.equal(gd.load(tmp_path / "disk.gdl").parameters()["0.weight"], disk_model().parameters()["0.weight"])


@pytest.mark.parametrize("saver", ["model", "graph", "text"])
def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path, saver):
    suffix = ".txt" if saver == "text" else ".gdl"
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / f"real{suffix}"
    hop = tmp_path / "store" / f"hop{suffix}"
    link = tmp_path / f"m{suffix}"
    os.symlink(f"real{suffix}", hop)  # relative links, one through another
    os.symlink(f"store/hop{suffix}", link)
    models = [disk_model(), disk_model()]
    models[1].parameters()["0.bias"].add_(1.0)
    for model in models:  # the first save goes through a dangling link, the second replaces the file
        if saver == "model":
            model.save(link)
        else:
            gd.save_graph(model.graph(), link)
        assert link.is_symlink() and hop.is_symlink() and target.is_file() and not target.is_symlink()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted([target.name, hop.name])  # no temp files
    if saver == "model":
        assert torch.equal(gd.load(link).parameters()["0.bias"], models[1].parameters()["0.bias"])
    elif saver == "graph":
        assert torch.equal(gd.load_graph(target).params["0.bias"].data, models[1].parameters()["0.bias"])
    else:
        assert target.read_text() == str(models[1].graph()) + "\n"


def test_saving_through_a_link_into_a_missing_folder_names_both(tmp_path):
    link = tmp_path / "m.gdl"
    os.symlink("gone/m.gdl", link)
    with pytest.raises(gd.GraphError, match=rf"cannot save to {link} \(a link to {tmp_path}/gone/m.gdl\): the folder "):
        disk_model().save(link)
    assert link.is_symlink()


# -- a tied tensor is saved once and comes back tied ------------------------------------------


def test_a_tied_tensor_is_stored_once_and_the_tie_comes_back(tmp_path):
    model, path = _tied(), tmp_path / "tied.gdl"
    model.save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert "2.weight" not in f.keys() and json.loads(f.metadata()["ties"]) == {"2.weight": "0.weight"}
    loaded = gd.load(path)
    assert loaded.ties() == {"2.weight": "0.weight"} and loaded.layers[2].weight is loaded.layers[0].weight
    X, Y = torch.rand(20, 4), torch.rand(20, 1)
    runs = [m.fit(X, Y, optimizer=gd.SGD(lr=0.1, momentum=0.9, weight_decay=0.1), epochs=2, batch_size=4, seed=0,
                  verbose=False) for m in (model, loaded)]  # two separate tensors trained 0.024 apart after an epoch
    assert runs[0] == runs[1]
    assert all(torch.equal(a, b) for a, b in zip(model.state().values(), loaded.state().values(), strict=True))


@pytest.mark.parametrize("ties, message", [
    ('{"2.weight": "9.weight"}', "names a place the layers do not have"),
    ('{"0.weight": "2.weight"}', "does not point to an earlier place"),
    ('{"4.weight": "0.weight"}', "joins tensors of different shapes or dtypes"),
    ('["2.weight"]', "must be a JSON object"),
    ('{"2.weight": 0}', "names a place the layers do not have"),
    ('{', "the layer list stored in the file is invalid"),
])
def test_ties_a_file_names_are_checked(tmp_path, ties, message):
    path = tmp_path / "tied.gdl"
    _tied().save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path.write_bytes(safetensors.torch.save(tensors, metadata={**meta, "ties": ties}))
    with pytest.raises(gd.GraphError, match=message):
        gd.load(path)


def test_a_file_without_its_ties_is_refused(tmp_path):
    path = tmp_path / "tied.gdl"
    _tied().save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["ties"]
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    with pytest.raises(gd.GraphError, match="the IR and its layer list disagree|does not declare"):
        gd.load(path)


# -- save writes only what load reads ----------------------------------------------------------


def _convert(model: gd.Sequential, dtype: torch.dtype) -> gd.Sequential:
    for _, layer, short, _, t in model.places():
        setattr(layer, short, t.to(dtype))
    return model


def _every_layer(dtype: torch.dtype = torch.float32) -> gd.Sequential:
    gen = torch.Generator().manual_seed(4)
    return gd.Sequential(gd.Standardize(dtype=dtype).adapt(torch.rand(9, 3, generator=gen) * 5),
                         gd.Linear(3, 5, generator=gen, dtype=dtype), gd.ReLU(),
                         gd.Linear(5, 5, generator=gen, dtype=dtype), gd.Tanh(),
                         gd.Linear(5, 4, generator=gen, dtype=dtype), gd.Sigmoid(), gd.Softmax())


# Every way a model comes to hold tensors of a dtype: built in it, converted by assigning
# (a float64 Standardize's config once said float32, and the file did not load), brought
# from torch, loaded, moved, tied.
PATHS = {
    "built": lambda dtype: _every_layer(dtype),
    "assigned": lambda dtype: _convert(_every_layer(), dtype),
    "from torch": lambda dtype: _from_torch(_convert(_every_layer(), dtype)),
    "moved": lambda dtype: _convert(_every_layer(), dtype).to("cpu"),
    "tied": lambda dtype: _tie(_convert(_every_layer(), dtype)),
}


def _from_torch(model: gd.Sequential) -> gd.Sequential:
    """The model with every layer torch has brought back from torch.nn (Standardize has no torch module)."""
    return gd.Sequential(model.layers[0], *gd.from_torch(gd.Sequential(*model.layers[1:]).to_torch()).layers)


def _tie(model: gd.Sequential) -> gd.Sequential:
    model.layers[3].bias = model.layers[1].bias
    return model


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_layer_round_trips_through_every_dtype_and_conversion(tmp_path, path, dtype):
    model = PATHS[path](dtype)
    model.save(tmp_path / "m.gdl")
    loaded = gd.load(tmp_path / "m.gdl")
    assert loaded.config() == model.config() and loaded.ties() == model.ties()
    assert all(torch.equal(a, b) and a.dtype == b.dtype == dtype
               for a, b in zip(model.state().values(), loaded.state().values(), strict=True))
    X = torch.rand(6, 3, dtype=dtype)
    assert torch.equal(loaded.predict(X), model.predict(X))
    loaded.save(tmp_path / "again.gdl")  # and what load gave saves again, the same
    files = [safetensors.safe_open(str(tmp_path / name), framework="pt") for name in ("m.gdl", "again.gdl")]
    assert files[0].metadata() == files[1].metadata() and list(files[0].keys()) == list(files[1].keys())
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())


def test_save_refuses_a_model_load_would_refuse_and_writes_nothing(tmp_path):
    class Square(gd.Layer):  # a layer of the user's own: no model file can name it
        def forward(self, build, x):
            return x * x

    path = tmp_path / "m.gdl"
    gd.Sequential(gd.Linear(2, 3)).save(path)
    before = path.read_bytes()
    with pytest.raises(gd.GraphError, match=r"save: .*m.gdl would not load back, so nothing was written: .*unknown "
                                            r"layer type 'Square'"):
        gd.Sequential(gd.Linear(2, 3), Square()).save(path)
    assert path.read_bytes() == before


# -- layers beyond two dims in model files ------------------------------------------------------------


def _beyond_2d(dtype: torch.dtype = torch.float32) -> gd.Sequential:
    gen = torch.Generator().manual_seed(6)
    return gd.Sequential(gd.Embedding(9, 4, gen, dtype), gd.Reshape((2, -1)), gd.GELU(approximate="tanh"),
                         gd.Flatten(), gd.Linear(12, 6, gen, dtype), gd.LeakyReLU(0.25), gd.Linear(6, 6, gen, dtype),
                         gd.SiLU(), gd.Reshape((3, 2)), gd.Softmax(dim=1), gd.GELU(),
                         gd.Flatten(start_dim=1, end_dim=-1), input_shape=(3,))


BEYOND_2D_PATHS = {
    "built": _beyond_2d,
    "assigned": lambda dtype: _convert(_beyond_2d(), dtype),
    "from torch": lambda dtype: gd.from_torch(_convert(_beyond_2d(), dtype).to_torch(), input_shape=(3,)),
    "tied": lambda dtype: _convert(_beyond_2d(), dtype),  # and 6.bias given 4.bias's tensor, below
}


@pytest.mark.parametrize("path", list(BEYOND_2D_PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_layers_beyond_2d_round_trip_through_model_files(tmp_path, path, dtype):
    model = BEYOND_2D_PATHS[path](dtype)
    if path == "tied":
        model.layers[6].bias = model.layers[4].bias
    model.save(tmp_path / "m.gdl")
    loaded = gd.load(tmp_path / "m.gdl")
    assert loaded.config() == model.config() and loaded.ties() == model.ties()
    assert loaded.input_shape == (3,) and loaded.graph().inputs["x"].dtype == torch.int64  # from the file's IR
    assert all(torch.equal(a, b) and a.dtype == b.dtype == dtype
               for a, b in zip(model.state().values(), loaded.state().values(), strict=True))
    X = torch.randint(0, 9, (5, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.predict(X), model.predict(X))
    assert str(loaded.graph()) == str(model.graph())


def test_a_layer_list_beyond_2d_is_checked_like_any(tmp_path):
    path = tmp_path / "m.gdl"
    _beyond_2d().save(path)
    config = json.loads(safetensors.safe_open(str(path), framework="pt").metadata()["layers"])
    assert config[1] == {"type": "Reshape", "shape": [2, -1]} and config[0]["num_embeddings"] == 9
    for layers, message in [
        ('[{"type": "Reshape", "shape": [[2], 3]}]', "plain numbers and strings \\(or lists of them"),
        ('[{"type": "Reshape", "shape": [2, 1e400]}]', "layer 0 \\(Reshape\\): bad settings"),
        ('[{"type": "Reshape", "shape": [2, 99999999999999999999999]}]', "layer 0 \\(Reshape\\): bad settings"),
        ('[{"type": "Flatten", "start_dim": true}]', "start_dim must be a whole number"),
        ('[{"type": "Embedding", "num_embeddings": 9, "embedding_dim": 0}]', "embedding_dim must be a whole number"),
        ('[{"type": "GELU", "approximate": "erf"}]', "approximate must be 'none' or 'tanh'"),
        ('[{"type": "LeakyReLU", "negative_slope": NaN}]', "negative_slope must be a finite number"),
        (json.dumps([{**config[0], "num_embeddings": 8}, *config[1:]]),
         r"weight '0.weight' is f32\[9,4\] but the layers build f32\[8,4\]"),
    ]:
        _rewrite_layers(path, layers)
        with pytest.raises(gd.GraphError, match=message):
            gd.load(path)


def test_the_input_shape_a_files_ir_declares_is_the_models(tmp_path):
    """The layers of an Embedding of sequences do not say the sequences' length: the IR does."""
    path = tmp_path / "m.gdl"
    gd.Sequential(gd.Embedding(9, 4), input_shape=(3,)).save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path.write_bytes(safetensors.torch.save(tensors, metadata={**meta, "ir": meta["ir"].replace("[N,3", "[N,5")}))
    assert gd.load(path).input_shape == (5,)
    path.write_bytes(safetensors.torch.save(tensors, metadata={**meta, "ir": meta["ir"].replace("[N,3", "[N,L")}))
    with pytest.raises(gd.GraphError, match=r"the layer list stored in the file is invalid \(input_shape\[0\] must "
                                            r"be a whole number >= 1, got 'L'\)"):
        gd.load(path)
