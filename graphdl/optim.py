"""graphdl's optimizers (SGD, Adam, AdamW, RMSprop, Adagrad) and learning-rate schedules.

Each optimizer follows torch.optim's update rule, defaults and argument names, and updates
the live param tensors in place with one fused multi-tensor kernel where torch has one
that is right for the params' dtype and device (`_fused_sgd_`, `_fused_adam_`,
`_fused_adamw_`, `_fused_adagrad_`: the kernels behind torch.optim's `fused=True`), else
with a few `torch._foreach_*` ops: either way a handful of kernel launches per step
whatever the number of params, and no host sync (step counts and rates live in tensors).

They share one protocol (`Optimizer`), which is all that the training step, fit, its
checkpoints and data-parallel training use:

- `reset(params, names)`, `carry(before, after, params, names)`: the per-param state
  (moments, velocities, step counts), made afresh or kept across a change of the model;
- `plan(params, grads)` -> a function applying one update, at the rate of `set_lr`;
  `update` and `step` apply one directly;
- `state_tensors()` (every state tensor: snapshots, broadcasts), `state_dict()` /
  `load_state_dict()` (named and checked, for checkpoints) and `config()`.

Parameter groups: every optimizer takes `groups=`, per-param overrides of its settings,
as a list of {"params": [names], setting: value} or a function (name, tensor) ->
{setting: value} or None. Names are the model's ("0.weight", "2.bias"): a list may name
a tied tensor by any of its places, a function is called once per tensor, with its first
place's name. A name that matches nothing is refused, listing the names there are. A
group's "lr" keeps its ratio to the optimizer's lr, so a schedule scales every group
alike, as torch's multiplicative schedulers do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .checks import GraphError, flag, format_type, real, shown, whole

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
            if not bool(t.isfinite().all()):
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
                    t.fill_(_rounded(_inverse_of(lr * factor) if inverse else lr * factor, dtype))

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
            t = self._rates[key] = torch.tensor(_rounded(_inverse_of(value) if inverse else value, dtype),
                                                dtype=dtype, device=device)
        return t


def _params_of(named: dict[str, torch.Tensor]) -> str:
    found = list(dict.fromkeys(name.split("/", 1)[1] for name in named if "/" in name))
    return ", ".join(found) if found else "none"


def _step_dtype(p: torch.Tensor) -> torch.dtype:
    """Step counts are float32, as torch's fused kernels read them; float64 for float64
    params on the CPU (whose kernels read either), so their bias corrections are exact."""
    return torch.float64 if p.dtype == torch.float64 and p.device.type == "cpu" else torch.float32


def _positive(name: str, value: Any) -> float:
    number = real(name, value, 0.0)
    if number == 0:
        raise ValueError(f"{name} must be > 0 (it keeps a division finite), got {shown(value)}")
    return number


def _betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), each in [0, 1), e.g. (0.9, 0.999); got {shown(value)}")
    return (real(f"{name}[0]", value[0], 0.0, 1.0, high_open=True),
            real(f"{name}[1]", value[1], 0.0, 1.0, high_open=True))


# -- torch's fused kernels ------------------------------------------------------------------

_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def _fused_works(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's fused `kernel` updates params of `dtype` on `device` right. On CUDA
    torch has them all but `_fused_adagrad_`; on the CPU each is tried once per dtype
    (`_probe`): torch 2.13's `_fused_sgd_` leaves every full SIMD block of a float16 or
    bfloat16 param untouched there (pytorch/pytorch#191763), so that f16 training would
    silently stop; such params take the multi-tensor ops."""
    if not hasattr(torch, kernel):
        return False
    if device.type == "cuda":
        return kernel != "_fused_adagrad_"
    if device.type != "cpu":
        return False
    key = (kernel, dtype)
    if key not in _WORKS:
        _WORKS[key] = _probe(kernel, dtype)
    return _WORKS[key]


