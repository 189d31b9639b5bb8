"""Operator-norm maths: exact norms, circular-convolution bounds, cheap sound bounds, row distances.

A leaf module: it imports no cll layer, so every layer may use it to bound itself. Every bound
here is *guaranteed* to be >= the quantity it bounds (float64 results are inflated by
``ROUNDING_SLACK``, 1e-9 relative, far above the backward error of LAPACK's symmetric eigensolver,
about n * 1.1e-16, for any layer we build):

* ``spectral_norm_exact``: the largest singular value of a dense matrix (float64 eigenvalues of the
  smaller Gram matrix);
* ``conv_norm_bound``: a zero-padded, strided conv2d at a given input size: exact from the explicit
  matrix where it is small, else the exact norm of the *circular* convolution on the zero-padded
  canvas, per frequency by FFT (Sedghi, Gupta, Long, "The singular values of convolutional layers",
  ICLR 2019, arXiv 1805.10408, Thm. 6). The zero-padded operator is ``crop o circular o pad``, crop
  and pad have norm <= 1. A stride s is handled exactly by space-to-depth: the strided conv of x is
  a stride-1 conv of x's s*s polyphase components (an orthogonal re-indexing), kernel split alike;
* ``schur_bound`` (Schur's test) and ``nonnegative_norm_bound`` (Collatz-Wielandt): cheap bounds;
* ``residual_bound``: the norm of I - step M^T D M over diagonal 0 <= D <= I (CPL, SLL);
* ``row_distances``: ||W_i - W_j||_2 by explicit differences (the one helper for head distances).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Relative inflation of every float64 bound (see the module docstring).
ROUNDING_SLACK = 1e-9
# Largest explicit matrix (rows * columns) whose exact norm we compute for a conv layer.
EXPLICIT_MAX_ENTRIES = 2**22

Operator = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- the true operators of conv/linear layers
def conv_output_hw(layer: nn.Conv2d, in_shape: tuple[int, ...]) -> list[int]:
    """(height, width) of a zero-padded conv2d's output at input shape ``in_shape`` (no batch axis)."""
    return [(in_shape[d + 1] + 2 * layer.padding[d] - layer.kernel_size[d]) // layer.stride[d] + 1 for d in range(2)]


def check_conv(layer: nn.Conv2d) -> None:
    """Refuse the conv variants no bound here describes (groups, dilation, non-zero padding modes)."""
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
        raise TypeError(f"conv layer {layer} is not supported (groups, dilation, padding mode)")


def linear_operator(
    layer: nn.Module, in_shape: tuple[int, ...], weight: torch.Tensor | None = None
) -> tuple[Operator, Operator]:
    """The bias-free map of an ``nn.Linear``/``nn.Conv2d`` at input shape ``in_shape`` (no batch
    axis), and its exact adjoint. Both take and return batched tensors. ``weight``: use this tensor
    in place of ``layer.weight`` (same shape)."""
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Linear):
        return (lambda u: F.linear(u, w)), (lambda v: F.linear(v, w.t()))
    if isinstance(layer, nn.Conv2d):
        check_conv(layer)
        stride, padding, k = layer.stride, layer.padding, layer.kernel_size
        out_hw = conv_output_hw(layer, in_shape)
        # conv_transpose2d maps back onto (out-1)*s - 2p + k rows; the rows the forward conv never
        # reads (when the stride does not divide evenly) get output_padding, which makes the
        # adjoint exact instead of dropping the last row/column.
        extra = tuple(in_shape[d + 1] - ((out_hw[d] - 1) * stride[d] - 2 * padding[d] + k[d]) for d in range(2))
        return (
            lambda u: F.conv2d(u, w, None, stride, padding),
            lambda v: F.conv_transpose2d(v, w, None, stride, padding, output_padding=extra),
        )
    raise TypeError(f"no linear operator for layer type {type(layer).__name__}")


