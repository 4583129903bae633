"""tools/render_graph.py (the graphdl-render console script), run as users run it.

Each subprocess pays for importing torch, so the subprocess runs cover what only a real
process shows (formats, exit status, stderr without a traceback) and the remaining
options run `render_main` in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphdl as gd
from graphdl.cli import render_main
from graphdl.viz import STYLES

ROOT = Path(__file__).resolve().parent.parent
MAGIC = {"svg": b"<?xml", "png": b"\x89PNG", "pdf": b"%PDF", "dot": b"digraph"}


def render_tool(*args: object, path_env: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path_env is not None:
        env["PATH"] = path_env
    return subprocess.run([sys.executable, str(ROOT / "tools" / "render_graph.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def assert_clean_failure(returncode: int, stderr: str, message: str) -> None:
    assert returncode != 0
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert re.search(message, stderr), stderr
    assert stderr.startswith("graphdl-render: error: ")


def tool_fails(result: subprocess.CompletedProcess, message: str) -> None:
    assert_clean_failure(result.returncode, result.stderr, message)


def main_fails(capsys: pytest.CaptureFixture, args: list[object], message: str) -> None:
    status = render_main([str(a) for a in args])
    assert_clean_failure(status, capsys.readouterr().err, message)


def without_tooltips(source: str) -> str:
    return re.sub(r' tooltip="(?:[^"\\]|\\.)*"', "", source)  # they name the file:line that built each node


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "disk.gdl"
    gen = torch.Generator().manual_seed(0)
    gd.Sequential(gd.Linear(2, 25, generator=gen), gd.ReLU(), gd.Linear(25, 1, generator=gen), gd.Sigmoid()).save(path)
    return path


@pytest.mark.slow
@pytest.mark.usefixtures("dot_program")
@pytest.mark.parametrize("fmt", ["svg", "png", "pdf"])
def test_renders_a_model_file_to_each_format(tmp_path, model_file, fmt):
    out = tmp_path / f"disk.{fmt}"
    result = render_tool(model_file, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(MAGIC[fmt])
    if fmt == "svg":
        text = out.read_text()
        assert "%0 matmul" in text and "0:Linear" in text and "3:Sigmoid" in text


@pytest.mark.slow
def test_dot_output_needs_no_graphviz(tmp_path, model_file):
    out = tmp_path / "disk.dot"
    result = render_tool(model_file, "-o", out, path_env=str(tmp_path))  # `dot` is not on this PATH
    assert result.returncode == 0, result.stderr
    source = out.read_text()
    assert source.startswith("digraph")
    assert without_tooltips(source) == without_tooltips(gd.to_dot(gd.load(model_file).graph()).source)


def test_grad_of_a_model_draws_forward_and_backward(tmp_path, model_file):
    out = tmp_path / "grad.dot"
    assert render_main([str(model_file), "-o", str(out), "--grad"]) == 0
    model = gd.load(model_file)
    expected = gd.grad(model.graph(loss=gd.MSE()), list(model.parameters()))
    source = out.read_text()
    assert without_tooltips(source) == without_tooltips(gd.to_dot(expected).source)
    assert STYLES["backward"]["fillcolor"] in source and STYLES["forward"]["fillcolor"] in source


def test_views_and_ir_text_input(tmp_path, model_file):
    ir = tmp_path / "disk.txt"
    gd.save_graph(gd.load(model_file).graph(loss=gd.MSE()), ir)
    out = tmp_path / "view.dot"
    assert render_main([str(ir), "-o", str(out), "--grad", "--hide-params", "--collapse-layers"]) == 0
    source = out.read_text()
    assert 'label="0:Linear [N,2]→[N,25]"' in source and "0:Linear (grad)" in source
    assert "cylinder" not in source  # no param boxes


@pytest.mark.slow
def test_missing_file_fails_in_one_line(tmp_path):
    tool_fails(render_tool(tmp_path / "nope.gdl", "-o", tmp_path / "x.svg"), "nope.gdl: no such file")


@pytest.mark.slow
def test_corrupt_file_fails_in_one_line(tmp_path, model_file, capsys):
    corrupt = tmp_path / "corrupt.gdl"
    corrupt.write_bytes(model_file.read_bytes()[:-10])
    tool_fails(render_tool(corrupt, "-o", tmp_path / "x.dot"), "truncated")
    corrupt.write_bytes(b"\x80\x04\x95 not a model")
    main_fails(capsys, [corrupt, "-o", tmp_path / "x.dot"], "pickle")
    corrupt.write_text(str(gd.load(model_file).graph()).replace("relu", "rleu"))
    main_fails(capsys, [corrupt, "-o", tmp_path / "x.dot"], r"line \d+: unknown op 'rleu'")


@pytest.mark.slow
def test_missing_dot_program_fails_in_one_line(tmp_path, model_file):
    out = tmp_path / "x.svg"
    result = render_tool(model_file, "-o", out, path_env=str(tmp_path))
    tool_fails(result, "needs the Graphviz 'dot' program.*apt-get install graphviz")
    assert not out.exists()


def test_bad_requests_fail_in_one_line(tmp_path, model_file, capsys):
    main_fails(capsys, [model_file, "-o", tmp_path / "x.jpg"], r"end the name in \.svg")
    main_fails(capsys, [model_file, "-o", tmp_path / "no" / "x.dot"], "cannot write")
    main_fails(capsys, [tmp_path / "nope", "-o", tmp_path / "m.dot"], "no such file")
    forward = tmp_path / "forward.txt"
    gd.save_graph(gd.load(model_file).graph(), forward)  # output [N,1]: no scalar loss to differentiate
    main_fails(capsys, [forward, "-o", tmp_path / "x.dot", "--grad"], "must be a scalar loss")


def test_installed_as_a_console_script():
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+, and graphdl supports 3.10
    assert re.search(r'\[project\.scripts\]\ngraphdl-render = "graphdl\.cli:render_main"\n', pyproject)


def test_grad_of_a_model_file_differentiates_its_trainable_params_under_its_loss(tmp_path, capsys):
    X = torch.rand(10, 2)
    model = gd.Sequential(gd.Standardize().adapt(X), gd.Linear(2, 3), gd.Softmax())
    model.loss = gd.CrossEntropy()
    model.save(tmp_path / "clf.gdl")
    assert render_main([str(tmp_path / "clf.gdl"), "-o", str(tmp_path / "g.dot"), "--grad"]) == 0
    source = (tmp_path / "g.dot").read_text()
    assert "d/d1.weight" in source and "d/d1.bias" in source and "cross_entropy" in source
    assert "d/d0.mean" not in source and "d/d0.std" not in source  # Standardize's statistics are not trained


def test_profile_times_a_model_files_training_step_and_colours_the_drawing(tmp_path, model_file, capsys):
    from graphdl.viz import HEAT
    out = tmp_path / "profile.dot"
    assert render_main([str(model_file), "-o", str(out), "--profile", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("profile of the training step of sequential (MSE, SGD lr=0.01) at batch 8\n")
    assert re.search(r"^  0:Linear +\d", printed, re.M) and "optimizer" in printed
    source = out.read_text()
    assert "a step, coloured by time" in source and HEAT[-1] in source
    assert "mse_backward" in source  # the training step's graph: forward, backward
    ir = tmp_path / "forward.txt"
    gd.save_graph(gd.load(model_file).graph(), ir)
    assert render_main([str(ir), "-o", str(out), "--profile"]) == 0
    assert "called on x: [32,2]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        render_main([str(model_file), "-o", str(out), "--profile", "--batch-size", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.endswith("graphdl-render: error: argument --batch-size: must be >= 1, got 0\n")


def test_profile_of_a_cnn_and_an_embedding_model_file_feeds_examples_of_their_shape(tmp_path, capsys):
    """--profile makes random inputs of one example's shape and dtype: images for a CNN,
    indices (zeros) for an Embedding; the drawing is of the step it timed."""
    torch.manual_seed(0)
    cnn = gd.Sequential(gd.Conv2d(1, 2, 3, padding=1), gd.BatchNorm2d(2), gd.ReLU(), gd.Dropout(0.2), gd.Flatten(),
                        gd.Linear(2 * 4 * 4, 3), input_shape=(1, 4, 4))
    words = gd.Sequential(gd.Embedding(10, 4), gd.Flatten(), gd.Linear(12, 1), input_shape=(3,))
    for name, model, op in (("cnn", cnn, "conv2d"), ("words", words, "index_select")):
        path, out = tmp_path / f"{name}.gdl", tmp_path / f"{name}.dot"
        model.save(path)
        assert render_main([str(path), "-o", str(out), "--profile", "--batch-size", "4"]) == 0
        assert capsys.readouterr().out.startswith("profile of the training step of sequential")
        assert op in out.read_text() and "a step, coloured by time" in out.read_text()
