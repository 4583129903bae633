"""Data-parallel training over torch.distributed: the same script on 1 or N processes.

    torchrun --nproc_per_node 2 train.py       # in it: gd.distributed.init(); model.fit(..., distributed=True)

Every process (a *rank*) holds the whole dataset and the same model. `fit(distributed=True)`
keeps `batch_size` global: each global batch of the epoch's permutation (the same on
every rank, from one seed) is split between the ranks as evenly as possible; each rank
computes the gradient of its share, weighted by its share's size, and an all-reduce sums
the shares. So N ranks take the steps one process takes, to float rounding. That
all-reduce is IR (graphdl.passes.allreduce puts it into the gradient graph); the code it
lowers to calls `allreduce_start` and `Pending.wait` below.

This module holds the process group (`init`, `rank`, `world_size`, `is_main`, `barrier`,
`shutdown`), the collectives graphdl issues and what happens when a rank is lost (every
other rank stops with a `RankLostError` naming it), and fit's share of the data on this
rank (`shard`; graphdl.batches.Sharded walks a rank's share of an epoch).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .checks import NumberText, real, shown, whole_number

DEFAULT_TIMEOUT_S = 300.0  # how long a collective waits for the other ranks before naming the one missing
HEARTBEAT_S = 1.0  # how often each rank says it is alive, in the rendezvous store
STORE_TIMEOUT_S = 5.0  # how long a rank that lost a peer tries to reach the store to find out which

LAUNCH = "torchrun --nproc_per_node N script.py"


class Rank(NamedTuple):
    """This process's place in the job: rank `rank` of `world_size` (0 of 1 alone)."""

    rank: int
    world_size: int


class RankLostError(RuntimeError):
    """A collective failed because another rank died, froze or stopped taking part.

    `lost` holds the ranks found missing (empty when none could be named).
    """

    def __init__(self, message: str, lost: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.lost = list(lost)


# -- the process group --------------------------------------------------------------------


def init(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Rank:
    """Join the job torchrun launched, or do nothing when it did not launch this process.

    Args:
        backend: "gloo" or "nccl"; by default NCCL when CUDA is available, else gloo.
        timeout: seconds a collective waits for the other ranks; past it, it fails with
            a `RankLostError` naming the rank that did not come.

    Returns:
        `Rank(rank, world_size)`; `Rank(0, 1)` outside torchrun (no process group then).
        Calling it again returns the same.
    """
    timeout = _check_timeout(timeout)
    if is_initialized():
        return Rank(rank(), world_size())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Rank(0, 1)  # a plain `python script.py`: one process, nothing to join
    _join(_backend(backend), timeout)
    _Heartbeat.start(timeout)
    atexit.unregister(shutdown)  # once, however often the job is joined
    atexit.register(shutdown)
    return Rank(rank(), world_size())


def _check_timeout(timeout: Any) -> float:
    """The timeout as seconds: a finite real number (checks.real's) above 0."""
    try:
        seconds = real("timeout", timeout, 0.0)
    except ValueError:
        seconds = 0.0
    if seconds == 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {shown(timeout)}")
    return seconds


def _backend(backend: str | None) -> str:
    """The backend asked for, or by default NCCL when CUDA is available, else gloo."""
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; install a build with it to run under torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}")
    return backend


def _join(backend: str, timeout: float) -> None:
    """Join the process group torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"gd.distributed.init could not join the job ({e}); launch the script with "
                         f"`{LAUNCH}`, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from e


def is_initialized() -> bool:
    """Whether a default process group exists (after `init` under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if is_initialized():
        _collective("a barrier", dist.barrier)


def shutdown() -> None:
    """Leave the job: stop the heartbeat and destroy the process group (safe to call twice)."""
    _Heartbeat.stop()
    if is_initialized():
        dist.destroy_process_group()


def require_group(what: str) -> None:
    """Raise the ValueError that says how to launch, when there is no process group."""
    if not is_initialized():
        outside = "" if "RANK" in os.environ else " (this process was not launched by torchrun)"
        raise ValueError(f"{what} needs a process group{outside}: call gd.distributed.init() at the start of the "
                         f"script and launch it with `{LAUNCH}`; or pass distributed=False")


def spans_processes(what: str) -> bool:
    """Whether `what` (fit(distributed=True), ...) runs over several ranks. In a world of one
    (a plain `python script.py`, whether or not it called `init`, or a job of one rank) it
    runs as one process does, so the same script runs unchanged on 1 or N processes. Under
    torchrun with several ranks but no `init`, each rank would train alone: refused."""
    if is_initialized():
        return world_size() > 1
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        raise ValueError(f"{what}: this process is one of {os.environ['WORLD_SIZE']} ranks torchrun launched, but "
                         "has not joined them: call gd.distributed.init() at the start of the script")
    return False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    number = _digits(value)
    if number is None:
        raise ValueError(f"environment variable {name}={value!r} must be a whole number (torchrun sets it)")
    return number


def _digits(text: str) -> int | None:
    """The whole number that `text`, ASCII digits only, spells (torchrun's environment, the
    heartbeats in the store), or None: '²'.isdigit() is True, yet int() cannot read it, and
    a run of digits too long to be in any range (checks.whole_number) is none either."""
    if not (text.isascii() and text.isdigit()):
        return None
    number = whole_number(text)
    return None if isinstance(number, NumberText) else number


# -- lost ranks ---------------------------------------------------------------------------
#
# A peer that dies makes gloo fail at once ("Connection closed by peer"); one that freezes
# makes the next collective time out. Neither error says which rank is gone. So each rank
# publishes a heartbeat in the rendezvous store (its beat count and how many collectives
# it has issued), and a rank whose collective fails reads them: a rank whose beat stopped
# is lost; one still beating but with fewer collectives issued is stuck elsewhere.


class _Heartbeat:
    """The thread that publishes this rank's beat; one per process."""

    current: _Heartbeat | None = None
    issued = 0  # collectives this rank has started

    def __init__(self, timeout: float) -> None:
        self.timeout, self.rank = timeout, rank()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="graphdl-heartbeat", daemon=True)

    @classmethod
    def start(cls, timeout: float) -> None:
        cls.stop()
        cls.issued = 0
        if world_size() > 1 and _store_address() is not None:
            cls.current = cls(timeout)
            cls.current.thread.start()

    @classmethod
    def stop(cls) -> None:
        if cls.current is not None:
            cls.current.done.set()
            cls.current = None

    def _run(self) -> None:
        try:
            store = _store(self.timeout)
            beats = 0
            while not self.done.is_set():
                store.set(_beat_key(self.rank), f"{beats} {_Heartbeat.issued}")
                beats += 1
                self.done.wait(HEARTBEAT_S)
        except Exception:  # noqa: BLE001 - no store, no heartbeat: a lost rank is then reported unnamed
            return


def _store_address() -> tuple[str, int] | None:
    addr, port = os.environ.get("MASTER_ADDR"), _digits(os.environ.get("MASTER_PORT", ""))
    return (addr, port) if addr and port is not None else None


def _store(timeout: float) -> dist.TCPStore:
    """A client of the rendezvous store (hosted by rank 0, or by torchrun's agent)."""
    addr, port = _store_address()
    return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout))