def _probe(kernel: str, dtype: torch.dtype) -> bool:
    """One step of `kernel` from w = 1 with g = 1 at rate 0.25, after which each rule gives
    w = 0.75, on tensors of 1, 7, 64 and 515 elements (whole SIMD blocks and tails):
    whether every element got there."""
    sizes = (1, 7, 64, 515)

    def ones() -> list[torch.Tensor]:
        return [torch.ones(n, dtype=dtype) for n in sizes]

    def zeros() -> list[torch.Tensor]:
        return [torch.zeros(n, dtype=dtype) for n in sizes]

    def steps() -> list[torch.Tensor]:
        return [torch.ones((), dtype=torch.float32) for _ in sizes]

    runs: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        try:
            fn = getattr(torch, kernel)
            if kernel == "_fused_sgd_":
                for momentum in (0.0, 0.9):  # both of its paths, called as `SGD._part` calls them
                    params = ones()
                    if momentum:
                        fn(params, ones(), zeros(), weight_decay=0.0, momentum=momentum, lr=1.0, dampening=0.0,
                           nesterov=False, maximize=False, is_first_step=False,
                           grad_scale=torch.tensor(4.0, dtype=torch.float32))
                    else:
                        fn(params, ones(), [], weight_decay=0.0, momentum=0.0, lr=torch.tensor(0.25), dampening=0.0,
                           nesterov=False, maximize=False, is_first_step=False)
                    runs.append(params)
            elif kernel == "_fused_adagrad_":
                params = ones()
                fn(params, ones(), zeros(), steps(), lr=torch.tensor(0.25, dtype=torch.float64), lr_decay=0.0,
                   weight_decay=0.0, eps=1e-10, maximize=False)
                runs.append(params)
            else:
                for amsgrad in (False, True):
                    params = ones()
                    fn(params, ones(), zeros(), zeros(), zeros() if amsgrad else [], steps(),
                       lr=torch.tensor(0.25, dtype=torch.float64), beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                       amsgrad=amsgrad, maximize=False)
                    runs.append(params)
        except (RuntimeError, TypeError):
            return False
    return all(bool(((p.double() - 0.75).abs() <= 1e-2).all()) for params in runs for p in params)


# torch's fused kernels on CPU fork every thread for each tensor, whatever its size: with 2
# threads the disk net's SGD update took 115 µs (210 µs on a loaded machine) against 4 µs
# on one thread, and 8 µs switching to one thread for the call (Adam's: 86 µs against 64).
# Below ATen's own grain for parallel work (32768 elements) the update runs on one thread.
_SERIAL_BELOW = 32768


def _kernel_for(kernel: str, params: list[torch.Tensor]) -> Callable[..., None]:
    """torch's fused `kernel`, or for a few small CPU params, a call of it on one thread."""
    fn = getattr(torch, kernel)
    if params[0].device.type != "cpu" or sum(p.numel() for p in params) >= _SERIAL_BELOW:
        return fn

    def on_one_thread(*args: Any, **kwargs: Any) -> None:
        threads = torch.get_num_threads()
        if threads == 1:
            fn(*args, **kwargs)
            return
        torch.set_num_threads(1)
        try:
            fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return on_one_thread


def _inverse_of(lr: float) -> float:
    """1/lr, the fused SGD kernel's grad_scale; a rate of 0 gives inf, so ηg = 0."""
    return 1.0 / lr if lr else math.inf


