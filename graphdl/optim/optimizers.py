"""The optimizers: SGD, Adam, AdamW, RMSprop and Adagrad, each with torch.optim's rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..checks import flag, real
from .base import Optimizer, Settings, betas, positive
from .kernels import adder_of, compute_dtype, factor_of, fused_works, kernel_for


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
        fused = self.fused and dense and dtype != torch.float64 and fused_works("_fused_sgd_", device, dtype)
        rate = self._rate(factor, device, torch.float32 if fused else dtype, inverse=fused and bool(momentum))
        fused_sgd = kernel_for("_fused_sgd_", params) if fused else None

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
        return {"lr": real(name("lr"), s["lr"], 0.0), "betas": betas(name("betas"), s["betas"]),
                "eps": positive(name("eps"), s["eps"]),
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
        if self.fused and dense and fused_works(kernel, device, dtype):
            # The CPU kernel reads the rate as a double; CUDA's, as a float32 on the device.
            rate = self._rate(factor, device, torch.float64 if device.type == "cpu" else torch.float32)
            fused, steps = kernel_for(kernel, P), [self._steps[i] for i in idx]

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
        beta2, epsilon = factor_of(b2, P[0]), adder_of(eps, P)

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
                "eps": positive(name("eps"), s["eps"]),
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
        rate = self._rate(factor, P[0].device, compute_dtype(P[0].dtype))
        kept, epsilon, carried = factor_of(alpha, P[0]), adder_of(eps, P), factor_of(momentum, P[0])

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
                "eps": positive(name("eps"), s["eps"])}

    def _fresh(self, slot: str, p: torch.Tensor, hp: Settings) -> torch.Tensor:
        return torch.full_like(p, hp["initial_accumulator_value"], memory_format=torch.contiguous_format)

    def _part(self, hp: Settings, factor: float, idx: list[int], params: list[torch.Tensor],
              grads: list[torch.Tensor], dense: bool) -> Callable[[], None]:
        P, G, S = [params[i] for i in idx], [grads[i] for i in idx], [self._state["sum"][i] for i in idx]
        lr_decay, decay, eps = hp["lr_decay"], hp["weight_decay"], hp["eps"]
        device, dtype = P[0].device, P[0].dtype
        if self.fused and dense and fused_works("_fused_adagrad_", device, dtype):
            rate = self._rate(factor, device, torch.float64)  # the CPU kernel reads it as a double
            fused, steps = kernel_for("_fused_adagrad_", P), [self._steps[i] for i in idx]

            def fused_update() -> None:
                fused(P, G, S, steps, lr=rate, lr_decay=lr_decay, weight_decay=decay, eps=eps, maximize=False)
            return fused_update

        base, at = self._steps_of(idx)
        rate = self._rate(factor, device, torch.float64)
        decayed = torch.empty(base.shape, dtype=torch.float64, device=device)
        rates = [decayed[j] for j in at]
        epsilon = adder_of(eps, P)

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
