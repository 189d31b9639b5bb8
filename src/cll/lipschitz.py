"""Lipschitz constants of the networks: the training estimate and the sound certifying bound.

This is the only module that computes a Lipschitz constant. Two kinds of numbers, named for what
they guarantee:

``estimate_*``
    Power iteration on the *true* operator of every conv/linear layer at its real input size
    (stride, padding, and the exact adjoint: ``conv_transpose2d`` with the ``output_padding`` that
    restores the input shape). The iterates persist in the model's buffers (warm start), a few
    iterations run per training step with gradient (the K penalty differentiates through them,
    as the CLL reference does), and ``converge`` iterates to a tolerance for evaluation.
    Power iteration approaches sigma_max from *below*, and its residual does not bound sigma_max
    from above, so an estimate may never be used to certify.

``upper_bound_*``
    Guaranteed >= the operator norm of each layer:

    * linear layers: the exact largest singular value of W (float64 eigenvalues of the Gram
      matrix);
    * conv layers whose explicit matrix is small (digits, MNIST-sized early layers, tests): the
      exact norm of that matrix, built column by column in float64;
    * other conv layers: the exact norm of the *circular* convolution on the zero-padded canvas,
      computed per frequency by FFT (Sedghi, Gupta, Long, "The singular values of convolutional
      layers", ICLR 2019, arXiv 1805.10408, Thm. 6). The zero-padded operator equals
      ``crop o circular o pad``, crop and pad have norm <= 1, so its norm is at most the circular
      one. A stride s is handled exactly by space-to-depth: the strided conv of x equals a stride-1
      conv of x's s*s polyphase components (an orthogonal re-indexing), with the kernel split the
      same way.

    Every float64 result is inflated by ``ROUNDING_SLACK`` (1e-9 relative), far above the backward
    error of LAPACK's symmetric eigensolver (about n * 1.1e-16) for any layer we build.

The whole-model constant used by the certifier is the product of the body's per-layer bounds
(MaxMin, Flatten and ReLU are 1-Lipschitz; any other layer type raises) times the input
normalisation factor, times the head's largest pairwise row distance max_ij ||W_i - W_j||_2,
which is the Lipschitz constant of every logit difference z_i - z_j.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import layers as L

# Relative inflation of every float64 bound (see the module docstring).
ROUNDING_SLACK = 1e-9
# Largest explicit matrix (rows * columns) whose exact norm we compute for a conv layer.
EXPLICIT_MAX_ENTRIES = 2**22
# Layers that are 1-Lipschitz in l2 without any parameter to check.
ONE_LIPSCHITZ = (L.MaxMin, L.HouseHolder, L.PaddingChannels, nn.Flatten, nn.Identity, nn.ReLU)

Operator = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- the true operators of the layers
def conv_output_hw(layer: nn.Conv2d, in_shape: tuple[int, ...]) -> list[int]:
    """(height, width) of a zero-padded conv2d's output at input shape ``in_shape`` (no batch axis)."""
    return [(in_shape[d + 1] + 2 * layer.padding[d] - layer.kernel_size[d]) // layer.stride[d] + 1 for d in range(2)]


def linear_operator(
    layer: nn.Module, in_shape: tuple[int, ...], weight: torch.Tensor | None = None
) -> tuple[Operator, Operator]:
    """The bias-free map of a conv/linear layer at input shape ``in_shape`` (no batch axis), and its
    exact adjoint. Both take and return batched tensors. ``weight``: use this tensor in place of
    ``layer.weight`` (same shape)."""
    if isinstance(layer, nn.Linear):
        if weight is None:
            return (lambda u: F.linear(u, layer.weight)), (lambda v: F.linear(v, layer.weight.t()))
        return (lambda u: F.linear(u, weight)), (lambda v: F.linear(v, weight.t()))
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            raise ValueError(f"conv layer {layer} is not supported (groups, dilation, padding mode)")
        stride, padding = layer.stride, layer.padding
        k = layer.kernel_size
        out_hw = conv_output_hw(layer, in_shape)
        # conv_transpose2d maps back onto (out-1)*s - 2p + k rows; the rows the forward conv never
        # reads (when the stride does not divide evenly) get output_padding, which makes the
        # adjoint exact instead of dropping the last row/column as the reference did.
        extra = tuple(in_shape[d + 1] - ((out_hw[d] - 1) * stride[d] - 2 * padding[d] + k[d]) for d in range(2))

        def forward(u: torch.Tensor) -> torch.Tensor:
            return F.conv2d(u, layer.weight if weight is None else weight, None, stride, padding)

        def adjoint(v: torch.Tensor) -> torch.Tensor:
            return F.conv_transpose2d(
                v, layer.weight if weight is None else weight, None, stride, padding, output_padding=extra
            )

        return forward, adjoint
    raise TypeError(f"no linear operator for layer type {type(layer).__name__}")


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
    layer: nn.Module, shape: tuple[int, ...], u: torch.Tensor, n_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, u_n): ``n_iter`` power-iteration steps from ``u``, then sigma = ||A u_n|| / ||u_n||.

    Where autograd needs the weight's gradient, through every step (the K penalty of the recipe),
    the steps run as ``_PowerNorm``: the same operations forward and the same gradient, with the
    weight gradient of all the steps formed in one call."""
    if n_iter > 0 and torch.is_grad_enabled() and layer.weight.requires_grad:
        return _PowerNorm.apply(layer.weight, u, layer, shape, n_iter)
    forward, adjoint = linear_operator(layer, shape)
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


def is_linear_layer(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Linear, nn.Conv2d))


def trace_input_shapes(body: nn.Sequential, in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Input shape (without batch axis) of every child of ``body``, from one dry forward pass."""
    shapes: list[tuple[int, ...]] = []
    param = next(body.parameters(), None)
    x = torch.zeros(1, *in_shape, device=param.device if param is not None else "cpu")
    with torch.no_grad():
        for layer in body:
            shapes.append(tuple(x.shape[1:]))
            x = layer(x)
    return shapes


