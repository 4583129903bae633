"""graphdl.checkpoint: fit(checkpoint=...) and fit(resume=...) take the very steps of a
plain fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from helpers import _sine
from messages import names

import graphdl as gd


def test_checkpointing_and_resuming_take_the_very_steps_of_a_plain_fit(tmp_path):
    """fit runs one loop whatever it is asked: writing a checkpoint every epoch changes
    no bit of training, and a run resumed from epoch 2's checkpoint ends bit-exactly
    where the uninterrupted run does (weights, velocities, shuffling, schedule, History)."""
    X, Y = _sine()
    settings = dict(optimizer=gd.SGD(lr=0.05, momentum=0.9), schedule=gd.StepDecay(2, 0.5), batch_size=7,
                    seed=5, verbose=False, validation_data=(X[::3], Y[::3]), metrics=["mae"])

    def model() -> gd.Sequential:
        gen = torch.Generator().manual_seed(1)
        return gd.Sequential(gd.Linear(1, 8, generator=gen), gd.Tanh(), gd.Linear(8, 1, generator=gen))

    plain, checkpointed, resumed = model(), model(), model()
    h_plain = plain.fit(X, Y, epochs=4, **settings)
    path = tmp_path / "run.gdl"
    h_checkpointed = checkpointed.fit(X, Y, epochs=2, checkpoint=path, **settings)
    h_resumed = resumed.fit(X, Y, epochs=4, resume=path, **settings)
    assert h_checkpointed == {k: v[:2] for k, v in h_plain.items()}
    assert h_resumed == h_plain
    for a, b in zip(plain.state().values(), resumed.state().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("epoch, shown", [("-1", "got -1"), ("true", r"got True \(a bool\)"), ("2.0", "got 2.0"),
                                          ("9" * 5000, r"got 9999999999\.\.\. \(5000 digits\)")])
def test_a_checkpoints_epoch_count_is_read_by_the_checked_reader(tmp_path, epoch, shown):
    """The epoch count in a checkpoint's JSON is a number from a file: read_int reads it,
    so a crafted 5,000-digit one is refused by name instead of crashing int()."""
    from graphdl import io
    from graphdl.checkpoint import read_checkpoint
    X, Y = _sine()
    model = gd.Sequential(gd.Linear(1, 2), gd.Linear(2, 1))
    path, crafted = tmp_path / "run.gdl", tmp_path / "crafted.gdl"
    model.fit(X, Y, epochs=1, checkpoint=path, verbose=False)
    saved, info, state = io.load_model(path, gd.Sequential)
    io.save_model(saved, crafted, state, info.replace('"epoch": 1', f'"epoch": {epoch}'))
    with pytest.raises(gd.GraphError, match=f"crafted.gdl: the checkpoint's epoch count must be a whole number "
                                            f"from 0 to .*, {shown}; it is corrupt"):
        read_checkpoint(crafted, model, gd.SGD(), ["loss", "val_loss", "lr"], False)


OPTIMIZERS = {
    "SGD": lambda: gd.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "Adam": lambda: gd.Adam(lr=0.01, amsgrad=True, weight_decay=0.01),
    "AdamW": lambda: gd.AdamW(lr=0.01, groups=[{"params": ["0.bias"], "weight_decay": 0.0}]),
    "RMSprop": lambda: gd.RMSprop(lr=0.005, momentum=0.5, centered=True),
    "Adagrad": lambda: gd.Adagrad(lr=0.05, lr_decay=0.1, initial_accumulator_value=0.1),
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.linspace(-3, 3, 40).unsqueeze(1)
    return X, torch.sin(X)


def _model(tied: bool = False) -> gd.Sequential:
    gen = torch.Generator().manual_seed(1)
    model = gd.Sequential(gd.Linear(1, 8, generator=gen), gd.Tanh(), gd.Linear(8, 8, generator=gen), gd.Tanh(),
                          gd.Linear(8, 8, generator=gen), gd.Tanh(), gd.Linear(8, 1, generator=gen))
    if tied:
        model.layers[4].weight = model.layers[2].weight
    return model


SETTINGS = dict(schedule=gd.StepDecay(2, 0.5), batch_size=7, seed=5, verbose=False)


@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_resuming_takes_the_very_steps_of_an_uninterrupted_fit(tmp_path, kind, tied):
    """Moments, step counts, AMSGrad's maxima, velocities: a run resumed from epoch 2's
    checkpoint ends bit-exactly where the uninterrupted run does (a tied tensor has one state)."""
    X, Y = _data()
    plain, checkpointed, resumed = _model(tied), _model(tied), _model(tied)
    h_plain = plain.fit(X, Y, epochs=4, optimizer=OPTIMIZERS[kind](), **SETTINGS)
    path = tmp_path / "run.gdl"
    opt = OPTIMIZERS[kind]()
    checkpointed.fit(X, Y, epochs=2, optimizer=opt, checkpoint=path, **SETTINGS)
    h_resumed = resumed.fit(X, Y, epochs=4, optimizer=OPTIMIZERS[kind](), resume=path, **SETTINGS)
    assert h_resumed == h_plain
    for a, b in zip(plain.state().values(), resumed.state().values(), strict=True):
        assert torch.equal(a, b)
    stored = _state(path)
    assert set(stored) == set(opt.state_dict())
    assert len({n.split("/", 1)[1] for n in stored}) == len(plain.parameters()) == (7 if tied else 8)
    record = _info(path)["optimizer"]
    assert record == json.loads(json.dumps(opt.config())) and record["class"] == kind


def _info(path: Path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("state/"): v for k, v in safetensors.torch.load_file(str(path)).items()
            if k.startswith("state/")}


def _rewrite(path: Path, change_tensors=None, change_info=None) -> None:
    """Edit a checkpoint's state tensors or its fit state (JSON), keeping the rest."""
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
    if change_tensors is not None:
        change_tensors(tensors)
    if change_info is not None:
        info = json.loads(metadata["state"])
        change_info(info)
        metadata["state"] = json.dumps(info)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def adam_checkpoint(tmp_path) -> Path:
    X, Y = _data()
    path = tmp_path / "adam.gdl"
    _model().fit(X, Y, epochs=2, optimizer=gd.Adam(lr=0.01, amsgrad=True), checkpoint=path, **SETTINGS)
    return path


