"""Activations that are 1-Lipschitz in l2 for every value of their parameters.

- ``MaxMin``: the GroupSort activation with groups of two (Anil, Lucas, Grosse, ICML 2019,
  arXiv 1811.05381). It sorts each pair of adjacent channels, so it is 1-Lipschitz in l2 and
  gradient-norm preserving. Pairing follows the CLL/GloRo reference: channels (0,1), (2,3), ...;
  the output is ``cat([maxes, mins])`` along the channel axis.
- ``HouseHolder``: the order-1 Householder activation HH1 (Singla, Singla, Feizi, "Improved
  deterministic l2 robustness on CIFAR-10 and CIFAR-100", ICLR 2022, arXiv 2108.04062), used by
  the SOC LipConvNets. Channel c of the first half is paired with channel c of the second half.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..lipschitz.rounding import EXACT, Rounding, underflow, unit

# Accuracy assumed of sin/cos, in units in the last place: CUDA documents <= 2 ulp for sinf/cosf,
# glibc and SLEEF (PyTorch's vectorised CPU kernels) <= 1 ulp; twice the largest, for margin.
TRIG_ULPS = 4


class MaxMin(nn.Module):
    """GroupSort-2 over adjacent channels: (N, C, ...) -> (N, C, ...), C must be even.
    A permutation of its input at every point: 1-Lipschitz, and exact in floating point."""

    exact_bound = True

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        return EXACT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        pairs = x.reshape(n, c // 2, 2, *x.shape[2:])
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class HouseHolder(nn.Module):
    """HH1 on pairs (a, b) = (x[:, c], x[:, c + C/2]) with a learnable angle theta per pair.

    The pair is kept where it lies on the positive side of the line through 0 at angle theta/2,
    and reflected across that line otherwise:

        (a, b)                                          if a sin(theta/2) - b cos(theta/2) > 0
        (a cos theta + b sin theta, a sin theta - b cos theta)   otherwise

    Both pieces are orthogonal and agree on the line (its points are fixed by the reflection),
    so the map is continuous, piecewise orthogonal and 1-Lipschitz for every theta. At the
    initial theta = pi/2 it is exactly MaxMin over the two halves (SOC's pairing).
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
        keep = a * torch.sin(theta / 2) - b * torch.cos(theta / 2) > 0
        cos, sin = torch.cos(theta), torch.sin(theta)
        return torch.cat([torch.where(keep, a, a * cos + b * sin), torch.where(keep, b, a * sin - b * cos)], dim=1)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """The network certified uses the exact sin and cos of the float32 angles. Computed, the
        trigonometric values are off by mu <= 2 TRIG_ULPS u relative, and each of the line test
        a sin(theta/2) - b cos(theta/2) and the two reflected coordinates (two products and a sum)
        by eta = (1 + mu)(1 + u)^2 - 1 times |a| + |b|. Where the branch taken is the exact one, the
        pair is off by <= sqrt2 eta (|a| + |b|); where the rounded test took the other branch, the
        exact test value f had |f| <= eta (|a| + |b|), and the two branches differ by 2|f| (the
        reflection across the line moves a point by twice its distance |f| to it). Per pair at most
        (2 + sqrt2) eta (|a| + |b|) <= (2 + 2 sqrt2) eta ||(a, b)||, hence alpha = 5 eta over all pairs."""
        u = unit(dtype)
        eta = (1 + 2 * TRIG_ULPS * u) * (1 + u) ** 2 - 1
        return Rounding(5 * eta, underflow(4, math.prod(in_shape), dtype))