def _rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as a tensor of `dtype` holds it: past the dtype's range, inf (fill_ refuses
    to overflow; 1/lr of a rate decayed to 1e-60 is such a value)."""
    return value if value <= torch.finfo(dtype).max else math.inf


def _factor_of(value: float, like: torch.Tensor) -> float | torch.Tensor:
    """A constant factor for `torch._foreach_mul_` on tensors like `like`: for float32 and
    float64 on the CPU a 0-d tensor of their dtype (a Python scalar costs ~1.5 µs a tensor
    there to wrap: 14 µs against 4 for the disk net's 8), else the number (CUDA's scalar
    overload is the fused one; float16 kernels take a number in float32, a tensor in float16)."""
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _adder_of(value: float, tensors: list[torch.Tensor]) -> float | list[torch.Tensor]:
    """A constant to add with `torch._foreach_add_` to `tensors`: on the CPU views of one
    0-d tensor expanded to each one's shape (its scalar and 0-d-tensor overloads take
    ~14 µs for the disk net's 8 tensors, a list 5), on CUDA the number."""
    if tensors[0].device.type != "cpu" or tensors[0].dtype not in (torch.float32, torch.float64):
        return value
    one = torch.tensor(value, dtype=tensors[0].dtype, device=tensors[0].device)
    return [one.expand_as(t) for t in tensors]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the multi-tensor paths' scalars (rates, bias corrections)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the optimizers -------------------------------------------------------------------------


