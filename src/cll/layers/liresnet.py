"""LiResNet's layers: the linear residual block (Hu, Zou, Wang, Leino, Fredrikson, "Unlocking
Deterministic Robustness Certification on ImageNet", NeurIPS 2023, arXiv 2301.12549) and the
Cholesky-orthogonalised dense layers of its follow-up (Hu, Leino, Wang, Fredrikson, "Effectively
Leveraging Capacity for Improved Deterministic Robustness Certification", ICLR 2024, arXiv
2310.02513; code github.com/hukkai/liresnet, ``models/blocks.py``, ``models/model.py``).

``LiResBlock``: y = x + conv(x; s gamma V) + b, a 3x3 "same" convolution V (channels x channels),
gamma a per-output-channel gain, s = depth^(-1/2) for a stack of ``depth`` blocks. The identity is
a convolution too (the unit matrix on the centre tap), so the block *is* one convolution with the
kernel K = I_centre + s gamma V: its Lipschitz constant is ||conv_K||, bounded from K itself (the
papers' point: much tighter than 1 + ||conv_V||). The reference evaluates exactly that folded
kernel, and so does this layer. Instead of normalisation, training subtracts the batch mean of
conv(x; s gamma V) per channel and keeps a running mean (momentum 0.1); evaluation subtracts the
running mean from the bias.

``CholeskyLinear`` and its two variants: a matrix X (m x n, m <= n) is orthogonalised as
Q = L^-1 X with L L^T = X X^T + eps I, eps = mean(diag(X X^T)) / 1000 (a constant for autograd, as
the reference treats it): then Q Q^T = I - eps (L^T L)^-1, so ||Q|| < 1 in exact arithmetic.
``CholeskyResidualLinear`` takes X = I + s gamma V (square, gamma per row, s = depth^(-1/2): the
"Cholesky-orthogonalised residual dense" layers), ``CholeskyPatchConv`` uses Q as a p x p
convolution of stride p (disjoint patches: the operator is Q on every patch, so its norm is ||Q||;
the reference's neck). ``DerivedLinear`` and ``DerivedPatchConv`` hold what these share with
BRONet's dense and neck layers (``cll.layers.bro``): a matrix derived from the parameters, used as
an affine map or a patch convolution and bounded by its own norm.

What is certified: each layer's evaluation forward on its *derived* float32 tensors (K with the
bias less the running mean; Q), cached once per weights (``EvalCache``), so the forward, the bound
and the float64 pass use the same ones. The float32 Q is orthogonal only up to the rounding of the
Cholesky factorisation and the triangular solve, so ``upper_bound`` bounds ||Q|| of that matrix
(``spectral_norm_exact``: float64, proved), never "1 by construction". Rounding: each layer is one
affine map (``affine_rounding``: gamma_{n+1} of the fan-in n).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lipschitz.conv import conv_norm_bound
from ..lipschitz.operators import spectral_norm_exact
from ..lipschitz.rounding import Rounding, affine_rounding
from .basic import EvalCache

CENTRING_MOMENTUM = 0.1  # the reference's running-mean update
CHOLESKY_SHIFT = 1e-3  # eps = CHOLESKY_SHIFT * mean(diag(X X^T))


def cholesky_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """Q = L^-1 X, L L^T = X X^T + eps I (eps = 1e-3 mean(diag(X X^T)), detached), for X (..., m, n):
    Q Q^T = I - eps (L^T L)^-1 exactly, so ||Q|| < 1; for m <= n the rows are nearly orthonormal
    (m > n, which the reference builds at small widths, still factors: the shift keeps the Gram
    matrix positive definite). Differentiable; the reference's own backward gives the same gradient."""
    gram = x @ x.mT
    shift = gram.diagonal(dim1=-2, dim2=-1).mean(-1).detach() * CHOLESKY_SHIFT
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    chol = torch.linalg.cholesky(gram + shift[..., None, None] * eye)
    return torch.linalg.solve_triangular(chol, x, upper=False)