def _resume(path: Path, optimizer: gd.Optimizer, model: gd.Sequential | None = None) -> None:
    X, Y = _data()
    (model or _model()).fit(X, Y, epochs=3, optimizer=optimizer, resume=path, **SETTINGS)


def test_another_optimizer_class_or_other_kinds_of_state_are_refused(adam_checkpoint):
    model = _model()
    before = {k: v.clone() for k, v in model.state().items()}
    with pytest.raises(ValueError) as err:
        _resume(adam_checkpoint, gd.SGD(lr=0.1, momentum=0.9), model)
    names(str(err.value), r"was written by a fit with gd.Adam\(lr=0.01, betas=\[0.9, 0.999\]", "amsgrad=True",
          r"this fit's optimizer is SGD\(lr=0.1", "resume with gd.Adam")
    assert not isinstance(err.value, gd.GraphError)
    with pytest.raises(ValueError, match="was written by a fit with gd.Adam"):
        _resume(adam_checkpoint, gd.AdamW(), model)  # a subclass is another optimizer too
    with pytest.raises(ValueError) as err:
        _resume(adam_checkpoint, gd.Adam(lr=0.01), model)
    names(str(err.value), "the state holds exp_avg, exp_avg_sq, max_exp_avg_sq, step but", r"Adam\(.*amsgrad=False",
          "keeps exp_avg, exp_avg_sq, step", "resume with the optimizer settings that wrote it")
    assert all(torch.equal(v, before[k]) for k, v in model.state().items())  # nothing was taken
    _resume(adam_checkpoint, gd.Adam(lr=0.001, betas=(0.8, 0.99), amsgrad=True))  # other rates: fine