class SGD(Optimizer):
    """Stochastic gradient descent.

    Args:
        lr: the learning rate η (>= 0).
        momentum: γ in [0, 1): u <- γu + ηg, w <- w - u.
        nesterov: look ahead: w <- w - (γu + ηg) with the updated u.
        weight_decay: λ >= 0, adds λw to each gradient (L2 regularisation).
        groups: per-param settings (see the module doc).

    The velocity u is stored as it is, not divided by the rate as torch stores it, so a
    rate that changes (a schedule) needs no rescaling and u stays bounded however far the
    rate decays. Under a constant rate the steps are torch.optim.SGD's (dampening 0).
    """

    SETTINGS = ("lr", "momentum", "nesterov", "weight_decay")
    SLOTS = ("velocity",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, groups: Any = None) -> None:
        super().__init__(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    def _check_settings(self, s: Settings, name: Callable[[str], str]) -> Settings:
        checked = {"lr": real(name("lr"), s["lr"], 0.0),
                   "momentum": real(name("momentum"), s["momentum"], 0.0, 1.0, high_open=True),
                   "nesterov": flag(name("nesterov"), s["nesterov"]),
                   "weight_decay": real(name("weight_decay"), s["weight_decay"], 0.0)}
        if checked["nesterov"] and checked["momentum"] == 0:
            raise ValueError(f"{name('nesterov')}=True needs momentum > 0")
        return checked

    def _needs(self, slot: str, hp: Settings) -> bool:
        return bool(hp["momentum"])

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The velocities u, one per param (none without momentum)."""
        return self._state.get("velocity", [])

    def _part(self, hp: Settings, factor: float, idx: list[int], params: list[torch.Tensor],
              grads: list[torch.Tensor], dense: bool) -> Callable[[], None]:
        params, grads = [params[i] for i in idx], [grads[i] for i in idx]
        decay, momentum, nesterov = hp["weight_decay"], hp["momentum"], hp["nesterov"]
        buffers = [self._state["velocity"][i] for i in idx] if momentum else []
        device, dtype = params[0].device, params[0].dtype
        # torch's fused kernel walks param, gradient and buffer as flat arrays, so they must
        # all be contiguous; it reads a float32 rate: 1/η as grad_scale with momentum (it
        # takes ηg by scaling the gradients), η as lr without. float64 params take the
        # multi-tensor ops and an exact rate (of the params' dtype).
        fused = self.fused and dense and dtype != torch.float64 and _fused_works("_fused_sgd_", device, dtype)
        rate = self._rate(factor, device, torch.float32 if fused else dtype, inverse=fused and bool(momentum))
        fused_sgd = _kernel_for("_fused_sgd_", params) if fused else None

        def apply() -> None:
            if decay and (momentum or not fused):
                torch._foreach_add_(grads, params, alpha=decay)
            if fused and momentum:
                # torch's kernel: g <- g / grad_scale, b <- γb + g, w <- w - lr'(g + γb if nesterov else b).
                # With grad_scale = 1/η and lr' = 1, b is u and the rule is ours.
                fused_sgd(params, grads, buffers, weight_decay=0.0, momentum=momentum, lr=1.0, dampening=0.0,
                          nesterov=nesterov, maximize=False, is_first_step=False, grad_scale=rate)
            elif fused:  # w <- w - η(g + λw): torch's rule exactly
                fused_sgd(params, grads, [], weight_decay=decay, momentum=0.0, lr=rate, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=False)
            else:
                torch._foreach_mul_(grads, rate)  # ηg, or η(g + λw)
                if not momentum:
                    torch._foreach_sub_(params, grads)
                    return
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads)
                if nesterov:
                    torch._foreach_add_(params, buffers, alpha=-momentum)
                    torch._foreach_sub_(params, grads)
                else:
                    torch._foreach_sub_(params, buffers)
        return apply


class Adam(Optimizer):
    """Adam (Kingma & Ba), torch.optim.Adam's rule and defaults.

    m <- β1 m + (1 - β1) g, v <- β2 v + (1 - β2) g², (AMSGrad: v̂ <- max(v̂, v)),
    w <- w - η m / (1 - β1^t) / (sqrt(v or v̂) / sqrt(1 - β2^t) + ε), with t the param's
    step count; weight decay adds λw to g (L2), AdamW's shrinks w by ηλ first (decoupled).

    Args:
        lr: η >= 0. betas: (β1, β2), each in [0, 1). eps: ε > 0.
        weight_decay: λ >= 0. amsgrad: keep the largest v. groups: per-param settings.
    """

    SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    NONNEGATIVE = ("exp_avg_sq", "max_exp_avg_sq")
    COUNTED = True
    DECOUPLED = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, groups: Any = None) -> None:
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    def _check_settings(self, s: Settings, name: Callable[[str], str]) -> Settings:
        return {"lr": real(name("lr"), s["lr"], 0.0), "betas": _betas(name("betas"), s["betas"]),
                "eps": _positive(name("eps"), s["eps"]),
                "weight_decay": real(name("weight_decay"), s["weight_decay"], 0.0),
                "amsgrad": flag(name("amsgrad"), s["amsgrad"])}

    def _needs(self, slot: str, hp: Settings) -> bool:
        return slot != "max_exp_avg_sq" or hp["amsgrad"]

    def _part(self, hp: Settings, factor: float, idx: list[int], params: list[torch.Tensor],
              grads: list[torch.Tensor], dense: bool) -> Callable[[], None]:
        P, G = [params[i] for i in idx], [grads[i] for i in idx]
        M, V = [self._state["exp_avg"][i] for i in idx], [self._state["exp_avg_sq"][i] for i in idx]
        amsgrad = hp["amsgrad"]
        VM = [self._state["max_exp_avg_sq"][i] for i in idx] if amsgrad else []
        (b1, b2), eps, decay, decoupled = hp["betas"], hp["eps"], hp["weight_decay"], self.DECOUPLED
        device, dtype = P[0].device, P[0].dtype
        kernel = "_fused_adamw_" if decoupled else "_fused_adam_"
        if self.fused and dense and _fused_works(kernel, device, dtype):
            # The CPU kernel reads the rate as a double; CUDA's, as a float32 on the device.
            rate = self._rate(factor, device, torch.float64 if device.type == "cpu" else torch.float32)
            fused, steps = _kernel_for(kernel, P), [self._steps[i] for i in idx]

            def fused_update() -> None:
                fused(P, G, M, V, VM, steps, lr=rate, beta1=b1, beta2=b2, weight_decay=decay, eps=eps,
                      amsgrad=amsgrad, maximize=False)
            return fused_update

        # torch's multi-tensor rule with the step counts on the device (its capturable
        # form): w <- w - m / ((sqrt(v) / sqrt(1 - β2^t) + ε) (1 - β1^t) / η).
        # The bias corrections are worked out in float64 (from the exact counts), as torch
        # works them out on the host (from 1 - 0.999 in float32, sqrt(1 - β2) is 6e-6 off).
        base, at = self._steps_of(idx)
        rate = self._rate(factor, device, torch.float64)
        bc1, bc2 = (torch.empty(base.shape, dtype=torch.float64, device=device) for _ in range(2))
        shrink = torch.empty_like(rate)
        c1, c2 = [bc1[j] for j in at], [bc2[j] for j in at]
        beta2, epsilon = _factor_of(b2, P[0]), _adder_of(eps, P)

        def update() -> None:
            if decay and decoupled:
                torch.mul(rate, -decay, out=shrink)
                torch._foreach_mul_(P, shrink.add_(1))  # w <- (1 - ηλ) w
            elif decay:
                torch._foreach_add_(G, P, alpha=decay)
            torch._foreach_lerp_(M, G, 1 - b1)
            torch._foreach_mul_(V, beta2)
            torch._foreach_addcmul_(V, G, G, value=1 - b2)
            if amsgrad:
                torch._foreach_maximum_(VM, V)
            torch.pow(b1, bc1.copy_(base), out=bc1)
            bc1.neg_().add_(1).div_(rate)  # (1 - β1^t) / η
            torch.pow(b2, bc2.copy_(base), out=bc2)
            bc2.neg_().add_(1).sqrt_()  # sqrt(1 - β2^t)
            denom = torch._foreach_sqrt(VM if amsgrad else V)
            torch._foreach_div_(denom, c2)
            torch._foreach_add_(denom, epsilon)
            torch._foreach_mul_(denom, c1)
            torch._foreach_addcdiv_(P, M, denom, value=-1.0)
        return update


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), torch.optim.AdamW's rule and
    defaults: w <- (1 - ηλ) w before Adam's step, instead of adding λw to the gradient."""

    DECOUPLED = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, groups: Any = None) -> None:
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, groups=groups)


