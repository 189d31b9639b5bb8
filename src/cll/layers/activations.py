"""Building blocks of Lipschitz networks that are not plain linear maps.

- ``MaxMin``: the GroupSort activation with groups of two (Anil, Lucas, Grosse, ICML 2019,
  arXiv 1811.05381). It sorts each pair of adjacent channels, so it is 1-Lipschitz in l2 and
  gradient-norm preserving. Pairing follows the CLL/GloRo reference: channels (0,1), (2,3), ...;
  the output is ``cat([maxes, mins])`` along the channel axis.
"""
from __future__ import annotations

import torch
from torch import nn


class MaxMin(nn.Module):
    """GroupSort-2 over adjacent channels: (N, C, ...) -> (N, C, ...), C must be even."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        pairs = x.reshape(n, c // 2, 2, *x.shape[2:])
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)
