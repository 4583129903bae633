"""graphdl.checkpoint: fit(checkpoint=...) and fit(resume=...) take the very steps of a
plain fit."""

from __future__ import annotations

import pytest
import torch
from helpers import _sine

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
