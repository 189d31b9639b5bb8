"""Sandwich layers of LBDN (Wang & Manchester, "Direct parameterization of Lipschitz-bounded deep
networks", ICML 2023, arXiv 2301.11526).

    h_out = sqrt2 A^T Psi ReLU(sqrt2 Psi^{-1} B h_in + b),   Psi = diag(exp(psi)),

with [A B] (out x (out + in)) the Cayley transform of a free matrix, so A A^T + B B^T = I; then
the layer is 1-Lipschitz (the paper's Theorem 3.1: with the ReLU's incremental quadratic
constraint, ||dx||^2 - ||dh_out||^2 >= ||dx - sqrt2 B^T Psi dw||^2 >= 0). Cayley of
Y = [U; V]: Z = U - U^H + V^H V, Q = [(I+Z)^{-1}(I-Z); -2 V (I+Z)^{-1}] has orthonormal columns.
The free matrix is scaled to Frobenius norm ``alpha`` (a trained scalar, created here in
``__init__``: the reference creates the conv layer's alpha lazily in the first forward, after its
optimizer was built, so it never trained).

The conv layer does the same per frequency of a circular convolution over the whole n x n image
(``rfft2``; the frequency matrices of the self-conjugate columns are made exactly Hermitian so
that ``irfft2`` inverts without dropping anything). Stride 2 folds 2x2 blocks into channels and
halves the kernel (3 -> 1), as LBDN does.

What is certified: the evaluation forward in exact arithmetic on its *derived* float32 tensors
(the factors A, B per frequency, the scales sqrt2 exp(-psi) and exp(psi), and sqrt2 itself as
the float32 number the forward multiplies by), cached once per weights (``EvalCache``), so the
forward, the bound and the certifier's float64 pass use the same ones. Rounding makes [A B] only
nearly orthonormal and exp(psi) exp(-psi) only nearly 1: with E = A A^H + B B^H - I the same
argument gives ||dh_out||^2 <= (1 + 4 ||E|| ||B||^2) ||dx||^2, times the largest product of the
two scales (``upper_bound``).

Float rounding (``rounding``): the dense layer is matrix products and elementwise operations,
bounded from the standard model in either precision. The conv layer's float32 forward runs
``torch.fft`` (pocketfft on the CPU, cuFFT on a GPU), whose algorithms have no published error
bound: its float32 bound is an estimate (``rigorous=False``), so the certifier recomputes every
sample it would certify in float64. There ``forward64`` runs our own radix-2 Cooley-Tukey FFT
(``cll.lipschitz.fft``), whose error Higham bounds (Thm. 24.2 of "Accuracy and Stability of
Numerical Algorithms", 2nd ed., 2002): for n = 2^t and twiddle factors off by at most mu,
||fl(F x) - F x|| <= t eta / (1 - t eta) ||F x||, eta = mu + gamma_4 (sqrt2 + mu).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lipschitz.fft import fft2_error, fft2_radix2, full_spectrum, hermitian_columns, torch_fft_estimate
from ..lipschitz.operators import ROUNDING_SLACK, abs_operator_norm
from ..lipschitz.rounding import Rounding, gamma, underflow, unit
from .basic import EvalCache, float32_value, one_cpu_thread

SQRT2 = float32_value(math.sqrt(2.0))  # the float32 number the forward multiplies by


def cayley_rows(w: torch.Tensor) -> torch.Tensor:
    """(..., m, m + k) -> a matrix of the same shape with orthonormal rows (real or complex)."""
    m = w.shape[-2]
    y = w.transpose(-2, -1)  # tall: (m + k, m)
    u, v = y[..., :m, :], y[..., m:, :]
    z = u - u.mH + v.mH @ v
    eye = torch.eye(m, dtype=w.dtype, device=w.device)
    with one_cpu_thread(w.device):
        top = torch.linalg.solve(eye + z, eye - z)  # (I+Z)^{-1} (I-Z)
        bottom = -2 * torch.linalg.solve((eye + z).mT, v.mT).mT  # -2 V (I+Z)^{-1}
    return torch.cat([top, bottom], dim=-2).transpose(-2, -1)


# ------------------------------------------------------------------- the layers
class _Sandwich(EvalCache):
    def _factors(self) -> torch.Tensor:
        """[A B] with orthonormal rows (per frequency for the conv layer)."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): with gradient in training, derived once per weights in evaluation."""
        p = self.cached(self._factors)
        return p[..., : self.out_channels], p[..., self.out_channels :]

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt2 exp(-psi), exp(psi)): the per-channel scales inside and after the ReLU."""
        return SQRT2 * torch.exp(-self.psi), torch.exp(self.psi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return self.sandwich(x, a, b, *self.cached(self._scales))

    def _derived64(self) -> tuple[torch.Tensor, ...]:
        """A, B, the two scales and the bias of the evaluation forward, in float64 / complex128."""
        p = self.derived(self._factors)
        p = p.to(torch.complex128 if p.is_complex() else torch.float64)
        s_in, s_out = (s.double() for s in self.derived(self._scales))
        return p[..., : self.out_channels], p[..., self.out_channels :], s_in, s_out, self.bias.detach().double()

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        """sqrt(1 + 4 ||E|| ||B||^2) with E = A A^H + B B^H - I from the factors the forward uses,
        maxima over frequencies (conv), times max_i sqrt2 s_in,i s_out,i / 2, the Jacobian's scale
        (1 but for the rounding of exp(psi) exp(-psi) and of sqrt2). ||E||_2 <= ||E||_F, and
        B B^H <= A A^H + B B^H = I + E gives ||B||^2 <= 1 + ||E||: no eigendecomposition needed."""
        e = self.derived(self._orthogonality_error)
        s_in, s_out = (s.double() for s in self.derived(self._scales))
        scale = SQRT2 * (s_in * s_out).max().item() / 2
        return math.sqrt(1.0 + 4.0 * e * (1.0 + e)) * scale * (1 + ROUNDING_SLACK)

    def _orthogonality_error(self) -> float:
        """max over frequencies of ||A A^H + B B^H - I||_F, covering its own float64 evaluation."""
        a, b = self._derived64()[:2]
        err = a @ a.mH + b @ b.mH - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        e = torch.linalg.matrix_norm(err).max().item()  # Frobenius, per frequency
        # forming E in float64 from float32 factors: each entry is a sum of (out + in) exact products,
        # rounded at most (out + in) times by 2^-53 relative to a sum of magnitude <= 1 (unit rows)
        m, k = b.shape[-2], a.shape[-1] + b.shape[-1]
        return e * (1 + ROUNDING_SLACK) + m * k * 2.3e-16

    def _norms(self) -> dict[str, float]:
        """Factor norms the rounding bounds need: ||A||, ||B|| <= sqrt(1 + ||E||); |A|, |B| norms."""
        a, b, s_in, s_out, bias = self._derived64()
        e = self.derived(self._orthogonality_error)
        if a.dim() == 2:  # dense: |A^T| and |B| by Collatz-Wielandt
            abs_a, abs_b = abs_operator_norm(a), abs_operator_norm(b)
        else:  # per frequency || |B_f| || <= ||B_f||_F
            abs_a = torch.linalg.matrix_norm(a).max().item() * (1 + ROUNDING_SLACK)
            abs_b = torch.linalg.matrix_norm(b).max().item() * (1 + ROUNDING_SLACK)
        return dict(
            norm=math.sqrt(1 + e), abs_a=abs_a, abs_b=abs_b, s_in=s_in.abs().max().item(),
            s_out=s_out.abs().max().item(), bias=bias.norm().item(),
        )  # fmt: skip


class SandwichLinear(_Sandwich):
    """Dense Sandwich layer, (N, in_features) -> (N, out_features)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.out_channels = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features + out_features))
        nn.init.xavier_normal_(self.weight)
        self.alpha = nn.Parameter(self.weight.detach().norm().clone())
        self.psi = nn.Parameter(torch.zeros(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def _factors(self) -> torch.Tensor:
        return cayley_rows(self.alpha * self.weight / self.weight.norm())

    def sandwich(self, x, a, b, s_in, s_out):
        h = F.relu(s_in * (x @ b.t()) + self.bias.to(x.dtype)) * s_out
        return SQRT2 * h @ a

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward in float64 on the same float32 factors and scales."""
        a, b, s_in, s_out, _ = self._derived64()
        return self.sandwich(x.double(), a, b, s_in, s_out)

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """y = x B^T (fan-in n_in), q = ReLU(s_in y + b), o = s_out q, out = (sqrt2 o) A (fan-in out), as
        computed: each product with B or A is off by gamma_n || |B| || ||x|| (resp. || |A| ||), each
        elementwise product or sum by u of its result; errors pass on through the scales and the
        factors' norms (<= sqrt(1 + ||E||)), the ReLU being 1-Lipschitz."""
        u, k = unit(dtype), self._norms()
        n_in, n_out = self.weight.shape[1] - self.out_channels, self.out_channels
        g_in, g_out, g2 = gamma(n_in, dtype), gamma(n_out, dtype), gamma(2, dtype)

        def error(xn: float) -> float:
            err, size = g_in * k["abs_b"] * xn, (k["norm"] + g_in * k["abs_b"]) * xn  # y
            q = (1 + g2) * (k["s_in"] * size + k["bias"])
            err = k["s_in"] * err + g2 * (k["s_in"] * size + k["bias"])  # q
            err, size = k["s_out"] * err + u * k["s_out"] * q, (1 + u) * k["s_out"] * q  # o
            err, size = SQRT2 * err + u * SQRT2 * size, (1 + u) * SQRT2 * size  # sqrt2 o
            return k["norm"] * err + g_out * k["abs_a"] * size

        tiny = underflow(2 * (n_in + n_out) + 8, n_out, dtype, max(1.0, k["s_in"], k["s_out"]))
        return Rounding(error(1.0) - error(0.0), error(0.0) + tiny)


class SandwichConv(_Sandwich):
    """Sandwich convolution (circular, per frequency), (N, in, n, n) -> (N, out, n/stride, n/stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, in_hw: tuple[int, int], stride: int = 1):
        super().__init__()
        if stride not in (1, 2) or in_hw[0] != in_hw[1] or in_hw[0] % stride:
            raise ValueError(
                f"SandwichConv needs stride 1 or 2 and square inputs divisible by it, "
                f"got stride {stride}, input {in_hw}"
            )
        self.stride = stride
        if stride == 2:  # space-to-depth and a halved kernel
            in_channels, kernel_size = 4 * in_channels, max(1, kernel_size // 2)
        self.n = in_hw[0] // stride
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, out_channels + in_channels, kernel_size, kernel_size))
        nn.init.xavier_normal_(self.weight)
        self.alpha = nn.Parameter(self.spectrum().detach().norm().clone())
        self.psi = nn.Parameter(torch.zeros(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def spectrum(self) -> torch.Tensor:
        """The kernel's circular-convolution matrices per rfft2 frequency: (n, n//2+1, out, out+in),
        the kernel centred so that the convolution is "same" (tap (k-1)/2 at offset 0)."""
        k, n = self.kernel_size, self.n
        w = F.pad(self.weight, (0, n - k, 0, n - k))
        w = torch.roll(w, shifts=(-((k - 1) // 2),) * 2, dims=(2, 3))
        return torch.fft.rfft2(w).permute(2, 3, 0, 1)

    def _factors(self) -> torch.Tensor:
        """[A B] per frequency, orthonormal rows and the spectrum of a real operator."""
        w = self.spectrum()
        return hermitian_columns(cayley_rows(self.alpha * w / w.norm()))

    def sandwich(self, x, a, b, s_in, s_out):
        if self.stride == 2:
            x = F.pixel_unshuffle(x, 2)
        size = (self.n, self.n)
        h = torch.fft.irfft2(torch.einsum("hwoi,bihw->bohw", b, torch.fft.rfft2(x)), s=size)
        h = F.relu(s_in[:, None, None] * h + self.bias[:, None, None])
        h = h * s_out[:, None, None]
        out = torch.einsum("hwco,bchw->bohw", a.conj(), torch.fft.rfft2(h))
        return SQRT2 * torch.fft.irfft2(out, s=size)

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward in exact terms of the same float32 factors and scales, computed in
        float64 with ``fft2_radix2`` on all n x n frequencies (the half spectrum's Hermitian
        extension), so that its rounding has a proof (``rounding`` at float64)."""
        self._require_power_of_two()
        a, b, s_in, s_out, bias = self._derived64()
        a, b, n = full_spectrum(a, self.n), full_spectrum(b, self.n), self.n
        x = x.double()
        if self.stride == 2:
            x = F.pixel_unshuffle(x, 2)
        u = torch.einsum("hwoi,bihw->bohw", b, fft2_radix2(x.to(torch.complex128)))
        h = fft2_radix2(u, inverse=True).real / (n * n)
        h = F.relu(s_in[:, None, None] * h + bias[:, None, None]) * s_out[:, None, None]
        out = torch.einsum("hwco,bchw->bohw", a.conj(), fft2_radix2(h.to(torch.complex128)))
        return SQRT2 * (fft2_radix2(out, inverse=True).real / (n * n))

    def _require_power_of_two(self) -> None:
        if self.n & (self.n - 1):
            raise TypeError(
                f"SandwichConv on {self.n} x {self.n} frequencies: the float64 pass's radix-2 FFT needs a "
                "power of two, so its rounding has no proof and nothing could be certified"
            )

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """The steps as computed, each FFT off by at most e relative (``fft2_error``: proved for
        ``fft2_radix2`` in float64; an estimate for ``torch.fft`` in float32, ``torch_fft_estimate``,
        so that bound is marked not rigorous), each per-frequency complex product by sqrt2
        gamma_{m+2} ||B_f||_F ||X_f|| (Higham sec. 3.6), each elementwise product or sum by u of its
        result; errors pass on through the factors' norms (<= sqrt(1 + ||E||)), the scales and the
        ReLU. Norms: an unnormalised n x n DFT multiplies l2 norms by n."""
        n = self.n
        u, k = unit(dtype), self._norms()
        if dtype == torch.float64:
            self._require_power_of_two()
            fft, rigorous = fft2_error(n, dtype), True
        else:
            fft, rigorous = torch_fft_estimate(n, dtype), False
        g_b = math.sqrt(2) * gamma(self.in_channels + 2, dtype)
        g_a = math.sqrt(2) * gamma(self.out_channels + 2, dtype)
        g2, bias = gamma(2, dtype), k["bias"] * n

        def error(xn: float) -> float:
            x_size = (1 + fft) * n * xn
            err = fft * n * xn  # X = F x
            prod = g_b * k["abs_b"] * x_size
            err, size = k["norm"] * err + prod, k["norm"] * x_size + prod  # U = B X
            err, size = err / n + fft * size / n, (1 + fft) * size / n  # h = F^-1 U / n^2
            err = k["s_in"] * err + g2 * (k["s_in"] * size + bias)  # q = ReLU(s_in h + b)
            size = (1 + g2) * (k["s_in"] * size + bias)
            err, size = k["s_out"] * err + u * k["s_out"] * size, (1 + u) * k["s_out"] * size  # o
            err, size = n * err + fft * n * size, (1 + fft) * n * size  # V = F o
            prod = g_a * k["abs_a"] * size
            err, size = k["norm"] * err + prod, k["norm"] * size + prod  # W = A^H V
            err, size = err / n + fft * size / n, (1 + fft) * size / n  # F^-1 W / n^2
            return SQRT2 * err + u * SQRT2 * size

        outputs = self.out_channels * n * n
        ops = 8 * (self.in_channels + self.out_channels) + 16 * int(math.log2(max(n, 2))) + 8
        tiny = underflow(ops, outputs, dtype, max(1.0, k["s_in"], k["s_out"]) * n * n)
        return Rounding(error(1.0) - error(0.0), error(0.0) + tiny, rigorous)