def _beat_key(r: int) -> str:
    # torchrun keeps its store across restarts of the workers: one set of keys per attempt.
    return f"graphdl/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/beat/{r}"


def _read_beats(store: dist.TCPStore, world: int) -> dict[int, tuple[int, int]]:
    """rank -> (beat count, collectives issued), for the ranks whose beat is there and well formed."""
    beats = {}
    for r in range(world):
        if store.check([_beat_key(r)]):
            fields = [_digits(f) for f in store.get(_beat_key(r)).decode(errors="replace").split()]
            if len(fields) == 2 and None not in fields:
                beats[r] = (fields[0], fields[1])
    return beats


def _lost(error: Exception, what: str) -> RankLostError:
    """The error for a failed collective, naming the rank that is gone or stuck."""
    me, world = rank(), world_size()
    lost, found, stuck = _find_lost(me, world)
    hint = ("restart every rank; to continue the run, resume from the last checkpoint with fit(..., resume=path) "
            "(fit(..., checkpoint=path) writes one every epoch)")
    if stuck or not lost:
        hint = "every rank must run the same script on the same data, so that all issue the same collectives; " + hint
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RankLostError(f"{what} failed on rank {me} of {world}: {found}.\n  torch.distributed said: {said}"
                         f"\n  hint: {hint}", lost)


def _find_lost(me: int, world: int) -> tuple[list[int], str, bool]:
    """(the ranks found missing, what was found, whether they are alive but stuck), from
    two readings of the heartbeats a few beats apart."""
    address = _store_address()
    if address is None:
        return [], "no rendezvous store to ask which rank is gone (MASTER_ADDR/MASTER_PORT are not set)", False
    try:
        store = _store(timeout=STORE_TIMEOUT_S)
        before = _read_beats(store, world)
        time.sleep(3 * HEARTBEAT_S)
        after = _read_beats(store, world)
    except Exception:  # noqa: BLE001 - the store's host is what is gone
        return [0], (f"the rendezvous store at {address[0]}:{address[1]} does not answer, so the process hosting it "
                     "is gone: rank 0 (or torchrun's agent on the first node)"), False
    return _judge_beats(me, world, before, after)