def trace_input_shapes(body: nn.Sequential, in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Input shape (without batch axis) of every child of ``body``, from one dry forward pass that
    leaves no trace: a training-mode forward advances the power iterates of SOC and CPL layers, so
    every buffer is put back as it was."""
    shapes: list[tuple[int, ...]] = []
    param = next(body.parameters(), None)
    x = torch.zeros(1, *in_shape, device=param.device if param is not None else "cpu")
    saved = [(m, name, b.clone()) for m in body.modules() for name, b in m._buffers.items() if b is not None]
    try:
        with torch.no_grad():
            for layer in body:
                shapes.append(tuple(x.shape[1:]))
                x = layer(x)
    finally:
        for module, name, buffer in saved:
            module._buffers[name] = buffer
    return shapes


# ---------------------------------------------------------------- exact norms of dense matrices
def _gram(a: torch.Tensor) -> torch.Tensor:
    """The smaller of A A^H and A^H A (same nonzero eigenvalues), batched."""
    ah = a.conj().transpose(-2, -1)
    return a @ ah if a.shape[-2] <= a.shape[-1] else ah @ a


def spectral_norm_exact(matrix: torch.Tensor) -> float:
    """Largest singular value of a dense matrix, in float64 via the smaller Gram matrix (inflated)."""
    top = torch.linalg.eigvalsh(_gram(matrix.detach().double()))[-1].clamp_min(0).item()
    return math.sqrt(top) * (1 + ROUNDING_SLACK)


def conv_matrix(weight: torch.Tensor, in_shape: tuple[int, ...], stride=(1, 1), padding=(0, 0)) -> torch.Tensor:
    """A zero-padded conv2d at ``in_shape`` as a dense float64 matrix (out_numel, in_numel), built
    column by column."""
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


def explicit_matrix(layer: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """An ``nn.Linear``/``nn.Conv2d``'s bias-free map at ``in_shape`` as a dense float64 matrix."""
    if isinstance(layer, nn.Conv2d):
        return conv_matrix(layer.weight, in_shape, layer.stride, layer.padding)
    return layer.weight.detach().double()


# ---------------------------------------------------------------- convolutions
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
# the slow part and the Gram-iteration matmuls cheap
FFT_PRUNE_DEVICES = ("cuda",)
FFT_CHUNK_ENTRIES = 2**24  # complex entries per batched step (memory: 256 MB)


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


# ---------------------------------------------------------------- cheap sound bounds
def schur_bound(weight: torch.Tensor) -> float:
    """sqrt(max row sum * max column sum) of |A| for the operator A of a dense or conv layer with
    ``weight``: >= || |A| ||_2 >= ||A||_2 (Schur's test). Each output reads every (c_in, tap) at most
    once and each input meets every (c_out, tap) at most once, so the kernel's absolute sums bound
    the matrix's at any input size, padding or stride. Cheap and crude; used where crude suffices."""
    a = weight.detach().double().abs()
    rows = a.flatten(1).sum(1).max().item()
    cols = a.transpose(0, 1).flatten(1).sum(1).max().item()
    return math.sqrt(rows * cols) * (1 + ROUNDING_SLACK)


def nonnegative_norm_bound(m: torch.Tensor, n_iter: int = 30) -> float:
    """An upper bound on ||M||_2 for an entrywise nonnegative matrix M (float64).

    Collatz-Wielandt: for G = M^T M >= 0 and any x > 0, rho(G) <= max_i (G x)_i / x_i (G's spectral
    radius equals that of D^-1 G D, D = diag(x), whose infinity norm is that maximum). Power
    steps on G make x close to its Perron vector, so the bound approaches ||M||_2 from above;
    the small floor keeps every x_i > 0 (any positive x gives a valid bound). The float64
    evaluation of (G x)_i / x_i, a ratio of nonnegative sums, is off by a few 1e-16 relative:
    ROUNDING_SLACK covers it."""
    m = m.detach().double()
    x = torch.ones(m.shape[1], dtype=torch.float64, device=m.device)
    for _ in range(n_iter):
        gx = m.t() @ (m @ x)
        x = gx / gx.max().clamp_min(1e-300) + 1e-6
    ratio = (m.t() @ (m @ x)) / x
    return math.sqrt(ratio.max().item()) * (1 + ROUNDING_SLACK)


def abs_operator_norm(weight: torch.Tensor) -> float:
    """An upper bound on || |A| ||_2 for the operator A of a dense (out, in) or conv (out, in, kh, kw)
    layer with ``weight``, at any input size, stride or zero padding: for a conv, the entries of |A|
    are sums of the kernel's |K_s| placed at shifted positions, and || |A| || <= || sum_s |K_s| ||
    (each input channel vector meets every tap s at most once per output). Collatz-Wielandt bound."""
    w = weight.detach().double().abs()
    return nonnegative_norm_bound(w.sum((2, 3)) if w.dim() == 4 else w)


def residual_bound(step: float, norm_ub: float) -> float:
    """Bound on ||I - step * M^T D M|| over diagonal 0 <= D <= I (the Jacobians of CPL and SLL
    layers, M the inner linear map): its eigenvalues lie in [1 - step ||M||^2, 1]."""
    return max(1.0, step * norm_ub**2 - 1.0) * (1 + ROUNDING_SLACK)


def taylor_remainder(rho: float, terms: int) -> float:
    """sum_{i > terms} rho^i / i!, bounded by the geometric series rho^(T+1)/(T+1)! / (1 - rho/(T+2))
    (inf where that series diverges)."""
    if rho >= terms + 2:
        return math.inf
    return rho ** (terms + 1) / math.factorial(terms + 1) / (1 - rho / (terms + 2))


# ---------------------------------------------------------------- the classifier's rows
ROW_CHUNK_ENTRIES = 2**23  # entries of one block of explicit differences (64 MB in float64)


class _RowDistances(torch.autograd.Function):
    """D_ij = ||W_i - W_j||_2 by explicit differences, a block of rows at a time, with a backward that
    needs no (C, C, d) tensor: dD_ij/dW_i = (W_i - W_j) / D_ij, so for an output gradient G and
    M = G / D (0 where D = 0), grad W = diag(rowsum(S)) W - S W with S = M + M^T."""

    @staticmethod
    def forward(ctx, weight):
        c, d = weight.shape
        step = max(1, ROW_CHUNK_ENTRIES // max(1, c * d))
        table = torch.cat(
            [(weight[i : i + step, None, :] - weight[None, :, :]).norm(dim=-1) for i in range(0, c, step)]
        )
        ctx.save_for_backward(weight, table)
        return table

    @staticmethod
    def backward(ctx, grad):
        weight, table = ctx.saved_tensors
        m = torch.where(table > 0, grad / torch.where(table > 0, table, torch.ones_like(table)), 0.0)
        s = m + m.t()
        return s.sum(1, keepdim=True) * weight - s @ weight


def row_distances(weight: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """||W_r - W_i||_2 for every row r in ``rows`` (default: all) and every row i: (len(rows), C).

    The one helper for head distances (the certificate, the losses, the K penalty, the audit).
    Explicit differences: ``torch.cdist`` switches to |a|^2 + |b|^2 - 2ab for more than 25 rows,
    which cancels catastrophically for nearly equal rows (a radius 9x too large for rows 1e-6
    apart). The C x C table is formed once per call and indexed, so a batch costs no d-sized work
    per sample and the result never depends on the batch. Differentiable, with a backward that
    stores no (C, C, d) tensor; the gradient of an exactly zero distance (the diagonal, identical
    rows) is 0, not NaN."""
    table = _RowDistances.apply(weight)
    return table if rows is None else table[rows]


def max_row_distance(weight: torch.Tensor) -> torch.Tensor:
    """max_{i<j} ||W_i - W_j||_2: the Lipschitz constant of every logit difference z_i - z_j of a
    linear head (differentiable, same dtype)."""
    return row_distances(weight).max()
