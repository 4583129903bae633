"""Model and graph files: the IR text and the weights, in one safetensors file.

A file is a safetensors container (https://github.com/huggingface/safetensors): an
8-byte little-endian header length, a JSON header, then raw tensor bytes. Loading
parses JSON and copies bytes, never unpickles, so a file from a stranger cannot run
code. The header's string metadata says what the file is:

    format   "graphdl.model" (a Sequential or a functional gd.Model) or "graphdl.graph" (a bare graph)
    version  "1"
    ir       the forward graph as text IR (`str(graph)`)
    layers   models only: the JSON of `model.config()`
    model    models only, optional: "functional" for a gd.Model, whose IR (not the order of its
             layers) says how its layers connect; absent for a Sequential
    calls    functional models only: JSON [[layer, input, start, stop], ...], each layer call and
             the IR nodes it built (`Model.calls`), so that each is built again in training mode
    ties     models only, optional: JSON {place: place it shares}, e.g. {"2.weight": "0.weight"}
             for a tensor held by two layers (stored once, under its first place's name)
    loss     models only, optional: the name of the loss it was trained with (`gd.MSE().name`)

and its tensors are the model's state by name ("0.weight", ..., and non-trainable
buffers such as Standardize's "0.mean"). Every weight is checked
against the name, shape and dtype the IR declares. A graph can also be saved as plain
IR text (a `.txt` or `.gdir` file): readable and diffable, but without weights (they
load as zeros).

Writes are atomic: the bytes go to a temporary file in the same folder, are flushed to
disk, then renamed over the target, so a crash mid-save leaves the old file whole. Saving
through a symlink replaces the file it points to and keeps the link.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from .checks import FLOAT_DTYPES, GraphError, NumberText, format_type, read_int, read_shape, show_number
from .files import as_path, atomic_write, read_bytes, read_json
from .ir import Graph
from .losses import LOSSES, Loss
from .text import parse

if TYPE_CHECKING:
    from .model import Sequential

FORMAT_VERSION = "1"
MODEL_FORMAT = "graphdl.model"
SEQUENTIAL, FUNCTIONAL = "sequential", "functional"  # the kinds of model a model file holds
GRAPH_FORMAT = "graphdl.graph"
TEXT_SUFFIXES = (".txt", ".gdir")
_MAX_HEADER = 100_000_000  # safetensors' own limit; a bigger "length" means this is not one




def save_model(model: Sequential, path: str | os.PathLike[str], state: dict[str, torch.Tensor] | None = None,
               state_info: str = "") -> None:
    """Save a Sequential's layers, forward graph and weights (what `model.save(path)` does).

    Args:
        model: the model to save.
        path: the file to write (by convention `.gdl`); replaced atomically if it exists.
        state, state_info: training state to keep beside the model (a checkpoint, see
            graphdl.checkpoint): tensors stored as "state/NAME" and a string stored as the
            "state" metadata; `load` reads the model and skips them.
    """
    graph = model.graph()
    weights = model.state()
    if set(weights) != set(graph.params):
        raise GraphError(f"save: the model's tensors {sorted(weights)} differ from its graph's params "
                         f"{sorted(graph.params)}; this is a bug in the layer that built them")
    metadata = {"ir": str(graph), "layers": json.dumps(model.config())}
    if _kind(model) != SEQUENTIAL:
        metadata["model"] = _kind(model)
        metadata["calls"] = json.dumps(model.calls())  # which nodes each layer call built (graphdl.functional)
    ties = model.ties()
    if ties:
        metadata["ties"] = json.dumps(ties)  # each tensor is stored once; these places share it
    if model.loss is not None and LOSSES.get(model.loss.name) is type(model.loss):
        metadata["loss"] = model.loss.name  # evaluate's default, and how it reads a prediction as a class
    if state_info:
        metadata["state"] = state_info
    path = as_path(path)
    data = _encode(path, MODEL_FORMAT, metadata,
                   {**weights, **{STATE_PREFIX + name: t for name, t in (state or {}).items()}})
    try:  # a file that save writes is one that load reads: refuse it now, while the model is still here
        _model_from_bytes(path, data, type(model))
    except GraphError as e:
        raise GraphError(f"save: {path} would not load back, so nothing was written: {e}") from None
    atomic_write(path, data)


STATE_PREFIX = "state/"  # tensors a checkpoint keeps beside the weights; no param name has a '/'


def _kind(model: Any) -> str:
    """The kind of model files a model (or model class) writes and reads: its `file_kind`,
    else a Sequential's, whose files predate the field."""
    return getattr(model, "file_kind", SEQUENTIAL)


