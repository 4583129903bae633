"""examples/: their flags, what they write, and that a saved model reproduces what the run
printed; the README's tour and the python examples in docs/, run block by block as shown,
and the README's "When things go wrong" messages, exactly as printed."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphdl as gd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import digits_cnn  # noqa: E402
import disk_graph  # noqa: E402
import spirals  # noqa: E402


@pytest.mark.parametrize("main", [disk_graph.main, spirals.main, digits_cnn.main],
                         ids=["disk_graph", "spirals", "digits_cnn"])
@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--epochs", "2.5"], "argument --epochs: expected a whole number, got '2.5'"),
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--momentum", "1"], r"argument --momentum: must be >= 0 and < 1, got 1"),
    (["--seed", "-3"], "argument --seed: must be >= 0, got -3"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line_and_exit_status_2(main, flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(rf"(disk_graph|spirals|digits_cnn)\.py: error: {message} \(see --help\)\n", err), err


@pytest.mark.slow
def test_disk_flags_that_conflict_and_the_real_exit_status(capsys):
    with pytest.raises(SystemExit):
        disk_graph.main(["--seeds", "0"])
    assert "argument --seeds: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        disk_graph.main(["--seeds", "2", "--save", "m.gdl"])
    assert "--save keeps one trained model; drop --seeds" in capsys.readouterr().err
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "disk_graph.py"), "--batch-size", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr == "disk_graph.py: error: argument --batch-size: must be >= 1, got 0 (see --help)\n"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit:
        disk_graph.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0
    for default in ("(default: 50)", "(default: 20)", "(default: 0.1)", "(default: 0.9)", "(default: out)"):
        assert default in out


def test_the_saved_disk_model_reproduces_the_printed_test_error_on_raw_points(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert disk_graph.main(["--epochs", "3", "--seed", "2", "--no-plots"]) == 0
    assert list(tmp_path.iterdir()) == []  # no --save: no model file, no figures
    path = tmp_path / "models" / "disk.gdl"
    assert disk_graph.main(["--epochs", "3", "--seed", "2", "--no-plots", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}: the trained model" in out
    printed = re.search(r"^test error: (\d+\.\d\d)%$", out, re.M)[1]
    gen = torch.Generator().manual_seed(2)  # the example's data for seed 2: train, then test
    disk_graph.disk_data(1000, gen)
    X_raw, Y = disk_graph.disk_data(1000, gen)
    model = gd.load(path)
    assert isinstance(model.layers[0], gd.Standardize)
    assert f"{model.evaluate(X_raw, Y)['error'] * 100:.2f}" == printed
    assert float(printed) < 30  # trained: far from the 50 % of a model that lost its preprocessing


@pytest.mark.slow
def test_digits_cnn_trains_both_nets_draws_and_saves_a_model_that_reproduces_its_accuracy(tmp_path, capsys):
    """A quick run (2 epochs): it prints both test accuracies, writes the figure, and the
    saved CNN (BatchNorm's running statistics and Dropout's key with it) scores what was printed."""
    pytest.importorskip("sklearn", reason="examples/digits_cnn.py reads scikit-learn's digits (the examples extra)")
    path = tmp_path / "digits.gdl"
    assert digits_cnn.main(["--epochs", "2", "--save", str(path), "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "figs" / "digits_cnn.png").read_bytes().startswith(b"\x89PNG")
    printed = {net: float(acc) for net, acc in re.findall(r"^(CNN|MLP): test accuracy (\d+\.\d\d)%", out, re.M)}
    assert set(printed) == {"CNN", "MLP"} and printed["CNN"] > 80, out
    model = gd.load(path)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Reshape", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout", "Flatten", "Linear"]
    _, _, Xt, yt = digits_cnn.digits(0)
    assert f"{model.evaluate(Xt, yt)['accuracy'] * 100:.2f}" == f"{printed['CNN']:.2f}"


@pytest.mark.slow
def test_spirals_trains_a_classifier_and_saves_it_with_softmax(tmp_path, capsys):
    path = tmp_path / "spirals.gdl"
    assert spirals.main(["--epochs", "3", "--save", str(path), "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    for written in re.findall(r"^wrote (\S+):", out, re.M):
        assert Path(written).is_file()
    assert (tmp_path / "figs" / "spirals.png").read_bytes().startswith(b"\x89PNG")
    printed = float(re.search(r"^test: cross-entropy \S+, accuracy (\d+\.\d\d)%$", out, re.M)[1])
    model = gd.load(path)
    assert isinstance(model.layers[-1], gd.Softmax)
    gen = torch.Generator().manual_seed(0)
    spirals.spiral_data(1500, gen)
    X, labels = spirals.spiral_data(1500, gen)
    probabilities = model.predict(X)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(X)))
    assert f"{model.evaluate(X, labels)['accuracy'] * 100:.2f}" == f"{printed:.2f}"


# -- the README's tour and the docs' examples run as shown ------------------------------------------


def _blocks(doc: str) -> list[tuple[str, str | None]]:
    """A document's python blocks, each with the plain block printed right after it, if any."""
    return re.findall(r"```python\n(.*?)```\n(?:\n```\n(.*?)```\n)?", doc, re.S)


