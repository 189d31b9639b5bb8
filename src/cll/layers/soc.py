"""Skew-orthogonal convolution (Singla & Feizi, "Skew orthogonal convolutions", ICML 2021,
arXiv 2105.11417).

A kernel M (c x c x k x k, k odd) gives the skew kernel A = (M - M^T)/2, where M^T swaps the
channel axes and flips the taps: the zero-padded "same" convolution with M^T is exactly the
adjoint of the one with M, so conv_A is a skew-symmetric operator (exactly, in floating point
too: a - b and b - a round to opposite numbers). Its exponential is orthogonal, and the layer
computes the Taylor polynomial

    z = sum_{i=0..T} A^i x / i!      (T = 5 terms in training, 15 in evaluation)

after rescaling A to 0.7 / sigma_hat (1.0 for 1x1 kernels), sigma_hat being the smallest of the
four reshaped-kernel norms of "Fantastic four" (Singla & Feizi, ICLR 2021, arXiv 2011.00411),
each by one warm-started power-iteration step per training step (50 at the first).

The truncated series is only close to orthogonal. The certifier therefore does not trust
"1-Lipschitz by construction": with rho >= ||conv_A|| (a sound bound) it uses
||p_T(A)|| <= ||exp(A)|| + ||exp(A) - p_T(A)|| <= 1 + sum_{i>T} rho^i / i!   (``cll.lipschitz``),
as the ICLR 2022 follow-up recommends measuring rather than assuming.

Stride 2 folds 2x2 pixel blocks into channels first (an orthogonal re-indexing); channel-count
changes zero-pad the input channels or keep the first ``out_channels`` (both 1-Lipschitz).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TRAIN_TERMS = 5
EVAL_TERMS = 15
INIT_ITERS = 50


def transpose_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """The kernel of the adjoint of a zero-padded "same" convolution: swap channels, flip taps."""
    return kernel.transpose(0, 1).flip(2, 3)


def four_reshapes(kernel: torch.Tensor) -> list[torch.Tensor]:
    """The four matrices of Fantastic four: (o h, i w), (o w, i h), (o, i h w), (o h w, i)."""
    o, i, h, w = kernel.shape
    return [
        kernel.permute(0, 2, 1, 3).reshape(o * h, i * w),
        kernel.permute(0, 3, 1, 2).reshape(o * w, i * h),
        kernel.reshape(o, i * h * w),
        kernel.permute(0, 2, 3, 1).reshape(o * h * w, i),
    ]


class SOC(nn.Module):
    """Skew-orthogonal convolution, in_channels -> out_channels, stride 1 or 2, odd kernel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        train_terms: int = TRAIN_TERMS,
        eval_terms: int = EVAL_TERMS,
    ):
        super().__init__()
        if stride not in (1, 2) or kernel_size % 2 == 0:
            raise ValueError(f"SOC needs stride 1 or 2 and an odd kernel, got {stride}, {kernel_size}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.channels = max(in_channels * stride * stride, out_channels)
        self.kernel_size = kernel_size
        self.train_terms, self.eval_terms = train_terms, eval_terms
        self.correction = 0.7 if kernel_size > 1 else 1.0
        c = self.channels
        self.weight = nn.Parameter(torch.randn(c, c, kernel_size, kernel_size) / c**0.5)
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-(out_channels**-0.5), out_channels**-0.5))
        # persistent left/right singular vectors of the four reshapes (buffers: saved, resumed)
        with torch.no_grad():
            for n, m in enumerate(four_reshapes(self.skew())):
                self.register_buffer(f"u{n}", F.normalize(torch.randn(m.shape[0]), dim=0))
                self.register_buffer(f"v{n}", F.normalize(torch.randn(m.shape[1]), dim=0))
            if not self.weight.is_meta:  # (a model built on the meta device only counts parameters)
                self._power_step(INIT_ITERS)

    def skew(self) -> torch.Tensor:
        return (self.weight - transpose_kernel(self.weight)) / 2

    @torch.no_grad()
    def _power_step(self, n_iter: int) -> None:
        for n, m in enumerate(four_reshapes(self.skew())):
            u, v = getattr(self, f"u{n}"), getattr(self, f"v{n}")
            for _ in range(n_iter):
                u = F.normalize(m @ v, dim=0)
                v = F.normalize(m.t() @ u, dim=0)
            setattr(self, f"u{n}", u)
            setattr(self, f"v{n}", v)

    def kernel(self) -> torch.Tensor:
        """correction * A / sigma_hat: the kernel whose Taylor series the layer computes (from the
        stored singular vectors; a training forward first takes one power-iteration step)."""
        skew = self.skew()
        sigmas = [getattr(self, f"u{n}") @ m @ getattr(self, f"v{n}") for n, m in enumerate(four_reshapes(skew))]
        return self.correction * skew / torch.stack(sigmas).min()

    @property
    def terms(self) -> int:
        return self.train_terms if self.training else self.eval_terms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._power_step(1)
        kernel = self.kernel()
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        z = term = F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))
        for i in range(1, self.terms + 1):
            term = F.conv2d(term, kernel, padding=self.kernel_size // 2) / i
            z = z + term
        return z[:, : self.out_channels] + self.bias.view(1, -1, 1, 1)