def load_model(path: str | os.PathLike[str],
               *model_classes: type[Sequential]) -> tuple[Sequential, str, dict[str, torch.Tensor]]:
    """The model in a file saved with `model.save(path)` (or a checkpoint fit wrote), as
    the one of `model_classes` that reads the file's kind (gd.Sequential and gd.Model:
    `gd.load` is this, with both classes), with the training state saved beside it: its
    "state" metadata ('' if none) and its state tensors by name (see `save_model`).

    Raises:
        GraphError: the file is missing, truncated, corrupt, not a graphdl model (a
            pickle, a zip, a bare graph, another program's safetensors file), or its
            weights do not match the shapes its IR declares.
    """
    path = as_path(path)
    return _model_from_bytes(path, read_bytes(path), *model_classes)


def _model_from_bytes(path: Path, data: bytes,
                      *model_classes: type[Sequential]) -> tuple[Sequential, str, dict[str, torch.Tensor]]:
    if _is_ir_text(data):
        raise GraphError(f"{path}: holds IR text, not a model; load it with gd.load_graph({str(path)!r})")
    kind, metadata, weights = _decode(path, data)
    state = _split_state(weights)
    if kind != MODEL_FORMAT:
        raise GraphError(f"{path}: holds a bare graph, not a model; load it with gd.load_graph({str(path)!r})")
    model_class = _model_class(path, metadata, model_classes)
    graph = _graph_from(path, metadata, weights)
    info = metadata.get("state", "")
    if not isinstance(info, str):
        raise GraphError(f"{path}: the file's training state is not text; the file is corrupt")
    model = _model_from(path, metadata, graph, model_class)
    model.loss = _loss_from(path, metadata)
    return model, info, state


def _model_class(path: Path, metadata: dict[str, str], model_classes: tuple[type[Sequential], ...]) -> type[Sequential]:
    """The one of `model_classes` that reads the kind of model the file holds."""
    kind = metadata.get("model", SEQUENTIAL)
    if kind not in (SEQUENTIAL, FUNCTIONAL):
        raise GraphError(f"{path}: the file holds a model of kind {kind!r}, which this graphdl does not know (it "
                         f"knows {SEQUENTIAL!r} and {FUNCTIONAL!r}); the file is corrupt or was written by a newer "
                         "graphdl")
    for model_class in model_classes:
        if _kind(model_class) == kind:
            return model_class
    wanted = " or ".join(_kind(c) for c in model_classes)
    raise GraphError(f"{path}: holds a {kind} model, not a {wanted} one; load it with gd.load({str(path)!r})")


def _loss_from(path: Path, metadata: dict[str, str]) -> Loss | None:
    """The loss the file says the model was trained with, if it says."""
    name = metadata.get("loss")
    if name is None:
        return None
    if not isinstance(name, str) or name not in LOSSES:
        raise GraphError(f"{path}: the file names loss {name!r}, which this graphdl does not know (it knows "
                         f"{', '.join(LOSSES)}); the file is corrupt or was written by a newer graphdl")
    return LOSSES[name]()


