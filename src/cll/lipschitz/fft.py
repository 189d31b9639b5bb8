"""Discrete Fourier transforms with a proved rounding bound, and the spectra of real operators.

Sandwich's conv runs ``torch.fft`` in its float32 forward, whose algorithms (pocketfft, cuFFT) have
no published error bound, so that pass is only an estimate; the certifier's float64 pass recomputes
it with the transforms here, whose error is proved from the standard model (``cll.lipschitz.rounding``).
BRO's conv evaluates in float32 with ``real_rdft2`` / ``real_irdft2_crop`` (real matrix products with
correctly rounded cos/sin, its bound in ``BROConv.rounding``) and in float64 with ``dft2``:

* ``fft2_radix2``: radix-2 Cooley-Tukey for sides that are powers of two. Higham, "Accuracy and
  Stability of Numerical Algorithms", 2nd ed. 2002, Thm. 24.2: for n = 2^t and twiddle factors off
  by at most mu, ||fl(F x) - F x|| <= t eta / (1 - t eta) ||F x||, eta = mu + gamma_4 (sqrt2 + mu).
* ``dft2_direct``: any side n, as two matrix products with the n-th roots of unity correctly rounded
  (mpmath): each output is a complex inner product of n terms, off by <= sqrt2 gamma_{n+2} (Higham
  sec. 3.6) times sum_k |w_k| |x_k| plus the twiddles' own error (< 2u each, ``roots_of_unity``).
  BRONet's canvases (18 x 18, 34 x 34) are not powers of two.
* ``dft2`` / ``dft2_error``: the first where it applies, else the second, and the bound of the one used.

All transforms are unnormalised (the inverse without its 1/n^2) and act on the last two axes of a
complex tensor; errors are relative to the l2 norm of the exact result, for the whole tensor.
``hermitian_columns`` and ``full_spectrum`` handle the half spectra ``rfft2`` gives of real operators;
``real_dft_matrices`` holds the real cos/sin matrices of a canvas (rfft2 layout) for the products.
"""

from __future__ import annotations

import functools
import math

import mpmath
import torch

from .rounding import gamma, unit

TWIDDLE_ULPS = 24  # |computed - exact| of the radix-2 FFT's float64 twiddles, in units of u (``_twiddles``)
ROOT_ULPS = 2  # |computed - exact| of ``roots_of_unity`` in any precision, in units of that precision's u
FFT32_SAFETY = 4.0  # the torch.fft estimate: 4x the radix-2 bound with twiddles off by 8 u