# ---------------------------------------------------------------- power iteration (estimates)
class PowerIteration(nn.Module):
    """Persistent power-iteration state for the conv/linear layers of a sequential body.

    One buffer ``u<i>`` per layer holds the current (unit-norm) right singular vector estimate at
    the layer's real input shape, so it is saved in ``state_dict`` and training resumes warm.
    The layers themselves are kept in a plain list (not registered twice as submodules).
    """

    def __init__(self, body: nn.Sequential, in_shape: tuple[int, ...]):
        super().__init__()
        shapes = trace_input_shapes(body, in_shape)
        self._layers: list[tuple[nn.Module, tuple[int, ...]]] = []
        for layer, shape in zip(body, shapes):
            if not is_linear_layer(layer):
                continue
            u = torch.randn(1, *shape)
            self.register_buffer(f"u{len(self._layers)}", u / u.norm())
            self._layers.append((layer, shape))

    def iterates(self) -> list[torch.Tensor]:
        return [getattr(self, f"u{i}") for i in range(len(self._layers))]

    def layer_norms(self, n_iter: int, update: bool = True) -> list[torch.Tensor]:
        """sigma_max estimate of every layer after ``n_iter`` warm-started iterations.

        Autograd flows through the iterations when it is enabled (the K penalty's gradient),
        the stored iterates are updated detached."""
        norms = []
        for i, (layer, shape) in enumerate(self._layers):
            sigma, u = power_norm(layer, shape, getattr(self, f"u{i}"), n_iter)
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
        the first iteration that met the tolerance, with the result of checking at every one."""
        ops = [linear_operator(layer, shape) for layer, shape in self._layers]
        us = self.iterates()
        if not ops:
            return []
        sigma = torch.stack([forward(u).norm().double() for (forward, _), u in zip(ops, us)]).tolist()
        active, done_iter, block = list(range(len(ops))), 0, 1
        while active and done_iter < max_iter:
            block = min(block, check_every, max_iter - done_iter)
            trail: dict[int, list[torch.Tensor]] = {i: [] for i in active}
            values: dict[int, list[torch.Tensor]] = {i: [] for i in active}
            for _ in range(block):
                for i in active:
                    forward, adjoint = ops[i]
                    v = adjoint(forward(us[i]))
                    us[i] = v / (v.norm() + 1e-30)
                    trail[i].append(us[i])
                    values[i].append(forward(us[i]).norm().double())
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

    def upper_bounds(self) -> list[float]:
        return [upper_bound_layer(layer, shape) for layer, shape in self._layers]


# ---------------------------------------------------------------- sound per-layer bounds
def _sym_top_eigenvalue(gram: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).item()


def spectral_norm_exact(matrix: torch.Tensor) -> float:
    """Largest singular value of a dense matrix, in float64 via the smaller Gram matrix."""
    return math.sqrt(_sym_top_eigenvalue(_gram(matrix.detach().double()))) * (1 + ROUNDING_SLACK)


def explicit_matrix(layer: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's bias-free map at ``in_shape`` as a dense float64 matrix (out_numel, in_numel)."""
    if isinstance(layer, nn.Conv2d):
        return conv_matrix(layer.weight, in_shape, layer.stride, layer.padding)
    return layer.weight.detach().double()


