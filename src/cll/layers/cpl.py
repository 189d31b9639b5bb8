"""Convex potential layers (Meunier, Delattre, Araujo, Allauzen, "A dynamical system perspective
for Lipschitz neural networks", ICML 2022, arXiv 2110.12690).

    z = x - h * W^T ReLU(W x + b),   h = 2 / (||W||_2^2 + 1e-4)

is the gradient step of a convex potential and 1-Lipschitz whenever h <= 2/||W||^2: its
Jacobian I - h W^T D W (D diagonal in [0, 1]) has eigenvalues in [1 - h||W||^2, 1].

Training takes ||W|| from power iteration on W's true operator at the layer's input size:
``train_iters`` warm-started iterations per step (a persistent iterate, gradient through the
norm). Power iteration approaches ||W|| from below, so that h can be slightly too large, and
over 70 layers "slightly" compounds. The reference evaluates with 100 iterations; here the
evaluation-mode forward uses a *guaranteed upper bound* on ||W|| (``cll.lipschitz``: exact for
dense layers, the circular-convolution bound for conv layers), which makes every layer exactly
1-Lipschitz as evaluated, at the price of a marginally shorter step than training used. It is
computed once per set of weights and cached (the cache is dropped by ``train()``/``eval()`` and
``load_state_dict``). The certifier still bounds each layer by max(1, h ||W||_ub^2 - 1) from its
parameters rather than assuming the construction.

The conv form uses a 3x3 "same" convolution W (inner channels x channels) and its exact adjoint
``conv_transpose2d``; the linear form ``W`` (inner features x features).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .basic import EvalCache

EPSILON = 1e-4  # the reference's h = 2 / (sigma^2 + 1e-4)


class _CPL(EvalCache):
    train_iters = 1

    def _init(self, weight_shape: tuple[int, ...], iterate_shape: tuple[int, ...]) -> None:
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(weight_shape[0]))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # PyTorch's default conv/linear init
        bound = 1 / math.sqrt(math.prod(weight_shape[1:]))
        nn.init.uniform_(self.bias, -bound, bound)
        u = torch.randn(1, *iterate_shape)
        self.register_buffer("u", u / u.norm())

    def operator(self):
        raise NotImplementedError

    def _train_sigma(self) -> torch.Tensor:
        """||W|| estimate after ``train_iters`` warm-started iterations, gradient through the norm."""
        from .. import lipschitz  # late: lipschitz imports this package

        forward, adjoint = self.operator()
        with torch.no_grad():
            self.u = lipschitz.power_iterate(forward, adjoint, self.u, self.train_iters)
        return forward(self.u).norm()

    def norm_bound(self) -> float:
        """A guaranteed upper bound on ||W|| (``cll.lipschitz``)."""
        raise NotImplementedError

    def _eval_sigma(self) -> torch.Tensor:
        """What the evaluation-mode forward divides by: the sound ||W|| bound."""
        return torch.tensor(self.norm_bound(), dtype=self.weight.dtype, device=self.weight.device)

    def step_size(self) -> torch.Tensor:
        """h = 2 / (||W||^2 + 1e-4) as the current mode computes it: training from
        ``train_iters`` warm-started iterations (gradient through the norm), evaluation from the
        sound norm bound, cached."""
        if self.training:
            sigma = self._train_sigma()
        else:
            sigma = self.cached(self._eval_sigma)
        return 2.0 / (sigma**2 + EPSILON)

    @torch.no_grad()
    def eval_step_size(self) -> float:
        """The h of the evaluation-mode forward, in either mode (what the certifier bounds)."""
        return float(2.0 / (self.cached(self._eval_sigma) ** 2 + EPSILON))


class CPLConv(_CPL):
    """z = x - h conv^T(ReLU(conv(x) + b)), for inputs (N, channels, H, W)."""

    def __init__(self, channels: int, inner: int, in_hw: tuple[int, int], kernel_size: int = 3):
        super().__init__()
        self.padding = kernel_size // 2
        self._init((inner, channels, kernel_size, kernel_size), (channels, *in_hw))

    def norm_bound(self) -> float:
        from .. import lipschitz  # late: lipschitz imports this package

        shape = tuple(self.u.shape[1:])
        return lipschitz.conv_norm_bound(self.weight, shape, (1, 1), (self.padding,) * 2, method="fft")

    def operator(self):
        return (
            lambda u: F.conv2d(u, self.weight, padding=self.padding),
            lambda v: F.conv_transpose2d(v, self.weight, padding=self.padding),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        return x - self.step_size() * F.conv_transpose2d(res, self.weight, padding=self.padding)


class CPLLinear(_CPL):
    """z = x - h W^T ReLU(W x + b), for inputs (N, features)."""

    def __init__(self, features: int, inner: int):
        super().__init__()
        self._init((inner, features), (features,))

    def norm_bound(self) -> float:
        from .. import lipschitz

        return lipschitz.spectral_norm_exact(self.weight)

    def operator(self):
        return (lambda u: F.linear(u, self.weight), lambda v: F.linear(v, self.weight.t()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = F.relu(F.linear(x, self.weight, self.bias))
        return x - self.step_size() * F.linear(res, self.weight.t())
