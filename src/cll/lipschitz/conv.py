"""Sound bounds on the norm of a zero-padded, strided conv2d at a given input size
(``conv_norm_bound``): exact from the explicit matrix where it is small, else the exact norm of the
*circular* convolution on the zero-padded canvas, per frequency by a direct DFT with correctly
rounded twiddles (Sedghi, Gupta, Long, "The singular values of convolutional layers", ICLR 2019,
arXiv 1805.10408, Thm. 6). The zero-padded operator is ``crop o circular o pad``; crop and pad have
norm <= 1. A stride s is handled exactly by space-to-depth: the strided conv of x is a stride-1 conv
of x's s*s polyphase components (an orthogonal re-indexing), kernel split alike. The rounding model
and the eigenvalue bounds are those of ``cll.lipschitz.operators``."""

from __future__ import annotations

import math

import torch

from .fft import roots_of_unity
from .operators import (
    EXPLICIT_MAX_ENTRIES,
    ROUNDING_SLACK,
    conv_matrix,
    frobenius_sq_bound,
    gamma64,
    gram,
    gram_top_bound,
    spectral_norm_exact,
)


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
# max_top_eigenvalue); the others are ruled out by guaranteed upper bounds.
FFT_PRUNE_SLACK = 1e-6  # relative margin on those bounds, >> their rounding error (< 1e-9)
FFT_GRAM_STEPS = 8  # Gram-iteration squarings at most
FFT_SEEDS = 8  # frequencies solved first, to have a maximum to compare with
FFT_DIRECT_SIZE = 8  # Gram matrices up to this size: eigvalsh everywhere (cheap enough)
# devices where pruning pays: on the CPU (1-2 threads) batched complex128 matmuls cost more than
# the LAPACK eigvalsh calls they save (measured, bench/README.md); on a GPU the eigvalsh calls are
# the slow part and the Gram-iteration matmuls cheap
FFT_PRUNE_DEVICES = ("cuda",)
FFT_CHUNK_ENTRIES = 2**24  # complex entries per batched step (memory: 256 MB)


def max_top_eigenvalue(spectrum: torch.Tensor) -> float:
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
        g = gram(spectrum[idx])
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
    singular value over frequencies f of A_f = sum_t W_t w_t(f), W_t the (polyphase) kernel's tap t,
    w_t(f) = exp(-2 pi i (f_h t_h / n_h + f_w t_w / n_w)). A real kernel's spectrum is conjugate-
    symmetric (A(-f) = conj A(f), the same singular values), so rfft2's half of the frequencies
    covers them all; ``max_top_eigenvalue`` bounds the top eigenvalue of the Gram matrices of the
    *computed* A~_f, skipping the ones that provably cannot hold the maximum.

    The spectrum is a direct DFT, one complex matmul over the T taps with the correctly rounded
    twiddles of ``roots_of_unity`` (|w~ - w| <= 2u), so its rounding is proved rather than assumed
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
    twiddles = roots_of_unity(nh * nw).to(dev)[index.reshape(-1, kh2 * kw2)]
    spectrum = (twiddles @ taps.t().to(torch.complex128)).reshape(-1, c_out, c_in * sh * sw)
    t = kh2 * kw2
    s_fro = math.sqrt(frobenius_sq_bound(taps.abs().sum(1, keepdim=True)).item()) / (1 - gamma64(t))
    delta = gamma64(t + 4) * s_fro
    return (math.sqrt(max_top_eigenvalue(spectrum)) + delta) * (1 + ROUNDING_SLACK)
