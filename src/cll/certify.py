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

With u = 2^-24 this worst case shifts the radius by a few percent of eps (digits 4C3F) to ~15 %
(a CIFAR-10 4C3F), which would cost whole points of CRA if it were the certificate. Each sample
therefore gets two sound certificates, and is certified when either holds:

1. the float32 pass ``model(x)`` itself, less a cheap worst-case bound on its rounding
   (``Float32Bound``: activation norms instead of a second pass); it settles every sample whose
   radius is not within that bound of an eps;
2. for the others only (a few percent of the samples), the margins recomputed in float64, where
   the same bound is ~1e-13 of the logit scale, less that bound:

* The body is evaluated layer by layer in float64 (``Float64Forward``), carrying a per-sample
  bound E on ``||h_computed - h_exact||_2``. A linear or conv layer adds its own rounding
  ``rho = gamma_{n+1} || |W| |h| + |b| ||_2`` (evaluated on the actual activations with |W|, |b|,
  in float32 with its rounding down undone: a nonnegative sum) and scales the incoming error by
  at most its sound norm bound (``lipschitz.upper_bound_layer``).
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
Both passes use plain inner products only: no TF32, no cuDNN on a GPU (its FFT and Winograd
algorithms round differently), no NNPACK on the CPU (oneDNN's convolutions are direct).
The two certificates agree except for a radius within ~1e-13 of an eps (tests compare the
decisions with float64 on every sample); ``certify.json`` reports ``float64_share``.

``cra_estimate`` is the plain computation for comparison: float32 margins and the converged
power-iteration estimate of K_F, no rounding term. ``cra_unrounded`` (sound K_F, float32 margins,
no rounding term; the certifier's rule before the rounding term existed) separates the cost of
the sound bound from that of the rounding term.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

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


def certified_radius(
    logits: torch.Tensor,
    head_weight: torch.Tensor,
    lip_body: float,
    logit_error: torch.Tensor | None = None,
    body_error: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, certified l2 radius) per row of ``logits`` (N, C), computed in float64.

    ``logit_error`` (N, C) bounds |computed z_i - exact z_i| for the head's own rounding and
    ``body_error`` (N,) bounds the l2 error of the head's input (see the module docstring); both
    are subtracted from the margins. Without them the margins are taken as exact."""
    z = logits.detach().double()
    w = head_weight.detach().double()
    pred = z.argmax(1)
    margin = z.gather(1, pred[:, None]) - z  # z_j - z_i >= 0
    pair = torch.cdist(w[pred], w)  # ||W_j - W_i||
    if logit_error is not None:
        err = logit_error.detach().double()
        margin = margin - (err.gather(1, pred[:, None]) + err)
    if body_error is not None:
        margin = margin - pair * body_error.detach().double()[:, None]
    dist = pair * lip_body  # K_F ||W_j - W_i||
    # identical rows: z_j - z_i is a constant, so a positive gap can never close (radius inf)
    radius = torch.where(dist > 0, margin / dist, torch.where(margin > 0, math.inf, 0.0))
    radius = radius.scatter(1, pred[:, None], math.inf).min(1).values.clamp_min(0.0)
    return pred, radius


def radius_upper_bounds(
    logits: torch.Tensor,
    head_weight: torch.Tensor,
    lip_body: float,
    logit_error: torch.Tensor,
    body_error: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds on the radius the *exact* margins would give, from computed logits and their
    error bounds (see ``certified_radius``): for the predicted class j, min_{i != j} (z_j - z_i +
    slack) / (K_F ||W_j - W_i||); for any other class c, max_{c != j} (z_c - z_j + slack) / (K_F
    ||W_c - W_j||), a bound that is <= 0 unless the errors could reverse the prediction. The slack
    of a pair is r_j + r_i + ||W_j - W_i|| E."""
    z = logits.detach().double()
    w = head_weight.detach().double()
    pred = z.argmax(1)
    err = logit_error.detach().double()
    pair = torch.cdist(w[pred], w)
    slack = err.gather(1, pred[:, None]) + err + pair * body_error.detach().double()[:, None]
    gap = z.gather(1, pred[:, None]) - z
    dist = pair * lip_body

    def ratio(num, tie, skip):  # identical rows: a positive gap never closes, else no radius
        out = torch.where(dist > 0, num / dist, torch.where(num > 0, math.inf, tie))
        return out.scatter(1, pred[:, None], skip)

    reach_pred = ratio(gap + slack, 0.0, math.inf).min(1).values
    reach_other = ratio(slack - gap, -math.inf, -math.inf).max(1).values
    return reach_pred, reach_other


# ------------------------------------------------------------------- the float32 pass, bounded
def nonnegative_norm_bound(m: torch.Tensor, n_iter: int = 30) -> float:
    """An upper bound on ||M||_2 for an entrywise nonnegative matrix M (float64).

    Collatz-Wielandt: for G = M^T M >= 0 and any x > 0, rho(G) <= max_i (G x)_i / x_i (G's spectral
    radius equals that of D^-1 G D, D = diag(x), whose infinity norm is that maximum). Power
    steps on G make x close to its Perron vector, so the bound approaches ||M||_2 from above;
    the small floor keeps every x_i > 0 (any positive x gives a valid bound)."""
    x = torch.ones(m.shape[1], dtype=torch.float64, device=m.device)
    for _ in range(n_iter):
        gx = m.t() @ (m @ x)
        x = gx / gx.max().clamp_min(1e-300) + 1e-6
    ratio = (m.t() @ (m @ x)) / x
    return math.sqrt(ratio.max().item())


class Float32Bound:
    """The float32 pass ``model(x)`` itself, with a rigorous per-sample bound on its rounding.

    The same bound as ``Float64Forward``'s with u = 2^-24, except that the size term
    ``|| |W| |h| + |b| ||_2`` is not evaluated (that would be a second pass) but bounded from the
    activation norms the pass produces anyway: ``<= A ||h||_2 + ||b||_2 sqrt(P)``, with A an
    upper bound on the norm of the operator |W| (for a conv, || sum_s |K_s| ||_2 over the kernel
    positions s, which bounds any stride or zero padding of it; ``nonnegative_norm_bound``) and P
    the number of output positions. Per sample, the body's error then obeys

        E <- L E + gamma_{n+1} (A ||h|| + ||b|| sqrt(P)) + underflow,

    the head's per logit is computed as in the float64 pass, and the norms come from hooks on
    the body's layers during ``model(x)``, which also check that ``model(x)`` is
    ``head(body(x))`` (the certifier's interface). The bound is worst case and loose (a few
    percent of eps on the radius) but costs almost nothing: the certifier recomputes in float64
    only the samples whose decision it cannot settle (``Certifier``).

    The Higham bound holds for any order of summation of inner products, so the pass must not
    use FFT or Winograd convolutions: on the CPU PyTorch's oneDNN convolutions are "direct" (and
    NNPACK is switched off); on a GPU cuDNN is switched off (``_no_cudnn``). Underflow (flush to
    zero included) adds at most 2^-126 per product and sum, covered by an absolute term.
    ``supported`` is False when a body layer has no such analysis (the peers' layers): every
    sample then goes through the float64 pass."""

    UNIT = UNIT_ROUNDOFF[torch.float32]
    TINY = 2.0**-126

    def __init__(self, model: nn.Module, shapes: Sequence[tuple[int, ...]], layer_bounds: Sequence[float]):
        self.model = model
        self.terms: list[tuple[float, float, float, float, float] | None] = []  # (lip, gamma, A, B, tiny)
        self.supported = True
        with torch.no_grad():
            for layer, shape, bound in zip(model.body, shapes, layer_bounds):
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    w = layer.weight.detach().double()
                    if isinstance(layer, nn.Conv2d):
                        positions = math.prod(lipschitz.conv_output_hw(layer, shape))
                        absolute = w.abs().sum((2, 3))
                    else:
                        positions, absolute = 1, w.abs()
                    n = w[0].numel()
                    bias = layer.bias.detach().double().norm().item() if layer.bias is not None else 0.0
                    outputs = positions * w.shape[0]
                    tiny = (2 * n + 2) * self.TINY * max(1.0, w.abs().max().item()) * math.sqrt(outputs)
                    self.terms.append(
                        (
                            bound,
                            gamma(n + 1, torch.float32),
                            nonnegative_norm_bound(absolute),
                            bias * math.sqrt(positions),
                            tiny,
                        )
                    )
                elif isinstance(layer, EXACT_LAYERS):
                    self.terms.append(None)
                else:
                    self.supported = False
                    self.terms.append(None)
            w = model.head.weight.detach().double()
            bias = model.head.bias
            self.head_absw = w.abs()
            self.head_absb = bias.detach().double().abs() if bias is not None else torch.zeros_like(w[:, 0])
            d = w.shape[1]
            self.head_gamma = gamma(d + 1, torch.float32)
            self.head_tiny = (2 * d + 2) * self.TINY * max(1.0, w.abs().max().item())

    @classmethod
    def norm_bound(cls, h: torch.Tensor) -> torch.Tensor:
        """Per-sample upper bound (float64) on the l2 norm of the float32 tensor ``h``, from its float32
        norm (a float64 one would cost a converted copy): the computed sum of n squares is >= (1 -
        gamma_{n+1}) times the exact one less n underflows of <= 2^-126, and the square root rounds
        by <= u."""
        n = h[0].numel()
        computed = torch.linalg.vector_norm(h, dim=tuple(range(1, h.dim()))).double()
        return torch.sqrt(((computed / (1 - cls.UNIT)) ** 2 + n * cls.TINY) / (1 - gamma(n + 1, torch.float32)))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 logits, logit_error (N, C), body_error (N,)), the bounds in float64."""
        body, head = self.model.body, self.model.head
        norms: dict[int, torch.Tensor] = {}
        seen: dict[str, tuple] = {}

        def record(index):
            def hook(_module, inputs):
                if self.terms[index] is not None:  # the input norm of an affine layer, per sample
                    norms[index] = self.norm_bound(inputs[0])

            return hook

        def remember(name):
            def hook(_module, inputs, output):
                seen[name] = (inputs[0], output)

            return hook

        handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(body)]
        handles += [body.register_forward_hook(remember("body")), head.register_forward_hook(remember("head"))]
        try:
            with _no_tf32(), _no_cudnn(), torch.backends.nnpack.flags(enabled=False):
                logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        if not (
            "body" in seen
            and "head" in seen
            and seen["body"][0] is x
            and seen["head"][0] is seen["body"][1]
            and logits is seen["head"][1]
            and len(norms) == sum(t is not None for t in self.terms)
        ):
            raise CllError(
                f"{type(self.model).__name__}(x) is not head(body(x)): the model does not follow the "
                "certifier's interface (model(x) == model.head(model.body(x)))"
            )
        err = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for index, term in enumerate(self.terms):
            if term is not None:
                lip, g, a, b, tiny = term
                err = lip * err + TERM_SAFETY * (g * (a * norms[index] + b) + tiny)
        features = seen["head"][0].flatten(1).double()
        logit_error = TERM_SAFETY * (
            self.head_gamma * F.linear(features.abs(), self.head_absw, self.head_absb) + self.head_tiny
        )
        return logits, logit_error, err * TERM_SAFETY


# ------------------------------------------------------------------------ the float64 forward
class Float64Forward:
    """The logits of ``model`` recomputed in float64, with a per-sample bound on their rounding.

    ``model`` follows the package's interface: ``model(x) == model.head(model.body(x))`` with a
    sequential ``body`` and a linear ``head`` (``head.weight`` may be a parametrisation: its
    float32 value is the classifier certified)."""

    def __init__(self, model: nn.Module):
        self.model = model
        shapes = self.shapes = lipschitz.trace_input_shapes(model.body, model.in_shape)
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
                n = w[0].numel()
                # the size term |W||h| + |b| is a sum of n + 1 nonnegative terms: float32 suffices,
                # at 1/4 of a float64 conv's cost, if its rounding down is undone (see __call__)
                self.steps.append(
                    (
                        "affine",
                        layer,
                        dict(
                            w=w,
                            b=b,
                            absw=layer.weight.detach().abs(),
                            absb=layer.bias.detach().abs() if layer.bias is not None else None,
                            gamma=gamma(n + 1),
                            lip=bound,
                            size_scale=1 / ((1 - gamma(n + 1, torch.float32)) * (1 - UNIT_ROUNDOFF[torch.float32])),
                            size_tiny=(2 * n + 2) * Float32Bound.TINY * max(1.0, w.abs().max().item()),
                        ),
                    )
                )
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
        with _no_cudnn(), _no_tf32(), torch.backends.nnpack.flags(enabled=False):
            for kind, layer, p in self.steps:
                if kind == "affine":
                    out = self._affine(layer, h, p["w"], p["b"])
                    # |W||h| + |b| >= 0 in float32: each of its n + 1 products and sums, and |h|'s
                    # conversion, round down by at most a factor (1 - u): the computed value is at
                    # least (1 - gamma_{n+1})(1 - u) times the exact one, less underflows
                    size = self._affine(layer, h.abs().float(), p["absw"], p["absb"])
                    size_norm = Float32Bound.norm_bound(size) * p["size_scale"] + p["size_tiny"] * math.sqrt(
                        size[0].numel()
                    )
                    err = p["lip"] * err + TERM_SAFETY * p["gamma"] * size_norm
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
        """ "rigorous" if every body layer has the per-operation bound, else "estimated"."""
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
    """Sound per-sample radii of one model: K_F, the float32 pass with its rounding bound and, where
    that bound cannot settle a decision, the float64 pass.

    ``lip_body`` defaults to the sound K_F of ``lipschitz.upper_bound_body(model)``, taken as the
    product of the per-layer bounds the rounding bounds need anyway (the same product
    upper_bound_body forms; tests/test_certify.py checks the two agree), so no bound is computed
    twice.

    Both passes give a sound lower bound on the exact margins, so a sample is certified at eps
    when either proves it (they agree but for a radius within ~1e-13 of eps). The float32 one
    (``Float32Bound``) comes with the inference pass; the float64 one costs several passes, so it
    runs only on the samples where it could change a decision at one of ``eps``: those whose
    float32 radius is <= eps while an upper bound on their exact radius (the margins plus their
    error bounds, for the predicted class and for any other class) is above it. With ``eps``
    None, or a body layer without a float32 analysis, every sample is recomputed in float64."""

    def __init__(self, model: nn.Module, lip_body: float | None = None, eps: Sequence[float] | None = None):
        model.eval()
        self.model = model
        self.forward64 = Float64Forward(model)
        self.lip_body = math.prod(self.forward64.layer_bounds) if lip_body is None else lip_body
        self.forward32 = Float32Bound(model, self.forward64.shapes, self.forward64.layer_bounds)
        self.eps = None if eps is None else sorted(float(e) for e in eps)
        self.max_gap = 0.0  # largest |float32 logit - float64 logit| seen, relative to the logit scale
        self.recomputed = 0  # samples that went through the float64 pass

    def _needs_float64(self, logits, logit_error, body_error, radius, y) -> torch.Tensor:
        """Samples whose float64 radius could be above an eps that the float32 radius is not."""
        if self.eps is None or not self.forward32.supported:
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        reach_pred, reach_other = radius_upper_bounds(
            logits, self.model.head.weight, self.lip_body, logit_error, body_error
        )
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
        logits32, logit_error, body_error = self.forward32(x)
        pred, radius = certified_radius(logits32, self.model.head.weight, self.lip_body, logit_error, body_error)
        need = self._needs_float64(logits32, logit_error, body_error, radius, y)
        index = need.nonzero().flatten()
        if len(index):
            logits64, logit_error64, body_error64 = self.forward64(x[index])
            # both passes compute head(body(x)): a gap beyond rounding means they do not
            scale = logits64.abs().amax(1, keepdim=True).clamp_min(1.0)
            gap = ((logits32[index].double() - logits64).abs() / scale).max().item()
            if not gap <= 1e-3:
                raise CllError(
                    f"the float64 forward pass head(body(x)) of {type(self.model).__name__} differs "
                    f"from model(x) by {gap:.3g} of the logit scale: the model does not follow the "
                    "certifier's interface (model(x) == model.head(model.body(x)))"
                )
            self.max_gap = max(self.max_gap, gap)
            pred64, radius64 = certified_radius(
                logits64, self.model.head.weight, self.lip_body, logit_error64, body_error64
            )
            better = radius64 > radius[index]  # a positive radius fixes the class, so they agree
            pred[index] = torch.where(better, pred64, pred[index])
            radius[index] = torch.maximum(radius64, radius[index])
            self.recomputed += len(index)
        return logits32, pred, radius


@torch.no_grad()
def certify(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: Sequence[float] = DEFAULT_EPS,
    device: str | torch.device = "cpu",
) -> dict:
    """Certify ``model`` on ``batches`` of (x, y). Returns fractions (not percents):

    ``clean_accuracy`` (float32 forward), ``cra`` {eps_key: fraction} (sound: float64 margins less
    their rounding bound, sound K_F), ``cra_estimate`` (float32 margins with the converged
    power-iteration estimate of K_F, for comparison only), ``cra_unrounded`` (float32 margins,
    sound K_F, no rounding term), ``lipschitz_constant`` (sound bound of the whole model),
    ``lipschitz_estimate`` (converged power iteration), ``lipschitz_body`` (sound K_F),
    ``n_samples``, ``rounding`` ("rigorous" or "estimated", see the module docstring) and
    ``float32_gap`` (largest |float32 - float64| logit difference over the logit scale, over the
    samples recomputed in float64) and ``float64_share`` (the fraction of samples recomputed).
    """
    model.eval()
    body_estimate = lipschitz.converged_body(model)
    certifier = Certifier(model, eps=eps)
    body_bound = certifier.lip_body
    n = correct = 0
    robust = dict.fromkeys(eps, 0)
    robust_est = dict.fromkeys(eps, 0)
    robust_unrounded = dict.fromkeys(eps, 0)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, pred, radius = certifier(x, y)
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
        "float64_share": certifier.recomputed / n,
    }