def _judge_beats(me: int, world: int, before: dict[int, tuple[int, int]],
                 after: dict[int, tuple[int, int]]) -> tuple[list[int], str, bool]:
    """_find_lost's verdict from the two readings: the ranks whose beat stopped, else those
    issuing fewer collectives than this rank, else none."""
    others = [r for r in range(world) if r != me]
    silent = _silent(others, before, after)
    if silent:
        return silent, (f"{_ranks(silent, world)} stopped sending heartbeats: the process died, was killed or is "
                        "frozen"), False
    behind = [r for r in others if after[r][1] < _Heartbeat.issued]
    if behind:
        issued = ", ".join(str(after[r][1]) for r in behind)
        return behind, (f"{_ranks(behind, world)} still beating but behind: issued {issued} collectives to this "
                        f"rank's {_Heartbeat.issued}, so stuck or running other code"), True
    return [], "every rank still sends heartbeats, so no rank could be named", False


def _silent(ranks: list[int], before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> list[int]:
    """The `ranks` whose beat is gone or did not move between the two readings."""
    return [r for r in ranks if r not in after or after[r][0] == before.get(r, (None,))[0]]


def _ranks(ranks: list[int], world: int) -> str:
    """`rank 1 of 2`, `ranks 1, 3 of 4`."""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {world}"


def _collective(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Issue one collective, naming the lost rank if it fails."""
    _Heartbeat.issued += 1
    try:
        return call(*args, **kwargs)
    except RuntimeError as e:
        raise _lost(e, what) from e


# -- what the generated code and fit call -------------------------------------------------


@dataclass
class Stats:
    """Counters for benchmarks (reset them by assigning 0): bytes all-reduced by gradient
    buckets, and seconds spent blocked waiting for them (communication not hidden by compute)."""

    reduced_bytes: int = 0
    wait_s: float = 0.0


stats = Stats()


class Pending:
    """An all-reduce in flight: its flat buffer and torch's work handle."""

    __slots__ = ("buffer", "work")

    def __init__(self, buffer: torch.Tensor, work: Any) -> None:
        self.buffer, self.work = buffer, work

    def wait(self) -> torch.Tensor:
        """Block until the sum over every rank is in the buffer; return the buffer."""
        started = time.perf_counter()
        try:
            self.work.wait()
        except RuntimeError as e:
            raise _lost(e, "the all-reduce of a gradient bucket") from e
        stats.wait_s += time.perf_counter() - started
        return self.buffer


def allreduce_start(*tensors: torch.Tensor) -> Pending:
    """Copy `tensors` into one flat buffer and start summing it over every rank (the code
    of the allreduce_start op)."""
    require_group("a graph with allreduce_start")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    stats.reduced_bytes += flat.numel() * flat.element_size()
    return Pending(flat, _collective("the all-reduce of a gradient bucket", dist.all_reduce, flat, async_op=True))


def sum_over_ranks(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` summed over every rank, in place, and returned."""
    _collective(what, dist.all_reduce, t)
    return t


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Copy rank 0's values of `tensors` into every rank's, in one collective."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _collective("broadcasting rank 0's params", dist.broadcast, flat, src=0)
    first = 0
    for t in tensors:
        t.copy_(flat[first:first + t.numel()].view(t.shape))
        first += t.numel()


def split(total: int, parts: int) -> list[int]:
    """`total` items split into `parts` counts as evenly as possible, the larger first."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def shard(n: int) -> tuple[int, int]:
    """(first row, row count) of this rank's contiguous share of n rows."""
    counts = split(n, world_size())
    return sum(counts[:rank()]), counts[rank()]


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's `shard` of n rows, concatenated in rank order, on every rank."""
    counts = split(n, world_size())
    padded = local.new_zeros((counts[0], *local.shape[1:]))  # all_gather wants equal sizes
    padded[:counts[rank()]] = local[:counts[rank()]]
    parts = [torch.empty_like(padded) for _ in counts]
    _collective("gathering predictions", dist.all_gather, parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def agree(settings: dict[str, int], seed: int, device: torch.device) -> int:
    """Check that every rank has the same `settings` (else a ValueError on every rank, all
    seeing the same table) and return rank 0's `seed`."""
    # A seed may be any of torch's [-2**63, 2**64): sent as two int64 halves.
    mine = torch.tensor([*settings.values(), seed >> 32, seed & 0xFFFFFFFF], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world_size())]
    _collective("comparing the ranks' fit settings", dist.all_gather, table, mine)
    rows = [row.tolist() for row in table]
    for r, row in enumerate(rows):
        for name, theirs, main in zip(settings, row, rows[0]):
            if theirs != main:
                raise ValueError(f"fit(distributed=True): rank {r} has {name}={theirs} but rank 0 has {main}; every "
                                 "rank must call fit with the same data, model and settings")
    return (rows[0][-2] << 32) | rows[0][-1]
