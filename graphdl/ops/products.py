"""The kernels of the matrix products of two matrices: torch's own (MKL's sgemm on x86
CPUs) and oneDNN's, the faster of the two taken for each shape by measurement.

Which one wins depends on the machine and the shape. On one thread of this project's
AMD EPYC (Zen 5) torch's float32 `mm` ran at 101-108 GFLOP/s and oneDNN's product
(`torch.ops.mkldnn._linear_pointwise`, with its result copied into the arena's buffer)
at 185-226 from [256, 256] @ [256, 256] up; below, oneDNN's ~10 µs call loses (9.7
against 33 GFLOP/s at [100, 25] @ [25, 25]); on the Xeon MKL won every shape. oneDNN
also applies the tanh of `addmm_tanh` in the same call (a post-op): 169 µs for
tanh(x @ w + b) at [256, 256] @ [256, 256] against 455 µs for torch's addmm and tanh
(whose float tanh goes through MKL's VML, slow on the EPYC).

So each kernel here is an inexact `Fastest` (graphdl.ops.choice): its ways agree to
float32 rounding, not to the bit (the two sum the products in other orders; oneDNN's
tanh is within 1.22 ulp where torch's is within 0.51, and gives +0 for -0), so the way
chosen for each shape is kept in the machine's choice file, and every run on a machine
computes with the same kernels and gives the same numbers. `GRAPHDL_KERNELS=default`
keeps torch's own everywhere. oneDNN's way is a candidate only for float32 CPU
matrices with no empty dim and a bias of one value per column. A NaN or infinity in the
operands comes out where torch's puts it (tests/test_products.py); where the sums
themselves overflow, both give non-finite values, but not always the same ones (a sum
of +inf and -inf terms is NaN or ±inf by the order it is added in).

Generated code calls these through `products.<kernel>` (one lookup a call, ~2 µs), or,
in fit's arena, the way picked for the step's shapes when the arena is bound (no lookup).
"""

from __future__ import annotations

import sys

import torch

from .choice import Fastest
from .registry import CODE_GLOBALS


def _fits_onednn(*args: torch.Tensor | None, out: torch.Tensor | None = None) -> bool:
    """oneDNN's product takes these: float32 matrices on the CPU, no dim empty (its
    inner product refuses k = 0), and a bias (the first of three) of one value per column."""
    *bias, a, b = args
    mats = (a, b) if out is None else (a, b, out)
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.ndim == 2 for t in mats):
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    if bias and bias[0] is not None:
        c = bias[0]
        if c.dtype != torch.float32 or c.device.type != "cpu" or c.shape != (b.shape[1],):
            return False
    return torch.backends.mkldnn.is_available()


def _linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, post: str,
            out: torch.Tensor | None) -> torch.Tensor:
    # oneDNN's linear takes the weight as [out, in]: b.mT is a view, no copy. It reads a
    # and b by their strides, whatever they are, but the bias as dense: a strided or
    # expanded one would be misread (fit's arena calls the way picked for a contiguous
    # bias on whatever tensor the param holds), so it is made dense (no copy if it is).
    if bias is not None:
        bias = bias.contiguous()
    r = torch.ops.mkldnn._linear_pointwise.default(a, b.mT, bias, post, [], "")
    return r if out is None else out.copy_(r)


def mkl_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(a, b, out=out)


def onednn_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(a, b, None, "none", out)


def mkl_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addmm(bias, a, b, out=out)


def onednn_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(a, b, bias, "none", out)


def mkl_addmm_tanh(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addmm(bias, a, b, out=out).tanh_()


def onednn_addmm_tanh(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(a, b, bias, "tanh", out)


mm = Fastest("mm", mkl_mm, onednn_mm, exact=False, fits=_fits_onednn)
addmm = Fastest("addmm", mkl_addmm, onednn_addmm, exact=False, fits=_fits_onednn)
addmm_tanh = Fastest("addmm_tanh", mkl_addmm_tanh, onednn_addmm_tanh, exact=False, fits=_fits_onednn)
CODE_GLOBALS["products"] = sys.modules[__name__]  # what the generated code calls
