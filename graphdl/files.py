"""Files: the checked way graphdl reads and writes them, for every format it has (model
and graph files in graphdl.io, ONNX in graphdl.onnx_io, checkpoints in
graphdl.checkpoint).

- `as_path`: the path a user gave, or a GraphError for what is no path (None, a number).
- `read_bytes`: a file's bytes, or a GraphError saying why not (missing, a folder, ...).
- `atomic_write`: replace a file so that a reader sees the old one or the new, never half
  (the bytes go to a temporary file in the same folder, are flushed to disk, then
  renamed over the target); through a symlink, the file it points to is replaced.
- `read_json`: JSON whose numbers reach their field's checked reader (graphdl.checks)
  as written, so a 5,000-digit integer or 1e400 is refused by name, not crashed on.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .checks import GraphError, NumberText, whole_number


def as_path(path: object) -> Path:
    """The path as a Path, or a GraphError for something that is no path (None, a number)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise GraphError(f"expected a file path (a str or pathlib.Path), got {path!r}")
    return Path(path)


def read_bytes(path: Path) -> bytes:
    """The whole file, or a GraphError naming why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GraphError(f"{path}: no such file; check the path (save one with model.save or gd.save_graph)") from None
    except IsADirectoryError:
        raise GraphError(f"{path}: is a folder, not a model file") from None
    except OSError as e:
        raise GraphError(f"{path}: cannot read it: {e.strerror or e}") from None


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new, never half.
    A symlink stays a link: the file it points to is what gets replaced."""
    shown = str(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        shown, path = f"{path} (a link to {target})", target
    folder = path.parent
    if not folder.is_dir():
        raise GraphError(f"cannot save to {shown}: the folder {folder} does not exist; create it first")
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise GraphError(f"cannot save to {shown}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private; give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise GraphError(f"cannot save to {shown}: {e.strerror or e}; the previous file is unchanged") from None
        raise
    _fsync_folder(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk; not every OS allows this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(text: bytes | str) -> Any:
    """JSON whose numbers reach their field's reader (read_int, read_shape) as they were
    written: an integer too long to be in range, a float beyond float64 (1e400), NaN and
    Infinity stay text (NumberText), so the reader can refuse them by name."""
    return json.loads(text, parse_int=whole_number, parse_float=_json_float, parse_constant=NumberText)


def _json_float(text: str) -> float | NumberText:
    number = float(text)
    return number if math.isfinite(number) else NumberText(text)