def _model_from(path: Path, metadata: dict[str, str], graph: Graph, model_class: type[Sequential]) -> Sequential:
    """The model (a `model_class`) the file's layer list describes, with the file's ties, holding
    the weights `graph` (the file's IR) holds. Its layers must rebuild exactly that IR, or
    the model would run a different network than the one the file describes."""
    ties = metadata.get("ties", "{}")
    try:
        config = read_json(metadata["layers"])
        _check_config(config)
        # On the meta device: a crafted width allocates nothing, and no random initial
        # weights are drawn (which would advance torch's global RNG) only to be overwritten.
        with torch.device("meta"):
            if _kind(model_class) == FUNCTIONAL:  # its IR says how its layers connect (graphdl.functional)
                model = model_class.from_config(config, graph=graph, ties=read_json(ties),
                                                calls=read_json(metadata.get("calls", "null")))
            else:
                model = model_class.from_config(config, input_shape=_input_shape(graph))
            _tie(model, read_json(ties))
            params = model.state()
            rebuilt = str(model.graph())
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        # GraphError is a ValueError: keep its message, but say which file it came from.
        raise GraphError(f"{path}: the layer list stored in the file is invalid ({e}); the file is corrupt or "
                         "was written by an incompatible graphdl") from None
    for name, tensor in params.items():
        if name not in graph.params:
            raise GraphError(f"{path}: the layers build param {name!r}, which the file's IR does not declare; "
                             "the file is corrupt")
        _check_tensor(path, name, graph.params[name].data, tensor.dtype, tuple(tensor.shape), "the layers build")
    if set(graph.params) - set(params):
        extra = sorted(set(graph.params) - set(params))
        raise GraphError(f"{path}: the file holds weights {extra} that its layers do not use; the file is corrupt")
    stored = str(graph)
    if rebuilt != stored:
        raise GraphError(f"{path}: the file's IR and its layer list disagree ({_first_difference(stored, rebuilt)}), "
                         "so the model would not be the network the IR describes; the file is corrupt or was edited")
    if _kind(model_class) == FUNCTIONAL and model.calls() != read_json(metadata.get("calls", "null")):
        raise GraphError(f"{path}: the file's layer calls are not those its IR and layers make; the file is corrupt "
                         "or was edited")
    owners = {name: owner for name, owner in model.owners().items()}
    for name, layer, short, _, _ in model.places():
        setattr(layer, short, graph.params[owners[name]].data)
    return model


def _input_shape(graph: Graph) -> tuple | None:
    """The shape of one example the file's IR takes (its input x without the batch dim),
    which the layers' own declarations may not say (an Embedding of sequences); the
    model's constructor checks it, and the IR it rebuilds must match the file's."""
    x = graph.inputs.get("x")
    return None if x is None or not x.shape else x.shape[1:]


def _tie(model: Sequential, ties: Any) -> None:
    """Give each place the file names ({"2.weight": "0.weight"}) the tensor of the earlier
    place it shares, after checking that both exist and can hold one tensor."""
    if not isinstance(ties, dict):
        raise ValueError("the ties must be a JSON object of place names")
    places = {name: (layer, short, t) for name, layer, short, _, t in model.places()}
    order = list(places)
    for name, owner in ties.items():
        if not isinstance(owner, str) or name not in places or owner not in places:
            raise ValueError(f"the tie {name!r} -> {owner!r} names a place the layers do not have")
        if order.index(owner) >= order.index(name):
            raise ValueError(f"the tie {name!r} -> {owner!r} does not point to an earlier place")
        layer, short, t = places[name]
        source = places[owner][2]
        if (t.shape, t.dtype) != (source.shape, source.dtype):
            raise ValueError(f"the tie {name!r} -> {owner!r} joins tensors of different shapes or dtypes")
        setattr(layer, short, source)


def _first_difference(stored: str, rebuilt: str) -> str:
    def shown(line: str) -> str:
        line = line.strip()
        return f"`{line}`" if len(line) <= 100 else f"`{line[:96]}...`"

    for k, (a, b) in enumerate(itertools.zip_longest(stored.splitlines(), rebuilt.splitlines(), fillvalue="")):
        if a != b:
            return f"line {k + 1} of the IR is {shown(a) if a else 'missing'}; " \
                   f"the layers build {shown(b) if b else 'nothing'}"
    return "they differ"


