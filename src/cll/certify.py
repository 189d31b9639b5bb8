"""The certifier: certified radii, clean accuracy and certified robust accuracy (CRA) at each eps.

One rule for every architecture (the pairwise last-layer certificate of GloRo, CLL, SOC's LLN,
CPL and SLL; shared/spec/cll.md section 3): with j = argmax z the *predicted* class and K_F a sound
upper bound on the body's Lipschitz constant, the radius of x is

    r(x) = min_{i != j} (z_j - z_i) / (K_F * ||W_j - W_i||_2),

and x counts as certified at eps iff j equals the label and r(x) > eps (strict). Ties give a
radius of 0, so a tied prediction is never certified.

K_F always comes from ``cll.lipschitz.upper_bound_body`` (sound); the converged power-iteration
estimate is reported beside it as ``cra_estimate`` to show what the sound bound costs.

Rounding: what exactly is certified
-----------------------------------
K_F bounds the Lipschitz constant of the network ``f`` in *exact* arithmetic (its float32
parameters read as real numbers). The margins z_j - z_i, however, come out of a floating-point
forward pass, and a float32 pass can be off by far more than it looks: for one layer the
computed ``fl(W h + b)`` satisfies, for any summation order (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed. 2002, eq. 3.5 and Thm. 3.1),

    |fl(W h + b) - (W h + b)| <= gamma_{n+1} (|W| |h| + |b|)   elementwise,
    gamma_k = k u / (1 - k u),  n = fan-in,  u = 2^-24 (float32) or 2^-53 (float64).

With u = 2^-24 this worst case shifts the radius of a digits 4C3F model by a few percent of eps,
which would cost whole points of CRA. So the certified margins are recomputed in float64, where
the same bound is ~1e-13 of the logit scale, and the certificate subtracts that bound:

* The body is evaluated layer by layer in float64 (``Float64Forward``), carrying a per-sample
  bound E on ``||h_computed - h_exact||_2``. A linear or conv layer adds its own rounding
  ``rho = gamma_{n+1} || |W| |h| + |b| ||_2`` (evaluated on the actual activations with |W|, |b|)
  and scales the incoming error by at most its sound norm bound (``lipschitz.upper_bound_layer``).
  MaxMin, ReLU, Flatten and Identity are exact in floating point and 1-Lipschitz: E passes on.
* The head adds ``r_i = gamma_{n+1} (|W_i| |h| + |b_i|)`` per logit, so the exact margin is at
  least ``z_j - z_i - r_j - r_i - ||W_j - W_i|| E`` and the certified radius is

      r(x) = min_{i != j} (z_j - z_i - r_j - r_i - ||W_j - W_i|| E) / (K_F ||W_j - W_i||).

  Every term is inflated by 1 % (covering the float64 evaluation of the terms themselves, whose
  relative error is ~gamma_n << 1 %), and the final subtraction and division (relative error a
  few u) are covered by the 1e-9 relative slack already in K_F (``lipschitz.ROUNDING_SLACK``).
* A body layer of another type (SOC, CPL, SLL, Sandwich, ...) is evaluated by a float64 copy of
  itself; E is scaled by its sound bound ``lipschitz.upper_bound_layer`` and its own rounding is
  taken as ``GENERIC_REL * (||out|| + L ||in||)`` with GENERIC_REL = 1e-9, about 10^7 float64
  unit roundoffs. That is an estimate, not a proof (no per-operation analysis of such a layer),
  but it exceeds the float64 error of any layer that sums fewer than ~10^6 terms per output;
  ``certify.json`` says ``"rounding": "estimated"`` when such a layer was present.

The claim is then: the exact network ``f`` predicts the label everywhere in the l2 ball of radius
eps. The deployed float32 model evaluated at a point x' of the ball differs from f(x') by its own
rounding (the gamma bound above with u = 2^-24), which is only not covered when f's margin at x'
is itself below float32 rounding; ``cll audit`` checks attacked points in both precisions.
Caveat for GPUs: TF32 convolutions (cuDNN's default) are not float32, so the certifier's float64
pass never uses cuDNN and the float32 reference pass disables TF32.

``cra_estimate`` is the plain computation for comparison: float32 margins and the converged
power-iteration estimate of K_F, no rounding term. ``cra_unrounded`` (sound K_F, float32 margins,
no rounding term; the certifier's rule before the rounding term existed) separates the cost of
the sound bound from that of the rounding term.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import lipschitz
from .errors import CllError
from .layers import MaxMin
from .results import fmt_number

# The eps grid of the paper's tables, in [0,1]-pixel l2 units.
DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Layers whose floating-point evaluation is exact (comparisons, copies) and that are 1-Lipschitz.
EXACT_LAYERS = (MaxMin, nn.ReLU, nn.Flatten, nn.Identity)
# Assumed own rounding of a body layer without a per-operation analysis, relative (see above).
GENERIC_REL = 1e-9
# Safety factor on every rounding term (covers the float64 evaluation of the terms themselves).
TERM_SAFETY = 1.01


def eps_key(eps: float) -> str:
    """How an eps is written as a key in certify.json and tables: 4 significant digits."""
    return fmt_number(eps)


def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term inner product."""
    nu = n * UNIT_ROUNDOFF[dtype]
    if nu >= 1:
        raise ValueError(f"gamma_{n} is undefined in {dtype} (n u >= 1)")
    return nu / (1 - nu)


