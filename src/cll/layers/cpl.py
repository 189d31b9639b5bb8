"""Convex potential layers (Meunier, Delattre, Araujo, Allauzen, "A dynamical system perspective
for Lipschitz neural networks", ICML 2022, arXiv 2110.12690).

    z = x - h * W^T ReLU(W x + b),   h = 2 / (||W||_2^2 + 1e-4)

is the gradient step of a convex potential and 1-Lipschitz whenever h <= 2/||W||^2: its
Jacobian I - h W^T D W (D diagonal in [0, 1]) has eigenvalues in [1 - h||W||^2, 1].

Training takes ||W|| from power iteration on W's true operator at the layer's input size:
``train_iters`` warm-started iterations per step (a persistent iterate), the estimate and its
gradient formed as CPL's code forms them (``_train_sigma``). Power iteration approaches ||W||
from below, so that h can be slightly too large, and over 70 layers "slightly" compounds. The
reference evaluates with 100 iterations; here the evaluation-mode forward uses a *guaranteed
upper bound* on ||W|| (exact for dense layers, the circular-convolution bound for conv layers,
``cll.lipschitz.conv``), which makes every layer 1-Lipschitz as evaluated, at the price of a
marginally shorter step than training used. The step h is derived once per set of weights, in
float32 as the forward uses it, and cached (see ``EvalCache``). ``upper_bound`` still bounds each
layer by max(1, h ||W||_ub^2 - 1) from its parameters rather than assuming the construction, and
``rounding`` bounds its float error.

The conv form uses a 3x3 "same" convolution W (inner channels x channels) and its exact adjoint
``conv_transpose2d``; the linear form ``W`` (inner features x features).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lipschitz.conv import conv_norm_bound
from ..lipschitz.operators import abs_operator_norm, residual_bound, spectral_norm_exact
from ..lipschitz.rounding import Rounding, gamma, underflow, unit
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
        """||W|| estimate <W u_1, v_0> as CPL's code computes it (``SpectralNormPowerMethod``): per
        warm-started iteration v = W u / ||W u|| (with gradient), then u <- W^T v / ||W^T v||
        (without); the estimate pairs the last v with W applied to the new u, gradient through both."""
        forward, adjoint = self.operator()
        u = self.u
        for _ in range(self.train_iters):
            v = forward(u)
            v = v / (v.norm() + 1e-12)
            with torch.no_grad():
                u = adjoint(v)
                u = u / (u.norm() + 1e-12)
        self.u = u
        return (forward(u) * v).sum()

    def norm_bound(self) -> float:
        """A guaranteed upper bound on ||W||."""
        raise NotImplementedError

    def _derive(self) -> tuple[float, torch.Tensor]:
        """(||W||_ub, the h of the evaluation forward: 2 / (||W||_ub^2 + 1e-4) in the weight's precision)."""
        norm = self.norm_bound()
        sigma = torch.tensor(norm, dtype=self.weight.dtype, device=self.weight.device)
        return norm, 2.0 / (sigma**2 + EPSILON)

    def step_size(self) -> torch.Tensor:
        """h = 2 / (||W||^2 + 1e-4) as the current mode computes it: training from
        ``train_iters`` warm-started iterations (gradient through the norm), evaluation from the
        sound norm bound (derived once per weights)."""
        if self.training:
            return 2.0 / (self._train_sigma() ** 2 + EPSILON)
        return self.derived(self._derive)[1]

    def residual(self, x: torch.Tensor, weight, bias, step) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.weight, self.bias, self.step_size())

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward in float64, with the same float32 step h (the certifier's pass)."""
        step = self.derived(self._derive)[1].double()
        return self.residual(x.double(), self.weight.double(), self.bias.double(), step)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        """max(1, h ||W||_ub^2 - 1) with the h of the evaluation forward (computed from the layer's
        own sound norm bound, so this is 1 up to rounding)."""
        if tuple(in_shape) != tuple(self.u.shape[1:]):
            raise ValueError(f"CPL layer built for inputs {tuple(self.u.shape[1:])} sees {tuple(in_shape)}")
        norm, step = self.derived(self._derive)
        return residual_bound(float(step), norm)

    def _geometry(self) -> tuple[int, int, int]:
        """(fan-in of W x, fan-in of W^T r, output positions)."""
        raise NotImplementedError

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """z = x - h W^T r, r = ReLU(W x + b), as the forward computes it. With rho >= ||W||,
        A >= || |W| || (also || |W^T| ||), B = ||b|| sqrt(P), g = gamma_{n+1} and gT = gamma_{nT}
        (the fan-ins of W and W^T), per sample: the pre-activation is off by
        e_y <= g (A ||x|| + B); ReLU passes that on (1-Lipschitz) and ||r'|| <= Y =
        (rho + g A) ||x|| + (1 + g) B; the computed W^T r' is off by gT A Y and has norm
        <= V = (rho + gT A) Y; the product with h adds u h V; the subtraction u (||x|| + (1 + u) h V).
        The exact layer at the same x differs through r' - r by h rho e_y. All affine in ||x||."""
        n_in, n_t, positions = self._geometry()
        u, g_in, g_t = unit(dtype), gamma(n_in + 1, dtype), gamma(n_t, dtype)
        rho, step = self.derived(self._derive)
        a, h = abs_operator_norm(self.weight), float(step)
        b = self.bias.detach().double().norm().item() * math.sqrt(positions)

        def error(xn: float) -> float:
            e_y = g_in * (a * xn + b)
            y = (rho + g_in * a) * xn + (1 + g_in) * b
            v = (rho + g_t * a) * y
            return h * rho * e_y + h * g_t * a * y + u * h * v + u * (xn + (1 + u) * h * v)

        outputs = math.prod(in_shape)
        scale = max(1.0, self.weight.detach().abs().max().item())
        tiny = underflow(2 * (n_in + n_t) + 6, max(outputs, self.weight.shape[0] * positions), dtype, scale * h)
        return Rounding(error(1.0) - error(0.0), error(0.0) + tiny)


class CPLConv(_CPL):
    """z = x - h conv^T(ReLU(conv(x) + b)), for inputs (N, channels, H, W)."""

    def __init__(self, channels: int, inner: int, in_hw: tuple[int, int], kernel_size: int = 3):
        super().__init__()
        self.padding = kernel_size // 2
        self._init((inner, channels, kernel_size, kernel_size), (channels, *in_hw))

    def norm_bound(self) -> float:
        shape = tuple(self.u.shape[1:])
        return conv_norm_bound(self.weight, shape, (1, 1), (self.padding,) * 2, method="fft")

    def operator(self):
        return (
            lambda u: F.conv2d(u, self.weight, padding=self.padding),
            lambda v: F.conv_transpose2d(v, self.weight, padding=self.padding),
        )

    def residual(self, x, weight, bias, step):
        res = F.relu(F.conv2d(x, weight, bias, padding=self.padding))
        return x - step * F.conv_transpose2d(res, weight, padding=self.padding)

    def _geometry(self) -> tuple[int, int, int]:
        inner, channels, k, _ = self.weight.shape
        return channels * k * k, inner * k * k, math.prod(self.u.shape[2:])


class CPLLinear(_CPL):
    """z = x - h W^T ReLU(W x + b), for inputs (N, features)."""

    def __init__(self, features: int, inner: int):
        super().__init__()
        self._init((inner, features), (features,))

    def norm_bound(self) -> float:
        return spectral_norm_exact(self.weight)

    def operator(self):
        return (lambda u: F.linear(u, self.weight), lambda v: F.linear(v, self.weight.t()))

    def residual(self, x, weight, bias, step):
        res = F.relu(F.linear(x, weight, bias))
        return x - step * F.linear(res, weight.t())

    def _geometry(self) -> tuple[int, int, int]:
        inner, features = self.weight.shape
        return features, inner, 1
