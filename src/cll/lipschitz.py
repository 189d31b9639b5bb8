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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MaxMin

# Relative inflation of every float64 bound (see the module docstring).
ROUNDING_SLACK = 1e-9
# Largest explicit matrix (rows * columns) whose exact norm we compute for a conv layer.
EXPLICIT_MAX_ENTRIES = 2**22
# Layers that are 1-Lipschitz in l2 without any parameter to check.
ONE_LIPSCHITZ = (MaxMin, nn.Flatten, nn.Identity, nn.ReLU)

Operator = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- the true operators of the layers
def linear_operator(layer: nn.Module, in_shape: tuple[int, ...]) -> tuple[Operator, Operator]:
    """The bias-free map of a conv/linear layer at input shape ``in_shape`` (no batch axis), and its
    exact adjoint. Both take and return batched tensors."""
    if isinstance(layer, nn.Linear):
        return (lambda u: F.linear(u, layer.weight)), (lambda v: F.linear(v, layer.weight.t()))
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            raise ValueError(f"conv layer {layer} is not supported (groups, dilation, padding mode)")
        stride, padding = layer.stride, layer.padding
        k = layer.kernel_size
        out_hw = [(in_shape[d + 1] + 2 * padding[d] - k[d]) // stride[d] + 1 for d in range(2)]
        # conv_transpose2d maps back onto (out-1)*s - 2p + k rows; the rows the forward conv never
        # reads (when the stride does not divide evenly) get output_padding, which makes the
        # adjoint exact instead of dropping the last row/column as the reference did.
        extra = tuple(in_shape[d + 1] - ((out_hw[d] - 1) * stride[d] - 2 * padding[d] + k[d]) for d in range(2))

        def forward(u: torch.Tensor) -> torch.Tensor:
            return F.conv2d(u, layer.weight, None, stride, padding)

        def adjoint(v: torch.Tensor) -> torch.Tensor:
            return F.conv_transpose2d(v, layer.weight, None, stride, padding, output_padding=extra)

        return forward, adjoint
    raise TypeError(f"no linear operator for layer type {type(layer).__name__}")


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
            forward, adjoint = linear_operator(layer, shape)
            u = getattr(self, f"u{i}")
            for _ in range(n_iter):
                v = adjoint(forward(u))
                u = v / (v.norm() + 1e-12)
            norms.append(forward(u).norm() / (u.norm() + 1e-12))
            if update:  # rebind, not copy_: the old iterate may be saved for this step's backward
                setattr(self, f"u{i}", u.detach())
        return norms

    @torch.no_grad()
    def converge(self, tol: float = 1e-7, max_iter: int = 10_000) -> list[float]:
        """Iterate every layer until its estimate changes by <= tol (relative); update the buffers."""
        norms = []
        for i, (layer, shape) in enumerate(self._layers):
            forward, adjoint = linear_operator(layer, shape)
            u = getattr(self, f"u{i}")
            sigma = forward(u).norm().item()
            for _ in range(max_iter):
                v = adjoint(forward(u))
                u = v / (v.norm() + 1e-30)
                new = forward(u).norm().item()
                done = abs(new - sigma) <= tol * max(new, 1e-30)
                sigma = new
                if done:
                    break
            setattr(self, f"u{i}", u)
            norms.append(sigma)
        return norms

    def upper_bounds(self) -> list[float]:
        return [upper_bound_layer(layer, shape) for layer, shape in self._layers]


# ---------------------------------------------------------------- sound per-layer bounds
def _sym_top_eigenvalue(gram: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).item()


def spectral_norm_exact(matrix: torch.Tensor) -> float:
    """Largest singular value of a dense matrix, in float64 via the smaller Gram matrix."""
    a = matrix.detach().double()
    gram = a @ a.t() if a.shape[0] <= a.shape[1] else a.t() @ a
    return math.sqrt(_sym_top_eigenvalue(gram)) * (1 + ROUNDING_SLACK)


def explicit_matrix(layer: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's bias-free map at ``in_shape`` as a dense float64 matrix (out_numel, in_numel)."""
    n_in = math.prod(in_shape)
    w = layer.weight.detach().double()
    columns = []
    with torch.no_grad():
        for start in range(0, n_in, 512):  # the image of each unit input, a chunk at a time
            idx = torch.arange(start, min(start + 512, n_in), device=w.device)
            basis = torch.zeros(len(idx), n_in, dtype=torch.float64, device=w.device)
            basis[torch.arange(len(idx), device=w.device), idx] = 1.0
            basis = basis.reshape(len(idx), *in_shape)
            if isinstance(layer, nn.Conv2d):
                out = F.conv2d(basis, w, None, layer.stride, layer.padding)
            else:
                out = F.linear(basis, w)
            columns.append(out.reshape(len(idx), -1))
    return torch.cat(columns).t()


def conv_fft_bound(weight: torch.Tensor, in_shape: tuple[int, ...], stride: tuple[int, int],
                   padding: tuple[int, int]) -> float:
    """Upper bound on the norm of a zero-padded, strided 2-D convolution at input ``in_shape``.

    The exact norm of the circular convolution on the padded canvas (Sedghi et al. 2019), with the
    stride folded into the channels by space-to-depth (see the module docstring)."""
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
    spectrum = torch.fft.fft2(poly, s=(nh, nw)).permute(2, 3, 0, 1)  # (nh, nw, c_out, c_in*s*s)
    # sigma_max per frequency from the smaller Gram matrix, in float64
    if spectrum.shape[-2] <= spectrum.shape[-1]:
        gram = spectrum @ spectrum.conj().transpose(-2, -1)
    else:
        gram = spectrum.conj().transpose(-2, -1) @ spectrum
    top = torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(0).item()
    return math.sqrt(top) * (1 + ROUNDING_SLACK)


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
        n_in = math.prod(in_shape)
        n_out = n_in // in_shape[0] * layer.out_channels  # upper estimate of the output size
        if method == "explicit" or (method == "auto" and n_in * n_out <= EXPLICIT_MAX_ENTRIES):
            return spectral_norm_exact(explicit_matrix(layer, in_shape))
        if method in ("fft", "auto"):
            return conv_fft_bound(layer.weight, in_shape, layer.stride, layer.padding)
        raise ValueError(f"unknown bound method {method!r}; allowed: auto, explicit, fft")
    raise TypeError(
        f"no Lipschitz bound for layer type {type(layer).__name__}; add one to cll.lipschitz "
        "(a layer is never assumed 1-Lipschitz by default)"
    )


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
    """Sound K_F: product of every body layer's upper bound, times the input factor."""
    shapes = trace_input_shapes(model.body, model.in_shape)
    k = float(model.input_lipschitz)
    for layer, shape in zip(model.body, shapes):
        k *= upper_bound_layer(layer, shape)
    return k


def lipschitz_constant(model: nn.Module, body: float | None = None) -> float:
    """The sound bound the certifier uses: K_F (upper bound) * max_ij ||W_i - W_j||_2
    (``body``: a K_F from ``upper_bound_body`` already at hand)."""
    body = upper_bound_body(model) if body is None else body
    with torch.no_grad():
        head = head_factor(model.head.weight.detach().double()).item() * (1 + ROUNDING_SLACK)
    return body * head