# ------------------------------------------------------------------- radix-2 (powers of two)
def _twiddles(n: int, sign: float, like: torch.Tensor) -> torch.Tensor:
    """exp(sign 2 pi i k / n), k < n/2, complex128: the angle is off by <= 2 u |angle| <= 4 pi u and
    sin/cos by a few ulps more, so each factor is off by < TWIDDLE_ULPS u in absolute value."""
    k = torch.arange(n // 2, dtype=torch.float64, device=like.device)
    return torch.polar(torch.ones_like(k), sign * 2 * math.pi * k / n)


def _fft_last(x: torch.Tensor, sign: float) -> torch.Tensor:
    """Unnormalised DFT over the last axis (a power of two) by radix-2 Cooley-Tukey decimation in
    time: the butterflies even +- w odd that Higham's Thm 24.2 analyses."""
    n = x.shape[-1]
    if n == 1:
        return x
    even, odd = _fft_last(x[..., 0::2], sign), _fft_last(x[..., 1::2], sign)
    t = _twiddles(n, sign, x) * odd
    return torch.cat([even + t, even - t], dim=-1)


def fft2_radix2(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Unnormalised 2-D DFT (sign -1) or inverse DFT without the 1/n^2 (sign +1) over the last two
    axes of a complex tensor, both sides powers of two."""
    sign = 1.0 if inverse else -1.0
    return _fft_last(_fft_last(x, sign).transpose(-2, -1), sign).transpose(-2, -1)


def fft2_error(n: int, dtype: torch.dtype, ulps: float = TWIDDLE_ULPS) -> float:
    """Relative l2 error bound of ``fft2_radix2`` on an n x n input at ``dtype``'s unit roundoff:
    (1 + e)^2 - 1 with Higham's e = t eta / (1 - t eta) per axis, t = log2 n, eta = mu + gamma_4
    (sqrt2 + mu), mu = ``ulps`` u."""
    u, t = unit(dtype), int(math.log2(n))
    mu = ulps * u
    eta = mu + gamma(4, dtype) * (math.sqrt(2) + mu)
    e = t * eta / (1 - t * eta)
    return (1 + e) ** 2 - 1


def torch_fft_estimate(n: int, dtype: torch.dtype) -> float:
    """An *estimate*, not a bound, of the relative error of a ``torch.fft`` rfft2/irfft2 on n x n:
    FFT32_SAFETY times the radix-2 bound at the next power of two with twiddles off by 8 u, x2 for
    the half spectrum. A rounding bound built on it says ``rigorous=False``."""
    return 2 * FFT32_SAFETY * fft2_error(2 ** math.ceil(math.log2(max(n, 2))), dtype, ulps=8)


# ------------------------------------------------------------------- direct (any side)
@functools.lru_cache(maxsize=32)
def roots_of_unity(n: int) -> torch.Tensor:
    """exp(-2 pi i k / n) for k < n, complex128: each part is an 80-bit mpmath value (error < 2^-76)
    rounded to the nearest float64, so every entry is within sqrt2 (u + 2^-76) < 2u of exact; rounded
    on to complex64 it is within sqrt2 (u32 + 2 u64) < 2 u32. (mpmath ships with torch, through sympy.)"""
    with mpmath.workprec(80):
        turns = [mpmath.mpf(2 * k) / n for k in range(n)]
        values = [complex(float(mpmath.cospi(t)), -float(mpmath.sinpi(t))) for t in turns]
    return torch.tensor(values, dtype=torch.complex128)


def dft_matrix(n: int, inverse: bool, like: torch.Tensor) -> torch.Tensor:
    """F_jk = w^(j k mod n) (w = exp(-2 pi i / n); its conjugate for the inverse), in ``like``'s
    complex dtype and device: every entry one correctly rounded root, no accumulated error."""
    k = torch.arange(n)
    f = roots_of_unity(n)[(k[:, None] * k[None, :]) % n]
    return (f.conj() if inverse else f).to(device=like.device, dtype=like.dtype)


def dft2_direct(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Unnormalised 2-D DFT (or inverse DFT without the 1/n^2) of a complex tensor (..., n, n), any n:
    F x F (F symmetric), each product a batch of length-n complex inner products."""
    f = dft_matrix(x.shape[-1], inverse, x)
    return f @ x @ f


def dft2_direct_error(n: int, dtype: torch.dtype) -> float:
    """Relative l2 error bound of ``dft2_direct`` on an n x n input at ``dtype``'s unit roundoff.

    One axis, y = F x: with |F~_jk - F_jk| <= mu = ROOT_ULPS u and |F~_jk| <= 1 + mu, the computed
    y~_j is within sqrt2 gamma_{n+2} (1 + mu) ||x||_1 of (F~ x)_j, which is within mu ||x||_1 of y_j;
    so ||y~ - y||_2 <= sqrt(n) c ||x||_1 <= n c ||x||_2 = sqrt(n) c ||y||_2 (||F x|| = sqrt(n) ||x||),
    c = sqrt2 gamma_{n+2} (1 + mu) + mu: e = sqrt(n) c per axis, row by row, so for the whole tensor.
    Two axes: the second transforms the first's computed result, (1 + e)^2 - 1 (as ``fft2_error``)."""
    u = unit(dtype)
    mu = ROOT_ULPS * u
    e = math.sqrt(n) * (math.sqrt(2) * gamma(n + 2, dtype) * (1 + mu) + mu)
    return (1 + e) ** 2 - 1


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def dft2(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``fft2_radix2`` where the side is a power of two, else ``dft2_direct`` (square inputs)."""
    return fft2_radix2(x, inverse) if is_power_of_two(x.shape[-1]) else dft2_direct(x, inverse)


def dft2_error(n: int, dtype: torch.dtype) -> float:
    """The relative error bound of ``dft2`` on an n x n input (of the transform it runs there)."""
    return fft2_error(n, dtype) if is_power_of_two(n) else dft2_direct_error(n, dtype)


# ------------------------------------------------------------------- half spectra of real operators
def hermitian_columns(q: torch.Tensor) -> torch.Tensor:
    """Make the rfft2 columns 0 and n/2 of q (n, n//2+1, ...) conjugate-symmetric in the row
    frequency (row r = conj(row n-r), self-conjugate rows real), as the spectrum of a real
    operator must be."""
    n = q.shape[0]
    rows = torch.arange(n, device=q.device)
    mirror = (-rows) % n
    shape = (n,) + (1,) * (q.dim() - 2)
    keep, real = (rows < mirror).view(shape), (rows == mirror).view(shape)
    columns = [0] + ([n // 2] if n % 2 == 0 and n > 1 else [])
    out = q.clone()
    for c in columns:
        col = q[:, c]
        fixed = torch.where(keep, col, col[mirror].conj())
        out[:, c] = torch.where(real, col.real.to(col.dtype), fixed)
    return out


def full_spectrum(half: torch.Tensor, n: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(n, n//2+1, ...) rfft2 half of a real operator's spectrum -> all n x n frequencies (or the rows
    ``rows`` of them), column c > n/2 the conjugate of frequency (-r, n - c)."""
    rows = torch.arange(n, device=half.device) if rows is None else rows.to(half.device)
    rest = half[(-rows) % n][:, 1 : n - n // 2].flip(1).conj()  # columns n//2+1 .. n-1
    return torch.cat([half[rows], rest], dim=1)


# ------------------------------------------------------------------- real matrix products on a canvas
@functools.lru_cache(maxsize=16)
def real_dft_matrices(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The real cos/sin matrices of the n x n canvas's DFT, rfft2 layout (m = n//2+1 columns), for
    the interior (n-2) x (n-2) of a canvas zero-padded by one pixel, every entry cos or sin of
    2 pi j k / n from ``roots_of_unity`` (within ROOT_ULPS u of exact, |entry| <= 1), or 2 of it:

    * ``first`` (H, 2m): x @ first = [P | Q], P = x cos^T, Q = x sin^T along the last axis (the row
      DFT of the canvas is P - i Q);
    * ``rows`` (2n, 2H) on rows (j, part) of [P; Q] interleaved: [Re X; Im X] over the n row
      frequencies (Re = C P - S Q, Im = -(S P + C Q));
    * ``back`` (2H, 2n) on [Re Z; Im Z]: the inverse row DFT e^(+i) at the H interior rows, rows
      (j, part) interleaved (Re U = C Re Z - S Im Z, Im U = S Re Z + C Im Z);
    * ``last`` (2m, H) on [Re U | Im U]: irfft's c2r at the H interior columns, sum_k a_k (Re U_k
      cos - Im U_k sin), a_k = 1 for columns 0 and n/2 (their imaginary parts drop out), else 2."""
    with torch.device("cpu"):  # made on the CPU whatever the default device (meta: shape tracing)
        matrices = _real_dft_matrices(n)
    return tuple(t.to(dtype=dtype, device=device).contiguous() for t in matrices)


def _real_dft_matrices(n: int) -> tuple[torch.Tensor, ...]:
    m, h = n // 2 + 1, n - 2
    roots, half, full, inner = roots_of_unity(n), torch.arange(m), torch.arange(n), torch.arange(1, n - 1)

    def cos_sin(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phase = roots[(a[:, None] * b[None, :]) % n]
        return phase.real, -phase.imag

    c, s = cos_sin(inner, half)
    first = torch.cat([c, s], dim=1)
    c, s = cos_sin(full, inner)
    rows = torch.stack([torch.stack([c, -s], -1), torch.stack([-s, -c], -1)]).reshape(2 * n, 2 * h)
    c, s = cos_sin(inner, full)
    back = torch.stack([torch.cat([c, -s], 1), torch.cat([s, c], 1)], dim=1).reshape(2 * h, 2 * n)
    c, s = cos_sin(half, inner)
    a = torch.full((m, 1), 2.0, dtype=torch.float64)
    a[0] = 1.0
    if n % 2 == 0:
        a[n // 2] = 1.0
    last = torch.cat([a * c, -a * s], dim=0)
    return first, rows, back, last


def real_rdft2(x: torch.Tensor) -> torch.Tensor:
    """[Re; Im] (..., 2n, n//2+1) of the unnormalised rfft2 of x (..., H, H) zero-padded to n = H + 2,
    by two real matrix products (inner lengths H and 2H)."""
    h = x.shape[-1]
    first, rows, _, _ = real_dft_matrices(h + 2, x.dtype, x.device)
    pq = (x @ first).reshape(*x.shape[:-2], 2 * h, -1)  # rows (j, part): P_j, Q_j interleaved
    return rows @ pq


def real_irdft2_crop(z: torch.Tensor) -> torch.Tensor:
    """The H x H interior of irfft2's unnormalised inverse (no 1/n^2) of the half spectrum [Re; Im]
    (..., 2n, n//2+1), by two real matrix products (inner lengths 2n and 2m)."""
    n = z.shape[-2] // 2
    _, _, back, last = real_dft_matrices(n, z.dtype, z.device)
    u = (back @ z).reshape(*z.shape[:-2], n - 2, -1)  # (..., H, 2m): [Re U | Im U] per row
    return u @ last
