"""The audit: the certifier's certificates attacked, and how tight they are.

``audit`` certifies a test sample with the certifier's own rule (``cll.certify.Certifier``) and
attacks every certified point at each eps and every correct point at its own radius with the
ensemble of ``cll.attack``; any success refutes a certificate. It also measures how tight the
certificates are: the nearest adversarial point found (FMN-l2) over the radius, and a float64
lower bound on the Lipschitz constant from optimised pairs of inputs over the certified bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .attack import attack_names, fmn_l2, lipschitz_lower_bound, logit_spread, margin_loss, strongest
from .certify import Certifier, LocalCertifier, eps_key
from .checks import check_input
from .lipschitz import upper_bound_head
from .progress import Progress, fmt_time
from .values import AUDIT_RESTARTS, AUDIT_STEPS


def audit_plan(n: int, eps: list[float], steps: int, restarts: int) -> str:
    """One line: what ``audit`` will do."""
    return (
        f"audit of {n} test points: certified and correct points attacked at eps "
        f"{', '.join(eps_key(e) for e in eps)} and at (1 - 1e-3) x their own certified radius with PGD-l2 "
        f"({steps} steps x {restarts} restarts) + APGD-l2 DLR/CE ({steps} steps); tightness by FMN-l2 "
        f"({steps} steps); Lipschitz lower bound by pair ascent ({steps} steps)"
    )


def gradient_evaluations(n_points: int, eps: list[float], steps: int, restarts: int) -> int:
    """An upper estimate of the per-point forward-backward passes of ``audit``: ``strongest`` at each
    eps and at the own radius, FMN and the pair ascent (two points)."""
    ensemble = steps * (restarts + 2) + restarts + 8
    return n_points * (ensemble * (len(eps) + 1) + steps + 2 * steps)


def _quantiles(values: torch.Tensor) -> dict | None:
    if len(values) == 0:
        return None
    q = torch.quantile(values.double(), torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64))
    return dict(zip(["min", "q05", "q25", "median", "q75", "q95", "max"], q.tolist()))


def _seconds_per_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> float:
    """Measured seconds of one input-gradient evaluation per point (the audit's unit of work)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.enable_grad():
            point = x.clone().requires_grad_(True)
            margin_loss(model(point), y).sum().backward()
        times.append(time.perf_counter() - start)
    return min(times[1:]) / len(x)


@torch.no_grad()
def audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: list[float],
    steps: int = AUDIT_STEPS,
    restarts: int = AUDIT_RESTARTS,
    seed: int = 0,
    batch_size: int = 500,
    log: Callable[[str], None] | None = None,
    local: bool = False,
) -> dict:
    """Attack the certificates of (x, y) and measure how tight they are.

    A point is certified by the certifier's own rule (``cll.certify.Certifier``: float32 or float64
    margins less their rounding bound, sound K_F), with radius r. It is *broken* if an attack point
    inside its radius (distance checked in float64) is misclassified by the float32 model or by the
    float64 pass: one broken point refutes the certificate. Three checks:

    1. ``per_eps``: every certified point at each eps in ``eps`` (``strongest``); correct but
       uncertified points too, as a check that the attack is strong enough to matter
       (``uncertified_broken``).
    2. ``own_radius``: every correct point with a positive finite radius, at (1 - 1e-3) r: a bound
       10 % too small is caught where the fixed eps never sit near the radii.
    3. ``tightness``: per correct point with a positive finite radius, the smallest adversarial
       distance found (FMN-l2, and the own-radius attack) over r, as quantiles (1 = tight; < 1 would
       be a broken certificate); ``lipschitz_lower``: the largest logit-difference change per unit
       of distance over pairs optimised from the sampled points, re-evaluated in float64 less its
       rounding bound (a lower bound on the exact network's constant), against ``lipschitz_upper``
       (the certified bound): ``lipschitz_tightness`` = lower / upper, never above 1 for a sound
       bound (``bound_broken`` if it is).

    ``local``: the certificates at each eps include the sound local ones (Local-Lip-B,
    ``cll.certify.LocalCertifier``), which the attack at eps then tests too.

    Returns a dict with ``per_eps`` {eps_key: counts}, ``own_radius`` (counts), ``tightness``,
    ``lipschitz_lower``, ``lipschitz_upper``, ``lipschitz_tightness``, ``bound_broken``, ``broken``
    (the total of broken certificates), ``attacks`` and ``lipschitz_body``."""
    certifier = Certifier(model, eps=eps)
    check_input(model, x)  # before the first attack: every bound holds at model.in_shape only
    local_certifier = LocalCertifier(certifier) if local else None
    torch.manual_seed(seed)
    attacks = _Attacks(model, certifier, steps, restarts, torch.Generator().manual_seed(seed))
    total = gradient_evaluations(len(x), eps, steps, restarts)
    progress = Progress("audit", total, "gradient evaluations", log)
    per_point = gradient_evaluations(1, eps, steps, restarts)
    if log is not None and len(x):
        log(f"audit: about {fmt_time(total * _seconds_per_gradient(model, x[:32], y[:32]))} expected")
    per_eps = {eps_key(e): dict.fromkeys(PER_EPS_COUNTS, 0) for e in eps}
    own = dict.fromkeys(OWN_RADIUS_COUNTS, 0)
    ratios, lower = [], 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits, pred, radius = certifier(xb, yb)
        correct = logits.argmax(1) == yb
        for e in eps:
            if local_certifier is None:
                certified = (pred == yb) & (radius > e)
            else:
                certified = local_certifier(xb, yb, pred, radius, e)[0]
            attacks.at_eps(xb, yb, certified, correct, e, per_eps[eps_key(e)])
        mine = (pred == yb) & correct & (radius > 0) & torch.isfinite(radius)
        if mine.any():
            ratios.append(attacks.at_own_radius(xb[mine], yb[mine], radius[mine], own))
        lower = max(lower, attacks.pair_lower_bound(xb))
        progress.update(len(xb) * per_point)
    upper = certifier.lip_body * upper_bound_head(model.head.weight)
    ratios = torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
    found = torch.isfinite(ratios)
    return {
        "per_eps": per_eps,
        "own_radius": own,
        "tightness": {
            "quantiles": _quantiles(ratios[found]),
            "points": int(found.sum()),
            "no_adversarial_found": int((~found).sum()),
        },
        "lipschitz_lower": lower,
        "lipschitz_upper": upper,
        "lipschitz_tightness": lower / upper if upper > 0 else None,
        "bound_broken": lower > upper,
        "broken": sum(c["broken"] for c in per_eps.values()) + own["broken"] + int(lower > upper),
        "attacks": attack_names(steps, restarts) + [f"fmn-l2 ({steps} steps)", f"pair ascent ({steps} steps)"],
        "lipschitz_body": certifier.lip_body,
    }


