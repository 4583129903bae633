"""Numbers read from outside: IR text, a model file's safetensors header, its layer list.

Each crafted number goes through every way a user reads it (gd.parse, gd.load,
gd.load_graph, the render tool) and must come back as a GraphError naming the file or
line and the field, or as one clean line from the tool: never an OverflowError, a torch
RuntimeError, a TypeError or Python's int() digit-limit ValueError.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import graphdl as gd
from graphdl.checks import INT64_MAX, NumberText, read_float, read_int, read_shape, whole_number
from graphdl.cli import render_main

BIG = "9" * 5000
TWO_64 = str(2**64)


def _model() -> gd.Sequential:
    gen = torch.Generator().manual_seed(0)
    return gd.Sequential(gd.Linear(2, 3, generator=gen), gd.Tanh(), gd.Linear(3, 1, generator=gen))


IR = str(_model().graph())
RETURN_LINE = IR.splitlines().index("  return %4") + 1


def _with_input(decl: str) -> str:
    return IR.replace("x: f32[N,2]", f"x: f32[N,2], {decl}", 1)


def _with_param(decl: str) -> str:
    return IR.replace("2.bias: f32[1]", f"2.bias: f32[1], {decl}", 1)


def _with_node(node: str) -> str:
    return IR.replace("  return %4", f"  %9: {node}\n  return %4", 1)


# name: (the IR text, what the error must say)
IR_CASES: dict[str, tuple[str, str]] = {
    "400-digit constant": (_with_node(f"f32[] = const[value={'9' * 400}]"),
                           rf"line {RETURN_LINE}: attribute 'value' holds a number of 400 digits"),
    "constant 1e400": (_with_node("f32[] = const[value=1e400]"),
                       rf"line {RETURN_LINE}: .*attribute value: 1e400 is too large for a float; write inf"),
    "constant beyond f16": (_with_node("f16[] = const[value=1e300, dtype='f16']"),
                            rf"line {RETURN_LINE}: const %\d+\(\): value 1e\+300 does not fit f16"),
    "5000-digit axis": (_with_node(f"f32[] = sum[axis={BIG}] %4"),
                        rf"line {RETURN_LINE}: attribute 'axis' holds a number of 5,000 digits"),
    "dims overflow int64": (_with_input("z: f32[4294967296,4294967296]"),
                            r"line 1: z: f32\[4294967296,4294967296\] holds 18446744073709551616 elements"),
    "param dims overflow int64": (_with_param("q: f32[4294967296,4294967296]"),
                                  r"line 1: q: f32\[4294967296,4294967296\] holds 18446744073709551616 elements"),
    "dim beyond int64": (_with_input(f"z: f32[N,{TWO_64}]"),
                         rf"line 1: z: dimension 1 must be a whole number from 0 to 2\*\*63 - 1, got {TWO_64}"),
    "param dim beyond int64": (_with_param(f"q: f32[{TWO_64}]"),
                               rf"line 1: q: dimension 0 must be a whole number .*, got {TWO_64}"),
    "5000-digit dim": (_with_input(f"z: f32[{BIG}]"),
                       r"line 1: z: dimension 0 must be a whole number .*, got 9999999999\.\.\. \(5000 digits\)"),
    "negative dim": (_with_input("z: f32[N,-3]"), r"line 1: z: dimension 1 must be a whole number from 0 .*, got -3"),
    "unicode digit dim": (_with_input("z: f32[\u0663]"), "line 1: dimension '\u0663' must be a whole number"),
    "leading plus": (_with_input("z: f32[+3]"), r"line 1: dimension '\+3' must be a whole number"),
    "float dim": (_with_input("z: f32[2.0]"), r"line 1: dimension '2.0' must be a whole number"),
    "exponent dim": (_with_input("z: f32[1e3]"), r"line 1: dimension '1e3' must be a whole number"),
}


def _header(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def _container(header_json: str, body: bytes) -> bytes:
    raw = header_json.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _edited(edit: Callable[[dict], None], raw: Callable[[str], str] = lambda s: s) -> Callable[[bytes], bytes]:
    """A model file with its header edited as JSON (`edit`) and then as text (`raw`,
    for what JSON cannot hold: 1e400, NaN, 5,000 digits)."""
    def make(good: bytes) -> bytes:
        header, body = _header(good)
        edit(header)
        return _container(raw(json.dumps(header)), body)
    return make


def _set(name: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda header: header[name].__setitem__(key, value)


def _layers(text: str) -> Callable[[bytes], bytes]:
    return _edited(lambda header: header["__metadata__"].__setitem__("layers", text))


def _linear(in_features: str, out_features: str) -> str:
    return f'[{{"type": "Linear", "in_features": {in_features}, "out_features": {out_features}}}]'


MARK = 987654321  # a number to put in the JSON, then replace by text JSON cannot write


def _offset(text: str) -> Callable[[bytes], bytes]:
    def edit(header: dict) -> None:
        header["2.weight"]["data_offsets"][1] = MARK
    return _edited(edit, lambda s: s.replace(str(MARK), text))


def _dim(text: str) -> Callable[[bytes], bytes]:
    return _edited(_set("2.weight", "shape", [MARK, 1]), lambda s: s.replace(str(MARK), text))


# name: (how to craft the file from a good model file, what the error must say)
FILE_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "data_offsets 1e400": (_offset("1e400"), r"weight '2.weight' data_offsets\[1\] must be a whole number .*got 1e400"),
    "data_offsets 10**400": (_offset("1" + "0" * 400), r"data_offsets\[1\] .*got 1000000000\.\.\. \(401 digits\)"),
    "data_offsets NaN": (_offset("NaN"), r"data_offsets\[1\] must be a whole number .*got NaN"),
    "data_offsets -Infinity": (_offset("-Infinity"), r"data_offsets\[1\] must be a whole number .*got -Infinity"),
    "data_offsets float": (_offset("52.0"), r"data_offsets\[1\] must be a whole number .*got 52.0"),
    "data_offsets negative": (_offset("-1"), r"data_offsets\[1\] must be a whole number from 40 .*got -1"),
    "data_offsets bool": (_offset("true"), r"data_offsets\[1\] must be a whole number .*got True \(a bool\)"),
    "data_offsets past the end": (_offset("4000"), r"truncated: weight '2.weight' ends at byte 4000"),
    "data_offsets span": (_offset("48"), r"weight '2.weight' spans 8 bytes, but its shape \[3, 1\] of F32 needs 12"),
    "data_offsets nested": (_offset("[52]"), r"data_offsets\[1\] must be a whole number .*got \[52\] \(a list\)"),
    "shape overflows int64": (_edited(_set("2.weight", "shape", [2**62, 2**62])),
                              r"weight '2.weight' shape: f32\[4611686018427387904,4611686018427387904\] holds"),
    "shape beyond int64": (_dim(TWO_64), rf"weight '2.weight' shape: dimension 0 must be .*got {TWO_64}"),
    "shape 5000 digits": (_dim(BIG), r"shape: dimension 0 must be .*got 9999999999\.\.\. \(5000 digits\)"),
    "shape negative": (_dim("-3"), r"shape: dimension 0 must be a whole number from 0 .*got -3"),
    "shape float": (_dim("3.0"), r"shape: dimension 0 must be a whole number .*got 3.0"),
    "shape 1e400": (_dim("1e400"), r"shape: dimension 0 must be a whole number .*got 1e400"),
    "shape as text": (_edited(_set("2.weight", "shape", ["3", 1])), r"dimension 0 .*got '3' \(a str\)"),
    "shape symbol": (_edited(_set("2.weight", "shape", ["N", 1])), r"dimension 0 .*got 'N' \(a str\)"),
    "dtype int": (_edited(_set("2.weight", "dtype", "I64")), r"weight '2.weight' has dtype 'I64'; graphdl weights"),
    "dtype number": (_edited(_set("2.weight", "dtype", 5)), r"weight '2.weight' has dtype 5; graphdl weights"),
    "entry with extra field": (_edited(_set("2.weight", "extra", 1)), r"'2.weight' must hold exactly dtype, shape"),
    "overlapping weights": (_edited(lambda h: h["2.bias"].__setitem__("data_offsets", [40, 44]) or
                                    h["2.weight"].__setitem__("data_offsets", [36, 48])), r"overlap or leave a gap"),
    "metadata number": (_edited(lambda h: h["__metadata__"].__setitem__("extra", 5)), r"metadata 'extra' is 5"),
    "widths of 2**62": (_layers(_linear(str(2**62), str(2**62))),
                        r"layer 0 \(Linear\): .*Linear's weight: f32\[4611686018427387904,4611686018427387904\] holds"),
    "width of 2**62": (_layers(_linear("2", str(2**62))), r"Linear's weight: f32\[2,4611686018427387904\] holds"),
    "width beyond int64": (_layers(_linear("2", TWO_64)),
                           rf"layer 0 \(Linear\): .*out_features={TWO_64} is too large; out_features must be at "
                           rf"most {INT64_MAX}"),
    "width of 5000 digits": (_layers(_linear("2", BIG)), r"out_features must be a whole number .*got '999999999"),
    "width 1e400": (_layers(_linear("2", "1e400")), r"out_features must be a whole number .*got '1e400'"),
    "width NaN": (_layers(_linear("NaN", "3")), r"in_features must be a whole number .*got 'NaN'"),
    "width float": (_layers(_linear("2", "3.0")), r"out_features must be a whole number .*got 3.0"),
    "width bool": (_layers(_linear("true", "3")), r"in_features must be a whole number .*got True"),
    "width text": (_layers(_linear("2", '"3"')), r"out_features must be a whole number .*got '3'"),
    "width zero": (_layers(_linear("2", "0")), r"out_features must be a whole number >= 1, got 0"),
}
MODEL_ONLY = {name for name in FILE_CASES if "width" in name}  # gd.load_graph reads no layer list


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "m.gdl"
    _model().save(path)
    data = path.read_bytes()
    assert _header(data)[0]["2.weight"]["data_offsets"] == [40, 52]  # the cases above edit this entry
    return data


def _tool_fails(capsys: pytest.CaptureFixture, path: Path, tmp_path: Path, message: str, *options: str) -> None:
    status = render_main([str(path), "-o", str(tmp_path / "out.dot"), *options])
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("graphdl-render: error: ") and str(path) in err, err
    assert re.search(message, err), err


def _fails(call: Callable[[], object], *patterns: str) -> str:
    with pytest.raises(gd.GraphError) as info:
        call()
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("case", list(IR_CASES))
def test_crafted_numbers_in_ir_text(case, tmp_path, capsys, good_file):
    text, message = IR_CASES[case]
    _fails(lambda: gd.parse(text), "^IR text, " + message)
    with torch.device("meta"):  # as io.py parses: no allocation, still checked
        _fails(lambda: gd.parse(text), "^IR text, " + message)
    # the same text as an IR text file, and as the IR stored in a model file
    txt = tmp_path / "g.txt"
    txt.write_text(text)
    _fails(lambda: gd.load_graph(txt), f"^{txt}: IR text, {message}")
    _tool_fails(capsys, txt, tmp_path, message)
    model = tmp_path / "m.gdl"
    model.write_bytes(_edited(lambda h: h["__metadata__"].__setitem__("ir", text))(good_file))
    for load in (gd.load, gd.load_graph):
        _fails(lambda: load(model), f"^{model}: the IR stored in the file is invalid: IR text, {message}")
    for options in ((), ("--grad",)):
        _tool_fails(capsys, model, tmp_path, message, *options)


def test_a_crafted_line_is_quoted_cut_short():
    message = _fails(lambda: gd.parse(IR_CASES["5000-digit dim"][0]), r"\(5000 digits\)\n  1 \| graph sequential\(x")
    assert len(message) < 500 and message.endswith(" characters)")


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_crafted_numbers_in_model_files(case, tmp_path, capsys, good_file):
    make, message = FILE_CASES[case]
    path = tmp_path / "m.gdl"
    path.write_bytes(make(good_file))
    _fails(lambda: gd.load(path), f"^{path}: ", message)
    _tool_fails(capsys, path, tmp_path, message, "--grad")  # --grad on a model file goes through gd.load
    if case not in MODEL_ONLY:
        _fails(lambda: gd.load_graph(path), f"^{path}: ", message)
        _tool_fails(capsys, path, tmp_path, message)


def test_good_files_still_load_after_the_crafting(tmp_path, good_file):
    """The helpers above edit a good file; unedited, it loads (so each case fails for its number)."""
    path = tmp_path / "m.gdl"
    path.write_bytes(_edited(lambda h: None)(good_file))
    assert str(gd.load_graph(path)) == IR
    assert str(gd.load(path).graph()) == IR
    assert str(gd.parse(IR)) == IR


# -- the reader itself ------------------------------------------------------------------


def test_read_int_takes_ints_in_range_only():
    assert read_int(0, "n") == 0 and read_int(INT64_MAX, "n") == INT64_MAX
    assert read_int(-5, "n", low=-5, high=-5) == -5
    for bad in (INT64_MAX + 1, -1, True, 3.0, "3", NumberText("1e400"), None, [1], 10**5000):
        with pytest.raises(gd.GraphError, match="^the field n must be a whole number from 0 to 2\\*\\*63 - 1, got "):
            read_int(bad, "the field n")


def test_whole_number_reads_long_digit_runs_as_text_without_converting_them():
    assert whole_number("123") == 123 and whole_number("-7") == -7
    huge = whole_number("1" * 100_000)  # int() would raise past 4,300 digits (and take quadratic time before)
    assert isinstance(huge, NumberText) and len(huge) == 100_000
    with pytest.raises(gd.GraphError, match=r"got 1111111111\.\.\. \(100000 digits\)$"):
        read_int(huge, "dim")


def test_read_shape_bounds_each_dim_and_the_byte_count():
    assert read_shape(["N", 2, 3], "x", torch.float32) == ("N", 2, 3)
    assert read_shape([2**61 - 1], "x", torch.float32) == (2**61 - 1,)  # 2**63 - 4 bytes: the most there is
    with pytest.raises(gd.GraphError, match=r"x: f32\[2305843009213693952\] holds 2305843009213693952 elements"):
        read_shape([2**61], "x", torch.float32)
    with pytest.raises(gd.GraphError, match=r"x: dimension 0 must be a whole number .*got 'N' \(a str\)"):
        read_shape(["N"], "x", torch.float32, symbolic=False)
    with pytest.raises(gd.GraphError, match=r"holds 2\*\*3968 or more elements"):
        read_shape([2**62] * 64, "x", torch.float64)  # a product too long to print in decimal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_read_float_refuses_what_would_silently_become_inf(dtype):
    top = torch.finfo(dtype).max
    assert read_float(top, "v", dtype) == top
    assert read_float(-top, "v", dtype) == -top
    assert math.isinf(read_float(math.inf, "v", dtype)) and math.isnan(read_float(math.nan, "v", dtype))
    if dtype != torch.float64:  # a finite float64 always fits float64
        with pytest.raises(gd.GraphError, match=r"v .* does not fit .*it would silently become inf"):
            read_float(top * 2, "v", dtype)
    for bad in (10**400, NumberText("1e400")):
        with pytest.raises(gd.GraphError, match="is too large for a float; write inf if that is meant"):
            read_float(bad, "v", dtype)


def test_a_constant_rounds_like_torch_at_the_edge_of_f16():
    # 65519 rounds down to f16's largest finite value 65504; 65520 rounds up to inf.
    assert read_float(65519.0, "v", torch.float16) == 65519.0
    with pytest.raises(gd.GraphError, match="does not fit f16"):
        read_float(65520.0, "v", torch.float16)
    g = gd.Graph("g")
    x = g.input("x", (None, 2), torch.float16)
    with pytest.raises(gd.GraphError, match=r"const: value 100000.0 does not fit f16 .*\n  created at .*test_numbers"):
        gd.mul(x, 1e5)
    assert [n.op.name for n in g.nodes] == []  # the failed call left nothing behind


def test_api_shapes_get_the_same_bounds():
    g = gd.Graph("g")
    with pytest.raises(gd.GraphError, match=r"input x: dimension 1 must be a whole number .*got 18446744073709551616"):
        g.input("x", (None, 2**64))
    with pytest.raises(gd.GraphError, match=r"input y: f64\[2305843009213693952,4\] holds"):
        g.input("y", (2**61, 4), torch.float64)
    with pytest.raises(ValueError, match=r"Linear's weight: f32\[4611686018427387904,2\] holds"):
        gd.Linear(2**62, 2)


@pytest.mark.parametrize("make", [lambda: gd.SGD(lr=10**5000), lambda: gd.Linear(10**5000, 2),
                                  lambda: gd.SGD(momentum=-10**5000)])
def test_settings_beyond_python_s_digit_limit_are_named(make):
    with pytest.raises(ValueError, match=r"-?2\*\*16609 or more") as info:
        make()
    assert "sys.set_int_max_str_digits" not in str(info.value)