@pytest.mark.parametrize("change, pattern", [
    (lambda t: t.__setitem__("state/exp_avg/0.weight", torch.zeros(2, 8)), r"exp_avg/0.weight is f32\[2,8\], not "
                                                                           r"f32\[1,8\]; it is corrupt"),
    (lambda t: t.__setitem__("state/exp_avg_sq/2.bias", torch.zeros(8, dtype=torch.float64)), r"is f64\[8\], not "
                                                                                              r"f32\[8\]"),
    (lambda t: t["state/exp_avg/2.weight"].__setitem__((0, 0), float("nan")), "exp_avg/2.weight is not finite"),
    (lambda t: t["state/max_exp_avg_sq/4.weight"].__setitem__((1, 1), -1.0), "max_exp_avg_sq/4.weight has negative "
                                                                             "values, but it holds squares"),
    (lambda t: t.__setitem__("state/step/0.bias", torch.tensor(2.5)), r"step/0.bias is 2.5, not a whole number of "
                                                                      r"steps from 0 to 9007199254740992"),
    (lambda t: t.__setitem__("state/step/0.bias", torch.tensor(-1.0)), "step/0.bias is -1.0, not a whole number"),
    (lambda t: t.__setitem__("state/step/0.bias", torch.tensor(2.0**60)), "step/0.bias is 1.15.*e\\+18, not a whole"),
    (lambda t: t.__setitem__("state/step/0.bias", torch.tensor([12.0])), r"step/0.bias is f32\[1\], not f32\[\]"),
    (lambda t: t.__setitem__("state/step/0.bias", torch.tensor(12, dtype=torch.int64)), "'state/step/0.bias' has "
                                                                                        "dtype 'I64'"),
])
def test_every_number_read_back_is_checked_before_use(adam_checkpoint, change, pattern):
    _rewrite(adam_checkpoint, change_tensors=change)
    model = _model()
    before = {k: v.clone() for k, v in model.state().items()}
    with pytest.raises(gd.GraphError, match=pattern):
        _resume(adam_checkpoint, gd.Adam(lr=0.01, amsgrad=True), model)
    assert all(torch.equal(v, before[k]) for k, v in model.state().items())


def test_a_missing_tensor_or_a_malformed_record_is_refused(adam_checkpoint, tmp_path):
    _rewrite(adam_checkpoint, change_tensors=lambda t: t.pop("state/exp_avg/0.weight"))
    with pytest.raises(ValueError, match="the state is for params"):
        _resume(adam_checkpoint, gd.Adam(lr=0.01, amsgrad=True))
    X, Y = _data()
    for record in (None, "Adam", {"settings": {}}, {"class": 3}):
        path = tmp_path / "record.gdl"
        _model().fit(X, Y, epochs=1, optimizer=gd.Adam(), checkpoint=path, **SETTINGS)
        _rewrite(path, change_info=lambda info, r=record: info.update(optimizer=r) if r is not None
                 else info.pop("optimizer"))
        with pytest.raises(gd.GraphError, match="the checkpoint's record of its optimizer is malformed; it is corrupt"):
            _resume(path, gd.Adam())


def test_a_version_1_checkpoint_of_sgd_still_resumes(tmp_path):
    """v1 checkpoints (before other optimizers) hold SGD's velocities and no optimizer record."""
    X, Y = _data()
    path = tmp_path / "v1.gdl"
    settings = dict(SETTINGS, optimizer=gd.SGD(lr=0.05, momentum=0.9))
    plain, old = _model(), _model()
    h_plain = plain.fit(X, Y, epochs=3, **settings)
    _model().fit(X, Y, epochs=2, checkpoint=path, **settings)
    _rewrite(path, change_info=lambda info: (info.update(format="graphdl.fit.v1"), info.pop("optimizer")))
    assert h_plain == old.fit(X, Y, epochs=3, resume=path, **settings)
    with pytest.raises(ValueError, match="was written by a fit with gd.SGD"):
        old.fit(X, Y, epochs=3, resume=path, **dict(settings, optimizer=gd.Adam()))


def _nan_weight(tensors):
    tensors["0.bias"] = torch.full_like(tensors["0.bias"], float("nan"))


@pytest.mark.parametrize("change_tensors, change_info, message", [
    (_nan_weight, None, r"the checkpoint's 0.bias holds NaN or inf, which fit never writes"),
    (None, lambda info: info["history"].update(loss=[], lr=[]), r"History\['loss'\] is not 2 finite numbers"),
    (None, lambda info: info.update(epoch=10**18), r"History\['loss'\] is not 1000000000000000000 finite"),
    (None, lambda info: info["history"].update(lr=[-0.1, 0.01]), r"History\['lr'\] holds a negative rate"),
])
def test_a_checkpoint_that_disagrees_with_itself_is_refused(adam_checkpoint, change_tensors, change_info, message):
    """From the review: NaN weights resumed into a run whose divergence was blamed on the
    rate; an epoch count with empty loss lists, or a negative rate, was taken as is."""
    _rewrite(adam_checkpoint, change_tensors, change_info)
    model = _model()
    before = {k: v.clone() for k, v in model.state().items()}
    with pytest.raises(gd.GraphError, match=message):
        _resume(adam_checkpoint, gd.Adam(lr=0.01, amsgrad=True), model)
    assert all(torch.equal(t, before[k]) for k, t in model.state().items())


