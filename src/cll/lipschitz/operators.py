"""Operator-norm maths: exact norms, circular-convolution bounds, cheap sound bounds, row distances.

A leaf module: it imports no cll layer, so every layer may use it to bound itself. Every bound
here is *guaranteed* to be >= the quantity it bounds, in exact arithmetic, under Higham's standard
model of float64 rounding (each operation exact up to a factor 1 + d, |d| <= u = 2^-53; an n-term
inner product in any order within gamma_n |x|^T |y|, gamma_n = n u / (1 - n u); complex inner
products within gamma_{n+2}, Higham sec. 3.6); no LAPACK or FFT accuracy is assumed:

* ``top_eigenvalue_bound``: lambda_max of a Hermitian matrix, proved a posteriori from its computed
  eigendecomposition (residual and orthogonality defect, each with its own rounding bound);
* ``spectral_norm_exact``: the largest singular value of a dense matrix (the bound above on the
  smaller Gram matrix, plus the rounding of forming that Gram matrix);
* ``conv_norm_bound``: a zero-padded, strided conv2d at a given input size: exact from the explicit
  matrix where it is small, else the exact norm of the *circular* convolution on the zero-padded
  canvas, per frequency by a direct DFT with correctly rounded twiddles (Sedghi, Gupta, Long, "The
  singular values of convolutional layers", ICLR 2019, arXiv 1805.10408, Thm. 6). The zero-padded
  operator is ``crop o circular o pad``, crop and pad have norm <= 1. A stride s is handled exactly
  by space-to-depth: the strided conv of x is a stride-1 conv of x's s*s polyphase components (an
  orthogonal re-indexing), kernel split alike;
* ``schur_bound`` (Schur's test) and ``nonnegative_norm_bound`` (Collatz-Wielandt): cheap bounds;
* ``residual_bound``: the norm of I - step M^T D M over diagonal 0 <= D <= I (CPL, SLL);
* ``row_distances``: ||W_i - W_j||_2 by explicit differences (the one helper for head distances).

``ROUNDING_SLACK`` (1e-9 relative) now covers only roundings that are counted: the last few float64
operations of a bound (a square root, a sum of two bounds, a product; a few u each), and sums of at
most ~10^6 nonnegative terms (gamma_n < 1e-9 for n < 9e6: Schur's test, Collatz-Wielandt ratios).
Underflow, outside the standard model, is covered by absolute terms (``TINY``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import mpmath
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
def _gram(a: torch.Tensor) -> torch.Tensor:
    """The smaller of A A^H and A^H A (same nonzero eigenvalues), batched."""
    ah = a.conj().transpose(-2, -1)
    return a @ ah if a.shape[-2] <= a.shape[-1] else ah @ a


def gamma64(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float64 (``rounding.gamma`` for any dtype; this leaf
    cannot import it)."""
    return n * UNIT / (1 - n * UNIT)


