"""Activations that are 1-Lipschitz in l2 for every value of their parameters.

- ``MaxMin``: the GroupSort activation with groups of two (Anil, Lucas, Grosse, ICML 2019,
  arXiv 1811.05381). It sorts each pair of adjacent channels, so it is 1-Lipschitz in l2 and
  gradient-norm preserving. Pairing follows the CLL/GloRo reference: channels (0,1), (2,3), ...;
  the output is ``cat([maxes, mins])`` along the channel axis.
- ``MaxMinHalves``: GroupSort-2 on the pairs (c, c + C/2), each sorted in place (LiResNet's MinMax).
- ``HouseHolder``: the order-1 Householder activation HH1 (Singla, Singla, Feizi, "Improved
  deterministic l2 robustness on CIFAR-10 and CIFAR-100", ICLR 2022, arXiv 2108.04062), used by
  the SOC LipConvNets. Channel c of the first half is paired with channel c of the second half.
"""

from __future__ import annotations

import functools
import math

import mpmath
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import CllError
from ..lipschitz.rounding import EXACT, Rounding, underflow, unit

# Accuracy required of sin/cos, in units in the last place, checked on the angles in use
# (``trig_ulps``): CUDA documents <= 2 ulp for sinf/cosf, glibc and SLEEF (PyTorch's vectorised CPU
# kernels) <= 1 ulp; twice the largest, for margin.
TRIG_ULPS = 4
TRIG_REFERENCE_BITS = 120  # precision of the mpmath reference values (mpmath ships with torch)
# (mantissa bits p, exponent of the smallest normal number as m 2^e with 1/2 <= m < 1)
_FORMATS = {torch.float32: (24, -125), torch.float64: (53, -1021)}


@functools.lru_cache(maxsize=64)
def _trig_ulps(values: tuple[float, ...], dtype: torch.dtype, device: str) -> float:
    """The largest error, in ulps of ``dtype`` at the exact value, of torch's sin and cos at theta / 2
    and theta for the angles ``values`` (exact in float64), computed as the forward does (a 1-D
    tensor of the same length: same kernel, same vector/tail split). Exact values from mpmath at
    TRIG_REFERENCE_BITS bits (off by < 2^-100 ulp). The ulp of y = m 2^e (1/2 <= m < 1) is
    2^(max(e, e_min) - p), at most 2u |y| for a normal y."""
    p, e_min = _FORMATS[dtype]
    theta = torch.tensor(values, dtype=dtype, device=device)
    computed = [f(t).double().tolist() for t in (theta / 2, theta) for f in (torch.sin, torch.cos)]
    worst = 0.0
    with mpmath.workprec(TRIG_REFERENCE_BITS):
        for i, value in enumerate(values):
            half, full = mpmath.mpf(value) / 2, mpmath.mpf(value)  # exact
            exact = (mpmath.sin(half), mpmath.cos(half), mpmath.sin(full), mpmath.cos(full))
            for got, y in zip((c[i] for c in computed), exact):
                ulp = mpmath.ldexp(1, max(mpmath.frexp(y)[1] if y else e_min, e_min) - p)
                worst = max(worst, float(abs(got - y) / ulp))
    return worst


