"""Local Lipschitz constants of a network's body over the l2 ball around each input (Local-Lip-B).

Huang, Zhang, Shi, Kolter, Anandkumar, "Training Certifiably Robust Neural Networks with Efficient
Local Lipschitz Bounds", NeurIPS 2021, arXiv 2111.01395. Anywhere in the ball B(x, eps) the body's
Jacobian is W_L A_{L-1} W_{L-1} ... A_1 W_1, A_l the activations' Jacobians (partial
permutations: ||A_l|| <= 1). A neuron that is provably constant on the ball (a clipped unit whose
input stays beyond a threshold, a ReLU that stays off) has a zero row in every A_l there, so with
the 0/1 masks D_l (outputs of activation l that may vary) and E_l (inputs of activation l that
may reach a varying output; E_l = D_l for an elementwise activation, a pair of MaxMin inputs is
dropped when both its outputs are constant) A_l = D_l A_l E_l and

    K(x, eps) = prod_l ||E_l W_l D_{l-1}||_2

bounds the Lipschitz constant of the body on the ball (along any segment in the ball the body is
piecewise affine, and each piece's derivative is such a product). Which neurons are constant
follows from bounds on every pre-activation z_l over the ball, the intersection of

* an interval box, propagated from [x - eps, x + eps] with |W| (interval arithmetic), and
* a ball bound: |z_k(x') - z_k(x)| <= ||(W_l D_{l-1})_k|| * eps * K_{<l}(x), with K_{<l} the
  product of the masked norms of the layers before (constant inputs do not move z).

Two versions, named for what they guarantee:

``upper_bound_local`` / ``LocalBound`` (sound, for certificates)
    Every number is an upper bound in exact arithmetic on the float32 parameters read as reals:
    the propagation runs in float64 with each bound widened by its rounding error (Higham's
    gamma_n bound for any summation order, then one ulp outward; cuDNN off), so a mask never
    drops a neuron that varies somewhere in the ball. The masked norm of a dense layer, and of
    a conv layer whose explicit matrix is small (``lipschitz.operators.EXPLICIT_MAX_ENTRIES``), is the
    float64 top eigenvalue of the masked Gram matrix, widened by its rounding bound (see
    ``_masked_norm_bound``); a larger conv layer keeps its sound global bound
    (``lipschitz.upper_bound_layer``), which also caps every masked norm, so the local bound is
    never above the global K_F (``lipschitz.upper_bound_body``).

``estimate_local`` (the paper's, for training and for comparison)
    Masked norms from per-sample power iteration, the ball radius from the layers' power-iteration
    estimates of their global norms (as the paper's code does), no rounding terms: a lower
    estimate that may over-claim, never used to certify. It also returns the paper's sparsity
    term, which pushes the pre-activation bounds out of the clipped units' active range.

``cll.certify.LocalCertifier`` certifies with ``LocalBound`` (and reports ``estimate_local``'s
certificate beside it).

Differences from the paper's code: every conv/dense layer gets its masked norm (the code keeps
per-sample singular vectors of a few layers in host memory and uses global norms for the others);
the per-sample power iteration starts from the layer's persistent global iterate instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import lipschitz
from .checks import WeightsGuard, check_input
from .layers import ClippedMaxMin, ClippedReLU, MaxMin
from .lipschitz.operators import EXPLICIT_MAX_ENTRIES, TINY, UNIT, gamma64, top_eigenvalue_bound
from .lipschitz.rounding import full_precision

SAFETY = 1.01  # on every rounding term: covers the float64 evaluation of the term itself
GRAM_CHUNK = 2**24  # float64 entries per batched masked-Gram step (128 MB)
SPARSITY_SATURATION = 0.1  # the paper's code's weight of the clipped ReLU's saturation term
MASKABLE = (ClippedReLU, MaxMin)  # the activations with masks (ClippedMaxMin is a MaxMin)


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, math.inf))


def _down(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ...) broadcasting against ``like``."""
    return t.view(-1, *[1] * (like.dim() - 1))


