"""Operator-norm maths: exact norms, cheap sound bounds, row distances (convolutions: ``.conv``).

A leaf module: it imports no cll layer, so every layer may use it to bound itself. Every bound
here is *guaranteed* to be >= the quantity it bounds, in exact arithmetic, under Higham's standard
model of float64 rounding (each operation exact up to a factor 1 + d, |d| <= u = 2^-53; an n-term
inner product in any order within gamma_n |x|^T |y|, gamma_n = n u / (1 - n u); complex inner
products within gamma_{n+2}, Higham sec. 3.6); no LAPACK or FFT accuracy is assumed:

* ``top_eigenvalue_bound``: lambda_max of a Hermitian matrix, proved a posteriori from its computed
  eigendecomposition (residual and orthogonality defect, each with its own rounding bound);
* ``spectral_norm_exact``: the largest singular value of a dense matrix (the bound above on the
  smaller Gram matrix, plus the rounding of forming that Gram matrix);
* ``conv_matrix``: the explicit matrix of a small conv2d (``cll.lipschitz.conv`` bounds larger
  ones by a direct DFT, with the same rounding model);
* ``schur_bound`` (Schur's test) and ``nonnegative_norm_bound`` (Collatz-Wielandt): cheap bounds;
* ``residual_bound``: the norm of I - step M^T D M over diagonal 0 <= D <= I (CPL, SLL);
* ``row_distances``: ||W_i - W_j||_2 by explicit differences (the one helper for head distances).

``ROUNDING_SLACK`` (1e-9 relative) now covers only roundings that are counted: the last few float64
operations of a bound (a square root, a sum of two bounds, a product; a few u each), and sums of at
most ~10^6 nonnegative terms (gamma_n < 1e-9 for n < 9e6: Schur's test, Collatz-Wielandt ratios).
Underflow, outside the standard model, is covered by absolute terms (``TINY``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Relative inflation of the last few float64 operations of a bound (see the module docstring).
ROUNDING_SLACK = 1e-9
UNIT = 2.0**-53  # float64 unit roundoff
TINY = 2.0**-1000  # absolute cover of underflow: far above (count of operations) * 2^-1022 here
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
def gram(a: torch.Tensor) -> torch.Tensor:
    """The smaller of A A^H and A^H A (same nonzero eigenvalues), batched."""
    ah = a.conj().transpose(-2, -1)
    return a @ ah if a.shape[-2] <= a.shape[-1] else ah @ a


def gamma64(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float64 (``rounding.gamma`` for any dtype; this leaf
    cannot import it)."""
    return n * UNIT / (1 - n * UNIT)


def frobenius_sq_bound(x: torch.Tensor) -> torch.Tensor:
    """An upper bound on ||X||_F^2 for each matrix of the batch ``x`` (..., m, n), real or complex: the
    computed sum of N real squares (N = m n, or 2 m n for complex) is within gamma_N of the exact one
    in any order, so exact <= computed / (1 - gamma_N); N TINY covers underflowing squares."""
    xr = torch.view_as_real(x) if x.is_complex() else x
    count = x.shape[-2] * x.shape[-1] * (2 if x.is_complex() else 1)
    return xr.square().flatten(x.dim() - 2).sum(-1) / (1 - gamma64(count)) + count * TINY


