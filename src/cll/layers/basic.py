"""Small parameter-free maps, the unit-row (LLN) head and the evaluation cache.

- ``Normalize``: (x - mean) / std with one std for every channel; Lipschitz factor 1/std.
- ``PaddingChannels``: zero-pads the channel axis (an isometry, as in CPL and SLL's first layer).
- ``unit_row_head``: a linear classifier whose rows are normalised to unit l2 norm at every use
  ("last layer normalisation", LLN; Singla et al., ICLR 2022). It is a ``torch.nn.utils.
  parametrize`` parametrisation of ``weight``, so ``head.weight`` *is* the normalised matrix
  everywhere (the loss, the certifier, the K penalty) and nothing else needs to know. An LLN head
  is not globally 1-Lipschitz; the certifier's pairwise rule ||W_j - W_i|| is what makes it sound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


class Normalize(nn.Module):
    """(x - mean) / std, mean per channel, std a scalar (SOC's 0.2507; 1 = mean shift only)."""

    def __init__(self, mean, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]))
        self.std = float(std)

    @property
    def lipschitz(self) -> float:
        return 1.0 / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view((1, -1) + (1,) * (x.dim() - 2))) / self.std


class PaddingChannels(nn.Module):
    """(N, C, H, W) -> (N, channels, H, W), the new channels zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))


class UnitRows(nn.Module):
    """W -> W with every row divided by its l2 norm."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def unit_row_head(in_features: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(in_features, num_classes)
    parametrize.register_parametrization(head, "weight", UnitRows())
    return head


class EvalCache(nn.Module):
    """A layer that caches what its evaluation-mode forward derives from the parameters (CPL's
    converged ||W||, Sandwich's orthogonal factors). The cache is dropped whenever it could be
    stale: on ``train()``/``eval()`` switches and on ``load_state_dict``; the hazard of the peer
    code bases (shared/spec/peers.md section 13) is a cache that outlives new weights."""

    def __init__(self):
        super().__init__()
        self._cache: object | None = None
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.clear_cache())

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def cached(self, make):
        """``make()`` in training mode (with gradient); once per weights in evaluation mode."""
        if self.training:
            return make()
        if self._cache is None:
            with torch.no_grad():
                self._cache = make()
        return self._cache
