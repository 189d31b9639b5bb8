"""The certifier: certified radii, clean accuracy and certified robust accuracy (CRA) at each eps.

One rule for every architecture (the pairwise last-layer certificate of GloRo, CLL, SOC's LLN,
CPL and SLL; shared/spec/cll.md section 3): with j = argmax z the *predicted* class and K_F a sound
upper bound on the body's Lipschitz constant, the radius of x is

    r(x) = min_{i != j} (z_j - z_i) / (K_F * ||W_j - W_i||_2),

and x counts as certified at eps iff j equals the label and r(x) > eps (strict). Ties give a
radius of 0, so a tied prediction is never certified.

K_F always comes from ``cll.lipschitz.upper_bound_body`` (sound); the converged power-iteration
estimate is reported beside it as ``cra_estimate`` to show what the sound bound costs.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from . import lipschitz
from .results import fmt_number

# The eps grid of the paper's tables, in [0,1]-pixel l2 units.
DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)


def eps_key(eps: float) -> str:
    """How an eps is written as a key in certify.json and tables: 4 significant digits."""
    return fmt_number(eps)


def certified_radius(logits: torch.Tensor, head_weight: torch.Tensor, lip_body: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, certified l2 radius) per row of ``logits`` (N, C), computed in float64."""
    z = logits.detach().double()
    w = head_weight.detach().double()
    pred = z.argmax(1)
    margin = z.gather(1, pred[:, None]) - z                  # z_j - z_i >= 0
    dist = torch.cdist(w[pred], w) * lip_body                # K_F ||W_j - W_i||
    # identical rows: z_j - z_i is a constant, so a positive gap can never close (radius inf)
    radius = torch.where(dist > 0, margin / dist,
                         torch.where(margin > 0, math.inf, 0.0))
    radius = radius.scatter(1, pred[:, None], math.inf).min(1).values
    return pred, radius


@torch.no_grad()
def certify(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            eps: Sequence[float] = DEFAULT_EPS, device: str | torch.device = "cpu") -> dict:
    """Certify ``model`` on ``batches`` of (x, y). Returns fractions (not percents):

    ``clean_accuracy``, ``cra`` {eps_key: fraction}, ``cra_estimate`` (same with the converged
    power-iteration estimate of K_F in place of the sound bound, for comparison only),
    ``lipschitz_constant`` (sound bound of the whole model), ``lipschitz_estimate`` (converged power
    iteration), ``lipschitz_body`` (sound K_F), ``n_samples``.
    """
    model.eval()
    body_estimate = lipschitz.converged_body(model)
    body_bound = lipschitz.upper_bound_body(model)
    n = correct = 0
    robust = {e: 0 for e in eps}
    robust_est = {e: 0 for e in eps}
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        pred, radius = certified_radius(logits, model.head.weight, body_bound)
        # the estimate's radius scales by bound/estimate: same margins, smaller K_F
        radius_est = radius * (body_bound / body_estimate)
        hit = pred == y
        n += len(y)
        correct += hit.sum().item()
        for e in eps:
            robust[e] += (hit & (radius > e)).sum().item()
            robust_est[e] += (hit & (radius_est > e)).sum().item()
    if n == 0:
        raise ValueError("no samples to certify")
    return {
        "clean_accuracy": correct / n,
        "cra": {eps_key(e): robust[e] / n for e in eps},
        "cra_estimate": {eps_key(e): robust_est[e] / n for e in eps},
        "lipschitz_constant": lipschitz.lipschitz_constant(model, body_bound),
        "lipschitz_estimate": lipschitz.estimate_constant(model, body_estimate),
        "lipschitz_body": body_bound,
        "n_samples": n,
    }
