"""SDP-based Lipschitz layers (Araujo, Havens, Delattre, Allauzen, Hu, "A unified algebraic
perspective on Lipschitz neural networks", ICLR 2023, arXiv 2303.03169).

    z = x - 2 W^T T^{-1} ReLU(W x + b),   T = diag(t),   t_i = sum_j |W W^T|_ij q_j / q_i,

with weights q = |q_param| (SLL's code; a unit with q_i = 0 gets t_i = inf, 1/t_i = 0: dead).
Since T - W W^T is (weighted-Gershgorin) diagonally dominant, it is positive semidefinite and the
layer is 1-Lipschitz: with M = T^{-1/2} W its Jacobian is I - 2 M^T D M (D diagonal in [0, 1])
and ||M|| <= 1. t^{-1} is a *safe* inverse (0 where t = 0 or inf, a dead unit), the fixed form of
the paper's v2 (Appendix D). ``upper_bound`` still bounds each layer by max(1, 2 ||M||_ub^2 - 1)
from the weights rather than trusting the theorem through float rounding; the evaluation
forward's 1/t is derived once per weights in float32 and cached, so the forward, the bound and the
certifier's float64 pass use the same values.

Conv form: W is a 3x3 "same" convolution (inner channels x channels) and W W^T is the
convolution of the kernel with itself over all (2k-1)^2 offsets; the absolute values are summed
over offsets and channels, weighted q_j / q_i as in the paper and in SLL's code. Initialisation as
SLL's code: q_param ~ N(0, 1) for the conv layer, U(0, 1) for the dense one. SLL's dense layer
divides by q_i + 1e-6 rather than q_i; here q_i itself, so that the theorem's t holds exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lipschitz.operators import ROUNDING_SLACK, abs_operator_norm, residual_bound
from ..lipschitz.rounding import Rounding, gamma, underflow, unit
from .basic import EvalCache


def safe_inverse(t: torch.Tensor) -> torch.Tensor:
    """1/t where t > 0, else 0 (no inf/NaN for a unit whose weights are all zero)."""
    return torch.where(t > 0, 1.0 / torch.where(t > 0, t, torch.ones_like(t)), torch.zeros_like(t))


class _SLL(EvalCache):
    def _init(self, weight_shape: tuple[int, ...], q: torch.Tensor) -> None:
        inner = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(inner))
        self.q = nn.Parameter(q)
        nn.init.xavier_normal_(self.weight)
        bound = 1 / math.sqrt(math.prod(weight_shape[1:]))
        nn.init.uniform_(self.bias, -bound, bound)

    def gram_abs(self) -> torch.Tensor:
        """|W W^T| summed over spatial offsets: (inner, inner)."""
        raise NotImplementedError

    def inverse_t(self) -> torch.Tensor:
        q = self.q.abs()
        t = (self.gram_abs() * q[None, :] / q[:, None]).sum(1)
        return safe_inverse(t)

    def residual(self, x: torch.Tensor, weight, bias, t_inv) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.weight, self.bias, self.cached(self.inverse_t))

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward in float64, with the same float32 1/t (the certifier's pass)."""
        t_inv = self.derived(self.inverse_t).double()
        return self.residual(x.double(), self.weight.double(), self.bias.double(), t_inv)

    def _products64(self, w: torch.Tensor) -> torch.Tensor:
        """W W^T per spatial offset, (offsets, inner, inner), from one float64 matmul of inner size
        ``w[0].numel()`` (one offset for the dense layer)."""
        raise NotImplementedError

    def _gram_bound(self) -> torch.Tensor:
        """An entrywise upper bound on sum over offsets of |W W^T| in exact arithmetic: each computed
        entry G~ (an inner product of n = w[0].numel() terms, any order) is within gamma_n (|W| |W|^T)
        of exact, and the computed |W| |W|^T (nonnegative terms) is >= (1 - gamma_n) times its exact
        value, so |G| <= |G~| + gamma_n / (1 - gamma_n) fl(|W| |W|^T). |G~| alone is not a bound:
        entries that cancel may be computed far below their exact modulus."""
        w = self.weight.detach().double()
        g = gamma(w[0].numel())
        return (self._products64(w).abs() + g / (1 - g) * self._products64(w.abs())).sum(0)

    def _norm_m(self) -> float:
        """An upper bound on ||M||, M = T^{-1/2} W with the evaluation forward's 1/t: ||M||^2 =
        rho(T^-1 W W^T) <= rho(T^-1 |G|) <= max_i sum_j |G_ij| q_j / (q_i t_i) over the live units
        (Collatz-Wielandt with the weights q, valid for any q > 0, so q's own rounding is harmless;
        a live unit has q_i > 0, since q_i = 0 makes t_i infinite), which is exactly 1
        for the t of the theorem (Araujo et al. 2023) and 1 + rounding for the float32 t the forward
        uses. For the conv layer G sums |K K^T| over all spatial offsets, an upper bound on every row
        of the zero-padded operator's Gram matrix. |G| is bounded entrywise by ``_gram_bound``; the
        rest, nonnegative sums of r + offsets + 4 roundings (r live units), is within gamma of that
        count, divided out; ROUNDING_SLACK covers the division and square root."""
        t_inv = self.derived(self.inverse_t).double()
        live = t_inv > 0  # dead units (t = 0) have zero rows in M
        if not live.any():
            return 0.0
        q = self.q.detach().double().abs()
        gram = self._gram_bound()[live][:, live]
        rows = (gram * q[live][None, :]).sum(1) * t_inv[live] / q[live]
        offsets = math.prod(2 * k - 1 for k in self.weight.shape[2:])  # 1 for the dense layer
        terms = gram.shape[0] + offsets + 4
        norm_sq = rows.max().item() / (1 - gamma(terms)) * (1 + ROUNDING_SLACK)
        return math.sqrt(norm_sq)

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        """max(1, 2 ||M||^2 - 1): the Jacobian is I - 2 M^T D M with D diagonal in [0, 1]."""
        return residual_bound(2.0, self.derived(self._norm_m))

    def _abs_m(self) -> float:
        """An upper bound on || |M| ||, M's rows (output channels) scaled by sqrt(1/t)."""
        t_inv = self.derived(self.inverse_t).double()
        w = self.weight.detach().double()
        return abs_operator_norm(w * t_inv.sqrt().view((-1,) + (1,) * (w.dim() - 1)))

    def _geometry(self, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(fan-in of W x, fan-in of W^T s, output positions of W x)."""
        raise NotImplementedError

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """z = x - 2 W^T s, s = (1/t) * ReLU(W x + b), as the forward computes it, written with
        M = T^{-1/2} W (||M|| <= m, || |M| || <= A_M) so that no 1/t blows up: with
        B_M = ||t^{-1/2} b|| sqrt(P), g = gamma_{n+1}, gT = gamma_{nT}, per sample the pre-activation
        error weighted by t^{-1/2} is e <= g (A_M ||x|| + B_M); ||t^{-1/2} r'|| <= R = m ||x|| + B_M + e;
        W^T (s' - s) = M^T t^{-1/2} (r' - r) + M^T t^{-1/2} r' d (|d| <= u, the product with 1/t) is
        <= m (e + u R); the computed W^T s' is off by gT (1 + u) A_M R; the doubling is exact and the
        subtraction adds u (||x|| + 2 ||v'||), ||v'|| <= (1 + u) R (m + gT A_M)."""
        n_in, n_t, positions = self._geometry(in_shape)
        u, g, g_t = unit(dtype), gamma(n_in + 1, dtype), gamma(n_t, dtype)
        m, a_m = self.derived(self._norm_m), self.derived(self._abs_m)
        t_inv = self.derived(self.inverse_t).double()
        b_m = (t_inv.sqrt() * self.bias.detach().double()).norm().item() * math.sqrt(positions)

        def error(xn: float) -> float:
            e = g * (a_m * xn + b_m)
            r = m * xn + b_m + e
            v = (1 + u) * r * (m + g_t * a_m)
            return 2 * (m * (e + u * r) + g_t * (1 + u) * a_m * r) + u * (xn + 2 * v)

        scale = max(1.0, self.weight.detach().abs().max().item()) * max(1.0, t_inv.max().item())
        outputs = max(math.prod(in_shape), self.weight.shape[0] * positions)
        tiny = underflow(2 * (n_in + n_t) + 6, outputs, dtype, scale)
        return Rounding(error(1.0) - error(0.0), error(0.0) + tiny)


class SLLConv(_SLL):
    """z = x - 2 conv^T(t^{-1} ReLU(conv(x) + b)), for inputs (N, channels, H, W)."""

    def __init__(self, channels: int, inner: int, kernel_size: int = 3):
        super().__init__()
        self.padding = kernel_size // 2
        self._init((inner, channels, kernel_size, kernel_size), torch.randn(inner))

    def gram_abs(self) -> torch.Tensor:
        k = self.weight.shape[-1]
        return F.conv2d(self.weight, self.weight, padding=k - 1).abs().sum((2, 3))

    def _products64(self, w: torch.Tensor) -> torch.Tensor:
        # out[j, i, d] = sum_{c, p} W_i[c, p] W_j[c, p + d]: the padded kernel's k x k patches at every
        # offset d, against each kernel, as one batched matmul of inner size c k k
        k = w.shape[-1]
        patches = F.unfold(F.pad(w, (k - 1,) * 4), k)  # (inner, c k k, (2k - 1)^2)
        return (w.flatten(1) @ patches).permute(2, 1, 0)

    def residual(self, x, weight, bias, t_inv):
        res = t_inv[None, :, None, None] * F.relu(F.conv2d(x, weight, bias, padding=self.padding))
        return x - 2 * F.conv_transpose2d(res, weight, padding=self.padding)

    def _geometry(self, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
        inner, channels, k, _ = self.weight.shape
        return channels * k * k, inner * k * k, math.prod(in_shape[1:])


class SLLLinear(_SLL):
    """z = x - 2 W^T (t^{-1} ReLU(W x + b)), for inputs (N, features)."""

    def __init__(self, features: int, inner: int):
        super().__init__()
        self._init((inner, features), torch.rand(inner))

    def gram_abs(self) -> torch.Tensor:
        return (self.weight @ self.weight.t()).abs()

    def _products64(self, w: torch.Tensor) -> torch.Tensor:
        return (w @ w.t())[None]

    def residual(self, x, weight, bias, t_inv):
        res = t_inv * F.relu(F.linear(x, weight, bias))
        return x - 2 * F.linear(res, weight.t())

    def _geometry(self, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
        inner, features = self.weight.shape
        return features, inner, 1
