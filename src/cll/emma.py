"""EMMA, "Efficient Margin MAximization" (Hu, Zou, Wang, Leino, Fredrikson, "Unlocking Deterministic
Robustness Certification on ImageNet", NeurIPS 2023, arXiv 2301.12549; code github.com/hukkai/
liresnet, ``models/margin_layer.py::emma_loss``), and the eps schedule LiResNet trains it with
(``train.py::eps_fn``), and the loss module ``EMMA`` that trains with both (registered as ``emma`` in
``cll.losses``). BRONet's Logit Annealing (``cll.logit_annealing``) reuses all three.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .lipschitz.operators import row_distances
from .loss_base import Loss

EMMA_FLOOR = 0.01  # the smallest fraction of eps any class is pushed by (the reference's clip)


def emma_logits(
    logits: torch.Tensor, target: torch.Tensor, head_weight: torch.Tensor, lip_body: torch.Tensor | float, eps: float
) -> torch.Tensor:
    """EMMA's lifted logits z + eps s m (N, C). For a sample with label t, logits z, classifier rows
    W_i and the body's constant K_F, with m_i = K_F ||W_t - W_i|| (the bound on how fast z_i - z_t can
    grow per unit of input distance):

        s_i = clip((z_t - z_i) / (eps m_i), 0.01, 1)      (detached; s_t is irrelevant: m_t = 0)

    Each other class i is raised by what a perturbation of size eps s_i could add to its margin:
    eps itself where the sample is certified against i at eps (s_i = 1: GloRo's margin, for every
    class at once rather than the runner-up only), just its certified distance (z_t - z_i) / m_i
    where that is smaller, which lifts z_i exactly to z_t, and 0.01 eps where i already wins.
    s is treated as a constant; K_F and W keep their gradient (the reference computes s with
    ``detach`` and leaves the rest attached). The reference subtracts z_t from every logit first,
    which changes no softmax (nor its gradient). A zero m_i (two equal rows) divides by 1e-8
    instead, as the reference's clamp does."""
    m = lip_body * row_distances(head_weight, target)  # (N, C), 0 at the label
    gap = logits.gather(1, target[:, None]) - logits
    scale = (gap / (eps * m).clamp_min(1e-8)).clamp(EMMA_FLOOR, 1.0).detach()
    return logits + eps * scale * m


def emma_loss(
    logits: torch.Tensor, target: torch.Tensor, head_weight: torch.Tensor, lip_body: torch.Tensor | float, eps: float
) -> torch.Tensor:
    """EMMA, batch mean: CE(z + eps s m, t) on the lifted logits of ``emma_logits``."""
    return F.cross_entropy(emma_logits(logits, target, head_weight, lip_body, eps), target)


def emma_eps(eps: float, start: float, end: float, ramp: float, epochs: int, progress: float) -> float:
    """LiResNet's training eps: eps * (start + (end - start) * min(e / (ramp * epochs), 1)) at epoch
    e = floor(progress * epochs), stepped per epoch as the reference steps it (its configs: start
    0.1, end 3.0, ramp 0.5: from 0.1 eps to 3 eps over the first half of training, then constant)."""
    # progress * epochs is e + i / steps, i < steps; the 1e-9 keeps an e computed as e - 1 ulp at e
    epoch = math.floor(progress * epochs + 1e-9)
    done = 1.0 if ramp <= 0 else min(epoch / (ramp * epochs), 1.0)
    return eps * (start + (end - start) * done)


class EMMA(Loss):
    """LiResNet's loss (``emma_loss``) at its training eps (``emma_eps``)."""

    needs_lipschitz = True
    head = "lln"  # LiResNet's last layer (use_lln in every config)

    def __init__(self, eps: float, start: float, end: float, ramp: float, epochs: int):
        super().__init__()
        self.eps, self.schedule = eps, (start, end, ramp, epochs)

    def current_eps(self, progress: float) -> float:
        return emma_eps(self.eps, *self.schedule, progress)

    def forward(self, logits, target, head_weight, lip_body, progress: float = 1.0):
        return emma_loss(logits, target, head_weight, lip_body, self.current_eps(progress))