class RMSprop(Optimizer):
    """RMSprop, torch.optim.RMSprop's rule and defaults.

    g <- g + λw, s <- α s + (1 - α) g²; centered: ḡ <- α ḡ + (1 - α) g and d = sqrt(s - ḡ²) + ε,
    else d = sqrt(s) + ε; with momentum μ > 0: b <- μ b + g / d, w <- w - η b; else
    w <- w - η g / d. (torch has no fused kernel for it: the multi-tensor ops.)

    Args:
        lr: η >= 0. alpha: α in [0, 1). eps: ε > 0. weight_decay: λ >= 0.
        momentum: μ >= 0. centered: normalise by the gradient's variance. groups: per-param settings.
    """

    SETTINGS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    SLOTS = ("square_avg", "momentum_buffer", "grad_avg")
    NONNEGATIVE = ("square_avg",)

    def __init__(self, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, groups: Any = None) -> None:
        super().__init__(groups, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered)

    def _check_settings(self, s: Settings, name: Callable[[str], str]) -> Settings:
        return {"lr": real(name("lr"), s["lr"], 0.0),
                "alpha": real(name("alpha"), s["alpha"], 0.0, 1.0, high_open=True),
                "eps": _positive(name("eps"), s["eps"]),
                "weight_decay": real(name("weight_decay"), s["weight_decay"], 0.0),
                "momentum": real(name("momentum"), s["momentum"], 0.0),
                "centered": flag(name("centered"), s["centered"])}

    def _needs(self, slot: str, hp: Settings) -> bool:
        return {"square_avg": True, "momentum_buffer": hp["momentum"] > 0, "grad_avg": hp["centered"]}[slot]

    def _part(self, hp: Settings, factor: float, idx: list[int], params: list[torch.Tensor],
              grads: list[torch.Tensor], dense: bool) -> Callable[[], None]:
        P, G = [params[i] for i in idx], [grads[i] for i in idx]
        S = [self._state["square_avg"][i] for i in idx]
        alpha, eps, decay, momentum, centered = (hp[k] for k in ("alpha", "eps", "weight_decay", "momentum",
                                                                 "centered"))
        B = [self._state["momentum_buffer"][i] for i in idx] if momentum else []
        A = [self._state["grad_avg"][i] for i in idx] if centered else []
        rate = self._rate(factor, P[0].device, _compute_dtype(P[0].dtype))
        kept, epsilon, carried = _factor_of(alpha, P[0]), _adder_of(eps, P), _factor_of(momentum, P[0])

        def update() -> None:
            if decay:
                torch._foreach_add_(G, P, alpha=decay)
            torch._foreach_mul_(S, kept)
            torch._foreach_addcmul_(S, G, G, value=1 - alpha)
            if centered:
                torch._foreach_lerp_(A, G, 1 - alpha)
                avg = torch._foreach_addcmul(S, A, A, value=-1.0)
                torch._foreach_sqrt_(avg)
            else:
                avg = torch._foreach_sqrt(S)
            torch._foreach_add_(avg, epsilon)
            if momentum:
                torch._foreach_mul_(B, carried)
                torch._foreach_addcdiv_(B, G, avg)
                torch._foreach_sub_(P, torch._foreach_mul(B, rate))
            else:
                torch._foreach_mul_(G, rate)
                torch._foreach_addcdiv_(P, G, avg, value=-1.0)
        return update