def check_trig(theta: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise ``CllError`` unless torch's sin and cos in ``dtype`` on ``theta``'s device are within
    TRIG_ULPS ulps at theta / 2 and theta for every angle of ``theta`` (cached per values)."""
    values = tuple(theta.detach().to(dtype).double().flatten().tolist())
    worst = _trig_ulps(values, dtype, str(theta.device))
    if not worst <= TRIG_ULPS:
        raise CllError(f"sin/cos in {dtype} on {theta.device} are off by {worst:.3g} ulps > TRIG_ULPS = {TRIG_ULPS}")


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members (a, b) of every pair of adjacent channels of ``x``: views (N, C/2, ...)."""
    pairs = x.unflatten(1, (x.shape[1] // 2, 2))
    return pairs.select(2, 0), pairs.select(2, 1)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members (a, b) = (x[:, c], x[:, c + C/2]) of every pair of ``MaxMinHalves``: views."""
    return x.chunk(2, dim=1)


def _max_min(x: torch.Tensor, pairing=_pairs) -> torch.Tensor:
    """cat([maximum(a, b), minimum(a, b)], channels) over the pairs (a, b) of ``pairing``, written
    straight into one output tensor, in ``x``'s memory format (no concatenation copy)."""
    a, b = pairing(x)
    half = x.shape[1] // 2
    out = torch.empty_like(x)
    torch.maximum(a, b, out=out[:, :half])
    torch.minimum(a, b, out=out[:, half:])
    return out


class _MaxMinFunction(torch.autograd.Function):
    """``_max_min`` over the pairs of ``pairing`` with a hand-written backward that gives autograd's
    gradient exactly: each input gets its output's gradient (the max's if it is the larger one of
    its pair, the min's otherwise). At a tie a == b, with ``split_ties`` each gets half of both
    (autograd's rule for maximum and minimum, ``MaxMin``; ties are common where zero-padded inputs
    meet zero biases); without, a gets the min's and b the max's (``MaxMinHalves``: the rule of
    LiResNet's ``where(a > b, ...)``).

    Autograd's own backward spends about 20 passes over the activation (masks, halving, scatter
    into zeros, additions) and keeps the input alive; this one keeps one-byte masks per pair and
    writes the gradient in two ``lerp`` passes: lerp with weight 0 or 1 returns one of its ends
    exactly, and on the CPU it is a vectorised kernel, where ``where`` and comparisons into a float
    tensor are not (uint8 -> float conversion is, bool -> float is not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pairing, split_ties: bool) -> torch.Tensor:
        out = _max_min(x, pairing)
        a, b = pairing(x)
        ctx.pairing = pairing
        ctx.save_for_backward(torch.gt(a, b), torch.eq(a, b) if split_ties else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        larger, tie = ctx.saved_tensors
        half = grad.shape[1] // 2
        g_max, g_min = grad[:, :half], grad[:, half:]
        weight = larger.view(torch.uint8).to(grad.dtype)  # 1 where a is the max, 0 where b is
        grad_x = torch.empty_like(grad)
        g_a, g_b = ctx.pairing(grad_x)
        torch.lerp(g_min, g_max, weight, out=g_a)
        torch.lerp(g_max, g_min, weight, out=g_b)
        # on a GPU no host sync: there the fix-up costs less than a wait
        if tie is not None and (grad.device.type != "cpu" or (tie.numel() and tie.view(torch.uint8).amax())):
            split = g_max / 2 + g_min / 2
            g_a.copy_(torch.where(tie, split, g_a))
            g_b.copy_(torch.where(tie, split, g_b))
        return grad_x, None, None


# functorch transforms (jacrev, vmap: the local-bound tests) need autograd's own backward
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


class MaxMin(nn.Module):
    """GroupSort-2 over adjacent channels: (N, C, ...) -> (N, C, ...), C must be even.
    A permutation of its input at every point: 1-Lipschitz, and exact in floating point.

    Training runs ``_MaxMinFunction`` (same values, same gradient, several times faster backward);
    under torch.compile the plain expression, which the compiler fuses itself."""

    exact_bound = True

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        return EXACT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or _transforms_active():
            a, b = _pairs(x)
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxMinFunction.apply(x, _pairs, True)
        return _max_min(x)


class MaxMinHalves(nn.Module):
    """GroupSort-2 over the pairs (c, c + C/2), sorted in place: (N, C, ...) -> cat([max(a, b),
    min(a, b)]) with a, b the two halves of the channels (LiResNet's ``MinMax``; a tie gives the max
    b's gradient, as its ``where`` does). Not cll's ``MaxMin`` relabelled: that one pairs adjacent
    channels and writes each pair to (c, c + C/2), a channel permutation on top of the sort, which
    would turn LiResNet's identity skip into a permutation. 1-Lipschitz, exact in floating point.

    Runs like ``MaxMin``: ``_MaxMinFunction`` in training (the reference's values and gradient; its
    two ``where`` passes and the concatenation forward, four ``where`` passes backward, replaced by
    vectorised kernels), the plain expression under torch.compile and functorch transforms."""

    exact_bound = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or _transforms_active():
            a, b = _halves(x)
            larger = a > b
            return torch.cat([torch.where(larger, a, b), torch.where(larger, b, a)], dim=1)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxMinFunction.apply(x, _halves, False)
        return _max_min(x, _halves)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        return EXACT


class HouseHolder(nn.Module):
    """HH1 on pairs (a, b) = (x[:, c], x[:, c + C/2]) with a learnable angle theta per pair.

    The pair is kept where it lies on the non-positive side of the line through 0 at angle
    theta/2, and reflected across that line otherwise, as SOC's code orients it:

        (a, b)                                          if a sin(theta/2) - b cos(theta/2) <= 0
        (a cos theta + b sin theta, a sin theta - b cos theta)   otherwise

    Both pieces are orthogonal and agree on the line (its points are fixed by the reflection),
    so the map is continuous, piecewise orthogonal and 1-Lipschitz for every theta. At the
    initial theta = pi/2 it is exactly (min, max) over the two halves, as in SOC's code.
    """

    no_weight_decay = True  # SOC's recipe: weight decay on the convolutions only
    exact_bound = True  # piecewise orthogonal and continuous: the constant is 1

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"HouseHolder needs an even channel count, got {channels}")
        self.theta = nn.Parameter(torch.full((channels // 2,), math.pi / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        theta = self.theta.view(shape)
        keep = a * torch.sin(theta / 2) - b * torch.cos(theta / 2) <= 0
        cos, sin = torch.cos(theta), torch.sin(theta)
        return torch.cat([torch.where(keep, a, a * cos + b * sin), torch.where(keep, b, a * sin - b * cos)], dim=1)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """The network certified uses the exact sin and cos of the float32 angles. Computed, the
        trigonometric values are off by mu <= 2 TRIG_ULPS u relative: checked here, on these very
        angles, by ``check_trig`` (theta / 2 is exact in binary floating point, barring underflow of a
        subnormal theta, which the check, made against the exact theta / 2, also covers). Each of the line test
        a sin(theta/2) - b cos(theta/2) and the two reflected coordinates (two products and a sum)
        by eta = (1 + mu)(1 + u)^2 - 1 times |a| + |b|. Where the branch taken is the exact one, the
        pair is off by <= sqrt2 eta (|a| + |b|); where the rounded test took the other branch, the
        exact test value f had |f| <= eta (|a| + |b|), and the two branches differ by 2|f| (the
        reflection across the line moves a point by twice its distance |f| to it). Per pair at most
        (2 + sqrt2) eta (|a| + |b|) <= (2 + 2 sqrt2) eta ||(a, b)||, hence alpha = 5 eta over all pairs."""
        u = unit(dtype)
        check_trig(self.theta, dtype)
        eta = (1 + 2 * TRIG_ULPS * u) * (1 + u) ** 2 - 1
        return Rounding(5 * eta, underflow(4, math.prod(in_shape), dtype))