def conv_matrix(weight: torch.Tensor, in_shape: tuple[int, ...], stride=(1, 1), padding=(0, 0)) -> torch.Tensor:
    """A zero-padded conv2d at ``in_shape`` as a dense float64 matrix, built column by column."""
    n_in = math.prod(in_shape)
    w = weight.detach().double()
    columns = []
    with torch.no_grad():
        for start in range(0, n_in, 512):  # the image of each unit input, a chunk at a time
            idx = torch.arange(start, min(start + 512, n_in), device=w.device)
            basis = torch.zeros(len(idx), n_in, dtype=torch.float64, device=w.device)
            basis[torch.arange(len(idx), device=w.device), idx] = 1.0
            out = F.conv2d(basis.reshape(len(idx), *in_shape), w, None, stride, padding)
            columns.append(out.reshape(len(idx), -1))
    return torch.cat(columns).t()


def conv_norm_bound(
    weight: torch.Tensor, in_shape: tuple[int, ...], stride=(1, 1), padding=(0, 0), method: str = "auto"
) -> float:
    """Guaranteed upper bound on the norm of a zero-padded conv2d with ``weight`` at ``in_shape``:
    exact from the explicit matrix where it is small ("auto"/"explicit"), else the circular bound
    by FFT ("auto"/"fft")."""
    n_in = math.prod(in_shape)
    n_out = n_in // in_shape[0] * weight.shape[0]  # upper estimate of the output size
    if method == "explicit" or (method == "auto" and n_in * n_out <= EXPLICIT_MAX_ENTRIES):
        return spectral_norm_exact(conv_matrix(weight, in_shape, stride, padding))
    if method in ("fft", "auto"):
        return conv_fft_bound(weight, in_shape, tuple(stride), tuple(padding))
    raise ValueError(f"unknown bound method {method!r}; allowed: auto, explicit, fft")


# conv_fft_bound: float64 eigvalsh runs only at frequencies that may hold the maximum (see
# _max_top_eigenvalue); the others are ruled out by guaranteed upper bounds.
FFT_PRUNE_SLACK = 1e-6  # relative margin on those bounds, >> their rounding error (< 1e-9)
FFT_GRAM_STEPS = 8  # Gram-iteration squarings at most
FFT_SEEDS = 8  # frequencies solved first, to have a maximum to compare with
FFT_DIRECT_SIZE = 8  # Gram matrices up to this size: eigvalsh everywhere (cheap enough)
# devices where pruning pays: on the CPU (1-2 threads) batched complex128 matmuls cost more than
# the LAPACK eigvalsh calls they save (measured, bench/README.md); on a GPU the eigvalsh calls are
# the slow part and the Gram-iteration matmuls cheap (not measured here: no GPU was available)
FFT_PRUNE_DEVICES = ("cuda",)
FFT_CHUNK_ENTRIES = 2**24  # complex entries per batched step (memory: 256 MB)


def _gram(a: torch.Tensor) -> torch.Tensor:
    """The smaller of A A^H and A^H A (same nonzero eigenvalues), batched."""
    ah = a.conj().transpose(-2, -1)
    return a @ ah if a.shape[-2] <= a.shape[-1] else ah @ a