class Adagrad(Optimizer):
    """Adagrad, torch.optim.Adagrad's rule and defaults.

    g <- g + λw, s <- s + g², w <- w - η_t g / (sqrt(s) + ε), η_t = η / (1 + (t - 1) δ)
    with t the param's step count and δ the lr decay; s starts at `initial_accumulator_value`
    (a group's own, where it sets one: torch.optim.Adagrad takes the constructor's for all).

    Args:
        lr: η >= 0. lr_decay: δ >= 0. weight_decay: λ >= 0.
        initial_accumulator_value: >= 0. eps: ε > 0. groups: per-param settings.
    """

    SETTINGS = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    SLOTS = ("sum",)
    NONNEGATIVE = ("sum",)
    COUNTED = True

    def __init__(self, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, groups: Any = None) -> None:
        super().__init__(groups, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps)

    def _check_settings(self, s: Settings, name: Callable[[str], str]) -> Settings:
        return {"lr": real(name("lr"), s["lr"], 0.0), "lr_decay": real(name("lr_decay"), s["lr_decay"], 0.0),
                "weight_decay": real(name("weight_decay"), s["weight_decay"], 0.0),
                "initial_accumulator_value": real(name("initial_accumulator_value"),
                                                  s["initial_accumulator_value"], 0.0),
                "eps": _positive(name("eps"), s["eps"])}

    def _fresh(self, slot: str, p: torch.Tensor, hp: Settings) -> torch.Tensor:
        return torch.full_like(p, hp["initial_accumulator_value"], memory_format=torch.contiguous_format)

    def _part(self, hp: Settings, factor: float, idx: list[int], params: list[torch.Tensor],
              grads: list[torch.Tensor], dense: bool) -> Callable[[], None]:
        P, G, S = [params[i] for i in idx], [grads[i] for i in idx], [self._state["sum"][i] for i in idx]
        lr_decay, decay, eps = hp["lr_decay"], hp["weight_decay"], hp["eps"]
        device, dtype = P[0].device, P[0].dtype
        if self.fused and dense and _fused_works("_fused_adagrad_", device, dtype):
            rate = self._rate(factor, device, torch.float64)  # the CPU kernel reads it as a double
            fused, steps = _kernel_for("_fused_adagrad_", P), [self._steps[i] for i in idx]

            def fused_update() -> None:
                fused(P, G, S, steps, lr=rate, lr_decay=lr_decay, weight_decay=decay, eps=eps, maximize=False)
            return fused_update

        base, at = self._steps_of(idx)
        rate = self._rate(factor, device, torch.float64)
        decayed = torch.empty(base.shape, dtype=torch.float64, device=device)
        rates = [decayed[j] for j in at]
        epsilon = _adder_of(eps, P)

        def update() -> None:
            if decay:
                torch._foreach_add_(G, P, alpha=decay)
            torch._foreach_addcmul_(S, G, G, value=1.0)
            std = torch._foreach_sqrt(S)
            torch._foreach_add_(std, epsilon)
            if lr_decay:
                decayed.copy_(base).sub_(1).mul_(lr_decay).add_(1)
                torch.div(rate, decayed, out=decayed)  # η / (1 + (t - 1) δ)
                torch._foreach_mul_(G, rates)
            else:
                torch._foreach_mul_(G, rate)
            torch._foreach_addcdiv_(P, G, std, value=-1.0)
        return update


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