def certified_radius(logits: torch.Tensor, head_weight: torch.Tensor, lip_body: float,
                     logit_error: torch.Tensor | None = None, body_error: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, certified l2 radius) per row of ``logits`` (N, C), computed in float64.

    ``logit_error`` (N, C) bounds |computed z_i - exact z_i| for the head's own rounding and
    ``body_error`` (N,) bounds the l2 error of the head's input (see the module docstring); both
    are subtracted from the margins. Without them the margins are taken as exact."""
    z = logits.detach().double()
    w = head_weight.detach().double()
    pred = z.argmax(1)
    margin = z.gather(1, pred[:, None]) - z                  # z_j - z_i >= 0
    pair = torch.cdist(w[pred], w)                           # ||W_j - W_i||
    if logit_error is not None:
        err = logit_error.detach().double()
        margin = margin - (err.gather(1, pred[:, None]) + err)
    if body_error is not None:
        margin = margin - pair * body_error.detach().double()[:, None]
    dist = pair * lip_body                                   # K_F ||W_j - W_i||
    # identical rows: z_j - z_i is a constant, so a positive gap can never close (radius inf)
    radius = torch.where(dist > 0, margin / dist,
                         torch.where(margin > 0, math.inf, 0.0))
    radius = radius.scatter(1, pred[:, None], math.inf).min(1).values.clamp_min(0.0)
    return pred, radius


# ------------------------------------------------------------------------ the float64 forward
class Float64Forward:
    """The logits of ``model`` recomputed in float64, with a per-sample bound on their rounding.

    ``model`` follows the package's interface: ``model(x) == model.head(model.body(x))`` with a
    sequential ``body`` and a linear ``head`` (``head.weight`` may be a parametrisation: its
    float32 value is the classifier certified)."""

    def __init__(self, model: nn.Module):
        self.model = model
        shapes = lipschitz.trace_input_shapes(model.body, model.in_shape)
        # every body layer's sound bound, once: their product is upper_bound_body's K_F
        self.layer_bounds = [lipschitz.upper_bound_layer(layer, shape) for layer, shape in zip(model.body, shapes)]
        self.steps: list[tuple[str, nn.Module, dict]] = []
        self.generic: list[str] = []
        for layer, shape, bound in zip(model.body, shapes, self.layer_bounds):
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                if isinstance(layer, nn.Conv2d):
                    lipschitz.linear_operator(layer, shape)  # rejects unsupported conv variants
                w = layer.weight.detach().double()
                b = layer.bias.detach().double() if layer.bias is not None else None
                self.steps.append(("affine", layer, dict(
                    w=w, absw=w.abs(), b=b, absb=b.abs() if b is not None else None,
                    gamma=gamma(w[0].numel() + 1), lip=bound)))
            elif isinstance(layer, EXACT_LAYERS):
                self.steps.append(("exact", layer, {}))
            else:
                layer64 = copy.deepcopy(layer).double().eval()  # eval() drops float32 caches
                self.steps.append(("generic", layer64, dict(lip=bound)))
                self.generic.append(type(layer).__name__)
        w = model.head.weight.detach().double()
        bias = model.head.bias
        self.head_w, self.head_absw = w, w.abs()
        self.head_b = bias.detach().double() if bias is not None else torch.zeros_like(w[:, 0])
        self.head_gamma = gamma(w.shape[1] + 1)

    @staticmethod
    def _affine(layer: nn.Module, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if isinstance(layer, nn.Linear):
            return F.linear(h, w, b)
        return F.conv2d(h, w, b, layer.stride, layer.padding)

    @staticmethod
    def _norm(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(dim=1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N, C), logit_error (N, C), body_error (N,)), all float64, for ``certified_radius``."""
        h = x.double()
        err = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        with _no_cudnn():
            for kind, layer, p in self.steps:
                if kind == "affine":
                    out = self._affine(layer, h, p["w"], p["b"])
                    size = self._affine(layer, h.abs(), p["absw"], p["absb"])  # |W||h| + |b| >= 0
                    err = p["lip"] * err + TERM_SAFETY * p["gamma"] * self._norm(size)
                elif kind == "exact":
                    out = layer(h)
                else:
                    out = layer(h)
                    err = p["lip"] * err + TERM_SAFETY * GENERIC_REL * (self._norm(out) + p["lip"] * self._norm(h))
                h = out
            h = h.flatten(1) if h.dim() > 2 else h
            logits = F.linear(h, self.head_w, self.head_b)
            logit_error = TERM_SAFETY * self.head_gamma * F.linear(h.abs(), self.head_absw, self.head_b.abs())
        return logits, logit_error, err * TERM_SAFETY

    @property
    def rounding(self) -> str:
        """"rigorous" if every body layer has the per-operation bound, else "estimated"."""
        return "estimated" if self.generic else "rigorous"