def _tour() -> list[tuple[str, str | None]]:
    """The README's python blocks up to "When things go wrong" (whose blocks raise, and
    test_docs_show_the_messages_exactly_as_printed runs)."""
    return _blocks((ROOT / "README.md").read_text().split("## When things go wrong")[0])


def _run_as_shown(blocks: list[tuple[str, str | None]], name: str, capsys) -> dict:
    """Run the blocks in order in one namespace, as a reader pasting them would, checking
    that each prints exactly the block shown after it; returns the namespace."""
    namespace: dict = {"__name__": "__main__"}
    for code, shown in blocks:
        exec(compile(code, name, "exec"), namespace)  # noqa: S102
        printed = capsys.readouterr().out
        if shown:
            assert printed == shown
    return namespace


def test_the_readme_tour_runs_and_prints_what_it_shows(tmp_path, monkeypatch, capsys):
    blocks = _tour()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # whatever the tour writes lands here, not in the repository
    namespace = _run_as_shown(blocks, "README.md", capsys)
    # The gradient graph's return line the tour quotes in its prose.
    returned = str(gd.grad(namespace["g"], wrt=["w", "b"])).splitlines()[-2].strip()
    assert f"`{returned}`" in " ".join((ROOT / "README.md").read_text().split())


# The docs pages whose python blocks run as shown, with how many blocks each has at least
# (and how many of them show what they print), so that a block moved or lost fails here.
DOC_PAGES = {"docs/contract.md": (6, 0), "docs/files.md": (1, 1), "docs/distributed.md": (1, 0),
             "docs/diagnostics.md": (6, 0), "docs/functional.md": (3, 2)}


@pytest.mark.parametrize("page", sorted(DOC_PAGES))
def test_the_docs_examples_run_and_print_what_they_show(page, tmp_path, monkeypatch, capsys):
    blocks = _blocks((ROOT / page).read_text())
    least, shown = DOC_PAGES[page]
    assert len(blocks) >= least and sum(bool(out) for _, out in blocks) >= shown
    monkeypatch.chdir(tmp_path)  # files the examples write (m.onnx) land here
    _run_as_shown(blocks, page, capsys)


# -- the README's "When things go wrong" shows real messages --------------------------------------------------------


def _doc_examples() -> list[tuple[str, str, str]]:
    """(file name, code, printed message) for each example: the code is the whole block as
    shown, its `# name.py` first line included, so the line numbers in a message are what
    a reader who copies the block into that file gets."""
    doc = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    found = re.findall(r"```python\n(# (\S+)\n.*?)```\n\n```text\n(.*?)\n```", doc, re.S)
    assert len(found) >= 3
    return [(name, code, printed) for code, name, printed in found]


@pytest.mark.parametrize("name, code, printed", _doc_examples(), ids=lambda v: v if v.endswith(".py") else "")
def test_docs_show_the_messages_exactly_as_printed(name, code, printed):
    with pytest.raises(Exception) as err:  # noqa: B017 - any exception: its printed form is what is compared
        exec(compile(code, name, "exec"), {"__name__": "__main__"})  # noqa: S102
    e = err.value
    assert f"{type(e).__module__}.{type(e).__qualname__}: {e}" == printed