class Schedule:
    """A learning-rate schedule: `schedule(i, base_lr)` gives the lr of epoch i (from 0),
    or, where `per` is "step", of step i (from 0, counted over the whole fit: epoch e's
    k-th batch is step e * batches_per_epoch + k). fit sets a per-step rate into the
    update's rate tensors at every step, and records each epoch's first in History["lr"]."""

    per = "epoch"

    def __call__(self, epoch: int, base_lr: float) -> float:
        raise NotImplementedError


class Constant(Schedule):
    """The base learning rate throughout."""

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr


class StepDecay(Schedule):
    """Multiply the learning rate by `factor` every `every` epochs."""

    def __init__(self, every: int, factor: float) -> None:
        self.every = whole("every", every, 1)
        self.factor = real("factor", factor, 0.0)

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.factor ** (epoch // self.every)

    def __repr__(self) -> str:
        return f"StepDecay(every={self.every}, factor={self.factor})"


class ExponentialDecay(Schedule):
    """Multiply the learning rate by `rate` every epoch."""

    def __init__(self, rate: float) -> None:
        self.rate = real("rate", rate, 0.0)

    def __call__(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.rate**epoch

    def __repr__(self) -> str:
        return f"ExponentialDecay(rate={self.rate})"


class CosineDecay(Schedule):
    """Cosine annealing from the base rate down to `min_lr` over `epochs` epochs, or with
    `steps=` over that many steps (a per-step schedule), then `min_lr`: torch's
    CosineAnnealingLR(T_max=epochs or steps, eta_min=min_lr) up to T_max."""

    def __init__(self, epochs: int | None = None, min_lr: float = 0.0, *, steps: int | None = None) -> None:
        if (epochs is None) == (steps is None):
            raise ValueError("CosineDecay takes epochs=N (a rate per epoch) or steps=N (a rate per step), "
                             f"one of them; got epochs={shown(epochs)}, steps={shown(steps)}")
        self.epochs = None if epochs is None else whole("epochs", epochs, 1)
        self.steps = None if steps is None else whole("steps", steps, 1)
        self.per = "epoch" if steps is None else "step"
        self.min_lr = real("min_lr", min_lr, 0.0)

    def __call__(self, i: int, base_lr: float) -> float:
        span = self.epochs if self.steps is None else self.steps
        t = min(i, span) / span
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    def __repr__(self) -> str:
        span = f"epochs={self.epochs}" if self.steps is None else f"steps={self.steps}"
        return f"CosineDecay({span}, min_lr={self.min_lr})"


class PerStep(Schedule):
    """Any function `fn(step, base_lr) -> lr`, called for every step (from 0) instead of
    every epoch: `gd.PerStep(lambda step, lr: lr * 0.999**step)`."""

    per = "step"

    def __init__(self, fn: Callable[[int, float], float]) -> None:
        if not callable(fn):
            raise ValueError(f"PerStep takes a function (step, base_lr) -> lr, got {shown(fn)}")
        self.fn = fn

    def __call__(self, step: int, base_lr: float) -> float:
        return self.fn(step, base_lr)

    def __repr__(self) -> str:
        return f"PerStep({self.fn!r})"


class LinearWarmup(Schedule):
    """A per-step schedule: the rate rises linearly over the first `steps` steps, base_lr *
    (step + 1) / steps, then follows `then` (a per-step schedule, called with the steps
    counted from the warm-up's end) or stays at base_lr. torch's LinearLR(start_factor=
    1/steps, total_iters=steps - 1), followed by `then` as in SequentialLR."""

    per = "step"

    def __init__(self, steps: int, then: Schedule | Callable[[int, float], float] | None = None) -> None:
        self.steps = whole("steps", steps, 1)
        if then is not None and (not callable(then) or getattr(then, "per", "step") != "step"):
            raise ValueError(f"then must be a per-step schedule such as gd.CosineDecay(steps=1000), a function "
                             f"(step, base_lr) -> lr, or None; got {shown(then)}")
        self.then = then

    def __call__(self, step: int, base_lr: float) -> float:
        if step < self.steps:
            return base_lr * (step + 1) / self.steps
        return base_lr if self.then is None else self.then(step - self.steps, base_lr)

    def __repr__(self) -> str:
        return f"LinearWarmup(steps={self.steps}, then={self.then!r})"


class OneCycle(Schedule):
    """torch's OneCycleLR, per step (without its momentum cycling): from max_lr / div_factor
    up to max_lr over the first pct_start of `total_steps`, then down to max_lr /
    div_factor / final_div_factor (three_phase: back to the start first), by cosine or
    linear annealing. It sets the rate itself (the optimizer's lr is not used; a group's
    keeps its ratio). A fit of more than total_steps steps is refused before it starts."""

    per = "step"

    def __init__(self, max_lr: float, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False) -> None:
        self.max_lr = real("max_lr", max_lr, 0.0)
        self.total_steps = whole("total_steps", total_steps, 1)
        self.pct_start = real("pct_start", pct_start, 0.0, 1.0)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {shown(anneal_strategy)}")
        self.anneal_strategy = anneal_strategy
        self.div_factor = _positive("div_factor", div_factor)
        self.final_div_factor = _positive("final_div_factor", final_div_factor)
        self.three_phase = flag("three_phase", three_phase)
        initial = self.max_lr / self.div_factor
        least = initial / self.final_div_factor
        up = self.pct_start * self.total_steps - 1
        if three_phase:
            self.phases = [(up, initial, self.max_lr), (2 * up, self.max_lr, initial),
                           (self.total_steps - 1, initial, least)]
        else:
            self.phases = [(up, initial, self.max_lr), (self.total_steps - 1, self.max_lr, least)]
        ends = [0.0] + [end for end, _, _ in self.phases]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"OneCycle(total_steps={self.total_steps}, pct_start={self.pct_start}) leaves a phase "
                             "without steps: pct_start * total_steps must exceed 1 and leave steps after it; "
                             "give more total_steps or another pct_start")

    def __call__(self, step: int, base_lr: float) -> float:
        if step >= self.total_steps:
            raise ValueError(f"OneCycle(total_steps={self.total_steps}) was asked for the rate of step {step + 1}, "
                             f"past its end; give total_steps >= the fit's steps (epochs x batches per epoch)")
        start = 0.0
        for k, (end, first, last) in enumerate(self.phases):
            if step <= end or k == len(self.phases) - 1:
                pct = (step - start) / (end - start)
                if self.anneal_strategy == "linear":
                    return (last - first) * pct + first
                return last + (first - last) / 2.0 * (math.cos(math.pi * pct) + 1)
            start = end
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return (f"OneCycle(max_lr={self.max_lr}, total_steps={self.total_steps}, pct_start={self.pct_start}, "
                f"anneal_strategy={self.anneal_strategy!r}, div_factor={self.div_factor}, "
                f"final_div_factor={self.final_div_factor}, three_phase={self.three_phase})")
