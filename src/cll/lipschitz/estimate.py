"""Power-iteration *estimates* of the Lipschitz constant: for training and for comparison, never
for a certificate (power iteration approaches sigma_max from below, and its residual does not
bound sigma_max from above).

Power iteration runs on the *true* operator of every plain conv/linear layer of a body at its real
input size (stride, padding and the exact adjoint: ``conv_transpose2d`` with the ``output_padding``
that restores the input shape). The iterates persist in the model's buffers (warm start), a few
iterations run per training step with gradient (the K penalty differentiates through them, as the
CLL reference does), and ``converge`` iterates to a tolerance for evaluation. A layer of cll whose
map is one convolution or dense map of a *derived* weight (LiResNet's block: the kernel I + s gamma
V) is followed too: its ``power_operator()`` names a plain layer of that geometry and the weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bound import exact_constant
from .operators import Operator, linear_operator, max_row_distance, trace_input_shapes

TRACKED = (nn.Linear, nn.Conv2d)  # the layers power iteration follows (exact types)


def is_tracked(layer: nn.Module) -> bool:
    return type(layer) in TRACKED or hasattr(layer, "power_operator")


def operator_of(layer: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """(a plain conv/linear layer with the geometry of ``layer``'s map, the weight of that map): the
    layer and its own weight, or what its ``power_operator()`` gives (with gradient in training)."""
    own = getattr(layer, "power_operator", None)
    return own() if own is not None else (layer, layer.weight)


def weight_gradient(layer: nn.Module, inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """d/dW of sum_k <grads_k, A(W) inputs_k> for the layer's bias-free map A, in one call for the
    whole batch (inputs at the layer's input shape, grads at its output shape)."""
    if isinstance(layer, nn.Linear):
        return grads.flatten(1).t() @ inputs.flatten(1)
    return torch.nn.grad.conv2d_weight(inputs, layer.weight.shape, grads, layer.stride, layer.padding)


def power_iterate(forward: Operator, adjoint: Operator, u: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``n_iter`` power-iteration steps u <- A^T A u / ||A^T A u|| from ``u``."""
    for _ in range(n_iter):
        v = adjoint(forward(u))
        u = v / (v.norm() + 1e-12)
    return u


def power_norm(
    layer: nn.Module,
    shape: tuple[int, ...],
    u: torch.Tensor,
    n_iter: int,
    weight: torch.Tensor | None = None,
    last_step_gradient: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, u_n): ``n_iter`` power-iteration steps from ``u``, then sigma = ||A u_n|| / ||u_n||
    (``weight``: in place of ``layer.weight``, same shape).

    Where autograd needs the weight's gradient, through every step (the K penalty of the CLL
    reference), the steps run as ``_PowerNorm``: the same operations forward and the same gradient,
    with the weight gradient of all the steps formed in one call. With ``last_step_gradient`` the
    steps run without gradient and only sigma's own application of A is differentiated, u_n held
    constant (LiResNet's and BRONet's ``sub_lipschitz``): the same value, the gradient of sigma at
    a fixed iterate, which equals the full one where the iterate has converged."""
    weight = layer.weight if weight is None else weight
    grad = n_iter > 0 and torch.is_grad_enabled() and weight.requires_grad
    if grad and not last_step_gradient:
        return _PowerNorm.apply(weight, u, layer, shape, n_iter)
    forward, adjoint = linear_operator(layer, shape, weight)
    with torch.no_grad():  # the steps keep no graph: only sigma's own application below is differentiated
        u = power_iterate(forward, adjoint, u, n_iter)
    return forward(u).norm() / (u.norm() + 1e-12), u


class _PowerNorm(torch.autograd.Function):
    """``power_norm`` differentiated by hand with respect to the weight W.

    Autograd through the 2n+1 applications of A = A(W) and A^T forms one full weight gradient per
    application and adds them up: with a batch-1 iterate that is most of the cost (a 4096 -> 512
    dense layer: 11 rank-1 updates of 8 MB each; a conv layer: 11 batch-1 weight-gradient calls).
    The backward here runs the same chain rule, vector by vector, and collects the (input, output
    gradient) pair of every application instead: an application of A^T to x with output gradient g
    contributes what an application of A to g with output gradient x would (<g, A^T x> = <A g, x>,
    the adjoint is exact), so the whole weight gradient is one ``weight_gradient`` call over all
    the pairs. Equal to autograd's up to summation order (tests/test_lipschitz.py)."""

    @staticmethod
    def forward(ctx, weight, u, layer, shape, n_iter):
        forward, adjoint = linear_operator(layer, shape, weight)
        us, ys, vs = [u], [], []
        for _ in range(n_iter):  # the operations of power_iterate
            ys.append(forward(us[-1]))
            vs.append(adjoint(ys[-1]))
            us.append(vs[-1] / (vs[-1].norm() + 1e-12))
        ys.append(forward(us[-1]))
        sigma = ys[-1].norm() / (us[-1].norm() + 1e-12)
        ctx.save_for_backward(weight, *us, *ys, *vs)
        ctx.layer, ctx.shape, ctx.n_iter = layer, shape, n_iter
        ctx.mark_non_differentiable(us[-1])
        return sigma, us[-1]

    @staticmethod
    def backward(ctx, grad_sigma, _grad_u):
        n = ctx.n_iter
        weight, *saved = ctx.saved_tensors
        us, ys, vs = saved[: n + 1], saved[n + 1 : 2 * n + 2], saved[2 * n + 2 :]
        forward, adjoint = linear_operator(ctx.layer, ctx.shape, weight)
        inputs, grads = [], []  # (x, g) of every application of A, written as applications of A
        # sigma = ||y_n|| / (||u_n|| + c), y_n = A u_n
        norm_u, norm_y = us[n].norm(), ys[n].norm()
        grad_y = grad_sigma * ys[n] / (norm_y.clamp_min(1e-30) * (norm_u + 1e-12))
        grad_u = -grad_sigma * norm_y * us[n] / (norm_u.clamp_min(1e-30) * (norm_u + 1e-12) ** 2)
        inputs.append(us[n]), grads.append(grad_y)
        grad_u = grad_u + adjoint(grad_y)
        for k in reversed(range(n)):
            # u_{k+1} = v_k / (||v_k|| + c)
            norm_v = vs[k].norm()
            grad_v = grad_u / (norm_v + 1e-12) - vs[k] * (vs[k] * grad_u).sum() / (
                norm_v.clamp_min(1e-30) * (norm_v + 1e-12) ** 2
            )
            # v_k = A^T y_k: counts as A applied to grad_v with output gradient y_k
            inputs.append(grad_v), grads.append(ys[k])
            grad_y = forward(grad_v)
            # y_k = A u_k
            inputs.append(us[k]), grads.append(grad_y)
            if k > 0:  # u_0 is the stored iterate, a constant: no gradient needed
                grad_u = adjoint(grad_y)
        grad_weight = weight_gradient(ctx.layer, torch.cat(inputs), torch.cat(grads))
        return grad_weight, None, None, None, None


class PowerIteration(nn.Module):
    """Persistent power-iteration state for the plain conv/linear layers of a sequential body (and
    the layers of cll that name such a map by ``power_operator``, see ``operator_of``).

    One buffer ``u<i>`` per layer holds the current (unit-norm) right singular vector estimate at
    the layer's real input shape, so it is saved in ``state_dict`` and training resumes warm.
    The layers themselves are kept in a plain list (not registered twice as submodules).
    ``complete``: every other body layer has a known exact constant (``exact_bound``), so the
    product of the estimates is an estimate of the body's constant; False for the peers' layers
    (SOC, CPL, SLL, Sandwich), whose constants power iteration here does not follow."""

    def __init__(self, body: nn.Sequential, in_shape: tuple[int, ...]):
        super().__init__()
        # the training estimate's gradient: through every step (False, the CLL reference's), or
        # through the last application only (True: the hosts' references, set by their builders)
        self.last_step_gradient = False
        shapes = trace_input_shapes(body, in_shape)
        self._layers: list[tuple[nn.Module, tuple[int, ...]]] = []
        self.factor, self.complete = 1.0, True  # the product of the known exact constants
        for layer, shape in zip(body, shapes):
            if is_tracked(layer):
                u = torch.randn(1, *shape)
                self.register_buffer(f"u{len(self._layers)}", u / u.norm())
                self._layers.append((layer, shape))
                continue
            exact = exact_constant(layer, shape)
            if exact is None:
                self.complete = False
            else:
                self.factor *= exact

    def _operators(self) -> list[tuple[nn.Module, torch.Tensor, tuple[int, ...]]]:
        return [(*operator_of(layer), shape) for layer, shape in self._layers]

    def iterates(self) -> list[torch.Tensor]:
        return [getattr(self, f"u{i}") for i in range(len(self._layers))]

    def layer_norms(self, n_iter: int, update: bool = True) -> list[torch.Tensor]:
        """sigma_max estimate of every layer after ``n_iter`` warm-started iterations.

        Autograd flows through the iterations when it is enabled (the K penalty's gradient),
        the stored iterates are updated detached."""
        norms = []
        for i, (layer, shape) in enumerate(self._layers):
            geometry, weight = operator_of(layer)
            sigma, u = power_norm(geometry, shape, getattr(self, f"u{i}"), n_iter, weight, self.last_step_gradient)
            norms.append(sigma)
            if update:  # rebind, not copy_: the old iterate may be saved for this step's backward
                setattr(self, f"u{i}", u.detach())
        return norms

    @torch.no_grad()
    def converge(self, tol: float = 1e-7, max_iter: int = 10_000, check_every: int = 16) -> list[float]:
        """Iterate every layer until its estimate changes by <= tol (relative); update the buffers.

        The layers advance together (no two conv layers of our nets share a shape, so they cannot
        share a kernel call) and the host reads the estimates of all of them in one transfer per
        block of iterations (1, 2, 4, ... up to ``check_every``), not one per iteration and layer:
        on a GPU every read is a sync. The iterates of a block are kept, so each layer stops at
        the first iteration that met the tolerance, with the result of checking at every one.
        A u that is checked is also the next iteration's start: its image A u serves both, so an
        iteration costs two operator applications, not three."""
        ops = [linear_operator(geometry, shape, weight.detach()) for geometry, weight, shape in self._operators()]
        us = self.iterates()
        if not ops:
            return []
        ys = [forward(u) for (forward, _), u in zip(ops, us)]  # A u of every current iterate
        sigma = torch.stack([y.norm().double() for y in ys]).tolist()
        active, done_iter, block = list(range(len(ops))), 0, 1
        while active and done_iter < max_iter:
            block = min(block, check_every, max_iter - done_iter)
            trail: dict[int, list[torch.Tensor]] = {i: [] for i in active}
            values: dict[int, list[torch.Tensor]] = {i: [] for i in active}
            for _ in range(block):
                for i in active:
                    forward, adjoint = ops[i]
                    v = adjoint(ys[i])
                    us[i] = v / (v.norm() + 1e-30)
                    ys[i] = forward(us[i])
                    trail[i].append(us[i])
                    values[i].append(ys[i].norm().double())
            done_iter += block
            read = torch.stack([torch.stack(values[i]) for i in active]).tolist()  # one transfer
            still = []
            for i, row in zip(active, read):
                for j, new in enumerate(row):
                    converged = abs(new - sigma[i]) <= tol * max(new, 1e-30)
                    sigma[i] = new
                    if converged:
                        us[i] = trail[i][j]
                        break
                else:
                    still.append(i)
            active, block = still, 2 * block
        for i, u in enumerate(us):
            setattr(self, f"u{i}", u)
        return sigma


def estimate_body(model: nn.Module, n_iter: int, update: bool = True) -> torch.Tensor:
    """The training estimate of K_F: the product of the body's per-layer power-iteration estimates
    after ``n_iter`` warm-started iterations (gradient flows through when enabled), times the
    input normalisation factor. For the peers' bodies this takes their layers as 1-Lipschitz by
    construction (what their recipes' K penalties assume); it is not reported as an estimate."""
    k = torch.ones((), device=model.head.weight.device)
    for sigma in model.power.layer_norms(n_iter, update=update):
        k = k * sigma
    return k * model.input_lipschitz


def estimate_converged_body(model: nn.Module, tol: float = 1e-7, max_iter: int = 10_000) -> float | None:
    """K_F from power iteration run to convergence (or ``max_iter`` iterations), times the body's
    exactly known factors: a lower estimate (log it, never certify). None where the body has layers
    power iteration does not follow (the peers' families): no number is better than one that is not
    what its name says."""
    sigmas = model.power.converge(tol, max_iter)
    return math.prod(sigmas) * model.power.factor if model.power.complete else None


def estimate_constant(model: nn.Module, body: float | None = None) -> float | None:
    """Converged power-iteration estimate of the whole model's constant, K_F * max_ij ||W_i - W_j||
    (``body``: an ``estimate_converged_body`` value already at hand). None where K_F has none."""
    body = estimate_converged_body(model) if body is None else body
    if body is None:
        return None
    with torch.no_grad():
        return body * max_row_distance(model.head.weight.detach().double()).item()
