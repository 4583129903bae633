"""Command-line tools. `graphdl-render` (also `tools/render_graph.py`) draws a saved
model, an IR text file or an ONNX model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .autodiff import grad
from .checks import GraphError
from .functional import load
from .io import MODEL_FORMAT, file_format, load_graph
from .ir import Graph
from .losses import MSE
from .onnx_io import import_onnx
from .viz import FORMATS, render


def render_main(argv: Sequence[str] | None = None) -> int:
    """Draw a model file or IR text file: `graphdl-render FILE -o OUT.svg [--grad] ...`.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 on success, 1 with a one-line message on stderr otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="graphdl-render",
        description="Draw a graphdl model file (model.save / gd.save_graph), IR text file or ONNX model with Graphviz.",
    )
    parser.add_argument("file", help="a saved model or graph, a text file holding IR, or an .onnx file")
    parser.add_argument("-o", "--output", required=True,
                        help=f"the picture to write; its extension picks the format ({', '.join(FORMATS)}); "
                             ".dot needs no Graphviz install")
    parser.add_argument("--grad", action="store_true",
                        help="draw the gradient graph: the loss (a model's training loss, MSE if the file "
                             "names none, or a graph's first output) differentiated w.r.t. every trainable param")
    parser.add_argument("--hide-params", action="store_true", help="leave out param boxes")
    parser.add_argument("--collapse-layers", action="store_true", help="draw each layer as one box")
    parser.add_argument("--profile", action="store_true",
                        help="time every node on random inputs and colour the drawing by time (printing the "
                             "profile's table): a model file's training step as fit runs it, else the graph drawn")
    parser.add_argument("--batch-size", type=_batch_size, default=32, metavar="N",
                        help="the rows of the random inputs --profile times (default: 32)")
    args = parser.parse_args(argv)
    try:
        graph, report = _graph_to_draw(Path(args.file), args.grad), None
        if args.profile:
            graph, report = _profiled(Path(args.file), graph, args.batch_size)
            print(report)
        render(graph, args.output, hide_params=args.hide_params, collapse_layers=args.collapse_layers,
               profile=report)
    except (GraphError, OSError, ImportError) as e:  # ImportError: .onnx without the onnx package
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"graphdl-render: error: {message}", file=sys.stderr)
        return 1
    return 0


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _profiled(path: Path, graph: Graph, batch: int) -> tuple[Graph, Any]:
    """The profile of what --profile times (a model's training step, else `graph`) on
    random normal inputs of `batch` rows, and the graph it timed."""
    from .profiler import profile  # only for --profile: drawing alone does not load it
    gen = torch.Generator().manual_seed(0)
    if path.suffix.lower() != ".onnx" and file_format(path) == MODEL_FORMAT:
        model = load(path)
        x = model.graph().inputs["x"]  # one example's shape and dtype: rows, images, or indices (all 0)
        X = torch.randn(batch, *model.input_shape, generator=gen).to(x.dtype) if x.dtype.is_floating_point else \
            torch.zeros(batch, *model.input_shape, dtype=x.dtype)
        Y = torch.randn(batch, *model.output_shape, generator=gen).to(model.dtype())
        report = profile(model, X, Y, batch_size=batch)
    else:
        feeds = {name: torch.randn([batch if isinstance(d, str) else d for d in v.shape], generator=gen).to(v.dtype)
                 for name, v in graph.inputs.items()}
        report = profile(graph, **feeds)
    return report.graph, report


def _graph_to_draw(path: Path, want_grad: bool) -> Graph:
    if path.suffix.lower() == ".onnx":
        graph = import_onnx(path)
    elif want_grad and file_format(path) == MODEL_FORMAT:
        model = load(path)  # its trainable params only: Standardize's statistics get no gradient
        return grad(model.graph(loss=model.loss or MSE()), wrt=list(model.parameters()))
    else:
        graph = load_graph(path)
    if not want_grad:
        return graph
    if not graph.params:
        raise GraphError(f"{path}: graph {graph.name} has no params, so --grad has nothing to differentiate")
    if not graph.outputs or graph.outputs[0].shape != ():
        raise GraphError(f"{path}: --grad differentiates the first output, which must be a scalar loss; "
                         f"graph {graph.name}'s is not")
    return grad(graph, wrt=list(graph.params))
