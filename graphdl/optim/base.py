"""The optimizer protocol every optimizer shares, and the checks of the params it updates
(see graphdl.optim for the whole story)."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..checks import GraphError, all_finite, format_type, real, shown
from .kernels import inverse_of, rounded

Settings = dict[str, Any]

# The largest step count read back from a checkpoint: float64 counts are exact up to it
# (float32 ones stop at 2**24, where adding 1 rounds back; bias corrections are 1 by then).
MAX_STEPS = 2**53


class Optimizer:
    """What graphdl's optimizers share: settings and parameter groups, the per-param state,
    the rates (device tensors, so a planned update can run at a new rate without being
    planned again), and the checkpoint protocol. A subclass names its settings
    (`SETTINGS`), its kinds of state (`SLOTS`, and `COUNTED` for a step count per param),
    checks its settings (`_check_settings`) and plans the update of a part of the params
    with one dtype, device, layout and settings (`_part`)."""

    SETTINGS: tuple[str, ...] = ("lr",)
    SLOTS: tuple[str, ...] = ()  # each param's state tensors, by kind (shaped like the param)
    NONNEGATIVE: tuple[str, ...] = ()  # the kinds that hold squares or sums of squares
    COUNTED = False  # whether each param has a step count ("step")

    def __init__(self, groups: Any = None, **settings: Any) -> None:
        checked = self._check_settings(settings, lambda k: k)
        for key in self.SETTINGS:
            setattr(self, key, checked[key])
        self.groups = self._check_groups(groups)
        self.fused = True  # use torch's fused kernels where they are right (False: always the multi-tensor ops)
        self._names: list[str] = []
        self._overrides: list[Settings] = []  # each param's group settings ({} for none)
        self._shapes: list[torch.Size] = []
        self._slots: list[str] = []
        self._state: dict[str, list[torch.Tensor]] = {}
        self._steps: list[torch.Tensor] = []  # each param's step count: a 0-d view of one of _bases
        self._bases: list[torch.Tensor] = []  # the step counts of the params of one device and dtype
        self._where: list[tuple[int, int]] = []  # param -> (base, position)
        self._rates: dict[tuple, torch.Tensor] = {}  # the plans' rates, by (factor, 1/lr?, device, dtype)
        self._rate_lr = math.nan  # the lr the plans' rates hold

    # -- settings ---------------------------------------------------------------------------

    def _check_settings(self, s: Settings, name: Callable[[str], str]) -> Settings:
        """`s` (every setting) checked, each error naming its argument by `name(key)`."""
        raise NotImplementedError

    def _settings(self) -> Settings:
        return {key: getattr(self, key) for key in self.SETTINGS}

    def _check_groups(self, groups: Any) -> list[Settings] | Callable[..., Any] | None:
        if groups is None or callable(groups):
            return groups
        form = ('groups must be a list of dicts such as [{"params": ["0.bias"], "weight_decay": 0.0}], '
                "or a function (name, tensor) -> dict of settings or None")
        if not isinstance(groups, (list, tuple)):
            raise ValueError(f"{form}; got {shown(groups)}")
        checked = []
        for k, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise ValueError(f"{form}; groups[{k}] is {shown(group)}, which has no 'params'")
            names = group["params"]
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"groups[{k}]['params'] must be a param name or a non-empty list of names such as "
                                 f"['0.weight', '0.bias'], got {shown(group['params'])}")
            overrides = {key: v for key, v in group.items() if key != "params"}
            checked.append({"params": list(names), **self._checked_overrides(overrides, f"groups[{k}]")})
        return checked

    def _checked_overrides(self, overrides: Any, where: str) -> Settings:
        """A group's settings, checked against the optimizer's others (an error names `where`)."""
        if not isinstance(overrides, dict):
            raise ValueError(f"{where} must be a dict of settings or None, got {shown(overrides)}")
        unknown = [key for key in overrides if key not in self.SETTINGS]
        if unknown:
            raise ValueError(f"{where} sets {shown(unknown[0])}, which {type(self).__name__} does not have; "
                             f"a group may set {', '.join(self.SETTINGS)}")
        merged = self._check_settings({**self._settings(), **overrides},
                                      lambda key: f"{where}[{key!r}]" if key in overrides else key)
        if "lr" in overrides and merged["lr"] != self.lr and self.lr == 0:
            raise ValueError(f"{where}['lr']={merged['lr']} cannot keep a ratio to the optimizer's lr, which is 0; "
                             "give the optimizer an lr > 0 (a group's rate follows it, and its schedule)")
        return {key: merged[key] for key in overrides}

    def _resolve(self, names: list[str], aliases: dict[str, str], params: list[torch.Tensor]) -> list[Settings]:
        """Each param's group settings ({} for none)."""
        overrides: list[Settings] = [{} for _ in names]
        groups = self.groups
        if groups is None:
            return overrides
        if callable(groups):
            for i, (name, p) in enumerate(zip(names, params)):
                got = groups(name, p)
                if got is not None:
                    overrides[i] = self._checked_overrides(got, f"groups({name!r}, ...)")
            return overrides
        index = {name: i for i, name in enumerate(names)}
        origin: list[int | None] = [None] * len(names)
        for k, group in enumerate(groups):
            settings = {key: v for key, v in group.items() if key != "params"}
            for name in group["params"]:
                i = index.get(aliases.get(name, name))
                if i is None:
                    raise ValueError(f"groups[{k}] names param {name!r}, which the model does not have; its params "
                                     f"are {', '.join(names) if names else 'none'}")
                if origin[i] is not None and origin[i] != k:
                    raise ValueError(f"param {names[i]} is in groups[{origin[i]}] and in groups[{k}] (a tied tensor "
                                     "is one param, whichever place names it); put it in one group")
                origin[i], overrides[i] = k, settings
        return overrides

    def _factor(self, overrides: Settings) -> float:
        """A group's rate over the optimizer's."""
        return 1.0 if "lr" not in overrides or overrides["lr"] == self.lr else overrides["lr"] / self.lr

    # -- state ------------------------------------------------------------------------------

    def _needs(self, slot: str, hp: Settings) -> bool:
        """Whether a param with settings `hp` uses state of kind `slot`."""
        return True

    def _fresh(self, slot: str, p: torch.Tensor, hp: Settings) -> torch.Tensor:
        return torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _hps(self) -> list[Settings]:
        settings = self._settings()
        return [{**settings, **o} if o else settings for o in self._overrides]

    def _bind(self, params: list[torch.Tensor], names: list[str] | None, aliases: dict[str, str] | None) -> None:
        if names is None:
            names = [str(i) for i in range(len(params))]
        names = list(names)
        if len(names) != len(params):
            raise ValueError(f"got {len(params)} params but {len(names)} names; give one name per param")
        self._overrides = self._resolve(names, dict(aliases or {}), params)
        self._names, self._shapes = names, [p.shape for p in params]
        hps = self._hps()
        self._slots = [s for s in self.SLOTS if any(self._needs(s, hp) for hp in hps)]

    def reset(self, params: list[torch.Tensor], names: list[str] | None = None,
              aliases: dict[str, str] | None = None) -> None:
        """Start these params from fresh state (zero moments, step 0). `names` are theirs
        for the groups (by default "0", "1", ... by position) and `aliases` maps other
        names of a tied tensor to the one in `names` (a model's `ties()`)."""
        params = list(params)
        self._bind(params, names, aliases)
        hps = self._hps()
        self._state = {slot: [self._fresh(slot, p, hp) for p, hp in zip(params, hps)] for slot in self._slots}
        self._pack_steps(params, [None] * len(params))

    def carry(self, before: list[Hashable], after: list[Hashable], params: list[torch.Tensor],
              names: list[str] | None = None, aliases: dict[str, str] | None = None) -> None:
        """Re-align the state with a new list of params: `before` and `after` identify the
        params of the old and new lists (their slots); a param in both keeps its state if
        its shape is unchanged (moved to its new dtype and device, as the param was), and
        every other starts afresh."""
        params = list(params)
        old = {key: i for i, key in enumerate(before)}
        old_shapes, old_state, old_steps = self._shapes, self._state, self._steps
        self._bind(params, names, aliases)
        kept = [old.get(key) for key in after]
        kept = [i if i is not None and i < len(old_shapes) and old_shapes[i] == p.shape else None
                for i, p in zip(kept, params)]
        hps = self._hps()
        state = {}
        for slot in self._slots:
            prior = old_state.get(slot, [])
            state[slot] = [prior[i].to(p.device, p.dtype) if i is not None and i < len(prior) else
                           self._fresh(slot, p, hp) for i, p, hp in zip(kept, params, hps)]
        self._state = state
        self._pack_steps(params, [old_steps[i] if i is not None and i < len(old_steps) else None for i in kept])

    def _pack_steps(self, params: list[torch.Tensor], values: list[torch.Tensor | None]) -> None:
        """Each param's step count (`values`, None for 0) as a 0-d view of one tensor per
        device and dtype, so that a step adds 1 to all of them in one op."""
        self._steps, self._bases, self._where = [], [], []
        if not self.COUNTED:
            return
        by: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by.setdefault((p.device, _step_dtype(p)), []).append(i)
        steps: list[torch.Tensor | None] = [None] * len(params)
        where: list[tuple[int, int]] = [(0, 0)] * len(params)
        for (device, dtype), idx in by.items():
            base = torch.zeros(len(idx), dtype=dtype, device=device)
            for j, i in enumerate(idx):
                if values[i] is not None:
                    base[j] = values[i].to(device, dtype)
            for j, (i, view) in enumerate(zip(idx, base.unbind(0))):
                steps[i], where[i] = view, (len(self._bases), j)
            self._bases.append(base)
        self._steps, self._where = steps, where  # type: ignore[assignment]

    def _ensure(self, params: list[torch.Tensor]) -> None:
        """State for these params: made afresh if there is none for this many, and made for
        any kind a setting changed since now needs."""
        if len(params) != len(self._overrides):
            self.reset(params)
            return
        hps = self._hps()
        for slot in self.SLOTS:
            if slot not in self._slots and any(self._needs(slot, hp) for hp in hps):
                self._slots = [s for s in self.SLOTS if s in self._slots or s == slot]
                self._state[slot] = [self._fresh(slot, p, hp) for p, hp in zip(params, hps)]

    def _check_state(self, params: list[torch.Tensor]) -> None:
        for slot in self._slots:
            for k, (p, u) in enumerate(zip(params, self._state[slot])):
                if (p.shape, p.dtype, p.device) != (u.shape, u.dtype, u.device):
                    raise ValueError(f"param {k} is {p.dtype}{list(p.shape)} on {p.device} but the {slot} kept for it "
                                     f"is {u.dtype}{list(u.shape)} on {u.device}: these are not the params it was made "
                                     "for; call reset(params) to start them from fresh state")
        for k, (p, s) in enumerate(zip(params, self._steps)):
            if s.device != p.device:
                raise ValueError(f"param {k} is on {p.device} but its step count is on {s.device}; call reset(params)")

    @property
    def names(self) -> list[str]:
        """The names of the params the state is for (by `reset` or `carry`)."""
        return list(self._names)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state (what a snapshot copies and data-parallel ranks share)."""
        return [t for slot in self._slots for t in self._state[slot]] + list(self._bases)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state by name, "KIND/PARAM" ("exp_avg/0.weight", "step/0.weight"): the live tensors."""
        named = {f"{slot}/{name}": t for slot in self._slots for name, t in zip(self._names, self._state[slot])}
        if self.COUNTED:
            named.update((f"step/{name}", s) for name, s in zip(self._names, self._steps))
        return named

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "load_state_dict") -> None:
        """Put `tensors` (as `state_dict` names them) into the state, after checking every
        one: the same kinds and params, each of the shape and dtype of the state it
        replaces, finite, squares >= 0, step counts whole numbers from 0 to 2**53.

        Raises:
            ValueError: the tensors are of other settings (kinds of state) or other params.
            GraphError: a tensor is malformed (the file it came from is corrupt).
        """
        mine = self.state_dict()
        if set(tensors) != set(mine):
            def kinds(d: dict[str, torch.Tensor]) -> str:
                found = sorted({name.split("/", 1)[0] for name in d})
                return ", ".join(found) if found else "no state"
            if {n.split("/", 1)[0] for n in tensors} == {n.split("/", 1)[0] for n in mine}:
                raise ValueError(f"{where}: the state is for params {_params_of(tensors)} but the model's are "
                                 f"{_params_of(mine)}; resume with the model that wrote it")
            raise ValueError(f"{where}: the state holds {kinds(tensors)} but {self!r} keeps {kinds(mine)}; resume "
                             "with the optimizer settings that wrote it")
        for name, ref in mine.items():
            t = tensors[name]
            kind = name.split("/", 1)[0]
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape or not t.is_floating_point() \
                    or (kind != "step" and t.dtype != ref.dtype):
                got = format_type(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise GraphError(f"{where}: the optimizer's {name} is {got}, not "
                                 f"{format_type(ref.dtype, tuple(ref.shape))}; it is corrupt")
            if not all_finite(t):
                raise GraphError(f"{where}: the optimizer's {name} is not finite; it is corrupt")
            if kind in self.NONNEGATIVE and bool((t < 0).any()):
                raise GraphError(f"{where}: the optimizer's {name} has negative values, but it holds squares; "
                                 "it is corrupt")
            if kind == "step" and not (float(t) == round(float(t)) and 0 <= float(t) <= MAX_STEPS):
                raise GraphError(f"{where}: the optimizer's {name} is {float(t)}, not a whole number of steps from 0 "
                                 f"to {MAX_STEPS}; it is corrupt")
        with torch.inference_mode():
            for name, ref in mine.items():
                ref.copy_(tensors[name])

    def config(self) -> dict[str, Any]:
        """The class, settings and each param's group settings, as JSON values (for checkpoints)."""
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v
        return {"class": type(self).__name__, "settings": {k: plain(v) for k, v in self._settings().items()},
                "groups": {name: {k: plain(v) for k, v in o.items()}
                           for name, o in zip(self._names, self._overrides) if o}}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        groups = "" if self.groups is None else f", groups={self.groups!r}"
        return f"{type(self).__name__}({settings}{groups})"

    # -- updates ----------------------------------------------------------------------------

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float | None = None) -> None:
        """Update `params` in place from `grads` (same order as at `reset`); `grads` are not modified.

        Any memory layout works (transposed, sliced, expanded gradients; transposed or
        sliced params); a param whose elements share memory (an expanded tensor) cannot
        be updated in place and is refused.
        """
        lr = self.lr if lr is None else real("lr", lr, 0.0)
        _check_step(params, grads, type(self).__name__)
        if len(params) == len(self._overrides):
            self._check_state(params)
        self.update(params, grads, lr)

    def update(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
               overwrite_grads: bool = False) -> None:
        """`step` without its checks, for a caller that made the gradients itself (fit);
        with `overwrite_grads` the update may use the gradients as scratch."""
        if not params:  # a model with nothing to train (only Standardize, say)
            return
        grads = [g if overwrite_grads and (g.is_contiguous() or torch._debug_has_internal_overlap(g) != 1)
                 else g.clone(memory_format=torch.contiguous_format) for g in grads]
        with torch.inference_mode():  # params that require grad, or made in inference mode, update too
            self.set_lr(lr)
            self.plan(params, grads)()

    def plan(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
        """A function applying one update to `params` from what `grads` hold when it is
        called, at the rate last given to `set_lr`; it overwrites the gradients.

        For a caller whose gradients land in the same tensors at every step (fit's
        arena, a captured CUDA graph): the checks and the kernel choice happen here, once,
        and the rate and step counts are read from tensors on the params' device, so a
        CUDA graph can capture the update and replay it at a new rate. The params are
        updated in parts of one dtype, device, layout and group settings, each with torch's
        fused kernel where it applies, else the multi-tensor ops.
        """
        params, grads = list(params), list(grads)
        self._ensure(params)
        if not params:
            return lambda: None
        self._check_state(params)
        parts: dict[tuple, list[int]] = {}
        for i, (p, g, o) in enumerate(zip(params, grads, self._overrides)):
            key = (tuple(sorted(o.items())), p.device, p.dtype, p.is_contiguous() and g.is_contiguous())
            parts.setdefault(key, []).append(i)
        settings = self._settings()
        fns = [self._part({**settings, **self._overrides[idx[0]]}, self._factor(self._overrides[idx[0]]), idx,
                          params, grads, key[3]) for key, idx in parts.items()]
        bases = list(self._bases)
        if not bases and len(fns) == 1:
            return fns[0]

        def apply() -> None:
            for base in bases:
                base.add_(1)
            for fn in fns:
                fn()
        return apply

    def _part(self, hp: Settings, factor: float, idx: list[int], params: list[torch.Tensor],
              grads: list[torch.Tensor], dense: bool) -> Callable[[], None]:
        """The update of params `idx` (one dtype and device; `dense`: they and their
        gradients are contiguous) with settings `hp`, at `factor` times the rate; the
        step counts are already incremented when it runs."""
        raise NotImplementedError

    def _steps_of(self, idx: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The one tensor holding the step counts of params `idx` (of one device and dtype), and their positions."""
        b = self._where[idx[0]][0]
        return self._bases[b], [self._where[i][1] for i in idx]

    def set_lr(self, lr: float) -> None:
        """The rate the functions from `plan` apply next (written into their rate tensors
        in place, only when it changes: a kernel launch on CUDA)."""
        if lr != self._rate_lr:
            self._rate_lr = lr
            with torch.inference_mode():  # rates made by a plan in inference mode are inference tensors
                for (factor, inverse, _, dtype), t in self._rates.items():
                    t.fill_(rounded(inverse_of(lr * factor) if inverse else lr * factor, dtype))

    def load_lr(self, lr: torch.Tensor) -> None:
        """Set the plans' rates from `lr`, a float64 0-d tensor on their device, with device
        ops only, so that a captured graph replays it with whatever `lr` then holds (a
        per-step schedule's rates, copied there once an epoch). `set_lr` fills the rates
        next time whatever it is given: after this they are not known on the host."""
        for (factor, inverse, device, _), t in self._rates.items():
            value = lr.to(device, torch.float64) * factor
            t.copy_(value.reciprocal_() if inverse else value)  # 1/0 = inf, and past float32's range inf: as set_lr
        self.forget_lr()

    def forget_lr(self) -> None:
        """The rate tensors were changed on the device (`load_lr` in a replayed graph): the
        next `set_lr` fills them whatever rate it is given."""
        self._rate_lr = math.nan

    def _rate(self, factor: float, device: torch.device, dtype: torch.dtype, inverse: bool = False) -> torch.Tensor:
        """The rate (or 1/rate) times `factor`, as a 0-d tensor that `set_lr` keeps current."""
        key = (factor, inverse, device, dtype)
        t = self._rates.get(key)
        if t is None:
            if math.isnan(self._rate_lr):
                self._rate_lr = self.lr
            value = self._rate_lr * factor
            t = self._rates[key] = torch.tensor(rounded(inverse_of(value) if inverse else value, dtype),
                                                dtype=dtype, device=device)
        return t


def _params_of(named: dict[str, torch.Tensor]) -> str:
    found = list(dict.fromkeys(name.split("/", 1)[1] for name in named if "/" in name))
    return ", ".join(found) if found else "none"


def _step_dtype(p: torch.Tensor) -> torch.dtype:
    """Step counts are float32, as torch's fused kernels read them; float64 for float64
    params on the CPU (whose kernels read either), so their bias corrections are exact."""
    return torch.float64 if p.dtype == torch.float64 and p.device.type == "cpu" else torch.float32


def positive(name: str, value: Any) -> float:
    number = real(name, value, 0.0)
    if number == 0:
        raise ValueError(f"{name} must be > 0 (it keeps a division finite), got {shown(value)}")
    return number


def betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), each in [0, 1), e.g. (0.9, 0.999); got {shown(value)}")
    return (real(f"{name}[0]", value[0], 0.0, 1.0, high_open=True),
            real(f"{name}[1]", value[1], 0.0, 1.0, high_open=True))


def checked_optimizer(optimizer: Any) -> Optimizer:
    """`optimizer` if it is a graphdl optimizer; otherwise a ValueError saying what to pass."""
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a graphdl optimizer such as gd.SGD(lr=0.01) or gd.Adam(), "
                         f"got {optimizer!r}")
    return optimizer


def _check_step(params: list[torch.Tensor], grads: list[torch.Tensor], kind: str = "SGD") -> None:
    """Params and gradients must pair up: same count, shape, dtype and device; each param
    writable in place."""
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise ValueError("step takes a list of params and a list of gradients")
    if len(params) != len(grads):
        raise ValueError(f"step got {len(params)} params but {len(grads)} gradients; give one gradient per param")
    for k, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            raise ValueError(f"step: param {k} and its gradient must be torch.Tensors, "
                             f"got {type(p).__name__} and {type(g).__name__}")
        if (p.shape, p.dtype, p.device) != (g.shape, g.dtype, g.device):
            raise ValueError(f"step: param {k} is {p.dtype}{list(p.shape)} on {p.device} but its gradient is "
                             f"{g.dtype}{list(g.shape)} on {g.device}; they must match")
        if not p.is_floating_point():
            raise ValueError(f"step: param {k} is {p.dtype}; {kind} updates floating-point params only")
        check_updatable(f"step: param {k}", p)


def check_apart(tensors: dict[str, torch.Tensor]) -> None:
    """Params updated in place one by one must not share elements: a view of part of
    another param would be updated twice a step, once through each. (One tensor held in
    two places is one param, and comes here once.)"""
    spans = []
    for name, t in tensors.items():
        if t.numel() and not t.is_meta:
            reach = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # torch's strides are >= 0
            spans.append((t.untyped_storage().data_ptr(), t.data_ptr(), t.data_ptr() + reach * t.itemsize, name, t))
    spans.sort(key=lambda s: (s[0], s[1]))
    for i, (storage, _, end, name, t) in enumerate(spans):
        for storage2, begin2, _, name2, t2 in spans[i + 1:]:
            if storage2 != storage or begin2 >= end:
                break
            if not _share_elements(t, t2):
                continue
            raise ValueError(f"params {name} and {name2} share elements but are not one tensor (they view "
                             f"overlapping parts of one), so training would update those elements twice a step; give "
                             f"{name2} its own memory (.clone()), or tie the two as one tensor "
                             "(layer.weight = other.weight)")


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage have an element in common (exactly, for one dtype)."""
    if a.dtype != b.dtype:
        return True
    size = a.untyped_storage().nbytes() // a.itemsize
    index = torch.arange(size, device="cpu")
    elements = [torch.as_strided(index, t.shape, t.stride(), t.storage_offset()).reshape(-1) for t in (a, b)]
    return bool(torch.isin(elements[0], elements[1]).any())


def check_updatable(what: str, p: torch.Tensor) -> None:
    """A param updated in place needs memory of its own for each element (not an expanded view)."""
    if not p.is_contiguous() and torch._debug_has_internal_overlap(p) == 1:
        raise ValueError(f"{what} (stride {p.stride()}) has elements that share memory, such as an expanded "
                         "tensor, so it cannot be updated in place; give it its own memory with .clone()")
