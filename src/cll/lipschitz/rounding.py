"""Floating-point error maths: what a layer's forward can be off by, in float32 or float64.

The certifier proves margins of the network *in exact arithmetic* (its parameters, and the
parameters its evaluation forward derives from them, read as real numbers) from a forward pass in
floating point. Every layer therefore states, next to its forward, a bound on its *own* rounding
(``rounding(in_shape, dtype)``): for a computed input h, its computed output differs from the
exact layer applied to that same h by at most

    alpha * ||h||_2 + beta      (l2 norm per sample)

and the certifier carries the error through the body as E <- L E + alpha ||h|| + beta, L the
layer's sound Lipschitz bound (``cll.certify``). The bounds rest on the standard model of floating
point (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. 2002, ch. 2-3): each
operation is exact up to a factor (1 + d), |d| <= u, with u = 2^-24 (float32) or 2^-53 (float64),
and an inner product of n terms in *any* order is off by at most

    gamma_n |x|^T |y|,    gamma_n = n u / (1 - n u)        (Higham eq. 3.5, Thm 3.1).

An underflow (flush to zero included) adds at most the smallest normal number per operation,
covered by the ``beta`` terms. A bound whose derivation needs more than this model (an FFT library
of unknown algorithm) says ``rigorous=False``: the certifier then never certifies from it.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch

from .operators import abs_operator_norm

UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
TINY = {torch.float32: 2.0**-126, torch.float64: 2.0**-1022}  # smallest normal numbers


class Rounding(NamedTuple):
    """A layer's own rounding error on input h: at most ``alpha * ||h||_2 + beta`` per sample.
    ``rigorous``: derived from the standard model alone (False: an estimate, never certified from)."""

    alpha: float
    beta: float
    rigorous: bool = True


EXACT = Rounding(0.0, 0.0)  # comparisons, copies, sign flips, zero padding: no rounding at all


def unit(dtype: torch.dtype) -> float:
    if dtype not in UNIT:
        raise TypeError(f"no rounding analysis for {dtype}; allowed: float32, float64")
    return UNIT[dtype]


def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term inner product."""
    nu = n * unit(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} is undefined in {dtype} (n u >= 1)")
    return nu / (1 - nu)


def underflow(ops: int, outputs: int, dtype: torch.dtype, scale: float = 1.0) -> float:
    """l2 bound of ``ops`` underflows of at most TINY * ``scale`` in each of ``outputs`` entries."""
    return ops * TINY[dtype] * scale * math.sqrt(outputs)


def norm_upper_bound(h: torch.Tensor) -> torch.Tensor:
    """Per-sample upper bound (float64) on the exact l2 norm of the float tensor ``h`` (N, ...),
    from its norm computed in h's own precision (no converted copy): the computed sum of n squares
    is >= (1 - gamma_{n+1}) times the exact one less n underflows, and the square root rounds by
    <= u."""
    n, u, tiny = h[0].numel(), unit(h.dtype), TINY[h.dtype]
    computed = torch.linalg.vector_norm(h, dim=tuple(range(1, h.dim()))).double()
    return torch.sqrt(((computed / (1 - u)) ** 2 + n * tiny) / (1 - gamma(n + 1, h.dtype)))


def affine_rounding(weight: torch.Tensor, bias: torch.Tensor | None, positions: int, dtype: torch.dtype) -> Rounding:
    """A dense or conv layer y = A h + b with ``weight`` and ``bias``, ``positions`` output pixels
    (1 for a dense layer): elementwise |fl(A h + b) - (A h + b)| <= gamma_{n+1} (|A| |h| + |b|), n the
    fan-in, whose l2 norm is <= gamma_{n+1} (|| |A| || ||h|| + ||b|| sqrt(positions))
    (``abs_operator_norm``), plus (2n + 2) underflows per output."""
    n = weight[0].numel()
    g = gamma(n + 1, dtype)
    b = bias.detach().double().norm().item() if bias is not None else 0.0
    outputs = positions * weight.shape[0]
    tiny = underflow(2 * n + 2, outputs, dtype, max(1.0, weight.detach().abs().max().item()))
    return Rounding(g * abs_operator_norm(weight), g * b * math.sqrt(positions) + tiny)


# every fp32_precision switch of torch's backends (torch >= 2.9): "ieee" = full float32
_PRECISION_SWITCHES = (
    "",
    "cuda.matmul",
    "cudnn",
    "cudnn.conv",
    "cudnn.rnn",
    "mkldnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
)


def _switches() -> list[object]:
    found = []
    for path in _PRECISION_SWITCHES:
        obj = torch.backends
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


AUTOCAST_DEVICES = ("cpu", "cuda")  # autocast is switched off for these inside full_precision


@contextmanager
def full_precision():
    """Plain float32 (and float64) arithmetic whatever the caller set, the setting under which the
    bounds here hold: autocast off (an enclosing ``torch.autocast`` would run products in bf16 or
    fp16), every backend's fp32_precision "ieee" (no TF32, no bf16 passes inside float32 products;
    torch >= 2.9, else the legacy matmul precision "highest" and TF32 off), cuDNN (FFT and Winograd
    algorithms) and NNPACK off; everything restored afterwards. (The legacy getters raise once the
    new switches disagree, so they are used only without them.) oneDNN's own environment variable
    ONEDNN_DEFAULT_FPMATH_MODE cannot be reset from here: ``cll.checks`` refuses it."""
    switches = _switches()
    cudnn = torch.backends.cudnn.enabled
    if switches:
        saved = [(obj, "fp32_precision", obj.fp32_precision, "ieee") for obj in switches]
    else:  # pragma: no cover (torch < 2.9)
        legacy = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
        saved = [(obj, name, getattr(obj, name), False) for obj, name in legacy]
        matmul = torch.get_float32_matmul_precision()
    try:
        for obj, name, _, value in saved:
            setattr(obj, name, value)
        if not switches:  # pragma: no cover
            torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.enabled = False  # (cudnn.flags() reads the legacy TF32 getter)
        with ExitStack() as stack:
            for device in AUTOCAST_DEVICES:
                stack.enter_context(torch.autocast(device, enabled=False))
            stack.enter_context(torch.backends.nnpack.flags(enabled=False))
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn
        if not switches:  # pragma: no cover
            torch.set_float32_matmul_precision(matmul)
        for obj, name, value, _ in reversed(saved):
            setattr(obj, name, value)