PER_EPS_COUNTS = (
    "sampled",
    "correct",
    "certified",
    "attacked",
    "broken",
    "broken_float32",
    "broken_float64",
    "uncertified_attacked",
    "uncertified_broken",
)
OWN_RADIUS_COUNTS = ("attacked", "broken", "broken_float32", "broken_float64")


def _inside(xt: torch.Tensor, radius) -> torch.Tensor:
    """An attack radius whose float32 points provably stay within ``radius``: x + delta rounds by
    <= u ||x + delta|| in l2 and the projection's own arithmetic by a few u of ||delta||."""
    u = 2.0**-24
    norm = xt.flatten(1).double().norm(dim=1)
    r = torch.as_tensor(radius, dtype=torch.float64, device=xt.device)
    return (r * (1 - 1e-5) - 4 * u * (norm + r)).clamp_min(0).to(xt.dtype)


@dataclass
class _Attacks:
    """The audit's three checks on one batch, with the model, its certifier and the attack budget."""

    model: nn.Module
    certifier: Certifier
    steps: int
    restarts: int
    generator: torch.Generator

    def _strongest(self, xt, yt, radius) -> torch.Tensor:
        with torch.enable_grad():  # a hair inside the ball: float32 rounding never leaves it
            return strongest(self.model, xt, yt, _inside(xt, radius), self.steps, self.restarts, self.generator)[0]

    def _broken(self, adv, xt, yt, radius) -> tuple[torch.Tensor, torch.Tensor]:
        """(wrong in float32, wrong in float64) for attack points checked to lie inside ``radius``."""
        distance = (adv.double() - xt.double()).flatten(1).norm(dim=1)
        if not (distance <= radius.double()).all():
            raise RuntimeError(f"attack left the ball: distance {distance.max().item()} > radius")
        return self.model(adv).argmax(1) != yt, self.certifier.forward64(adv)[0].argmax(1) != yt

    def at_eps(self, xb, yb, certified, correct, eps: float, counts: dict) -> None:
        """Check 1: the certified points and, to measure the attack, the correct uncertified ones."""
        targets = certified | correct
        counts["sampled"] += len(yb)
        counts["correct"] += correct.sum().item()
        counts["certified"] += certified.sum().item()
        if not targets.any():
            return
        xt, yt, cert = xb[targets], yb[targets], certified[targets]
        adv = self._strongest(xt, yt, eps)
        wrong32, wrong64 = self._broken(adv, xt, yt, torch.full((len(yt),), eps, device=xt.device))
        counts["attacked"] += cert.sum().item()
        counts["broken_float32"] += (wrong32 & cert).sum().item()
        counts["broken_float64"] += (wrong64 & cert).sum().item()
        counts["broken"] += ((wrong32 | wrong64) & cert).sum().item()
        counts["uncertified_attacked"] += (~cert).sum().item()
        counts["uncertified_broken"] += (wrong32 & ~cert).sum().item()

    def at_own_radius(self, xt, yt, radius, counts: dict) -> torch.Tensor:
        """Checks 2 and 3: each point attacked at (1 - 1e-3) of its radius, and the nearest
        adversarial distance found over the radius (inf where none was found)."""
        adv = self._strongest(xt, yt, radius * (1 - 1e-3))
        with torch.enable_grad():
            _nearest, distance = fmn_l2(self.model, xt, yt, self.steps, scale=radius.to(xt.dtype))
        wrong32, wrong64 = self._broken(adv, xt, yt, radius)
        hit = wrong32 | wrong64
        counts["attacked"] += len(yt)
        counts["broken_float32"] += wrong32.sum().item()
        counts["broken_float64"] += wrong64.sum().item()
        counts["broken"] += hit.sum().item()
        found = torch.where(hit, (adv - xt).flatten(1).norm(dim=1), distance.to(xt.dtype))
        return found.double() / radius.double()

    def pair_lower_bound(self, xb) -> float:
        """Check 3, the constant: pairs optimised from ``xb``, their logit-difference change per unit
        of distance in float64 less its rounding bound: a lower bound on the exact network's constant."""
        with torch.enable_grad():
            x1, x2 = lipschitz_lower_bound(self.model, xb, self.steps)
        z1, err1, body1 = self.certifier.forward64(x1)
        z2, err2, body2 = self.certifier.forward64(x2)
        head = upper_bound_head(self.model.head.weight)  # |change of z_i - z_j from a body error E| <= head * E
        slack = 2 * (err1.max(1).values + err2.max(1).values) + head * (body1 + body2)
        distance = (x1.double() - x2.double()).flatten(1).norm(dim=1) * (1 + 1e-15 * x1[0].numel())
        return ((logit_spread(z1, z2) - slack) / distance).clamp_min(0).max().item()
