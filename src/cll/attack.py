"""Attacks that test certificates (``cll.audit`` runs them against the certifier).

A certified point must never be misclassified inside its radius, so any success is a soundness
bug. The ensemble (``strongest``) is PGD in l2 (Madry et al., ICLR 2018, arXiv 1706.06083) with
random restarts and APGD-l2 with the DLR and CE losses (Croce & Hein, ICML 2020, arXiv 2003.01690);
``fmn_l2`` (Fast Minimum-Norm, Pintor et al., NeurIPS 2021, arXiv 2102.12827) looks for the
*smallest* adversarial perturbation, which says how tight a certificate is; ``lipschitz_lower_bound``
optimises pairs of inputs for the largest change of a logit difference per unit of distance, an
empirical lower bound on the constant the certificate bounds from above. Every radius argument
may be a float or a per-sample (N,) tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _unit(v: torch.Tensor) -> torch.Tensor:
    flat = v.flatten(1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(v)


def _per_sample(eps: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """eps as an (N,) tensor on x's device and dtype."""
    if torch.is_tensor(eps):
        return eps.to(x.device, x.dtype)
    return torch.full((len(x),), float(eps), device=x.device, dtype=x.dtype)


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (x.dim() - 1))


def _project(delta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * _view((_per_sample(eps, delta) / norms).clamp(max=1.0), delta)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{i != y} z_i - z_y per sample (> 0 means misclassified): the CW margin."""
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return other - logits.gather(1, y[:, None]).squeeze(1)


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int = 50,
    restarts: int = 5,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Per sample, the most damaging point found within the l2 ball of radius ``eps`` around x.

    Each restart starts uniformly at random in the ball and takes ``steps`` normalised-gradient
    ascent steps on the CW margin (or on cross-entropy every other restart), projecting back
    onto the ball (and onto ``clamp``, the valid input box, when given)."""
    eps = _per_sample(eps, x)
    step = _view(2.5 * eps / steps if step_size is None else _per_sample(step_size, x), x)
    best = x.clone()
    best_margin = torch.full((len(x),), float("-inf"), device=x.device)
    model.eval()
    for r in range(restarts):
        radius = eps * torch.rand(len(x), device=x.device) ** (1 / x[0].numel())
        delta = _unit(torch.randn_like(x)) * _view(radius, x)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            objective = margin_loss(logits, y) if r % 2 == 0 else F.cross_entropy(logits, y, reduction="none")
            (grad,) = torch.autograd.grad(objective.sum(), delta)
            with torch.no_grad():
                delta = _project(delta + step * _unit(grad), eps)
                if clamp is not None:
                    delta = (x + delta).clamp(*clamp) - x
        with torch.no_grad():
            margin = margin_loss(model(x + delta), y)
            better = margin > best_margin
            best[better] = (x + delta)[better]
            best_margin = torch.where(better, margin, best_margin)
    return best.detach()


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference of logits ratio, -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3), which
    is invariant to the logits' scale (Lipschitz-margin nets have very sharp or very flat logits);
    the plain CW margin where there are fewer than three classes."""
    if logits.shape[1] < 3:
        return margin_loss(logits, y)
    top = logits.sort(1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def _checkpoints(steps: int) -> list[int]:
    """APGD's iterations at which the step size may halve: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), times the budget."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p[1:] if q < 1} - {0})


def apgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int = 100,
    loss: str = "dlr",
    momentum: float = 0.75,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Auto-PGD in l2 (Croce & Hein, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", ICML 2020, arXiv 2003.01690, Alg. 1), written
    from the paper: per-sample step size starting at 2 eps, halved at the checkpoints where fewer
    than ``rho`` of the steps since the last one improved the loss or where neither step size nor
    best loss changed (then restarting from the best point), momentum ``momentum`` on the
    projected step. ``loss``: "dlr" or "ce". Returns the best point found per sample."""
    objective = dlr_loss if loss == "dlr" else (lambda z, t: F.cross_entropy(z, t, reduction="none"))
    shape = (-1, *[1] * (x.dim() - 1))

    def value_and_grad(point):
        point = point.clone().requires_grad_(True)
        f = objective(model(point), y)
        (grad,) = torch.autograd.grad(f.sum(), point)
        return f.detach(), grad

    def step(point, direction, size):
        return x + _project(point + size.view(shape) * _unit(direction) - x, eps)

    model.eval()
    eps = _per_sample(eps, x)
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    current = x + _project(_unit(noise) * _view(eps * 0.5, x), eps)  # a random start inside the ball
    size = 2.0 * eps
    f, grad = value_and_grad(current)
    best, best_f = current.clone(), f.clone()
    previous = current
    checks = _checkpoints(steps)
    last_check, improved = 0, torch.zeros(len(x), device=x.device)
    size_at_check, best_at_check = size.clone(), best_f.clone()
    for k in range(steps):
        z = step(current, grad, size)
        if k == 0:
            new = z
        else:
            new = x + _project(current + momentum * (z - current) + (1 - momentum) * (current - previous) - x, eps)
        previous, current = current, new
        f_new, grad_new = value_and_grad(current)
        improved += (f_new > f).float()
        better = f_new > best_f
        best[better], best_f = current[better], torch.where(better, f_new, best_f)
        f, grad = f_new, grad_new
        if k + 1 in checks:
            span = k + 1 - last_check
            halve = (improved < rho * span) | ((size_at_check == size) & (best_at_check == best_f))
            size = torch.where(halve, size / 2, size)
            current = torch.where(halve.view(shape), best, current)
            previous = current.clone()
            if halve.any():  # restart from the best point: its loss and gradient
                f_best, grad_best = value_and_grad(best)
                f = torch.where(halve, f_best, f)
                grad = torch.where(halve.view(shape), grad_best, grad)
            last_check, improved = k + 1, torch.zeros_like(improved)
            size_at_check, best_at_check = size.clone(), best_f.clone()
    return best.detach()


def attack_names(steps: int, restarts: int) -> list[str]:
    """What ``strongest`` runs, as audit.json records it."""
    return [
        f"pgd-l2 ({steps} steps x {restarts} restarts, CW margin / CE)",
        f"apgd-l2-dlr ({steps} steps)",
        f"apgd-l2-ce ({steps} steps)",
    ]


def strongest(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int = 100,
    restarts: int = 5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """The audit's attack ensemble within the l2 ball of radius ``eps``: PGD-l2 (``steps`` steps,
    ``restarts`` restarts alternating CW margin and cross-entropy) and APGD-l2 with the DLR and the
    CE loss (``steps`` iterations each). Per sample, the point with the largest CW margin over all
    attacks. Returns it and the names of the attacks run."""
    candidates = [
        pgd_l2(model, x, y, eps, steps=steps, restarts=restarts),
        apgd_l2(model, x, y, eps, steps=steps, loss="dlr", generator=generator),
        apgd_l2(model, x, y, eps, steps=steps, loss="ce", generator=generator),
    ]
    names = attack_names(steps, restarts)
    with torch.no_grad():
        margins = torch.stack([margin_loss(model(c), y) for c in candidates])
        pick = margins.argmax(0)
        best = torch.stack(candidates)[pick, torch.arange(len(x), device=x.device)]
    return best, names


def _cosine(start: float, end: float, k: int, steps: int) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * k / steps)) / 2


def fmn_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100, scale: float | torch.Tensor = 1.0):
    """Fast Minimum-Norm attack in l2 (Pintor, Roli, Brendel, Biggio, NeurIPS 2021, arXiv 2102.12827,
    Alg. 1), written from the paper: a normalised gradient step on the logit margin z_y - max_{j!=y}
    z_j, then a projection onto an l2 ball whose radius eps_k adapts: where the point is
    adversarial, eps shrinks by a factor (1 - gamma_k) (and never above the smallest adversarial
    norm found); where not, it grows by (1 + gamma_k), or, before any success, jumps to the linear
    estimate of the boundary ||delta|| + margin / ||grad||. gamma and the step size anneal by
    cosine (0.05 -> 0.001; ``scale`` -> scale / 100, ``scale`` per sample).

    Returns (the smallest adversarial point found, its distance to x), distance inf where none."""
    model.eval()
    delta = torch.zeros_like(x)
    eps = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    best = x.clone()
    best_norm = torch.full((len(x),), math.inf, device=x.device, dtype=x.dtype)
    alpha0 = _per_sample(scale, x)
    for k in range(steps):
        delta.requires_grad_(True)
        margin = -margin_loss(model(x + delta), y)  # > 0: still correct
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            norm = delta.flatten(1).norm(dim=1)
            adversarial = margin < 0
            better = adversarial & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            best[better] = (x + delta)[better]
            gamma = _cosine(0.05, 0.001, k, steps)
            grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            found = torch.isfinite(best_norm)
            grow = torch.where(found, eps * (1 + gamma), norm + margin / grad_norm)
            eps = torch.where(adversarial, torch.minimum(eps * (1 - gamma), best_norm), grow)
            alpha = alpha0 * _cosine(1.0, 0.01, k, steps)
            delta = _project(delta - _view(alpha, x) * _unit(grad), eps)
    with torch.no_grad():  # the last iterate
        margin = -margin_loss(model(x + delta), y)
        norm = delta.flatten(1).norm(dim=1)
        better = (margin < 0) & (norm < best_norm)
        best_norm = torch.where(better, norm, best_norm)
        best[better] = (x + delta)[better]
    return best.detach(), best_norm


def logit_spread(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """max_{i,j} |(z_i - z_j)(x1) - (z_i - z_j)(x2)| = max(dz) - min(dz), dz = z(x1) - z(x2)."""
    dz = logits - other
    return dz.max(1).values - dz.min(1).values


def lipschitz_lower_bound(model: nn.Module, x: torch.Tensor, steps: int = 100, lr: float = 1e-2) -> torch.Tensor:
    """Per sample, the largest |change of a logit difference| / ||x1 - x2|| found by gradient ascent
    over pairs (x1, x2) started at x and a point 1e-2 away, as GloRo's and the CLL reference's
    lower-bound evaluations do: every such ratio is a lower bound on the constant of all logit
    differences, which the certificate bounds from above (float32 ratios; ``audit`` re-evaluates
    the final pairs in float64 with their rounding bounds)."""
    model.eval()
    x1 = x.clone().requires_grad_(True)
    x2 = (x + 1e-2 * _unit(torch.randn_like(x))).requires_grad_(True)
    optimizer = torch.optim.Adam([x1, x2], lr=lr)
    for _ in range(steps):
        distance = (x1 - x2).flatten(1).norm(dim=1).clamp_min(1e-4)
        ratio = logit_spread(model(x1), model(x2)) / distance
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    return x1.detach(), x2.detach()