def _apply(layer: nn.Module, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(h, weight, bias)
    return F.conv2d(h, weight, bias, layer.stride, layer.padding)


def _fan_in(layer: nn.Module) -> int:
    return layer.weight[0].numel()


# ------------------------------------------------------------------------ masks of the activations
def activation_masks(
    layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, D, sparsity) of an activation whose inputs lie in [lo, hi] (N, C, ...): E (inputs that may
    reach a varying output) and D (outputs that may vary) as booleans, and the paper's sparsity
    term, with gradient through lo and hi (0 for a layer without thresholds):

    * clipped ReLU min(max(z, 0), theta): constant where hi <= 0 or lo >= theta; sparsity
      mean(relu(hi)) + 0.1 mean(relu(theta - lo)) (the paper's code);
    * (clipped) MaxMin on a pair (a, b): the max output is constant where max(lo_a, lo_b) >=
      theta_max, the min output where min(hi_a, hi_b) <= theta_min; sparsity mean(relu(theta_max -
      max(lo_a, lo_b))) + mean(relu(min(hi_a, hi_b) - theta_min)). Plain MaxMin: never constant."""
    if isinstance(layer, ClippedReLU):
        varies = ~((hi <= 0) | (lo >= layer.theta))
        sparsity = F.relu(hi).mean() + SPARSITY_SATURATION * F.relu(layer.theta - lo).mean()
        return varies, varies, sparsity
    if isinstance(layer, MaxMin):
        n, c = lo.shape[:2]
        pairs_lo = lo.reshape(n, c // 2, 2, *lo.shape[2:])
        pairs_hi = hi.reshape(n, c // 2, 2, *hi.shape[2:])
        max_lo = torch.maximum(pairs_lo[:, :, 0], pairs_lo[:, :, 1])
        min_hi = torch.minimum(pairs_hi[:, :, 0], pairs_hi[:, :, 1])
        if isinstance(layer, ClippedMaxMin):
            max_fixed, min_fixed = max_lo >= layer.theta_max, min_hi <= layer.theta_min
            sparsity = F.relu(layer.theta_max - max_lo).mean() + F.relu(min_hi - layer.theta_min).mean()
        else:
            max_fixed = min_fixed = torch.zeros_like(max_lo, dtype=torch.bool)
            sparsity = lo.new_zeros(())
        out = ~torch.cat([max_fixed, min_fixed], dim=1)
        live = ~(max_fixed & min_fixed)  # a pair feeds a varying output
        return torch.stack([live, live], dim=2).reshape(lo.shape), out, sparsity
    raise TypeError(f"no local bound for activation {type(layer).__name__}")


# ------------------------------------------------------------------------ interval propagation
def _affine_bounds(
    layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor, sound: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on W z + b over the box lo <= z <= hi (``lo is hi``: a point), mid-radius form.

    sound (float64): with c, r the computed centre and radius (r rounded up so that [c - r, c + r]
    holds the box), m = fl(W c + b) and q = fl(|W| r) are within gamma_{n+1} s of the exact values
    together, s = |W| (|c| + r) + |b|, and fl(m -+ q) within u more (Higham eq. 3.5); the bounds
    are m -+ q -+ SAFETY gamma_{n+2} s / (1 - gamma_{n+2}) (s computed in float64 is at least
    (1 - gamma_{n+2}) times the exact one), then one ulp outward for the last subtraction."""
    weight, bias = layer.weight, layer.bias
    if sound:
        weight, bias = weight.double(), None if bias is None else bias.double()
    point = lo is hi
    c = lo if point else (lo + hi) / 2
    m = _apply(layer, c, weight, bias)
    q = None
    if not point:
        r = hi - c
        if sound:  # hi - c and c - lo are each within u of exact: widen both, take the larger
            r = _up(torch.maximum(r, c - lo) * (1 + 4 * UNIT))
        q = _apply(layer, r, weight.abs(), None)
    if not sound:
        return (m, m) if point else (m - q, m + q)
    size = c.abs() if point else _up(c.abs() + r)
    s = _apply(layer, size, weight.abs(), None if bias is None else bias.abs())
    g = gamma64(_fan_in(layer) + 2)
    err = SAFETY * g / (1 - g) * s + TINY * (_fan_in(layer) + 2)
    if point:
        return _down(m - err), _up(m + err)
    return _down((m - q) - err), _up((m + q) + err)


def _row_norms(layer: nn.Module, varies: torch.Tensor | None, shape: tuple[int, ...], sound: bool) -> torch.Tensor:
    """||(W D)_k||_2 for every output k of a conv/dense layer, D the 0/1 mask ``varies`` of its inputs
    (None: all ones; then shape (1, ...)): the square root of W^2 applied to D. sound: float64,
    rounded up (a sum of n nonnegative exact squares is computed within gamma_n below)."""
    w2 = layer.weight.double() ** 2 if sound else layer.weight.square()
    d = w2.new_ones(1, *shape) if varies is None else varies.to(w2.dtype)
    t = _apply(layer, d, w2, None)
    if not sound:
        return t.clamp_min(1e-24).sqrt()  # no infinite gradient where a whole row is masked
    return _up(torch.sqrt(t / (1 - gamma64(_fan_in(layer)))) * (1 + 2 * UNIT))


# ------------------------------------------------------------------------ the walk through the body
NormFn = Callable[[int, nn.Module, tuple[int, ...], torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def _propagate(
    body: nn.Sequential,
    x: torch.Tensor,
    eps: float,
    sound: bool,
    masked_norm: NormFn,
    ball_norms: Sequence[torch.Tensor] | None = None,
    trace: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K (N,), sparsity) for the body over B(x, eps): bounds on every pre-activation (box and
    ball, see the module docstring), masks from them, and the product of ``masked_norm(index,
    layer, in_shape, E, D)`` over the conv/dense layers (E, D boolean masks or None = all ones).
    The ball radius after a layer is eps times the product of the masked norms so far, or of
    ``ball_norms`` (one per conv/dense layer) when given. ``trace``: a list that receives
    (lo, hi, D) at every activation."""
    h = x.double() if sound else x
    eps_t = torch.as_tensor(eps, dtype=h.dtype, device=h.device)
    lo, hi = (_down(h - eps_t), _up(h + eps_t)) if sound else (h - eps, h + eps)
    p_lo = p_hi = h  # bounds on the exact body at x itself (a point in the estimate)
    lip = h.new_ones(len(h))
    rho = lip * eps_t  # ||h(x') - h(x)|| <= rho on the ball, at the current layer's input
    varies: torch.Tensor | None = None  # D of the last activation (inputs of the next layer)
    pending: tuple | None = None  # a conv/dense layer whose E is not known yet
    sparsity = h.new_zeros(())
    n_linear = 0

    def close(e_mask: torch.Tensor | None) -> None:
        nonlocal lip, rho, pending
        index, layer, shape, d_mask = pending
        lip = lip * masked_norm(index, layer, shape, e_mask, d_mask)
        factor = lip if ball_norms is None else math.prod(ball_norms[:n_linear], start=lip.new_ones(()))
        rho = _up(factor * eps_t) if sound else factor * eps_t
        if sound:
            lip = _up(lip)
        pending = None

    for layer in body:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            if pending is not None:
                close(None)
            shape = tuple(lo.shape[1:])
            lo, hi = _affine_bounds(layer, lo, hi, sound)
            p_lo, p_hi = _affine_bounds(layer, p_lo, p_hi, sound)
            reach = _row_norms(layer, varies, shape, sound) * _per_sample(rho, lo)
            if sound:
                reach = _up(reach)
                lo, hi = torch.maximum(lo, _down(p_lo - reach)), torch.minimum(hi, _up(p_hi + reach))
            else:
                lo, hi = torch.maximum(lo, p_lo - reach), torch.minimum(hi, p_hi + reach)
            n_linear += 1
            pending = (n_linear - 1, layer, shape, varies)
            varies = None
        elif isinstance(layer, MASKABLE):
            e_mask, varies, term = activation_masks(layer, lo, hi)
            if trace is not None:
                trace.append((lo, hi, varies))
            sparsity = sparsity + term
            if pending is not None:
                close(e_mask)
            # monotone in every input: the images of the bounds bound the image (exact in floats)
            lo, hi = layer(lo), layer(hi)
            p_lo, p_hi = (layer(p_lo),) * 2 if p_lo is p_hi else (layer(p_lo), layer(p_hi))
        elif isinstance(layer, nn.Flatten):
            lo, hi = lo.flatten(1), hi.flatten(1)
            p_lo, p_hi = (p_lo.flatten(1),) * 2 if p_lo is p_hi else (p_lo.flatten(1), p_hi.flatten(1))
            varies = None if varies is None else varies.flatten(1)
        else:
            raise TypeError(f"no local bound for layer type {type(layer).__name__}")
    if pending is not None:
        close(None)
    return lip, sparsity


# ------------------------------------------------------------------------ sound bounds
def _masked_norm_bound(a: torch.Tensor, e: torch.Tensor | None, d: torch.Tensor | None) -> torch.Tensor:
    """Upper bounds (N,) on ||E A D||_2 for the float64 matrix ``a`` (m, n) of exact float32 values and
    per-sample 0/1 masks e (N, m), d (N, n) (None: all ones, then N is the other mask's).

    The smaller Gram matrix G of B = E A D (r x r, r = min(m, n), inner size k = max(m, n)) is
    formed in float64: its products are exact (float32 x float32) and each entry's sum is within
    gamma_k of exact, so ||G~ - G||_2 <= ||G~ - G||_F <= gamma_k || |B|^T |B| ||_F <= gamma_k r
    ||B||^2 (|| |B| ||_F = ||B||_F <= sqrt(r) ||B||_2), and lambda_max(G~) <= b, b the proved bound of
    ``lipschitz.operators.top_eigenvalue_bound`` (from G~'s computed eigendecomposition, no assumed
    eigensolver accuracy). Hence ||B||^2 <= b / (1 - gamma_k r); the square root is rounded up."""
    m, n = a.shape
    count = len(e) if e is not None else len(d)
    e = a.new_ones(count, m, dtype=torch.bool) if e is None else e
    d = a.new_ones(count, n, dtype=torch.bool) if d is None else d
    r, k = min(m, n), max(m, n)
    # samples without a masked row or column share one matrix: its Gram is solved once
    masked = ~(e.all(1) & d.all(1))
    rows = torch.cat([masked.nonzero().flatten(), (~masked).nonzero().flatten()[:1]])
    e, d = e[rows].to(a.dtype), d[rows].to(a.dtype)
    chunk = max(1, GRAM_CHUNK // (m * n))
    tops = []
    for start in range(0, len(rows), chunk):
        ec, dc = e[start : start + chunk], d[start : start + chunk]
        if m <= n:  # E A D A^T E
            g = (a * dc[:, None, :]) @ a.t() * ec[:, :, None] * ec[:, None, :]
        else:  # D A^T E A D
            g = (a.t() * ec[:, None, :]) @ a * dc[:, :, None] * dc[:, None, :]
        tops.append(top_eigenvalue_bound(g))
    lam = torch.cat(tops) / (1 - gamma64(k) * r)
    top = _up(torch.sqrt(_up(lam)) * (1 + 2 * UNIT))
    out = top[-1:].expand(count).clone() if not masked.all() else top.new_empty(count)
    out[rows[: masked.sum()]] = top[: masked.sum()]
    return out


class LocalBound:
    """Sound local bounds of one model's body: ``LocalBound(model)(x, eps)`` -> K (N,) float64, an
    upper bound, in exact arithmetic, on the Lipschitz constant of ``model.body`` on the l2 ball of
    radius eps around each row of x, never above the global K_F of ``lipschitz.upper_bound_body``.

    The layers' global bounds and explicit matrices are computed on first use and kept: build one
    per trained model and call it for every batch and eps (a call after the weights changed is
    refused, as are hooks and inputs of another shape: ``cll.checks``). Runs without gradient, in
    float64 on the model's device, under ``full_precision`` (no autocast, no cuDNN: its FFT and
    Winograd convolutions round differently from the inner products the rounding bound describes)."""

    def __init__(self, model: nn.Module, guard: WeightsGuard | None = None):
        self.model = model
        self.guard = WeightsGuard(model) if guard is None else guard
        self._global: dict[int, float] = {}
        self._matrix: dict[int, torch.Tensor | None] = {}

    def _masked_norm(
        self, index: int, layer: nn.Module, shape: tuple[int, ...], e: torch.Tensor | None, d: torch.Tensor | None
    ) -> torch.Tensor:
        if index not in self._global:
            self._global[index] = lipschitz.upper_bound_layer(layer, shape)
            n_out = math.prod(_apply(layer, layer.weight.new_zeros(1, *shape), layer.weight, None).shape)
            small = isinstance(layer, nn.Linear) or n_out * math.prod(shape) <= EXPLICIT_MAX_ENTRIES
            self._matrix[index] = lipschitz.explicit_matrix(layer, shape) if small else None
        bound = torch.tensor(self._global[index], dtype=torch.float64, device=layer.weight.device)
        if self._matrix[index] is None or (e is None and d is None):
            return bound  # a scalar: the same for every sample
        local = _masked_norm_bound(
            self._matrix[index], None if e is None else e.flatten(1), None if d is None else d.flatten(1)
        )
        return torch.minimum(local, bound)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, eps: float, trace: list | None = None) -> torch.Tensor:
        """K (N,) float64; ``trace``: a list that receives, at every activation, the bounds (lo, hi)
        on its inputs over the ball and the mask D of its outputs that may vary."""
        if not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps}")
        self.guard.check()
        check_input(self.model, x)
        with full_precision():
            lip, _ = _propagate(self.model.body, x, float(eps), True, self._masked_norm, trace=trace)
        return lip


def upper_bound_local(model: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Sound K (N,) float64 of ``model.body`` on the l2 ball of radius eps around each row of x (see
    ``LocalBound``, which keeps the layers' global bounds between calls)."""
    return LocalBound(model)(x, eps)


# ------------------------------------------------------------------------ the paper's estimate
@dataclass
class LocalEstimate:
    """What ``estimate_local`` returns: per-sample constants (N,) and the sparsity term (scalar)."""

    lip: torch.Tensor
    sparsity: torch.Tensor


def estimate_local(model: nn.Module, x: torch.Tensor, eps: float, n_iter: int, update: bool = True) -> LocalEstimate:
    """The paper's local estimate of the body's constant on B(x, eps), with gradient where enabled.

    Each conv/dense layer's global norm is estimated by ``n_iter`` warm-started power iterations
    (``model.power``; the stored iterates advance when ``update``), and those estimates set the
    ball radius; the masked norm ||E W D|| of each sample by ``n_iter`` power iterations on E W D
    from the layer's global iterate (without gradient), then sigma = ||E W D u|| / ||D u|| (with
    gradient through W). May be below the true constant: never certify with it."""
    power = model.power
    global_norms = power.layer_norms(n_iter, update=update)
    starts = [u.detach() for u in power.iterates()]

    def masked_norm(index, layer, shape, e, d):
        forward, adjoint = lipschitz.linear_operator(layer, shape)

        def op(u):
            v = forward(u if d is None else u * d)
            return v if e is None else v * e

        def norms(t):
            return t.flatten(1).norm(dim=1).clamp_min(1e-30)

        u = starts[index].expand(len(x), *shape)
        with torch.no_grad():
            for _ in range(n_iter):
                u = adjoint(op(u))
                u = u if d is None else u * d
                u = u / _per_sample(norms(u), u)
        u = u if d is None else u * d
        return norms(op(u)) / norms(u)

    return LocalEstimate(*_propagate(model.body, x, float(eps), False, masked_norm, global_norms))
