"""The certifier: certified radii, clean accuracy and certified robust accuracy (CRA) at each eps.

One rule for every architecture (``radius.py``: the pairwise last-layer certificate of GloRo, CLL,
SOC's LLN, CPL and SLL) with K_F always the sound ``cll.lipschitz.upper_bound_body``; the converged
power-iteration estimate is reported beside it (``cra_estimate``, where one exists) to show what
the sound bound costs.

What exactly is certified
-------------------------
K_F bounds the Lipschitz constant of the network ``f`` in *exact* arithmetic: its float32
parameters, and the tensors its evaluation forward derives from them once (SOC's kernel, CPL's
step, SLL's 1/t, Sandwich's factors), read as real numbers. The margins z_j - z_i, however, come
out of a floating-point forward pass, which for one layer of fan-in n can be off by gamma_{n+1}
(|W||h| + |b|) (Higham 2002, eq. 3.5): with u = 2^-24 that shifts radii by a few percent of eps
(a digits 4C3F) to ~15 % (a CIFAR-10 4C3F). Every layer therefore bounds its own rounding next to
its forward (``rounding``), and each sample gets two sound certificates (``passes.py``), certified
when either holds:

1. the float32 pass ``model(x)`` itself, less a cheap worst-case bound on its rounding; it settles
   every sample whose radius is not within that bound of an eps;
2. for the others only, the margins recomputed in float64, where the same analysis at u = 2^-53 is
   ~1e-13 of the logit scale: first from the float32 activations of a *restart* layer on (the last
   layers, at most 30 % of the body's operations, which on a GloRo net carry most of the float32
   bound: its dense layers have the largest fan-ins), the error bound of the float32 layers before it
   carried along; then, where that still cannot settle a decision, from the input.

A sample goes through float64 only if its float32 radius is <= some eps while an upper bound on
its exact radius (for the predicted class and for any other class; labels used) is above it. A
layer whose float32 bound is an estimate (the Sandwich conv's FFT) makes the float32 pass screen
only: every sample it would certify is recomputed, and only the float64 certificate counts.

The claim is then: the exact network ``f`` predicts the label everywhere in the l2 ball of radius
eps. The deployed float32 model at a point x' of the ball differs from f(x') by its own rounding,
which is only not covered when f's margin at x' is itself below float32 rounding; ``cll audit``
checks attacked points in both precisions.

``cra_estimate`` is the plain computation for comparison: float32 margins and the power-iteration
estimate of K_F (the stored iterates, converged at the end of training, refined by at most
``ESTIMATE_ITERS`` iterations), no rounding term (null for the peers' families, whose layers power
iteration does not follow). ``cra_unrounded`` (sound K_F, float32 margins, no rounding term)
separates the cost of the sound bound from that of the rounding term.

Local bounds (Local-Lip-B): with ``local``, a sample the global K_F does not certify at eps gets a
second chance with K(x, eps), a sound bound on the body's constant on the ball itself
(``cll.local_lipschitz.LocalBound``, never above K_F), and the float64 margins less their rounding:
certified at eps iff min_{i != j} (margin less rounding) / (K(x, eps) ||W_j - W_i||) > eps. A K for
one eps says nothing about another. ``cra_estimate`` is then the paper's own certificate (masks and
norms from power iteration, float32 margins): what the sound one costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..checks import WeightsGuard
from ..errors import CllError
from ..lipschitz import estimate_converged_body, upper_bound, upper_bound_layers
from ..lipschitz.operators import row_distances
from ..local_lipschitz import LocalBound, estimate_local
from ..progress import Progress
from ..results import fmt_number
from ..values import LOCAL_ESTIMATE_ITERS, PAPER_EPS
from .passes import Float32Pass, Float64Pass, full_precision, head_gap, layer_costs, restart_layer
from .radius import certified_radius, radius_upper_bounds

DEFAULT_EPS = PAPER_EPS  # the eps grid of the paper's tables
ESTIMATE_ITERS = 100  # power iterations refining the stored iterates for cra_estimate
GAP_LIMIT = 1e-3  # beside an estimated float32 bound: logits further apart are not one function


def eps_key(eps: float) -> str:
    """How an eps is written as a key in certify.json and tables: 4 significant digits."""
    return fmt_number(eps)


class Certifier:
    """Sound per-sample radii of one model: K_F, the float32 pass with its rounding bound and, where
    that bound cannot settle a decision, the float64 pass.

    K_F is the product of the per-layer bounds the rounding bounds need anyway (the product
    ``upper_bound_body`` forms), so no bound is computed twice. Both passes give a sound lower
    bound on the exact margins, so a sample is certified at eps when either proves it (they agree
    but for a radius within ~1e-13 of eps). The float64 pass runs only on the samples where it
    could change a decision at one of ``eps``; with ``eps`` None, every sample is recomputed in
    float64. The model is checked when the certifier is built and at every pass (``cll.checks``:
    no hooks, plain head and body, float32 weights, inputs at ``in_shape``); its weights are copied,
    and a call after they changed is refused (the bound would be that of the old weights)."""

    def __init__(self, model: nn.Module, eps: Sequence[float] | None = None):
        model.eval()
        self.model = model
        self.guard = WeightsGuard(model)
        with full_precision():
            shapes, bounds = upper_bound_layers(model)
        self.layer_bounds = bounds
        self.lip_body = math.prod(bounds)
        self.forward32 = Float32Pass(model, shapes, bounds, self.guard)
        self.forward64 = Float64Pass(model, shapes, bounds, self.guard)
        if self.forward32.rigorous:  # a float64 pass may then go on from the float32 activations
            with full_precision():
                self.forward32.restart = restart_layer(layer_costs(model.body, shapes))
        self.distances = row_distances(model.head.weight.detach().double())
        self.row_norms = model.head.weight.detach().double().norm(dim=1)
        self.eps = None if eps is None else sorted(float(e) for e in eps)
        self.max_gap = 0.0  # largest |float32 logit - float64 logit| seen, relative to the logit scale
        self.recomputed = 0  # samples that went through the whole float64 pass
        self.resumed = 0  # samples whose float64 pass started from the float32 pass's restart layer

    def _recompute(self, index, logits32, pred, radius, recomputed, bound32) -> None:
        """Take the certificate of ``recomputed`` (logits, logit_error, body_error of a float64 pass
        over the samples ``index``) where it is the larger, after checking it computes model(x)."""
        logits64, logit_error64, body_error64 = recomputed
        self._check_same_function(
            logits32[index], logits64, bound32, logit_error64 + self.row_norms * body_error64[:, None]
        )
        pred64, radius64 = certified_radius(
            logits64, self.model.head.weight, self.lip_body, logit_error64, body_error64, self.distances
        )
        better = radius64 > radius[index]  # a positive radius fixes the class, so they agree
        pred[index] = torch.where(better, pred64, pred[index])
        radius[index] = torch.maximum(radius64, radius[index])

    def _check_same_function(self, logits32, logits64, bound32, bound64) -> None:
        """Both passes compute head(body(x)), each within its rounding bound of the exact logits, so
        they differ by at most the sum of the two bounds (the float32 one being rigorous; an
        estimated one is held to GAP_LIMIT of the logit scale instead). A larger gap means that
        model(x) is not head(body(x)), or that a layer's rounding bound is wrong: never certify."""
        gap = head_gap(logits32, logits64)
        self.max_gap = max(self.max_gap, gap)
        allowed = bound32 * (1 + 1e-6) + bound64 + 1e-300
        within = ((logits32.double() - logits64).abs() <= allowed).all().item()
        if not (within or (not self.forward32.rigorous and gap <= GAP_LIMIT)):
            raise CllError(
                f"the float64 forward pass head(body(x)) of {type(self.model).__name__} differs from "
                f"model(x) by {gap:.3g} of the logit scale, more than their rounding bounds allow: the "
                "model does not follow the certifier's interface (model(x) == model.head(model.body(x)))"
            )

    def _needs_float64(self, logits, logit_error, body_error, radius, y) -> torch.Tensor:
        """Samples whose float64 radius could be above an eps that the float32 radius is not."""
        if self.eps is None:
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        w = self.model.head.weight
        reach_pred, reach_other = radius_upper_bounds(logits, w, self.lip_body, logit_error, body_error, self.distances)
        # the exact argmax is the predicted class (radius <= reach_pred) or another one (<= reach_other);
        # a sample predicted wrong can only be certified through another class
        reach = torch.maximum(reach_pred, reach_other)
        if y is not None:
            reach = torch.where(logits.argmax(1) == y.to(logits.device), reach, reach_other)
        need = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        for e in self.eps:
            need |= ~(radius > e) & (reach > e)
        return need

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 logits, predicted class, sound certified radius) for a batch ``x``; ``y`` (the
        labels, optional) lets it skip the float64 pass for samples that cannot be certified."""
        w = self.model.head.weight
        logits32, logit_error, body_error = self.forward32(x)
        pred, radius = certified_radius(logits32, w, self.lip_body, logit_error, body_error, self.distances)
        if not self.forward32.rigorous:  # an estimated bound screens, it never certifies
            radius = torch.zeros_like(radius)
        index = self._needs_float64(logits32, logit_error, body_error, radius, y).nonzero().flatten()
        restart = self.forward32.restart
        if len(index) and restart is not None:  # float64 from the restart layer on (cheap) first
            h, err = self.forward32.restart_input[index], self.forward32.restart_error[index]
            bound32 = logit_error[index] + self.row_norms * body_error[index, None]
            resumed = self.forward64(h, restart, err)
            self._recompute(index, logits32, pred, radius, resumed, bound32)
            self.resumed += len(index)
            index = index[self._needs_float64(*resumed, radius[index], None if y is None else y[index])]
        if len(index):
            bound32 = logit_error[index] + self.row_norms * body_error[index, None]
            self._recompute(index, logits32, pred, radius, self.forward64(x[index]), bound32)
            self.recomputed += len(index)
        return logits32, pred, radius


class LocalCertifier:
    """The per-eps local certificates of samples the global certificate leaves out (see the module
    docstring), and the paper's estimate-based ones for comparison (``local_estimate_iters`` power
    iterations per masked norm; None: no estimate)."""

    def __init__(self, certifier: Certifier, local_estimate_iters: int | None = None):
        self.certifier, self.local_estimate_iters = certifier, local_estimate_iters
        self.bound = LocalBound(certifier.model, certifier.guard)
        self.computed = 0  # samples x eps whose local bound was computed

    def __call__(self, x, y, pred, radius, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sound, estimate): boolean masks of the samples certified at ``eps`` by the local bound
        (beyond the global certificate: those are included) and by the paper's estimate (None
        without ``local_estimate_iters``)."""
        model, w = self.certifier.model, self.certifier.model.head.weight
        sound = (pred == y) & (radius > eps)
        todo = ((pred == y) & ~sound).nonzero().flatten()
        estimate = None if self.local_estimate_iters is None else sound.clone()
        if len(todo):
            self.computed += len(todo)
            k = self.bound(x[todo], eps)
            logits, logit_error, body_error = self.certifier.forward64(x[todo])
            # the float64 margins less their rounding decide the class themselves: a float32 argmax
            # on a near-tie says nothing about the exact one
            pred64, local = certified_radius(logits, w, k, logit_error, body_error, self.certifier.distances)
            sound[todo] = (pred64 == y[todo]) & (local > eps)
            if estimate is None:
                return sound, None
            k_est = estimate_local(model, x[todo], eps, self.local_estimate_iters, update=False).lip
            pred32, r_est = certified_radius(model(x[todo]), w, k_est, distances=self.certifier.distances)
            estimate[todo] = (pred32 == y[todo]) & (r_est > eps)
        return sound, estimate


