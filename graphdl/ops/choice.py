"""Kernels with several ways to compute the same numbers, each call taking the way
measured fastest for its inputs' shapes.

Which of torch's CPU kernels is fast depends on the shape, the memory layout and the
machine. Max pooling of [32, 16, 8, 8] NCHW activations with a 2x2 window took 200 us
through `aten.max_pool2d_with_indices` and 70 us through the channels-last kernel (the
copies to and from that layout included); at [2, 3, 224, 224] with a 3x3 window the
NCHW kernel won, 1.5 against 2.6 ms (one thread, the development machine's Xeon). So a
`Fastest` holds the ways, and the first time it is called with a signature (each
tensor's shape, strides, dtype and device, and the other arguments) it times each way
on those very inputs, alternately, and keeps the fastest for that signature for the rest
of the process. Every way of an exact kernel returns the same numbers, to the bit: tests
pin that (tests/test_choice.py), so the choice never changes a result, only its speed.

An inexact kernel's ways agree only to rounding (the matrix products of
graphdl.ops.products: MKL's and oneDNN's sum in other orders). So that the choice does
not make one run differ from the next in the last bits, an inexact kernel keeps each
choice in the machine's choice file and takes it from there in every later process:
`$GRAPHDL_CHOICES`, else `~/.cache/graphdl/choices-<machine>.jsonl` (`$XDG_CACHE_HOME`
for `~/.cache` where it is set), one file per processor, core count and torch build
(the name's hash of them; its first line holds them in words), a line a choice, which
processes only append (see `_Kept`). Lines that are not choices of known ways are
skipped, and a file that is no choice file is begun afresh; one that cannot be written
leaves the choices to this process, with a warning. Delete the file to measure again
(a process running then keeps the kernels it chose, and writes them into the next file
it begins). Choices made before `GRAPHDL_CHOICES` names another file hold for the rest
of the process, and are not written there.

Only CPU calls are timed; on other devices the first way (torch's own) runs, as it does
where `fits` says the others cannot take the inputs. The signature includes torch's
thread count. `GRAPHDL_KERNELS=default` in the environment makes every choice made from
then on the first way (set it before the process first computes, to have none other).
`chosen()` says what was picked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROUNDS = 3  # timed calls of each way after a warm-up call, alternated; the smallest time counts
LONG_S = 0.02  # ways that take this long together are chosen by their first call alone
MAX_SIGNATURES = 4096  # choices a kernel keeps before it starts afresh
_ALL: list[Fastest] = []


class Fastest:
    """A kernel: `Fastest(name, first, other, ...)` with each way a function of the same
    arguments that reads them and returns a tensor (never writing into an input, as each
    runs on the same inputs while they are timed; a keyword `out=` buffer it may write),
    `first` torch's own. Calling it runs the way chosen for the arguments' signature
    (about 2 us to look up), choosing it on first sight; `pick(*args)` only chooses.

    exact: every way gives the same bits (else the choices are kept in the machine's
    choice file). fits: where given, the ways after the first are candidates only for
    arguments with `fits(*args, **kwargs)`."""

    def __init__(self, name: str, *ways: Callable[..., Any], exact: bool = True,
                 fits: Callable[..., bool] | None = None) -> None:
        if not ways:
            raise ValueError(f"kernel {name} needs at least one way to compute it")
        self.name, self.ways, self.exact, self.fits = name, ways, exact, fits
        self._chosen: dict[tuple, Callable[..., Any]] = {}
        _ALL.append(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = (torch.get_num_threads(), *map(signature, args))  # (a choice on 1 thread may not hold on 2)
        way = self._chosen.get(key)
        if way is None:
            way = self._choose(key, args, kwargs)
        return way(*args, **kwargs)

    def pick(self, signatures: list[Any], make: Callable[[], tuple[tuple, dict]]) -> Callable[..., Any]:
        """The way chosen for arguments of these signatures (each one's `signature`), timed
        if none is yet on the arguments `make()` gives (args, kwargs) of those signatures."""
        key = (torch.get_num_threads(), *signatures)
        way = self._chosen.get(key)
        if way is None:
            args, kwargs = make()
            assert [*map(signature, args)] == signatures, "make() gave arguments of other signatures"
            way = self._choose(key, args, kwargs)
        return way

    def _choose(self, key: tuple, args: tuple, kwargs: dict) -> Callable[..., Any]:
        if len(self._chosen) >= MAX_SIGNATURES:  # (a process feeding ever new shapes)
            self._chosen.clear()
        way = self._chosen[key] = self._decide(key, args, kwargs)
        return way

    def candidates(self, *args: Any, **kwargs: Any) -> tuple[Callable[..., Any], ...]:
        """The ways a choice for these arguments is made among: every way, or only the
        first (torch's own) with one way, with `GRAPHDL_KERNELS=default`, off the CPU, or
        where `fits` says the others cannot take the arguments."""
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if len(self.ways) == 1 or os.environ.get("GRAPHDL_KERNELS") == "default" or \
                any(t.device.type != "cpu" for t in tensors) or \
                (self.fits is not None and not self.fits(*args, **kwargs)):
            return self.ways[:1]
        return self.ways

    def _decide(self, key: tuple, args: tuple, kwargs: dict) -> Callable[..., Any]:
        if len(self.candidates(*args, **kwargs)) == 1:
            return self.ways[0]
        words = None if self.exact else f"{self.name} {_words(key)}"
        kept = _KEPT.get(words, self.ways) if words else None
        if kept is not None:
            return kept
        times: list[list[float]] = [[] for _ in self.ways]
        for round_ in range(1 + ROUNDS):  # the first round warms each way up
            for k, way in enumerate(self.ways):
                start = time.perf_counter()
                way(*args, **kwargs)
                times[k].append(time.perf_counter() - start)
            if round_ == 0 and sum(min(t) for t in times) > LONG_S:
                break  # each way long enough that one run tells (and more would cost the first step dearly)
        counted = [t[1:] or t for t in times]
        fastest = self.ways[min(range(len(self.ways)), key=lambda k: min(counted[k]))]
        return _KEPT.put(words, fastest, self.ways) if words else fastest

    def chosen(self) -> dict[tuple, str]:
        """Signature -> the name of the way chosen for it."""
        return {key: way.__name__ for key, way in self._chosen.items()}


def chosen() -> dict[str, dict[tuple, str]]:
    """Every kernel's choices so far: {kernel name: {signature: way name}}."""
    return {k.name: k.chosen() for k in _ALL if k._chosen}


def signature(a: Any) -> Any:
    """What a choice is made for, of one argument: a tensor's shape, strides, dtype and device."""
    if isinstance(a, torch.Tensor):
        return a.shape, a.stride(), a.dtype, a.device
    return tuple(a) if isinstance(a, list) else a


def _words(key: tuple) -> str:
    """A signature as the choice file writes it: `threads=1 f32[256,256]/256,1 ...`."""
    def one(part: Any) -> str:
        if isinstance(part, tuple) and len(part) == 4 and isinstance(part[0], torch.Size):
            shape, stride, dtype, device = part
            return f"{str(dtype).removeprefix('torch.')}[{','.join(map(str, shape))}]/" \
                   f"{','.join(map(str, stride))}@{device}"
        return repr(part)
    return f"threads={key[0]} " + " ".join(map(one, key[1:]))


@functools.cache
def machine() -> str:
    """This machine in words, as far as it decides which kernel is fastest: the processor,
    its core count, torch's version and the libraries torch was built with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "flags"):
                    cpu += " " + (value.strip() if key.strip() == "model name"
                                  else hashlib.sha256(value.encode()).hexdigest()[:12])
                if line.strip() == "":
                    break  # the first processor tells
    except OSError:
        pass
    built = hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:12]
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (build {built})"


MAX_KEPT = 100_000  # lines the choice file grows to; past them new choices hold for their process only


class _Kept:
    """The machine's choice file: the inexact kernels' choices, {signature in words: way}.

    It is a log of JSON lines, a header line and then one `{"kernel": words, "way": name}`
    per choice, that processes only append to (one write of one short line, which POSIX
    keeps whole among concurrent appends), and the first line for a signature naming one
    of its kernel's ways is the choice: a process that chose too appends its own line,
    reads the log on from where it had read, and takes the first, so that processes
    choosing at once agree, with no lock, and a choice costs one line whatever the file
    holds. Lines that are not choices (a write torn by a crash, an edit) are skipped, and
    a line is begun on a new line after one that was cut short. A file replaced, cut
    short or deleted under a running process is read again from its start, and one begun
    afresh holds this process's choices so far, so that they outlive it."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.choices: dict[str, list[str]] = {}  # signature -> the ways its lines name, in order
        self.offset = 0  # bytes of the file read so far
        self.identity: tuple[int, int] | None = None  # (device, inode) of the file read
        self.lines = 0
        self.warned = False

    def file(self) -> Path:
        named = os.environ.get("GRAPHDL_CHOICES")
        if named:
            return Path(named).resolve()  # (a symbolic link: its target is the file)
        name = f"choices-{hashlib.sha256(machine().encode()).hexdigest()[:16]}.jsonl"
        try:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        except RuntimeError:  # no home directory to be found
            cache = Path(tempfile.gettempdir())
        return cache / "graphdl" / name

    def _load(self) -> None:
        """Read what the file holds beyond what was read (all of it, first, for another
        path, or when the file there is another or shorter than what was read)."""
        path = self.file()
        if path != self.path:
            self.path, self.choices, self.offset, self.identity, self.lines = path, {}, 0, None, 0
        try:
            with open(path, "rb") as f:
                stat = os.fstat(f.fileno())
                if (stat.st_dev, stat.st_ino) != self.identity or stat.st_size < self.offset:
                    self.offset, self.lines = 0, 0  # replaced or cut short: read it afresh
                    self.identity = (stat.st_dev, stat.st_ino)
                f.seek(self.offset)
                tail = f.read()
        except OSError:
            self.offset, self.identity, self.lines = 0, None, 0  # (gone: begun afresh by the next choice)
            return
        whole = tail[:tail.rfind(b"\n") + 1]  # (a line still being written is read next time)
        lines = whole.splitlines()
        if self.offset == 0 and (not lines or not _header(lines[0])):
            self.identity = None
            return  # not a choice file (or an empty one): nothing to take from it
        self.offset += len(whole)
        for line in lines:
            self.lines += 1
            entry = _entry(line)
            if entry is not None and entry[1] not in self.choices.setdefault(entry[0], []):
                self.choices[entry[0]].append(entry[1])

    def _first(self, words: str, ways: tuple[Callable[..., Any], ...]) -> Callable[..., Any] | None:
        """The way of the first line for `words` that names one of `ways`."""
        return next((w for name in self.choices.get(words, ()) if (w := _named(name, ways))), None)

    def get(self, words: str, ways: tuple[Callable[..., Any], ...]) -> Callable[..., Any] | None:
        self._load()
        return self._first(words, ways)

    def put(self, words: str, way: Callable[..., Any], ways: tuple[Callable[..., Any], ...]) -> Callable[..., Any]:
        """Keep `way` for `words`, unless another process kept a choice first (then that's it)."""
        self._load()
        assert self.path is not None
        theirs = self._first(words, ways)
        if theirs is not None:
            return theirs
        try:
            if self.lines >= MAX_KEPT:
                raise OSError(f"it holds {MAX_KEPT:,} choices already; delete it to start afresh")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.offset == 0:  # missing, empty or not a choice file: begin it afresh
                self._begin()
            _append(self.path, _line(words, way.__name__))
        except OSError as e:
            if not self.warned:
                self.warned = True
                warnings.warn(f"graphdl could not keep its kernel choices in {self.path} ({e}); they hold for "
                              "this process only, so another run may choose other kernels (set GRAPHDL_CHOICES "
                              "to a writable file, or GRAPHDL_KERNELS=default for torch's own everywhere)",
                              RuntimeWarning, stacklevel=4)
            self.choices.setdefault(words, []).insert(0, way.__name__)
            return way
        self._load()  # our line and any written meanwhile: the first for `words` stands
        return self._first(words, ways) or way

    def _begin(self) -> None:
        """Make the file one holding the header and the choices this process knows: a new
        one (unless another process just made it), or in place of one that is no choice
        file."""
        assert self.path is not None
        header = json.dumps({"graphdl choices": 1, "machine": machine()}, ensure_ascii=True).encode() + b"\n"
        known = b"".join(_line(words, names[0]) for words, names in self.choices.items() if names)
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".choices-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header + known)
            os.chmod(temporary, 0o644)  # (mkstemp makes it readable by its owner alone)
            try:
                os.link(temporary, self.path)  # atomic, and refused where the file is there already
            except FileExistsError:
                self._load()
                if self.offset == 0:  # there, but no choice file: replaced
                    os.replace(temporary, self.path)
            except OSError:  # a file system without hard links
                os.replace(temporary, self.path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        self._load()


def _line(words: str, name: str) -> bytes:
    return json.dumps({"kernel": words, "way": name}, ensure_ascii=True).encode() + b"\n"


def _append(path: Path, line: bytes) -> None:
    """Append one line in one write, on a line of its own after a last line cut short."""
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def _header(line: bytes) -> bool:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("graphdl choices") == 1


def _entry(line: bytes) -> tuple[str, str] | None:
    """(signature in words, way name) from one line of the file, or None if it is no choice."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # (RecursionError: a line nested deeper than json reads)
        return None
    if not isinstance(data, dict) or set(data) != {"kernel", "way"}:
        return None
    words, name = data["kernel"], data["way"]
    return (words, name) if isinstance(words, str) and isinstance(name, str) else None


def _named(name: str | None, ways: tuple[Callable[..., Any], ...]) -> Callable[..., Any] | None:
    return next((w for w in ways if w.__name__ == name), None)


_KEPT = _Kept()