def _check_config(config: Any) -> None:
    """Only plain settings reach the layer classes: a list of {"type": name, ...} of JSON
    scalars (or flat lists of them), with dtypes from graphdl's fixed list (so no name is
    looked up on torch blindly)."""
    if not isinstance(config, list) or not all(isinstance(spec, dict) for spec in config):
        raise ValueError("expected a list of layer settings")
    dtypes = {str(t).removeprefix("torch.") for t in FLOAT_DTYPES.values()}
    for k, spec in enumerate(config):
        _check_layer_settings(k, spec, dtypes)


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _check_layer_settings(k: int, spec: dict[str, Any], dtypes: set[str]) -> None:
    if not all(_plain(v) or isinstance(v, list) and all(_plain(e) for e in v) for v in spec.values()):
        raise ValueError(f"layer {k}: settings must be plain numbers and strings (or lists of them, such as a "
                         f"Reshape's shape), got {spec}")
    if "dtype" in spec and spec["dtype"] not in dtypes:
        raise ValueError(f"layer {k}: dtype {spec['dtype']!r} is not one of {sorted(dtypes)}")


def save_graph(graph: Graph, path: str | os.PathLike[str]) -> None:
    """Save a graph with its params' current values, or as IR text alone.

    Args:
        graph: the graph to save.
        path: a `.txt` or `.gdir` name writes plain IR text (no weights); any other name
            writes a safetensors file with the IR and the weights. Replaced atomically.
    """
    if not isinstance(graph, Graph):
        raise GraphError(f"save_graph takes a gd.Graph, got {type(graph).__name__}; save a model with model.save")
    path = as_path(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        atomic_write(path, (str(graph) + "\n").encode())
    else:
        _write(path, GRAPH_FORMAT, {"ir": str(graph)}, {n: v.data for n, v in graph.params.items()})


def load_graph(path: str | os.PathLike[str]) -> Graph:
    """Load a graph saved by `save_graph`, the forward graph of a model file, or IR text.

    Args:
        path: a graphdl safetensors file (graph or model), or a text file holding IR
            (recognised by its content, whatever its extension; its params load as zeros).

    Returns:
        The graph, its params holding the saved weights.

    Raises:
        GraphError: as `load`, naming what is wrong with the file.
    """
    path = as_path(path)
    data = read_bytes(path)
    if _is_ir_text(data):
        try:
            return parse(data.decode())
        except UnicodeDecodeError:
            raise GraphError(f"{path}: looks like IR text but is not valid UTF-8; the file is corrupt") from None
        except GraphError as e:
            raise GraphError(f"{path}: {e}") from None
    _, metadata, weights = _decode(path, data)
    _split_state(weights)
    return _graph_from(path, metadata, weights)


def _split_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take a checkpoint's state tensors out of `weights`, by their names without the prefix."""
    return {name.removeprefix(STATE_PREFIX): weights.pop(name) for name in list(weights)
            if name.startswith(STATE_PREFIX)}


def _is_ir_text(data: bytes) -> bool:
    return data.lstrip().startswith((b"graph", b"//"))


# -- the container ----------------------------------------------------------------------


def _write(path: Path, kind: str, metadata: dict[str, str], weights: dict[str, torch.Tensor]) -> None:
    atomic_write(path, _encode(path, kind, metadata, weights))


def _encode(path: Path, kind: str, metadata: dict[str, str], weights: dict[str, torch.Tensor]) -> bytes:
    """The file's bytes: the safetensors container of `weights` with graphdl's metadata."""
    meta = [name for name, t in weights.items() if t.is_meta]
    if meta:
        raise GraphError(f"{path}: cannot save weight {meta[0]!r}: it is on the meta device, which holds shapes "
                         "but no values; load or train real weights (on 'cpu' or 'cuda') before saving")
    # safetensors wants contiguous CPU tensors that share no memory.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in weights.items()}
    return safetensors.torch.save(tensors, metadata={"format": kind, "version": FORMAT_VERSION, **metadata})










def file_format(path: str | os.PathLike[str]) -> str:
    """What a file holds, reading only its header: "graphdl.model", "graphdl.graph" or "text" (IR).

    Raises:
        GraphError: the file is missing or not a graphdl file, saying what it looks like.
    """
    path = as_path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4096)
            if _is_ir_text(head):
                return "text"
            if len(head) >= 8:
                length = min(struct.unpack("<Q", head[:8])[0], _MAX_HEADER + 1)
                head += f.read(max(0, 8 + length - len(head)))
            size = os.fstat(f.fileno()).st_size
    except OSError:
        read_bytes(path)  # raises, naming what is wrong
        raise
    return _check_header(path, head, size)[0]["format"]


