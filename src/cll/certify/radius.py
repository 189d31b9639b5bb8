"""The certificate rule (Tsuzuku, Sato, Sugiyama, NeurIPS 2018; GloRo, Leino et al., ICML 2021):
with j = argmax z the *predicted* class and K_F a sound upper bound on the body's Lipschitz
constant, the certified l2 radius of x is

    r(x) = min_{i != j} (z_j - z_i) / (K_F * ||W_j - W_i||_2),

and x is certified at eps iff j equals the label and r(x) > eps (strict). Ties give a radius of 0,
so a tied prediction is never certified. With bounds on the rounding of the computed logits (see
``cll.certify``) the margins are lowered by them first. ||W_j - W_i|| always comes from
``cll.lipschitz.row_distances`` (explicit differences), so a radius never depends on the batch.
"""

from __future__ import annotations

import math

import torch

from ..lipschitz.operators import row_distances


def _lip(lip_body: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """K_F as a scalar, or per sample (N,) -> (N, 1) (a local bound)."""
    return lip_body.double().to(like.device)[:, None] if torch.is_tensor(lip_body) else lip_body


def _pairs(head_weight: torch.Tensor, pred: torch.Tensor, distances: torch.Tensor | None) -> torch.Tensor:
    table = row_distances(head_weight.detach().double()) if distances is None else distances
    return table[pred]


def certified_radius(
    logits: torch.Tensor,
    head_weight: torch.Tensor,
    lip_body: float | torch.Tensor,
    logit_error: torch.Tensor | None = None,
    body_error: torch.Tensor | None = None,
    distances: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, certified l2 radius) per row of ``logits`` (N, C), computed in float64.

    ``logit_error`` (N, C) bounds |computed z_i - exact z_i| for the head's own rounding and
    ``body_error`` (N,) the l2 error of the head's input; the exact margin is then at least
    z_j - z_i - err_j - err_i - ||W_j - W_i|| E. Without them the margins are taken as exact.
    ``lip_body``: K_F, a float or a per-sample (N,) tensor; ``distances``: the head's (C, C) float64
    ``row_distances`` table where it is already at hand."""
    z = logits.detach().double()
    pred = z.argmax(1)
    margin = z.gather(1, pred[:, None]) - z  # z_j - z_i >= 0
    pair = _pairs(head_weight, pred, distances)  # ||W_j - W_i||
    if logit_error is not None:
        err = logit_error.detach().double()
        margin = margin - (err.gather(1, pred[:, None]) + err)
    if body_error is not None:
        margin = margin - pair * body_error.detach().double()[:, None]
    dist = pair * _lip(lip_body, z)  # K_F ||W_j - W_i||
    # identical rows: z_j - z_i is a constant, so a positive gap can never close (radius inf)
    radius = torch.where(dist > 0, margin / dist, torch.where(margin > 0, math.inf, 0.0))
    radius = radius.scatter(1, pred[:, None], math.inf).min(1).values.clamp_min(0.0)
    return pred, radius


def radius_upper_bounds(
    logits: torch.Tensor,
    head_weight: torch.Tensor,
    lip_body: float | torch.Tensor,
    logit_error: torch.Tensor,
    body_error: torch.Tensor,
    distances: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds on the radius the *exact* margins would give, from computed logits and their
    error bounds (see ``certified_radius``): for the predicted class j, min_{i != j} (z_j - z_i +
    slack) / (K_F ||W_j - W_i||); for any other class c, max_{c != j} (z_c - z_j + slack) / (K_F
    ||W_c - W_j||), a bound that is <= 0 unless the errors could reverse the prediction. The slack
    of a pair is r_j + r_i + ||W_j - W_i|| E."""
    z = logits.detach().double()
    pred = z.argmax(1)
    err = logit_error.detach().double()
    pair = _pairs(head_weight, pred, distances)
    slack = err.gather(1, pred[:, None]) + err + pair * body_error.detach().double()[:, None]
    gap = z.gather(1, pred[:, None]) - z
    dist = pair * _lip(lip_body, z)

    def ratio(num, tie, skip):  # identical rows: a positive gap never closes, else no radius
        out = torch.where(dist > 0, num / dist, torch.where(num > 0, math.inf, tie))
        return out.scatter(1, pred[:, None], skip)

    reach_pred = ratio(gap + slack, 0.0, math.inf).min(1).values
    reach_other = ratio(slack - gap, -math.inf, -math.inf).max(1).values
    return reach_pred, reach_other