def top_eigenvalue_bound(g: torch.Tensor) -> torch.Tensor:
    """A proved upper bound on lambda_max(G) for each Hermitian float64 matrix of the batch ``g``
    (..., n, n), real or complex, read as exact: shape (...,).

    From the computed (lam, V) = eigh(G), whatever its accuracy: G = V diag(lam) V^H + R, so by Weyl
    lambda_max(G) <= max(lam_max, 0) ||V||_2^2 + ||R||_2, with ||V||_2^2 = ||V^H V||_2 <= 1 + e,
    e = ||V^H V - I||_F, and ||R||_2 <= ||R||_F. Both are evaluated in float64 (c = gamma_{n+2}, the
    complex inner-product constant, also safe for real ones): fl(V^H V) is within c |V|^H |V| and
    || |V|^H |V| ||_F <= ||V||_F^2, the subtraction of I within gamma_1 of its result, so
    e <= (1 + gamma_1) ||fl(V^H V) - I||_F + c ||V||_F^2; fl(V diag(lam)) is within u, the product
    with V^H within c, so fl(V diag(lam) V^H) is within gamma_{n+3} |V| |diag(lam)| |V|^H, whose
    Frobenius norm is <= max|lam| ||V||_F^2, and ||R||_F <= (1 + gamma_1) ||fl(R)||_F +
    gamma_{n+3} max|lam| ||V||_F^2. Frobenius norms: ``frobenius_sq_bound``, whose n^2 TINY also
    covers, after the square root, any underflow in the products (<= n^2 2^-1022). The rest, at most 40
    roundings of nonnegative numbers (a relative u each), is covered by the factor 1 + 64 u. A
    non-finite decomposition gives inf, a failed one raises (never a false bound)."""
    n = g.shape[-1]
    lam, v = torch.linalg.eigh(g)
    vh = v.conj().transpose(-2, -1)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    v_sq = frobenius_sq_bound(v)
    ortho = frobenius_sq_bound(vh @ v - eye).sqrt() * (1 + 2 * UNIT) + gamma64(n + 2) * v_sq
    residual = g - (v * lam[..., None, :]) @ vh
    lam_abs = lam.abs().amax(-1)
    resid = frobenius_sq_bound(residual).sqrt() * (1 + 2 * UNIT) + gamma64(n + 3) * lam_abs * v_sq
    bound = (lam[..., -1].clamp_min(0) * (1 + ortho) + resid) * (1 + 64 * UNIT)
    return torch.where(bound.isfinite(), bound, math.inf)


def gram_top_bound(a: torch.Tensor) -> torch.Tensor:
    """A proved upper bound on ||A||_2^2 = lambda_max(A^H A) for each float64 matrix of the batch ``a``
    (..., m, n), read as exact: (...,). The smaller Gram matrix G~ = fl(A A^H) (or A^H A), inner
    size k = max(m, n), is within gamma_{k+2} |A| |A|^H entrywise, so ||G~ - G||_2 <=
    gamma_{k+2} || |A| |A|^H ||_F <= gamma_{k+2} ||A||_F^2 (Weyl); lambda_max(G~) by
    ``top_eigenvalue_bound``. The final addition is left to the caller's ROUNDING_SLACK."""
    k = max(a.shape[-2], a.shape[-1])
    return top_eigenvalue_bound(gram(a)) + gamma64(k + 2) * frobenius_sq_bound(a)


def spectral_norm_exact(matrix: torch.Tensor) -> float:
    """Largest singular value of a dense matrix, a proved upper bound (``gram_top_bound``, in float64;
    ROUNDING_SLACK covers the final square root and product)."""
    return math.sqrt(gram_top_bound(matrix.detach().double()).item()) * (1 + ROUNDING_SLACK)


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
    the small floor keeps every x_i > 0 (any positive x gives a valid bound). Every step's x gives
    one: the smallest is kept, and the steps stop once it no longer falls (a few for the weights of
    trained nets). The float64 evaluation of (G x)_i / x_i, a ratio of nonnegative sums, is off by a
    few 1e-16 relative: ROUNDING_SLACK covers it."""
    m = m.detach().double()
    x = torch.ones(m.shape[1], dtype=torch.float64, device=m.device)
    best = math.inf
    for _ in range(n_iter + 1):
        gx = m.t() @ (m @ x)
        bound = (gx / x).max().item()
        if bound >= best * (1 - 1e-9):  # no progress: x is Perron's vector, as far as it goes
            break
        best = bound
        x = gx / gx.max().clamp_min(1e-300) + 1e-6
    return math.sqrt(best) * (1 + ROUNDING_SLACK)


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