def _frobenius_sq_bound(x: torch.Tensor) -> torch.Tensor:
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
    gamma_{n+3} max|lam| ||V||_F^2. Frobenius norms: ``_frobenius_sq_bound``, whose n^2 TINY also
    covers, after the square root, any underflow in the products (<= n^2 2^-1022). The rest, at most 40
    roundings of nonnegative numbers (a relative u each), is covered by the factor 1 + 64 u. A
    non-finite decomposition gives inf, a failed one raises (never a false bound)."""
    n = g.shape[-1]
    lam, v = torch.linalg.eigh(g)
    vh = v.conj().transpose(-2, -1)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    v_sq = _frobenius_sq_bound(v)
    ortho = _frobenius_sq_bound(vh @ v - eye).sqrt() * (1 + 2 * UNIT) + gamma64(n + 2) * v_sq
    residual = g - (v * lam[..., None, :]) @ vh
    lam_abs = lam.abs().amax(-1)
    resid = _frobenius_sq_bound(residual).sqrt() * (1 + 2 * UNIT) + gamma64(n + 3) * lam_abs * v_sq
    bound = (lam[..., -1].clamp_min(0) * (1 + ortho) + resid) * (1 + 64 * UNIT)
    return torch.where(bound.isfinite(), bound, math.inf)


def gram_top_bound(a: torch.Tensor) -> torch.Tensor:
    """A proved upper bound on ||A||_2^2 = lambda_max(A^H A) for each float64 matrix of the batch ``a``
    (..., m, n), read as exact: (...,). The smaller Gram matrix G~ = fl(A A^H) (or A^H A), inner
    size k = max(m, n), is within gamma_{k+2} |A| |A|^H entrywise, so ||G~ - G||_2 <=
    gamma_{k+2} || |A| |A|^H ||_F <= gamma_{k+2} ||A||_F^2 (Weyl); lambda_max(G~) by
    ``top_eigenvalue_bound``. The final addition is left to the caller's ROUNDING_SLACK."""
    k = max(a.shape[-2], a.shape[-1])
    return top_eigenvalue_bound(_gram(a)) + gamma64(k + 2) * _frobenius_sq_bound(a)


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
    """A proved upper bound on max_f lambda_max(A_f^H A_f) over the float64 batch ``spectrum`` (F, m, n),
    read as exact: the largest ``gram_top_bound`` over the frequencies that may hold the maximum.

    The value returned is ``best``, the largest proved bound over the frequencies solved. A frequency
    is skipped only when a guaranteed upper bound on its lambda_max, times 1 + FFT_PRUNE_SLACK, lies
    at or below ``best`` at that time; ``best`` only grows, so the skipped frequency's lambda_max is
    below the value returned (comparing against a proved *upper* bound is sound here because that
    same bound is what is returned). The bounds are those of the Gram iteration (Delattre,
    Barthelemy, Araujo, Allauzen, "Efficient Bound of Lipschitz Constant for Convolutional Layers by
    Gram Iteration", ICML 2023, arXiv 2305.16173): lambda_max(A^H A) <= ||A||_F^2, and for G_0 =
    the Gram matrix, G_{k+1} = G_k^H G_k, lambda_max(G_0) <= ||G_k||_F^(1/2^k), which tightens towards
    lambda_max with k (to within rank^(1/2^k)); each G_k is divided by its Frobenius norm, whose log
    is carried along. Rounding: with ||G_k||_F = 1 the computed product is within gamma_{r+2}
    |G_k|^H |G_k|, of norm <= gamma_{r+2}, while ||G_k^H G_k||_2 >= 1/r (rank <= r), so each step
    loses at most a relative r gamma_{r+2} of ||G_{k+1}||_2, shrunk by the 2^(k+1)-th root; with the
    Gram matrix's own gamma_{n+2} ||A||_F^2 <= gamma_{n+2} r ||A||_2^2 and the Frobenius sums
    (gamma_{2 r^2}), the log bound is low by at most ~ (n + 2r) r u: < 1e-9 for the widest layers
    here (n = 1024, r = 512), far below FFT_PRUNE_SLACK."""
    n_freq, m, n = spectrum.shape
    r = min(m, n)
    chunk = max(1, FFT_CHUNK_ENTRIES // (r * max(m, n)))

    def top(idx: torch.Tensor) -> float:  # proved: the largest bound over frequencies idx
        return max(gram_top_bound(spectrum[i]).amax().item() for i in idx.split(chunk))

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


@functools.lru_cache(maxsize=32)
def _roots_of_unity(n: int) -> torch.Tensor:
    """exp(-2 pi i k / n) for k < n, complex128: each part is an 80-bit mpmath value (error < 2^-76)
    rounded to the nearest float64, so every entry is within sqrt2 (u + 2^-76) < 2u of exact.
    (mpmath ships with torch, through sympy.)"""
    with mpmath.workprec(80):
        turns = [mpmath.mpf(2 * k) / n for k in range(n)]
        values = [complex(float(mpmath.cospi(t)), -float(mpmath.sinpi(t))) for t in turns]
    return torch.tensor(values, dtype=torch.complex128)


def conv_fft_bound(
    weight: torch.Tensor, in_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int]
) -> float:
    """Upper bound on the norm of a zero-padded, strided 2-D convolution at input ``in_shape``.

    The exact norm of the circular convolution on the padded canvas (Sedghi et al. 2019), with the
    stride folded into the channels by space-to-depth (see the module docstring): the largest
    singular value over frequencies f of A_f = sum_t W_t w_t(f), W_t the (polyphase) kernel's tap t,
    w_t(f) = exp(-2 pi i (f_h t_h / n_h + f_w t_w / n_w)). A real kernel's spectrum is conjugate-
    symmetric (A(-f) = conj A(f), the same singular values), so rfft2's half of the frequencies
    covers them all; ``_max_top_eigenvalue`` bounds the top eigenvalue of the Gram matrices of the
    *computed* A~_f, skipping the ones that provably cannot hold the maximum.

    The spectrum is a direct DFT, one complex matmul over the T taps with the correctly rounded
    twiddles of ``_roots_of_unity`` (|w~ - w| <= 2u), so its rounding is proved rather than assumed
    of an FFT library: |A~_f - A_f| <= gamma_{T+2} sum_t |W_t| |w~_t| + 2u sum_t |W_t| <=
    gamma_{T+4} S entrywise, S = sum_t |W_t|, hence ||A~_f - A_f||_2 <= delta = gamma_{T+4} ||S||_F
    (S~ is within gamma_T of S) at every f, and ||A_f|| <= sqrt(max lambda bound) + delta."""
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
    taps = poly.reshape(c_out * c_in * sh * sw, kh2 * kw2)
    # w_t(f) = root number (f_h t_h mod n_h) n_w + (f_w t_w mod n_w) n_h of the n_h n_w-th roots
    dev = w.device
    fh, fw = torch.arange(nh, device=dev), torch.arange(nw // 2 + 1, device=dev)
    th, tw = torch.arange(kh2, device=dev), torch.arange(kw2, device=dev)
    index = (fh[:, None, None, None] * th[None, None, :, None]) % nh * nw
    index = (index + (fw[None, :, None, None] * tw[None, None, None, :]) % nw * nh) % (nh * nw)
    twiddles = _roots_of_unity(nh * nw).to(dev)[index.reshape(-1, kh2 * kw2)]
    spectrum = (twiddles @ taps.t().to(torch.complex128)).reshape(-1, c_out, c_in * sh * sw)
    t = kh2 * kw2
    s_fro = math.sqrt(_frobenius_sq_bound(taps.abs().sum(1, keepdim=True)).item()) / (1 - gamma64(t))
    delta = gamma64(t + 4) * s_fro
    return (math.sqrt(_max_top_eigenvalue(spectrum)) + delta) * (1 + ROUNDING_SLACK)


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