@torch.no_grad()
def certify(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: Sequence[float] = DEFAULT_EPS,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    local: bool = False,
    local_estimate_iters: int = LOCAL_ESTIMATE_ITERS,
) -> dict:
    """Certify ``model`` on ``batches`` of (x, y). Returns fractions (not percents):

    ``clean_accuracy`` (float32 forward), ``cra`` {eps_key: fraction} (sound), ``cra_estimate``
    (float32 margins with the converged power-iteration estimate of K_F, for comparison only; null
    where no estimate exists), ``cra_unrounded`` (float32 margins, sound K_F, no rounding term),
    ``lipschitz_constant`` (sound bound of the whole model), ``lipschitz_estimate`` (converged power
    iteration, or null), ``lipschitz_body`` (sound K_F), ``n_samples``, ``rounding`` ("rigorous":
    every certificate rests on a proved rounding bound), ``float32_rounding`` ("rigorous", or
    "estimated" where the float32 pass only screens), ``float32_gap`` (largest |float32 - float64|
    logit difference over the logit scale, over the samples recomputed), ``float64_resumed_share``
    (the fraction of samples whose float64 pass started from the float32 activations at the restart
    layer) and ``float64_share`` (the fraction recomputed in float64 from the input). ``log``: where
    periodic progress lines go.

    ``local``: certify with sound local bounds as well (Local-Lip-B; see the module docstring), with
    ``cra_global`` the global certificate's CRA, ``cra_estimate`` the paper's estimate-based one
    (``local_estimate_iters`` power iterations) and ``local_share`` the samples x eps whose local
    bound was computed, over samples x eps.
    """
    model.eval()
    # the iterates a trained model carries were converged at its last epoch's end: refining them by
    # a bounded number of iterations keeps the comparison figure from costing more than the bound
    body_estimate = estimate_converged_body(model, max_iter=ESTIMATE_ITERS)
    certifier = Certifier(model, eps=eps)
    body_bound = certifier.lip_body
    local_certifier = LocalCertifier(certifier, local_estimate_iters) if local else None
    n = correct = 0
    robust = dict.fromkeys(eps, 0)
    robust_global = dict.fromkeys(eps, 0)
    robust_est = dict.fromkeys(eps, 0)
    robust_unrounded = dict.fromkeys(eps, 0)
    progress = Progress("certify", _length(batches), "images", log)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, pred, radius = certifier(x, y)
        pred32, radius32 = certified_radius(logits, model.head.weight, body_bound, distances=certifier.distances)
        hit, hit32 = pred == y, pred32 == y
        n += len(y)
        correct += hit32.sum().item()
        for e in eps:
            robust_global[e] += (hit & (radius > e)).sum().item()
            robust_unrounded[e] += (hit32 & (radius32 > e)).sum().item()
            if local_certifier is not None:
                sound, estimate = local_certifier(x, y, pred, radius, e)
                robust[e] += sound.sum().item()
                robust_est[e] += estimate.sum().item()
                continue
            robust[e] += (hit & (radius > e)).sum().item()
            if body_estimate is not None:  # the estimate's radius: same margins, smaller K_F
                robust_est[e] += (hit32 & (radius32 * (body_bound / body_estimate) > e)).sum().item()
        progress.update(len(y))
    if n == 0:
        raise ValueError("no samples to certify")
    has_estimate = body_estimate is not None or local
    out = {
        "clean_accuracy": correct / n,
        "cra": {eps_key(e): robust[e] / n for e in eps},
        "cra_estimate": {eps_key(e): robust_est[e] / n for e in eps} if has_estimate else None,
        "cra_unrounded": {eps_key(e): robust_unrounded[e] / n for e in eps},
        "lipschitz_constant": upper_bound(model, body_bound),
        "lipschitz_estimate": None if body_estimate is None else body_estimate * _head(model),
        "lipschitz_body": body_bound,
        "n_samples": n,
        "rounding": "rigorous",
        "float32_rounding": "rigorous" if certifier.forward32.rigorous else "estimated",
        "float32_gap": certifier.max_gap,
        "float64_share": certifier.recomputed / n,
        "float64_resumed_share": certifier.resumed / n,
    }
    if local_certifier is not None:
        out["cra_global"] = {eps_key(e): robust_global[e] / n for e in eps}
        out["local_share"] = local_certifier.computed / (n * len(eps))
    return out


def _head(model: nn.Module) -> float:
    return row_distances(model.head.weight.detach().double()).max().item()


def _length(batches) -> int | None:
    """Samples in ``batches`` where they say (a DataLoader over a sized data set)."""
    try:
        return len(batches.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


__all__ = ["DEFAULT_EPS", "Certifier", "certified_radius", "certify", "eps_key", "radius_upper_bounds"]
