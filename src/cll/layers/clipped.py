"""Clipped activations with learnable thresholds, the layers of Local-Lip-B.

Huang, Zhang, Shi, Kolter, Anandkumar, "Training Certifiably Robust Neural Networks with Efficient
Local Lipschitz Bounds", NeurIPS 2021, arXiv 2111.01395, section 4.1 ("clipped activations"): a
neuron whose output is clipped at a threshold is constant wherever its input is beyond it, so
over an input ball it can often be proved constant and dropped from the local Lipschitz bound
(``cll.local_lipschitz``). One threshold per neuron (per entry of the feature map), as in the
paper's code.

- ``ClippedReLU``: min(max(x, 0), theta), theta >= 0 (kept so after every optimizer step).
- ``ClippedMaxMin``: cll's MaxMin (pairs of adjacent channels, output [maxes, mins]) with the
  max branch capped at theta_max >= 0 and the min branch floored at theta_min <= 0. (The paper's
  code pairs channel c with channel c + C/2; after a learned conv the two pairings are the same
  family of networks, up to a relabelling of the conv's output channels.)

Both are 1-Lipschitz in l2 for every threshold (a clamp after a 1-Lipschitz map) and evaluate
exactly in floating point (comparisons and copies only): ``upper_bound`` 1, ``rounding`` none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..lipschitz.rounding import EXACT, Rounding
from .activations import MaxMin


class ClippedReLU(nn.Module):
    """min(max(x, 0), theta) with a learnable theta per neuron: (N, *shape) -> (N, *shape)."""

    no_weight_decay = True  # thresholds are not weights (the paper's recipe has no weight decay)

    def __init__(self, shape: Sequence[int], init: float = 1.0):
        super().__init__()
        if init < 0:
            raise ValueError(f"ClippedReLU threshold must be >= 0, got {init}")
        self.theta = nn.Parameter(torch.full(tuple(shape), float(init)))

    @property
    def exact_bound(self) -> bool:
        """The constant is exactly 1 where some neuron has a range to vary in (theta > 0)."""
        return bool((self.theta > 0).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, self.theta).clamp_min(0.0)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project theta back to >= 0 (after an optimizer step), as the paper's code does."""
        self.theta.clamp_(min=0.0)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        return EXACT


class ClippedMaxMin(MaxMin):
    """MaxMin with its max branch capped at theta_max and min branch floored at theta_min, one
    threshold per output neuron: (N, C, ...) -> (N, C, ...), C even; init theta_max = ``init``,
    theta_min = -``init``. Its constant is exactly 1: below theta_max the max output follows the
    larger input of its pair."""

    no_weight_decay = True
    exact_bound = True

    def __init__(self, shape: Sequence[int], init: float = 1.0):
        super().__init__()
        if shape[0] % 2:
            raise ValueError(f"ClippedMaxMin needs an even channel count, got {shape[0]}")
        if init < 0:
            raise ValueError(f"ClippedMaxMin threshold must be >= 0, got {init}")
        half = (shape[0] // 2, *shape[1:])
        self.theta_max = nn.Parameter(torch.full(half, float(init)))
        self.theta_min = nn.Parameter(torch.full(half, -float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maxes, mins = super().forward(x).chunk(2, dim=1)
        return torch.cat([torch.minimum(maxes, self.theta_max), torch.maximum(mins, self.theta_min)], dim=1)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Keep theta_max >= 0 >= theta_min, so the two branches never cross."""
        self.theta_max.clamp_(min=0.0)
        self.theta_min.clamp_(max=0.0)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return 1.0

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        return EXACT
