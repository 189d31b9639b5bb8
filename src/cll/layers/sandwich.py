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
halves the kernel (3 -> 1), as LBDN does. The evaluation-mode factors are cached (dropped by
``train()`` and ``load_state_dict``).

Rounding makes [A B] only nearly orthonormal. With E = A A^H + B B^H - I the same argument gives
||dh_out||^2 <= (1 + 4 ||E|| ||B||^2) ||dx||^2, which is the bound the certifier uses
(``cll.lipschitz``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .basic import EvalCache

SQRT2 = math.sqrt(2.0)


@contextmanager
def _one_cpu_thread(device: torch.device):
    """One intra-op thread on the CPU. The MKL that ships with torch 2.14.1 fails batched LU
    factorisations of matrices from about 256 x 256 when it runs on 2 or more threads ("Parameter 6
    was incorrect on entry to CLASWP", then "Pivots given to lu_solve must all be greater or equal
    to 1"): a 256-channel Sandwich layer hits it; on one thread the same solve is correct."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cayley_rows(w: torch.Tensor) -> torch.Tensor:
    """(..., m, m + k) -> a matrix of the same shape with orthonormal rows (real or complex)."""
    m = w.shape[-2]
    y = w.transpose(-2, -1)  # tall: (m + k, m)
    u, v = y[..., :m, :], y[..., m:, :]
    z = u - u.mH + v.mH @ v
    eye = torch.eye(m, dtype=w.dtype, device=w.device)
    with _one_cpu_thread(w.device):
        top = torch.linalg.solve(eye + z, eye - z)  # (I+Z)^{-1} (I-Z)
        bottom = -2 * torch.linalg.solve((eye + z).mT, v.mT).mT  # -2 V (I+Z)^{-1}
    return torch.cat([top, bottom], dim=-2).transpose(-2, -1)


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


class SandwichLinear(EvalCache):
    """Dense Sandwich layer, (N, in_features) -> (N, out_features)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features + out_features))
        nn.init.xavier_normal_(self.weight)
        self.alpha = nn.Parameter(self.weight.detach().norm().clone())
        self.psi = nn.Parameter(torch.zeros(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with [A B] orthonormal rows."""
        p = self.cached(lambda: cayley_rows(self.alpha * self.weight / self.weight.norm()))
        out = self.weight.shape[0]
        return p[:, :out], p[:, out:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        h = F.relu(SQRT2 * torch.exp(-self.psi) * (x @ b.t()) + self.bias) * torch.exp(self.psi)
        return SQRT2 * h @ a


class SandwichConv(EvalCache):
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

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) per frequency, [A B] with orthonormal rows and the spectrum of a real operator."""

        def make():
            w = self.spectrum()
            return hermitian_columns(cayley_rows(self.alpha * w / w.norm()))

        p = self.cached(make)
        return p[..., : self.out_channels], p[..., self.out_channels :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pixel_unshuffle(x, 2)
        a, b = self.factors()
        size = (self.n, self.n)
        h = torch.fft.irfft2(torch.einsum("hwoi,bihw->bohw", b, torch.fft.rfft2(x)), s=size)
        h = F.relu(SQRT2 * torch.exp(-self.psi)[:, None, None] * h + self.bias[:, None, None])
        h = h * torch.exp(self.psi)[:, None, None]
        out = torch.einsum("hwco,bchw->bohw", a.conj(), torch.fft.rfft2(h))
        return SQRT2 * torch.fft.irfft2(out, s=size)