def _max_top_eigenvalue(spectrum: torch.Tensor) -> float:
    """max_f lambda_max(A_f^H A_f) over the float64 batch ``spectrum`` (F, m, n): the value that
    float64 eigvalsh at every f gives, with eigvalsh run only where needed.

    A frequency is skipped only when a guaranteed upper bound on its lambda_max lies below an
    eigvalsh value already found, so it cannot hold the maximum. The bounds are those of the Gram
    iteration (Delattre, Barthelemy, Araujo, Allauzen, "Efficient Bound of Lipschitz Constant for
    Convolutional Layers by Gram Iteration", ICML 2023, arXiv 2305.16173): lambda_max(A^H A) <=
    ||A||_F^2, and for G_0 = the Gram matrix, G_{k+1} = G_k^H G_k, lambda_max(G_0) <=
    ||G_k||_F^(1/2^k), which tightens towards lambda_max with k (to within rank^(1/2^k)); each
    G_k is divided by its Frobenius norm, whose log is carried along. Rounding: a float64 product
    with inner size n and Gram size r changes ||G_k||_2 by at most about n * r * 2^-53 relative
    (worst case, |A^H||A| against A^H A), which the 2^k-th root shrinks further; for the widest
    layers here (n = 1024, r = 256) that is < 1e-10, far below FFT_PRUNE_SLACK."""
    n_freq, m, n = spectrum.shape
    r = min(m, n)
    chunk = max(1, FFT_CHUNK_ENTRIES // (r * max(m, n)))

    def top(idx: torch.Tensor) -> float:  # exact: the largest eigvalsh value over frequencies idx
        return max(torch.linalg.eigvalsh(_gram(spectrum[i])).amax().item() for i in idx.split(chunk))

    every = torch.arange(n_freq, device=spectrum.device)
    if r <= FFT_DIRECT_SIZE or spectrum.device.type not in FFT_PRUNE_DEVICES:
        return max(top(every), 0.0)
    tiny = torch.finfo(torch.float64).tiny
    slack = math.log1p(FFT_PRUNE_SLACK)
    # level 0: log ||A_f||_F^2; the largest few are solved first
    log_ub = torch.view_as_real(spectrum).square().sum((-3, -2, -1)).clamp_min(tiny).log()
    order = torch.argsort(log_ub, descending=True)
    best = top(order[:FFT_SEEDS])
    log_best = math.log(best) if best > 0 else -math.inf

    def alive(bound: torch.Tensor) -> torch.Tensor:  # not provably below best (NaN stays alive)
        return ~(bound + slack <= log_best)

    rest = order[FFT_SEEDS:]
    rest = rest[alive(log_ub[rest])]
    kept, kept_ub = [], []
    gram_chunk = max(1, FFT_CHUNK_ENTRIES // (r * r))
    for idx in rest.split(gram_chunk):
        g = _gram(spectrum[idx])
        carry = torch.zeros(len(idx), dtype=torch.float64, device=g.device)
        for k in range(FFT_GRAM_STEPS + 1):
            scale = torch.view_as_real(g).square().sum((-3, -2, -1)).sqrt().clamp_min(tiny)
            bound = carry + scale.log() / 2**k
            keep = alive(bound)
            idx, g, carry, bound, scale = idx[keep], g[keep], carry[keep], bound[keep], scale[keep]
            if k == FFT_GRAM_STEPS or len(idx) == 0:
                break
            carry = carry + scale.log() / 2**k
            g = g / scale[:, None, None]
            g = g.conj().transpose(-2, -1) @ g
        kept.append(idx)
        kept_ub.append(bound)
    if kept:
        idx, bound = torch.cat(kept), torch.cat(kept_ub)
        by_bound = torch.argsort(bound, descending=True)
        idx, bound = idx[by_bound], bound[by_bound].tolist()
        for start in range(0, len(idx), FFT_SEEDS):  # most promising first, until none can win
            if bound[start] + slack <= log_best:
                break
            value = top(idx[start : start + FFT_SEEDS])
            if value > best:
                best, log_best = value, math.log(value)
    return max(best, 0.0)


def conv_fft_bound(
    weight: torch.Tensor, in_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int]
) -> float:
    """Upper bound on the norm of a zero-padded, strided 2-D convolution at input ``in_shape``.

    The exact norm of the circular convolution on the padded canvas (Sedghi et al. 2019), with the
    stride folded into the channels by space-to-depth (see the module docstring): the largest
    float64 eigenvalue of the per-frequency Gram matrices. A real kernel's spectrum is conjugate-
    symmetric (A(-f) = conj A(f), the same singular values), so rfft2's half of the frequencies
    covers them all; ``_max_top_eigenvalue`` skips the ones that provably cannot hold the maximum."""
    w = weight.detach().double()
    c_out, c_in, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    # canvas: the zero-padded input, extended with zeros to a multiple of the stride
    nh = math.ceil((in_shape[1] + 2 * ph) / sh)
    nw = math.ceil((in_shape[2] + 2 * pw) / sw)
    # kernel tap (s*u + a) becomes tap u of polyphase channel a
    kh2, kw2 = math.ceil(kh / sh), math.ceil(kw / sw)
    assert nh >= kh2 and nw >= kw2, "canvas smaller than the kernel"
    padded = w.new_zeros(c_out, c_in, kh2 * sh, kw2 * sw)
    padded[:, :, :kh, :kw] = w
    poly = padded.reshape(c_out, c_in, kh2, sh, kw2, sw).permute(0, 1, 3, 5, 2, 4)
    poly = poly.reshape(c_out, c_in * sh * sw, kh2, kw2)
    spectrum = torch.fft.rfft2(poly, s=(nh, nw)).permute(2, 3, 0, 1).reshape(-1, c_out, c_in * sh * sw)
    return math.sqrt(_max_top_eigenvalue(spectrum)) * (1 + ROUNDING_SLACK)


def upper_bound_layer(layer: nn.Module, in_shape: tuple[int, ...], method: str = "auto") -> float:
    """Guaranteed upper bound on the l2 operator norm of one layer (bias ignored: it cancels in
    differences). ``method``: "auto" (exact where the explicit matrix is small, else FFT),
    "explicit" or "fft" (conv layers only)."""
    if isinstance(layer, ONE_LIPSCHITZ):
        return 1.0
    if isinstance(layer, nn.Linear):
        return spectral_norm_exact(layer.weight)
    if isinstance(layer, nn.Conv2d):
        linear_operator(layer, in_shape)  # rejects unsupported conv variants
        return conv_norm_bound(layer.weight, in_shape, layer.stride, layer.padding, method)
    if isinstance(layer, nn.AvgPool2d):
        return avg_pool_bound(layer)
    if isinstance(layer, L.Normalize):
        return layer.lipschitz * (1 + ROUNDING_SLACK)
    for kind, bound in PEER_BOUNDS.items():
        if isinstance(layer, kind):
            return bound(layer, in_shape)
    raise TypeError(
        f"no Lipschitz bound for layer type {type(layer).__name__}; add one to cll.lipschitz "
        "(a layer is never assumed 1-Lipschitz by default)"
    )


def avg_pool_bound(layer: nn.AvgPool2d) -> float:
    """Non-overlapping average (or sum/divisor) pooling: each output is the sum of k*k disjoint
    inputs over the divisor, so the norm is sqrt(k*k) / divisor (CPL/SLL: 4x4 over 4 -> 1)."""
    k = (layer.kernel_size,) * 2 if isinstance(layer.kernel_size, int) else tuple(layer.kernel_size)
    s = (layer.stride,) * 2 if isinstance(layer.stride, int) else tuple(layer.stride)
    if s != k or layer.padding not in (0, (0, 0)):
        raise TypeError(f"no Lipschitz bound for overlapping or padded pooling {layer}")
    divisor = layer.divisor_override or k[0] * k[1]
    return math.sqrt(k[0] * k[1]) / divisor * (1 + ROUNDING_SLACK)


# ---------------------------------------------------------------- the peers' layers
# Each is "1-Lipschitz by construction" only in exact arithmetic and, for SOC and CPL, only if an
# approximation is good enough. These bounds are computed from the parameters the evaluation-mode
# forward uses, so that a certificate never rests on the construction alone.
def residual_bound(step: float, norm_ub: float) -> float:
    """Bound on ||I - step * M^T D M|| over diagonal 0 <= D <= I (the Jacobians of CPL and SLL
    layers, M the inner linear map): its eigenvalues lie in [1 - step ||M||^2, 1]."""
    return max(1.0, step * norm_ub**2 - 1.0) * (1 + ROUNDING_SLACK)


def schur_bound(weight: torch.Tensor) -> float:
    """sqrt(max row sum * max column sum) of |A| for the operator A of a dense or conv layer with
    ``weight``: >= ||A||_2 (Schur's test). Each output reads every (c_in, tap) at most once and each
    input meets every (c_out, tap) at most once, so the kernel's absolute sums bound the matrix's
    at any input size, padding or stride. Cheap and crude; used where crude suffices."""
    a = weight.detach().double().abs()
    rows = a.flatten(1).sum(1).max().item()
    cols = a.transpose(0, 1).flatten(1).sum(1).max().item()
    return math.sqrt(rows * cols) * (1 + ROUNDING_SLACK)


def _taylor_remainder(rho: float, terms: int) -> float:
    """sum_{i > terms} rho^i / i!, bounded by the geometric series rho^(T+1)/(T+1)! / (1 - rho/(T+2))
    (inf where that series diverges)."""
    if rho >= terms + 2:
        return math.inf
    return rho ** (terms + 1) / math.factorial(terms + 1) / (1 - rho / (terms + 2))


def soc_bound(layer: L.SOC, in_shape: tuple[int, ...]) -> float:
    """||sum_{i<=T} A^i/i!|| for the skew A of the evaluation forward, with rho >= ||conv_A||:
    exp(A) is orthogonal, so the norm is at most 1 + sum_{i>T} rho^i/i! (and never more than
    sum_{i<=T} rho^i/i!). rho is first the cheap Schur bound; only where its remainder exceeds
    1e-9 is it tightened by the circular-convolution norm (FFT), which costs an eigendecomposition
    per frequency of c x c matrices (c up to 2048 in LipConv nets)."""
    t = layer.eval_terms
    with torch.no_grad():
        kernel = layer.kernel()
        rho = schur_bound(kernel)
        if _taylor_remainder(rho, t) > 1e-9:
            s, p = layer.stride, layer.kernel_size // 2
            shape = (layer.channels, in_shape[1] // s, in_shape[2] // s)
            rho = min(rho, conv_norm_bound(kernel, shape, (1, 1), (p, p), method="fft"))
    series = sum(rho**i / math.factorial(i) for i in range(t + 1))
    return min(series, 1.0 + _taylor_remainder(rho, t)) * (1 + ROUNDING_SLACK)


def cpl_bound(layer, in_shape: tuple[int, ...]) -> float:
    """max(1, h ||W||_ub^2 - 1) with the h of the evaluation forward (computed from the layer's
    own sound norm bound, so this is 1 up to rounding unless the cache is stale)."""
    if tuple(in_shape) != tuple(layer.u.shape[1:]):
        raise ValueError(f"CPL layer built for inputs {tuple(layer.u.shape[1:])} sees {tuple(in_shape)}")
    return residual_bound(layer.eval_step_size(), layer.norm_bound())


def sll_bound(layer, in_shape: tuple[int, ...]) -> float:
    """max(1, 2 ||M||^2 - 1) for M = T^{-1/2} W, with ||M||^2 bounded by the weighted Gershgorin
    row sums of T^{-1/2} |W W^T| T^{-1/2} under the weights q_j sqrt(t_j): max_i sum_j |G_ij| q_j /
    (q_i t_i), which is exactly 1 for the t of the theorem (Araujo et al. 2023) and 1 + rounding for
    the float32 t the forward uses. For the conv layer G sums |K K^T| over all spatial offsets, an
    upper bound on every row of the zero-padded operator's Gram matrix. No eigendecomposition."""
    with torch.no_grad():
        t_inv = layer.inverse_t().double()
        live = t_inv > 0  # dead units (t = 0) have zero rows in M
        q = torch.exp(layer.q.double())
        w = layer.weight.double()
        if isinstance(layer, L.SLLConv):
            k = w.shape[-1]
            gram = F.conv2d(w, w, padding=k - 1).abs().sum((2, 3))
        else:
            gram = (w @ w.t()).abs()
        gram = gram[live][:, live]
        rows = (gram * q[live][None, :]).sum(1) * t_inv[live] / q[live]
        norm_sq = rows.max().item() if live.any() else 0.0
    # float64 sums of (inner * taps * cin) products, each relative error <= 2^-53 per operation
    norm_sq *= 1 + gram.shape[0] * w[0].numel() * 2.3e-16 + ROUNDING_SLACK
    return residual_bound(2.0, math.sqrt(norm_sq))


def sandwich_bound(layer, in_shape: tuple[int, ...]) -> float:
    """sqrt(1 + 4 ||E|| ||B||^2) with E = A A^H + B B^H - I from the factors the forward uses,
    maxima over frequencies (conv; see cll.layers.sandwich). ||E||_2 <= ||E||_F, and
    B B^H <= A A^H + B B^H = I + E gives ||B||^2 <= 1 + ||E||: no eigendecomposition needed."""
    with torch.no_grad():
        a, b = (f.detach().to(torch.complex128 if f.is_complex() else torch.float64) for f in layer.factors())
        err = a @ a.mH + b @ b.mH - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        e = torch.linalg.matrix_norm(err).max().item()  # Frobenius, per frequency
    # forming E in float64 from float32 factors: each entry is a sum of (out + in) exact products,
    # rounded at most (out + in) times by 2^-53 relative to a sum of magnitude <= 1 (unit rows)
    m, k = b.shape[-2], a.shape[-1] + b.shape[-1]
    e = e * (1 + ROUNDING_SLACK) + m * k * 2.3e-16
    return math.sqrt(1.0 + 4.0 * e * (1.0 + e)) * (1 + ROUNDING_SLACK)


PEER_BOUNDS = {
    L.SOC: soc_bound,
    L.CPLConv: cpl_bound,
    L.CPLLinear: cpl_bound,
    L.SLLConv: sll_bound,
    L.SLLLinear: sll_bound,
    L.SandwichConv: sandwich_bound,
    L.SandwichLinear: sandwich_bound,
}


# ---------------------------------------------------------------- whole-model constants
def head_factor(weight: torch.Tensor) -> torch.Tensor:
    """max_{i<j} ||W_i - W_j||_2 over the classifier's rows (differentiable, same dtype)."""
    return torch.pdist(weight).max()


def estimate_body(model: nn.Module, n_iter: int, update: bool = True) -> torch.Tensor:
    """K_F estimate: product of the body's per-layer power-iteration estimates after ``n_iter``
    warm-started iterations (gradient flows through when enabled), times the input factor."""
    k = torch.ones((), device=model.head.weight.device)
    for sigma in model.power.layer_norms(n_iter, update=update):
        k = k * sigma
    return k * model.input_lipschitz


def converged_body(model: nn.Module, tol: float = 1e-7) -> float:
    """K_F from power iteration run to convergence (a lower estimate: log it, never certify)."""
    return math.prod(model.power.converge(tol)) * model.input_lipschitz


def estimate_constant(model: nn.Module, body: float | None = None) -> float:
    """Converged power-iteration estimate of the whole model's constant (``body``: a K_F from
    ``converged_body`` already at hand)."""
    body = converged_body(model) if body is None else body
    with torch.no_grad():
        return body * head_factor(model.head.weight.detach().double()).item()


def upper_bound_body(model: nn.Module) -> float:
    """Sound K_F: product of every body layer's upper bound (the input normalisation included)."""
    shapes = trace_input_shapes(model.body, model.in_shape)
    return math.prod(upper_bound_layer(layer, shape) for layer, shape in zip(model.body, shapes))


def lipschitz_constant(model: nn.Module, body: float | None = None) -> float:
    """The sound bound the certifier uses: K_F (upper bound) * max_ij ||W_i - W_j||_2
    (``body``: a K_F from ``upper_bound_body`` already at hand)."""
    body = upper_bound_body(model) if body is None else body
    with torch.no_grad():
        head = head_factor(model.head.weight.detach().double()).item() * (1 + ROUNDING_SLACK)
    return body * head
