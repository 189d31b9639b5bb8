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
each by warm-started power iteration: 50 iterations at construction and at every 200th training
step (the first included), one at the others, as SOC's code schedules them (``update_freq``).
Evaluation sums 15 terms where SOC's code sums 12: the certified bound's Taylor remainder then
stays below 1e-9 from the cheap Schur bound on ||A|| alone; the outputs differ by less than
0.7^13 / 13! (2e-12) relative.

The truncated series is only close to orthogonal. The layer's bound therefore does not trust
"1-Lipschitz by construction": with rho >= ||conv_A|| (a sound bound) it is
||p_T(A)|| <= ||exp(A)|| + ||exp(A) - p_T(A)|| <= 1 + sum_{i>T} rho^i / i!   (``upper_bound``),
as the ICLR 2022 follow-up recommends measuring rather than assuming. The network certified is
the series of the evaluation forward with its derived float32 kernel (cached, so the bound, the
forward and the certifier's float64 pass use the same one).

The evaluation forward sums the first ``BLOCKED_TERMS`` convolutions of its series over G
input-channel blocks explicitly (``SUM_FAN_IN`` products per block, the blocks added one after
another), so that their float32 rounding is bounded by gamma_(n/G + G - 1) instead of gamma_n for
the whole fan-in n = c k^2 (see ``rounding``). Those terms carry almost all of the rounding (the
i-th term's norm is at most rho^i/i! of the input's); on a trained LipConv-5 the certifier's
float32 bound on the body's error shrinks 10x (median) and 6 % instead of 41 % of the samples need
its float64 pass.
Training keeps the plain convolutions (its rounding is never bounded).

Stride 2 folds 2x2 pixel blocks into channels first (an orthogonal re-indexing); channel-count
changes zero-pad the input channels or keep the first ``out_channels`` (both 1-Lipschitz).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lipschitz.conv import conv_norm_bound
from ..lipschitz.operators import (
    ROUNDING_SLACK,
    abs_operator_norm,
    schur_bound,
    taylor_remainder,
)
from ..lipschitz.rounding import Rounding, gamma, underflow, unit
from .basic import EvalCache

TRAIN_TERMS = 5
EVAL_TERMS = 15
INIT_ITERS = 50  # power iterations at construction and at every REFRESH_EVERY-th training step
REFRESH_EVERY = 200
SUM_FAN_IN = 72  # products per explicitly summed block of the evaluation forward's convolutions ...
BLOCKED_TERMS = 4  # ... in its first terms (the later ones are small: their rounding is too)


def sum_groups(channels: int, kernel_size: int, fan_in: int = SUM_FAN_IN) -> int:
    """How many input-channel blocks the evaluation forward sums explicitly: the largest power of two
    dividing ``channels`` that leaves at least ``fan_in`` products per output in each block (1 for a
    fan-in already that small)."""
    groups = 1
    while channels % (2 * groups) == 0 and channels * kernel_size**2 // (2 * groups) >= fan_in:
        groups *= 2
    return groups


def conv_in_blocks(x: torch.Tensor, blocks: list[torch.Tensor], padding: int) -> torch.Tensor:
    """sum_g conv(x_g, K_g) over consecutive input-channel blocks x_g, K_g (``blocks``: the kernel's
    column blocks), the partial results added in order: each block's inner products have at most
    c k^2 / G terms, whatever order the backend sums them in."""
    width = blocks[0].shape[1]
    out = F.conv2d(x[:, :width], blocks[0], padding=padding)
    for g, block in enumerate(blocks[1:], start=1):
        out = out + F.conv2d(x[:, g * width : (g + 1) * width], block, padding=padding)
    return out


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


class SOC(EvalCache):
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
        self.groups = sum_groups(self.channels, kernel_size)
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
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards so far
        self._steps_seen: tuple[tuple[int, int], int] | None = None  # (the buffer's id and version, value)

    def skew(self) -> torch.Tensor:
        return (self.weight - transpose_kernel(self.weight)) / 2

    @torch.no_grad()
    def _power_step(self, n_iter: int) -> None:
        """``n_iter`` alternating updates of each reshape's (u, v), in SOC's order: the output-side u
        first for the first three reshapes, the input-channel v first for the fourth."""
        for n, m in enumerate(four_reshapes(self.skew())):
            u, v = getattr(self, f"u{n}"), getattr(self, f"v{n}")
            for _ in range(n_iter):
                if n == 3:
                    v = F.normalize(m.t() @ u, dim=0)
                    u = F.normalize(m @ v, dim=0)
                else:
                    u = F.normalize(m @ v, dim=0)
                    v = F.normalize(m.t() @ u, dim=0)
            setattr(self, f"u{n}", u)
            setattr(self, f"v{n}", v)

    def kernel(self) -> torch.Tensor:
        """correction * A / sigma_hat: the kernel whose Taylor series the layer computes (from the
        stored singular vectors; a training forward first takes its power-iteration steps)."""
        skew = self.skew()
        sigmas = [getattr(self, f"u{n}") @ m @ getattr(self, f"v{n}") for n, m in enumerate(four_reshapes(skew))]
        return self.correction * skew / torch.stack(sigmas).min()

    @property
    def terms(self) -> int:
        return self.train_terms if self.training else self.eval_terms

    def _step_count(self) -> int:
        """The ``steps`` buffer's value, read from its device only when something else wrote it (a
        checkpoint, a tracing pass that put its copy back): every training forward reading it would
        make a GPU wait for the queued work of every SOC layer."""
        key = (id(self.steps), self.steps._version)
        if self._steps_seen is None or self._steps_seen[0] != key:
            self._steps_seen = (key, int(self.steps))
        return self._steps_seen[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            count = None if self.steps.is_meta else self._step_count()  # (meta: shapes only)
            self._power_step(INIT_ITERS if count is not None and count % REFRESH_EVERY == 0 else 1)
            self.steps += 1
            if count is not None:
                self._steps_seen = ((id(self.steps), self.steps._version), count + 1)
            return self.series(x, self.kernel(), self.bias, self.terms)
        return self.series(x, self.derived(self.kernel), self.bias, self.terms, self.derived(self.kernel_blocks))

    def kernel_blocks(self) -> list[torch.Tensor]:
        """The evaluation kernel's ``groups`` input-channel blocks, each contiguous."""
        return [block.contiguous() for block in self.derived(self.kernel).split(self.channels // self.groups, dim=1)]

    def series(
        self, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, terms: int, blocks: list | None = None
    ) -> torch.Tensor:
        """sum_{i<=terms} conv_kernel^i x / i! on the (unshuffled, channel-padded) input, plus the bias;
        with ``blocks`` (the kernel's input-channel blocks) the first ``BLOCKED_TERMS`` convolutions
        summed block by block."""
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        z = term = F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))
        pad = self.kernel_size // 2
        for i in range(1, terms + 1):
            if blocks is not None and i <= BLOCKED_TERMS:
                term = conv_in_blocks(term, blocks, pad) / i
            else:
                term = F.conv2d(term, kernel, padding=pad) / i
            z = z + term
        return z[:, : self.out_channels] + bias.view(1, -1, 1, 1)

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward in float64, with the same float32 kernel (the certifier's pass)."""
        kernel = self.derived(self.kernel)
        return self.series(x.double(), kernel.double(), self.bias.double(), self.eval_terms)

    def _rho(self, in_shape: tuple[int, ...]) -> float:
        """rho >= ||conv_A|| for the evaluation kernel (once per weights and input shape)."""
        return self.derived(lambda: self._rho_bound(in_shape), name=f"rho{tuple(in_shape)}")

    def _rho_bound(self, in_shape: tuple[int, ...]) -> float:
        """Schur's test, tightened by the circular-convolution norm (FFT) only where its Taylor
        remainder exceeds 1e-9 (an eigendecomposition per frequency of c x c matrices, c up to 2048
        in LipConv nets)."""
        kernel = self.derived(self.kernel)
        rho = schur_bound(kernel)
        if taylor_remainder(rho, self.eval_terms) > 1e-9:
            s, p = self.stride, self.kernel_size // 2
            shape = (self.channels, in_shape[1] // s, in_shape[2] // s)
            rho = min(rho, conv_norm_bound(kernel, shape, (1, 1), (p, p), method="fft"))
        return rho

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        """||sum_{i<=T} A^i/i!|| for the skew A of the evaluation forward, with rho >= ||conv_A||:
        exp(A) is orthogonal, so the norm is at most 1 + sum_{i>T} rho^i/i! (and never more than
        sum_{i<=T} rho^i/i!)."""
        t, rho = self.eval_terms, self._rho(in_shape)
        series = sum(rho**i / math.factorial(i) for i in range(t + 1))
        return min(series, 1.0 + taylor_remainder(rho, t)) * (1 + ROUNDING_SLACK)

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """The series as ``series`` computes it, term by term. With rho >= ||K||, A >= || |K| || and
        g = gamma_n (n = c k^2, the conv's fan-in), or for the first ``BLOCKED_TERMS`` convolutions, summed
        in G blocks, g = gamma_(n/G + G - 1) (each block's inner products are off by gamma_(n/G)
        |K_g||x_g| (Higham 2002, eq. 3.5, any order), the G partial results added in order by
        gamma_(G-1) of their absolute sum, and (1 + gamma_a)(1 + gamma_b) <= 1 + gamma_(a+b)), per unit
        of ||x||: the computed conv of the
        computed term t'_{i-1} (norm <= tau_{i-1}) is off by g A tau_{i-1} and has norm
        <= c_i = (rho + g A) tau_{i-1}; dividing by i adds v c_i / i, v = (1 + u)^2 - 1 (CUDA divides
        by a Python scalar as a product with the rounded fl(1/i): two roundings); the error d_i of
        term i obeys d_i <= (rho d_{i-1} + g A tau_{i-1} + v c_i) / i and tau_i = (1 + v) c_i / i.
        Each partial sum z_i = z_{i-1} + t_i adds u (zeta_{i-1} + tau_i), zeta_i = (1 + u)(zeta_{i-1}
        + tau_i) bounding its norm; the bias adds u (||z|| + ||b|| sqrt(P))."""
        u, kernel = unit(dtype), self.derived(self.kernel)
        v = (1 + u) ** 2 - 1
        n = kernel[0].numel()
        a, rho = abs_operator_norm(kernel), self._rho(in_shape)
        blocked, plain = gamma(n // self.groups + self.groups - 1, dtype), gamma(n, dtype)
        tau, d, zeta, err = 1.0, 0.0, 1.0, 0.0
        for i in range(1, self.eval_terms + 1):
            g = blocked if i <= BLOCKED_TERMS else plain
            c = (rho + g * a) * tau
            d = (rho * d + g * a * tau + v * c) / i
            tau = (1 + v) * c / i
            err += d + u * (zeta + tau)
            zeta = (1 + u) * (zeta + tau)
        positions = (in_shape[1] // self.stride) * (in_shape[2] // self.stride)
        bias = self.bias.detach().double().norm().item() * math.sqrt(positions)
        scale = max(1.0, kernel.abs().max().item())
        tiny = underflow((2 * n + 3) * self.eval_terms + 1, self.channels * positions, dtype, scale)
        return Rounding(err + u * zeta, u * bias + tiny)