class LiResBlock(EvalCache):
    """x + conv(x; s gamma V) + b on (N, channels, H, W), evaluated as one 3x3 "same" convolution."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        self.channels, self.scale = channels, depth**-0.5
        # the reference's initialisation: V ~ N(0, 1) / (9 channels), gamma 1, b 0
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) / (9 * channels))
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        # the geometry power iteration follows (``power_operator``): a meta-device conv, shapes only, no submodule
        self._geometry = (nn.Conv2d(channels, channels, 3, padding=1, bias=False, device="meta"),)

    def residual_kernel(self) -> torch.Tensor:
        return self.weight * self.gamma * self.scale

    def kernel(self) -> torch.Tensor:
        """K = s gamma V with 1 added to the centre tap of each channel's own filter."""
        k = self.residual_kernel()
        centre = torch.zeros_like(k)
        centre[:, :, 1, 1] = torch.eye(self.channels, dtype=k.dtype, device=k.device)
        return centre + k

    def _derived(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, b - running mean): the evaluation forward's kernel and bias, in the weights' precision."""
        return self.kernel(), self.bias - self.running_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            kernel, bias = self.derived(self._derived)
            return F.conv2d(x, kernel, bias, padding=1)
        out = F.conv2d(x, self.residual_kernel(), padding=1)
        mean = out.mean((0, 2, 3))
        with torch.no_grad():  # centring in place of a normalisation: the batch mean, and its average
            self.running_mean.add_((mean - self.running_mean) * CENTRING_MOMENTUM)
        return x + out + (self.bias - mean)[:, None, None]

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward in float64 on the same float32 K and bias (the certifier's pass)."""
        kernel, bias = self.derived(self._derived)
        return F.conv2d(x.double(), kernel.double(), bias.double(), padding=1)

    def power_operator(self) -> tuple[nn.Conv2d, torch.Tensor]:
        """(the geometry, the kernel) power iteration follows: K, with its gradient in training."""
        return self._geometry[0], self.cached(self.kernel)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        """||conv_K|| of the zero-padded convolution at in_shape: exact from the explicit matrix where
        it is small, else the circular-convolution bound on the padded canvas (``conv_norm_bound``)."""
        return self.derived(lambda: self._bound(in_shape), name=f"bound{tuple(in_shape)}")

    def _bound(self, in_shape: tuple[int, ...]) -> float:
        return conv_norm_bound(self.derived(self._derived)[0], tuple(in_shape), (1, 1), (1, 1))

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """One convolution with bias: gamma_{9c+1} (|| |K| || ||x|| + ||b|| sqrt(H W))."""
        kernel, bias = self.derived(self._derived)
        return affine_rounding(kernel, bias, math.prod(in_shape[1:]), dtype)


class DerivedMatrix(EvalCache):
    """A layer whose weight is a matrix Q = ``matrix()`` derived from its free parameters by an
    orthogonalisation (Cholesky here, BRO in ``cll.layers.bro``), bounded by the norm of the float32
    Q it uses, never by "orthogonal by construction"."""

    def matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_used(self) -> torch.Tensor:
        """Q: with gradient in training, derived once per weights in evaluation."""
        return self.cached(self.matrix)

    def norm_bound(self) -> float:
        """||Q|| of the float32 Q the forward uses (proved in float64): 1 up to its rounding."""
        return self.derived(lambda: spectral_norm_exact(self.derived(self.matrix)), name="bound")


class DerivedLinear(DerivedMatrix):
    """Q h + b, (N, in_features) -> (N, out_features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_used(), self.bias)

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.double(), self.derived(self.matrix).double(), self.bias.double())

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        return self.norm_bound()

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        return affine_rounding(self.derived(self.matrix), self.bias, 1, dtype)


class DerivedPatchConv(DerivedMatrix):
    """(N, in_channels, H, W) -> (N, out_channels, H/p, W/p): a p x p convolution of stride p, no
    padding, no bias, whose (out, in p p) matrix is Q."""

    def __init__(self, in_channels: int, out_channels: int, patch: int):
        super().__init__()
        self.in_channels, self.out_channels, self.patch = in_channels, out_channels, patch

    def _kernel(self, q: torch.Tensor) -> torch.Tensor:
        return q.reshape(self.out_channels, self.in_channels, self.patch, self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._kernel(self.weight_used()), stride=self.patch)

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.double(), self._kernel(self.derived(self.matrix)).double(), stride=self.patch)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        """||Q||: every output position reads its own p x p patch (stride p, no padding), so the
        operator is Q on each patch, a direct sum (rows and columns past the last whole patch are
        never read: a restriction, norm <= 1)."""
        return self.norm_bound()

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        positions = (in_shape[1] // self.patch) * (in_shape[2] // self.patch)
        return affine_rounding(self._kernel(self.derived(self.matrix)), None, positions, dtype)


class CholeskyLinear(DerivedLinear):
    """Q h + b, (N, in_features) -> (N, out_features), Q = ``cholesky_orthogonal(X)`` from a free
    X ~ N(0, 1/in_features)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def free(self) -> torch.Tensor:
        return self.weight

    def matrix(self) -> torch.Tensor:
        return cholesky_orthogonal(self.free())


class CholeskyResidualLinear(CholeskyLinear):
    """CholeskyLinear on features -> features with X = I + s gamma V (V ~ N(0, 1) / features, gamma 1
    per row, s = depth^(-1/2)): LiResNet's "Cholesky-orthogonalised residual dense" layer."""

    def __init__(self, features: int, depth: int):
        super().__init__(features, features)
        self.scale = depth**-0.5
        with torch.no_grad():
            self.weight.copy_(torch.randn(features, features) / features)
        self.gamma = nn.Parameter(torch.ones(features, 1))

    def free(self) -> torch.Tensor:
        eye = torch.eye(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        return eye + self.weight * self.gamma * self.scale


class CholeskyPatchConv(DerivedPatchConv):
    """The neck's patch convolution with Q = ``cholesky_orthogonal(X)``, X ~ N(0, 1/(in p p))."""

    def __init__(self, in_channels: int, out_channels: int, patch: int):
        super().__init__(in_channels, out_channels, patch)
        fan_in = in_channels * patch * patch
        self.weight = nn.Parameter(torch.randn(out_channels, fan_in) / fan_in**0.5)

    def matrix(self) -> torch.Tensor:
        return cholesky_orthogonal(self.weight)