@contextmanager
def _no_cudnn():
    """Native (im2col + GEMM) convolutions on GPUs: cuDNN may pick FFT or Winograd algorithms,
    whose rounding the inner-product bound does not describe."""
    if torch.backends.cudnn.is_available():
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


@contextmanager
def _no_tf32():
    """Real float32 in the reference forward pass (TF32 keeps 10 mantissa bits)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


class Certifier:
    """Sound per-sample radii of one model: the float64 forward pass, its rounding bound and K_F.
    ``lip_body`` defaults to the sound K_F of ``lipschitz.upper_bound_body(model)``, taken as the
    product of the per-layer bounds the float64 pass computes anyway (the same product
    upper_bound_body forms; tests/test_certify.py checks the two agree), so no bound is computed
    twice."""

    def __init__(self, model: nn.Module, lip_body: float | None = None):
        model.eval()
        self.model = model
        self.forward64 = Float64Forward(model)
        self.lip_body = math.prod(self.forward64.layer_bounds) if lip_body is None else lip_body
        self.max_gap = 0.0  # largest |float32 logit - float64 logit| seen, relative to the logit scale

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 logits, predicted class, sound certified radius) for a batch ``x``."""
        with _no_tf32():
            logits32 = self.model(x)
        logits64, logit_error, body_error = self.forward64(x)
        # a forward that is not head(body(x)) would make the certificate about another function
        scale = logits64.abs().amax(1, keepdim=True).clamp_min(1.0)
        gap = ((logits32.double() - logits64).abs() / scale).max().item() if len(x) else 0.0
        if not gap <= 1e-3:
            raise CllError(f"the float64 forward pass head(body(x)) of {type(self.model).__name__} differs "
                           f"from model(x) by {gap:.3g} of the logit scale: the model does not follow the "
                           "certifier's interface (model(x) == model.head(model.body(x)))")
        self.max_gap = max(self.max_gap, gap)
        pred, radius = certified_radius(logits64, self.model.head.weight, self.lip_body, logit_error, body_error)
        return logits32, pred, radius


@torch.no_grad()
def certify(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            eps: Sequence[float] = DEFAULT_EPS, device: str | torch.device = "cpu") -> dict:
    """Certify ``model`` on ``batches`` of (x, y). Returns fractions (not percents):

    ``clean_accuracy`` (float32 forward), ``cra`` {eps_key: fraction} (sound: float64 margins less
    their rounding bound, sound K_F), ``cra_estimate`` (float32 margins with the converged
    power-iteration estimate of K_F, for comparison only), ``cra_unrounded`` (float32 margins,
    sound K_F, no rounding term), ``lipschitz_constant`` (sound bound of the whole model),
    ``lipschitz_estimate`` (converged power iteration), ``lipschitz_body`` (sound K_F),
    ``n_samples``, ``rounding`` ("rigorous" or "estimated", see the module docstring) and
    ``float32_gap`` (largest |float32 - float64| logit difference over the logit scale).
    """
    model.eval()
    body_estimate = lipschitz.converged_body(model)
    certifier = Certifier(model)
    body_bound = certifier.lip_body
    n = correct = 0
    robust = {e: 0 for e in eps}
    robust_est = {e: 0 for e in eps}
    robust_unrounded = {e: 0 for e in eps}
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, pred, radius = certifier(x)
        pred32, radius32 = certified_radius(logits, model.head.weight, body_bound)
        # the estimate's radius scales by bound/estimate: same margins, smaller K_F
        radius_est = radius32 * (body_bound / body_estimate)
        hit, hit32 = pred == y, pred32 == y
        n += len(y)
        correct += hit32.sum().item()
        for e in eps:
            robust[e] += (hit & (radius > e)).sum().item()
            robust_est[e] += (hit32 & (radius_est > e)).sum().item()
            robust_unrounded[e] += (hit32 & (radius32 > e)).sum().item()
    if n == 0:
        raise ValueError("no samples to certify")
    return {
        "clean_accuracy": correct / n,
        "cra": {eps_key(e): robust[e] / n for e in eps},
        "cra_estimate": {eps_key(e): robust_est[e] / n for e in eps},
        "cra_unrounded": {eps_key(e): robust_unrounded[e] / n for e in eps},
        "lipschitz_constant": lipschitz.lipschitz_constant(model, body_bound),
        "lipschitz_estimate": lipschitz.estimate_constant(model, body_estimate),
        "lipschitz_body": body_bound,
        "n_samples": n,
        "rounding": certifier.forward64.rounding,
        "float32_gap": certifier.max_gap,
    }