def test_a_model_of_indices_resumes_exactly(tmp_path):
    """An Embedding of sequences (i64 inputs, input_shape from the file's IR) checkpoints and resumes."""
    def model() -> gd.Sequential:
        return gd.Sequential(gd.Embedding(10, 4, torch.Generator().manual_seed(1)), gd.Flatten(), gd.GELU(),
                             gd.Linear(8, 2, torch.Generator().manual_seed(2)), input_shape=(2,))

    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 10, (20, 2), generator=gen), torch.randint(0, 2, (20,), generator=gen)
    def settings() -> dict:
        return {"loss": gd.CrossEntropy(), "optimizer": gd.SGD(lr=0.5, momentum=0.9), "seed": 1, "verbose": False}

    whole = model()
    whole.fit(X, Y, epochs=4, **settings())
    model().fit(X, Y, epochs=2, checkpoint=tmp_path / "c.gdl", **settings())
    resumed = gd.load(tmp_path / "c.gdl")
    resumed.fit(X, Y, epochs=4, resume=tmp_path / "c.gdl", **settings())
    assert resumed.history["loss"] == whole.history["loss"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state().values(), whole.state().values(), strict=True))


def test_a_net_with_dropout_and_batchnorm_resumes_exactly(tmp_path):
    """Dropout's key and BatchNorm's running statistics are model state: the checkpoint
    holds them, so the resumed run draws the very masks the plain run draws and ends
    bit-exactly where it does."""
    gen = torch.Generator().manual_seed(2)
    X, labels = torch.randn(40, 16, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    settings = dict(loss=gd.CrossEntropy(), optimizer=gd.SGD(lr=0.1, momentum=0.9), batch_size=8, seed=5,
                    verbose=False)

    def model() -> gd.Sequential:
        gen = torch.Generator().manual_seed(1)
        return gd.Sequential(gd.Reshape((1, 4, 4)), gd.Conv2d(1, 3, 3, padding=1, generator=gen), gd.BatchNorm2d(3),
                             gd.ReLU(), gd.Dropout(0.5, generator=gen), gd.Flatten(), gd.Linear(48, 3, generator=gen))

    plain, checkpointed, resumed = model(), model(), model()
    h_plain = plain.fit(X, labels, epochs=4, **settings)
    path = tmp_path / "run.gdl"
    checkpointed.fit(X, labels, epochs=2, checkpoint=path, **settings)
    assert float(gd.load(path).state()["4.key"]) == 10.0  # 2 epochs of 5 steps
    h_resumed = resumed.fit(X, labels, epochs=4, resume=path, **settings)
    assert h_resumed == h_plain
    assert set(plain.state()) >= {"2.running_mean", "2.running_var", "4.key"}
    for a, b in zip(plain.state().values(), resumed.state().values(), strict=True):
        assert torch.equal(a, b)


def test_a_dropout_with_another_seed_is_refused_on_resume(tmp_path):
    """From the review: a model built again without a seed draws a new one, and resuming
    it silently trained on with other masks than the checkpointed run."""
    X, Y = _sine()
    def net(seed):
        return gd.Sequential(gd.Linear(1, 8, generator=torch.Generator().manual_seed(0)), gd.ReLU(),
                             gd.Dropout(0.3, seed=seed), gd.Linear(8, 1, generator=torch.Generator().manual_seed(1)))
    settings = {"batch_size": 8, "seed": 1, "verbose": False}
    net(5).fit(X, Y, epochs=2, checkpoint=tmp_path / "run.gdl", **settings)
    with pytest.raises(ValueError, match=r"layer 2 \(Dropout\) has seed=5, but this model's has seed=6; resume "
                                         r"with the model that wrote it; build it as Dropout\(\.\.\., seed=5\)"):
        net(6).fit(X, Y, epochs=3, resume=tmp_path / "run.gdl", **settings)
    straight = net(5).fit(X, Y, epochs=3, **settings)
    assert net(5).fit(X, Y, epochs=3, resume=tmp_path / "run.gdl", **settings) == straight
