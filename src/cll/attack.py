"""PGD in l2 (Madry et al., ICLR 2018, arXiv 1706.06083) with random restarts, to test certificates:
a certified point must never be misclassified inside its radius, so any success is a soundness bug.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _unit(v: torch.Tensor) -> torch.Tensor:
    flat = v.flatten(1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(v)


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / norms).clamp(max=1.0).view(-1, *[1] * (delta.dim() - 1))


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{i != y} z_i - z_y per sample (> 0 means misclassified): the CW margin."""
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return other - logits.gather(1, y[:, None]).squeeze(1)


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 50,
           restarts: int = 5, step_size: float | None = None, clamp: tuple[float, float] | None = None,
           ) -> torch.Tensor:
    """Per sample, the most damaging point found within the l2 ball of radius ``eps`` around x.

    Each restart starts uniformly at random in the ball and takes ``steps`` normalised-gradient
    ascent steps on the CW margin (or on cross-entropy every other restart), projecting back
    onto the ball (and onto ``clamp``, the valid input box, when given)."""
    step_size = step_size or 2.5 * eps / steps
    best = x.clone()
    best_margin = torch.full((len(x),), float("-inf"), device=x.device)
    model.eval()
    for r in range(restarts):
        radius = eps * torch.rand(len(x), device=x.device) ** (1 / x[0].numel())
        delta = _unit(torch.randn_like(x)) * radius.view(-1, *[1] * (x.dim() - 1))
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            objective = margin_loss(logits, y) if r % 2 == 0 else F.cross_entropy(logits, y, reduction="none")
            grad, = torch.autograd.grad(objective.sum(), delta)
            with torch.no_grad():
                delta = _project(delta + step_size * _unit(grad), eps)
                if clamp is not None:
                    delta = (x + delta).clamp(*clamp) - x
        with torch.no_grad():
            margin = margin_loss(model(x + delta), y)
            better = margin > best_margin
            best[better] = (x + delta)[better]
            best_margin = torch.where(better, margin, best_margin)
    return best.detach()
