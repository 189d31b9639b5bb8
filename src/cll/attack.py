"""PGD in l2 (Madry et al., ICLR 2018, arXiv 1706.06083) with random restarts, to test certificates:
a certified point must never be misclassified inside its radius, so any success is a soundness bug.
"""

from __future__ import annotations

import math

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


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 50,
    restarts: int = 5,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = None,
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
            (grad,) = torch.autograd.grad(objective.sum(), delta)
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
    eps: float,
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
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    current = x + _project(_unit(noise) * eps * 0.5, eps)  # a random start inside the ball
    size = torch.full((len(x),), 2.0 * eps, device=x.device)
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
    eps: float,
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


# ------------------------------------------------------------------------------------ the audit
@torch.no_grad()
def audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: list[float],
    steps: int = 100,
    restarts: int = 5,
    seed: int = 0,
    batch_size: int = 500,
) -> dict:
    """Attack every certified point of (x, y) at each radius in ``eps`` with ``strongest``.

    A point is certified by the certifier's own rule (``cll.certify.Certifier``: float32 or float64
    margins less their rounding bound, sound K_F). It is *broken* if an attack point within distance eps
    (checked in float64) is misclassified by the float32 model or by the float64 forward pass:
    one broken point refutes the certificate. Correct but uncertified points are attacked too, as
    a check that the attack is strong enough to matter (``uncertified_broken``).

    Returns ``{"per_eps": {eps_key: counts}, "broken": total, "attacks": [...], "lipschitz_body"}``
    with counts ``sampled, correct, certified, attacked, broken, broken_float32, broken_float64,
    uncertified_attacked, uncertified_broken``."""
    from .certify import Certifier, eps_key

    certifier = Certifier(model, eps=eps)
    generator = torch.Generator().manual_seed(seed)
    per_eps, names = {}, attack_names(steps, restarts)
    for e in eps:
        counts = dict.fromkeys(
            [
                "sampled",
                "correct",
                "certified",
                "attacked",
                "broken",
                "broken_float32",
                "broken_float64",
                "uncertified_attacked",
                "uncertified_broken",
            ],
            0,
        )
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits, pred, radius = certifier(xb, yb)
            correct = logits.argmax(1) == yb
            certified = (pred == yb) & (radius > e)
            targets = certified | correct
            counts["sampled"] += len(yb)
            counts["correct"] += correct.sum().item()
            counts["certified"] += certified.sum().item()
            if not targets.any():
                continue
            xt, yt = xb[targets], yb[targets]
            with torch.enable_grad():
                # a hair inside the ball, so float32 projection rounding never leaves it
                adv, _ = strongest(model, xt, yt, e * (1 - 1e-5), steps=steps, restarts=restarts, generator=generator)
            distance = (adv.double() - xt.double()).flatten(1).norm(dim=1)
            if not (distance <= e).all():
                raise RuntimeError(f"attack left the ball: distance {distance.max().item()} > eps {e}")
            wrong32 = model(adv).argmax(1) != yt
            wrong64 = certifier.forward64(adv)[0].argmax(1) != yt
            cert = certified[targets]
            counts["attacked"] += cert.sum().item()
            counts["broken_float32"] += (wrong32 & cert).sum().item()
            counts["broken_float64"] += (wrong64 & cert).sum().item()
            counts["broken"] += ((wrong32 | wrong64) & cert).sum().item()
            counts["uncertified_attacked"] += (~cert).sum().item()
            counts["uncertified_broken"] += (wrong32 & ~cert).sum().item()
        per_eps[eps_key(e)] = counts
    return {
        "per_eps": per_eps,
        "broken": sum(c["broken"] for c in per_eps.values()),
        "attacks": names,
        "lipschitz_body": certifier.lip_body,
    }