def _check_header(path: Path, data: bytes, size: int) -> tuple[dict[str, str], dict[str, Any], int]:
    """Check the container's start by hand, so each way a file can be wrong gets its own
    message. `data` is the file or at least its header; `size` is the file's length.

    Returns:
        The metadata, the whole header and the header's length.
    """
    length = struct.unpack("<Q", data[:8])[0] if size >= 8 else None
    header = _header_json(data, size, length)
    if header is None:
        raise _not_safetensors(path, data, size, length)
    metadata = _graphdl_metadata(path, header)
    _check_metadata_values(path, metadata)
    return metadata, header, length


def _header_json(data: bytes, size: int, length: int | None) -> Any:
    """The header's JSON, or None if the file holds no header of that `length` or it is not JSON."""
    if length is None or length > _MAX_HEADER or 8 + length > size:
        return None
    try:
        return read_json(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def _not_safetensors(path: Path, data: bytes, size: int, length: int | None) -> GraphError:
    """The error for a file that is not a safetensors container, saying what it is instead."""
    not_ours = f"{path}: is not a graphdl model file"
    what = _pickle_or_zip(data)
    if what is not None:
        return GraphError(f"{not_ours}: it looks like {what}, which graphdl never loads because unpickling "
                          "can run code; re-save the model with graphdl's model.save")
    if length is None:
        return GraphError(f"{not_ours}: it is only {size} bytes long (empty or truncated)")
    if length > _MAX_HEADER:
        return GraphError(f"{not_ours}: it does not start with a safetensors header")
    if 8 + length > size:
        return GraphError(f"{path}: the file is truncated or not a graphdl model file: its header alone "
                          f"needs {8 + length} bytes but the file has {size}")
    return GraphError(f"{not_ours}: its header is not JSON (not a safetensors file, or corrupt)")


def _pickle_or_zip(data: bytes) -> str | None:
    """What torch.save and pickle files look like from their first bytes, or None."""
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (e.g. from torch.save)"
    return None


def _graphdl_metadata(path: Path, header: Any) -> dict[str, str]:
    """The header's metadata, if it is graphdl's, of the format version this graphdl reads."""
    not_ours = f"{path}: is not a graphdl model file"
    if not isinstance(header, dict):
        raise GraphError(f"{not_ours}: its header is not a JSON object (corrupt)")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") not in (MODEL_FORMAT, GRAPH_FORMAT):
        raise GraphError(f"{not_ours}: it is a safetensors file without graphdl's metadata (format "
                         f"{MODEL_FORMAT!r}); it was written by another program")
    if metadata.get("version") != FORMAT_VERSION:
        raise GraphError(f"{path}: format version {metadata.get('version')!r} is not one this graphdl reads "
                         f"({FORMAT_VERSION!r}); load it with the graphdl that wrote it")
    return metadata


def _check_metadata_values(path: Path, metadata: dict[str, Any]) -> None:
    """The metadata holds the IR (and a model's layer list), and only strings, as safetensors' does."""
    if not isinstance(metadata.get("ir"), str) or (metadata["format"] == MODEL_FORMAT and
                                                    not isinstance(metadata.get("layers"), str)):
        raise GraphError(f"{path}: the file's metadata lacks its IR or layer list; the file is corrupt")
    odd = [key for key, value in metadata.items() if not isinstance(value, str) or isinstance(value, NumberText)]
    if odd:
        raise GraphError(f"{path}: the file's metadata {odd[0]!r} is {show_number(metadata[odd[0]])}; safetensors "
                         "metadata holds strings only, so the file is corrupt")


def _decode(path: Path, data: bytes) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
    metadata, header, length = _check_header(path, data, len(data))
    _check_entries(path, header, len(data) - 8 - length)
    try:
        weights = safetensors.torch.load(data)
    except Exception as e:  # not expected after _check_entries; safetensors' own SafetensorError is not exported
        raise GraphError(f"{path}: the weights are corrupt ({e})") from None
    return metadata["format"], metadata, weights


_WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _check_entries(path: Path, header: dict[str, Any], size: int) -> None:
    """Check every tensor entry of the header before safetensors reads it: each is sound
    (`_entry_span`), and together they tile the `size` bytes of data exactly, as
    safetensors requires."""
    spans = sorted((*_entry_span(path, name, entry, size), name)
                   for name, entry in header.items() if name != "__metadata__")
    covered = 0
    for begin, end, name in spans:
        if begin != covered:
            raise GraphError(f"{path}: the weights overlap or leave a gap at byte {covered} of the data (weight "
                             f"{name!r} starts at {begin}); the file is corrupt")
        covered = end
    if covered != size:
        raise GraphError(f"{path}: the file has {size - covered} bytes after its last weight; the file is corrupt")


def _entry_span(path: Path, name: str, entry: Any, size: int) -> tuple[int, int]:
    """The [begin, end) bytes of one tensor entry, after checking that it holds a dtype
    graphdl uses, a shape and data_offsets of whole numbers, and a span that fits the
    data and matches the shape."""
    field = f"weight {name!r}"
    dtype = _entry_dtype(path, field, entry)
    shape, begin, end = _entry_numbers(path, field, entry, dtype)
    if end > size:
        raise GraphError(f"{path}: the file is truncated: {field} ends at byte {end} of the data, which has only "
                         f"{size} bytes; save it again")
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise GraphError(f"{path}: {field} spans {end - begin} bytes, but its shape {list(shape)} of "
                         f"{entry['dtype']} needs {needed}; the file is corrupt")
    return begin, end


def _entry_dtype(path: Path, field: str, entry: Any) -> torch.dtype:
    """The dtype of an entry that holds exactly dtype, shape and data_offsets."""
    if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
        raise GraphError(f"{path}: the header entry of {field} must hold exactly dtype, shape and data_offsets; "
                         "the file is corrupt")
    dtype = _WEIGHT_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise GraphError(f"{path}: {field} has dtype {show_number(entry['dtype'])}; graphdl weights are "
                         f"{', '.join(_WEIGHT_DTYPES)}, so the file is corrupt or not graphdl's")
    return dtype


def _entry_numbers(path: Path, field: str, entry: dict[str, Any], dtype: torch.dtype) -> tuple[tuple, int, int]:
    """An entry's shape and data offsets (begin, end), each read by its checked reader."""
    offsets = entry["data_offsets"]
    if not isinstance(entry["shape"], list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise GraphError(f"{path}: {field}'s shape and data_offsets must be lists (data_offsets of two numbers, "
                         "[begin, end]); the file is corrupt")
    try:
        shape = read_shape(entry["shape"], f"{field} shape", dtype, symbolic=False)
        begin = read_int(offsets[0], f"{field} data_offsets[0]")
        end = read_int(offsets[1], f"{field} data_offsets[1]", low=begin)
    except GraphError as e:
        raise GraphError(f"{path}: {e}; the file is corrupt") from None
    return shape, begin, end


def _graph_from(path: Path, metadata: dict[str, str], weights: dict[str, torch.Tensor]) -> Graph:
    """Parse the stored IR and give its params the stored weights, after checking each."""
    try:
        with torch.device("meta"):  # params start as placeholders: a crafted IR cannot make us allocate them
            graph = parse(metadata["ir"])
    except GraphError as e:
        raise GraphError(f"{path}: the IR stored in the file is invalid: {e}") from None
    missing = [n for n in graph.params if n not in weights]
    if missing:
        raise GraphError(f"{path}: the IR declares params {missing} but the file holds no weights for them; "
                         "the file is corrupt or truncated")
    extra = [n for n in weights if n not in graph.params]
    if extra:
        raise GraphError(f"{path}: the file holds weights {extra} that its IR does not declare; the file is corrupt")
    for name, value in graph.params.items():
        _check_tensor(path, name, weights[name], value.dtype, value.shape, "the IR declares")
        value.data = weights[name]
    return graph


def _check_tensor(path: Path, name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: Any, who: str) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise GraphError(f"{path}: weight {name!r} is {format_type(tensor.dtype, tuple(tensor.shape))} but "
                         f"{who} {format_type(dtype, tuple(shape))}; the file is corrupt or was edited")
