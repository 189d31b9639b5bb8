"""The net every architecture builds: ``LipschitzNet`` (body -> head), the head choice, the width
rule, and the architecture registry ``ARCHS`` the family modules register into."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..layers import Normalize, truncation_head, unit_row_head
from ..lipschitz import PowerIteration
from ..registry import Registry

ARCHS = Registry("architecture")


class LipschitzNet(nn.Module):
    """body -> head; the body's Lipschitz constant is bounded layer by layer in ``cll.lipschitz``."""

    def __init__(
        self,
        body: nn.Sequential,
        head: nn.Linear,
        in_shape: Sequence[int],
        mean: Sequence[float] | None = None,
        std: float = 1.0,
    ):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.num_classes = head.out_features
        if mean is not None:  # the normalisation is the body's first layer, bounded like any other
            body = nn.Sequential(Normalize(mean, std), *body)
        self.body = body
        self.head = head
        self.power = PowerIteration(body, self.in_shape)

    @property
    def input_lipschitz(self) -> float:
        """The factor of the body's parameter-free layers that power iteration does not see (the
        input normalisation, 1/std): training estimates of K_F multiply by it."""
        return math.prod(m.lipschitz for m in self.body if isinstance(m, Normalize))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def scaled(n: int, width: float) -> int:
    """A layer size n * width, kept even (MaxMin and HH1 pair channels); n itself at width 1."""
    return n if width == 1 else max(2, 2 * round(n * width / 2))


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Linear:
    """``linear`` (unconstrained, the certifier uses its pairwise row distances), ``lln`` (unit
    rows) or ``trunc`` (the first num_classes features, fixed)."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "lln":
        return unit_row_head(in_features, num_classes)
    if kind == "trunc":
        return truncation_head(in_features, num_classes)
    raise ValueError(f"unknown head {kind!r}; allowed: linear, lln, trunc")
