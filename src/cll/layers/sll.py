"""SDP-based Lipschitz layers (Araujo, Havens, Delattre, Allauzen, Hu, "A unified algebraic
perspective on Lipschitz neural networks", ICLR 2023, arXiv 2303.03169).

    z = x - 2 W^T T^{-1} ReLU(W x + b),   T = diag(t),   t_i = sum_j |W W^T|_ij q_j / q_i,

with q = exp(q_param) > 0. Since T - W W^T is (weighted-Gershgorin) diagonally dominant, it is
positive semidefinite and the layer is 1-Lipschitz: with M = T^{-1/2} W its Jacobian is
I - 2 M^T D M (D diagonal in [0, 1]) and ||M|| <= 1. t^{-1} is a *safe* inverse (0 where t = 0, a
dead unit), the fixed form of the paper's v2 (Appendix D). The certifier still bounds each layer
by max(1, 2 ||M||_ub^2 - 1) from the weights (``cll.lipschitz``) rather than trusting the theorem
through float rounding.

Conv form: W is a 3x3 "same" convolution (inner channels x channels) and W W^T is the
convolution of the kernel with itself over all (2k-1)^2 offsets; the absolute values are summed
over offsets and channels. Unlike the reference's conv layer, whose q weights cancel (q_i / q_i),
q_j / q_i weights here as in the paper; both are 1-Lipschitz.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def safe_inverse(t: torch.Tensor) -> torch.Tensor:
    """1/t where t > 0, else 0 (no inf/NaN for a unit whose weights are all zero)."""
    return torch.where(t > 0, 1.0 / torch.where(t > 0, t, torch.ones_like(t)), torch.zeros_like(t))


class _SLL(nn.Module):
    def _init(self, weight_shape: tuple[int, ...]) -> None:
        inner = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(inner))
        self.q = nn.Parameter(torch.randn(inner))
        nn.init.xavier_normal_(self.weight)
        bound = 1 / math.sqrt(math.prod(weight_shape[1:]))
        nn.init.uniform_(self.bias, -bound, bound)

    def gram_abs(self) -> torch.Tensor:
        """|W W^T| summed over spatial offsets: (inner, inner)."""
        raise NotImplementedError

    def inverse_t(self) -> torch.Tensor:
        q = torch.exp(self.q)
        t = (self.gram_abs() * q[None, :] / q[:, None]).sum(1)
        return safe_inverse(t)


class SLLConv(_SLL):
    """z = x - 2 conv^T(t^{-1} ReLU(conv(x) + b)), for inputs (N, channels, H, W)."""

    def __init__(self, channels: int, inner: int, kernel_size: int = 3):
        super().__init__()
        self.padding = kernel_size // 2
        self._init((inner, channels, kernel_size, kernel_size))

    def gram_abs(self) -> torch.Tensor:
        k = self.weight.shape[-1]
        return F.conv2d(self.weight, self.weight, padding=k - 1).abs().sum((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_inv = self.inverse_t()[None, :, None, None]
        res = t_inv * F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        return x - 2 * F.conv_transpose2d(res, self.weight, padding=self.padding)


class SLLLinear(_SLL):
    """z = x - 2 W^T (t^{-1} ReLU(W x + b)), for inputs (N, features)."""

    def __init__(self, features: int, inner: int):
        super().__init__()
        self._init((inner, features))

    def gram_abs(self) -> torch.Tensor:
        return (self.weight @ self.weight.t()).abs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.inverse_t() * F.relu(F.linear(x, self.weight, self.bias))
        return x - 2 * F.linear(res, self.weight.t())
