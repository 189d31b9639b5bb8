"""BRO, the block reflector orthogonal layers of BRONet (Lai, Huang, Kung, Chen, "Enhancing Certified
Robustness via Block Reflector Orthogonal Layers and Logit Annealing Loss", ICML 2025, arXiv
2505.15174; code github.com/ntuaislab/BRONet, ``bronet/models/backbone.py::LiResConvOrtho`` with
mode "bro", ``dense.py::LiBroMLP``, ``neck.py::Map2Vec.get_bro_weight``).

The block reflector of a tall V (m x k, k < m): W = I - 2 V (V^H V + eps I)^-1 V^H, with the
reference's shift eps = c mean(diag(V^H V)) (c = 1e-7 in the conv and dense layers, with autograd;
1e-5, detached, in the neck). For eps = 0 it reflects the column space of V (W = W^H, W^2 = I); for
eps > 0 it is still Hermitian, with eigenvalue 1 on the complement of that space and
1 - 2 s^2 / (s^2 + eps) in (-1, 1] for each singular value s of V, so ||W|| = 1 in exact arithmetic.
W depends on V only through its column space (and eps relative to V's scale): V and V D give the
same W for any invertible D.

``BROConv`` (the backbone's layer; the reference's ``frequency_convolution``): for x (N, c, H, H),
zero-pad one pixel on each side (an n x n canvas, n = H + 2), take the DFT, multiply the channel
vector at each frequency f by the c x c matrix W_f, invert, crop the H x H centre, add the bias.
W_f is the block reflector of V_f, the DFT at f of the 3 x 3 kernel V = I_centre + s gamma X
(c x k, k = the rank; the k x k identity on the centre tap, s = depth^(-1/2), gamma per output
channel) zero-filled to n x n with tap (a, b) at offset (a, b): V_f = sum_ab V_ab e^(-2 pi i (f1 a
+ f2 b) / n). (The reference scales both by 1/n, "ortho", and offers a shift that multiplies V_f by
a phase; neither changes W_f.) Since V is real, V_{-f} = conj(V_f) and W_{-f} = conj(W_f): the map is
a real circular convolution of the canvas with the kernel whose DFT is W (dense, not 3 x 3), unitary
on the canvas, between the padding (an isometry) and the crop (norm <= 1). Like LiResNet's block it
trains with the batch mean of its output subtracted (running mean, momentum 0.1).

What is certified: each layer's evaluation forward on its *derived* float32 tensors (the complex64
W_f, made exactly conjugate-symmetric on rfft2's self-conjugate columns by ``hermitian_columns``; the
bias less the running mean), cached once per weights (``EvalCache``), so the forward, the bound and
the float64 pass use the same ones. Computed in float32 the W_f are orthogonal only up to the
rounding of the solve (whose Gram matrix may be ill-conditioned: eps is only 1e-7 relative), so
``upper_bound`` is max_f ||W_f|| of those matrices, proved in float64 (``max_top_eigenvalue``), never
"1 by construction". Rounding: the forward runs no FFT library (``torch.fft`` has no proved error
bound) but real matrix products with the canvas's cos/sin DFT matrices from correctly rounded roots
of unity (``real_rdft2``, ``real_conv``, ``real_irdft2_crop``), whose float32 rounding is proved from
Higham's gamma_n (``rigorous=True``), so the certifier's float32 pass certifies by itself; the
float64 pass (``forward64``) runs ``cll.lipschitz.fft.dft2`` on the whole canvas, whose error is
proved too. Training runs the same products (on W_f made afresh, with autograd): on this small
canvas they are faster on the CPU than the reference's torch.fft rfft2/irfft2, which compute the same
function (bench/README, vs_hosts "(d)"), and the function trained is the one certified.

The dense BRO layers are matrices like LiResNet's Cholesky layers (``DerivedLinear``,
``DerivedPatchConv``): ``BROResidualLinear`` (``LiBroMLP``) with V = I_{:, :k} + s gamma X, and the
neck's ``BROLinear`` and ``BROPatchConv``, whose matrix is the first ``out`` rows of the reflector of a
free X (in x out): a row block of an orthogonal matrix. Only those rows are formed (the reference
forms the whole in x in reflector and slices it: the same rows in exact arithmetic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lipschitz.conv import max_top_eigenvalue
from ..lipschitz.fft import (
    ROOT_ULPS,
    dft2,
    dft2_error,
    full_spectrum,
    hermitian_columns,
    real_irdft2_crop,
    real_rdft2,
)
from ..lipschitz.operators import ROUNDING_SLACK, frobenius_sq_bound
from ..lipschitz.rounding import Rounding, gamma, underflow, unit
from .basic import EvalCache, one_cpu_thread
from .liresnet import CENTRING_MOMENTUM, DerivedLinear, DerivedPatchConv

BRO_SHIFT = 1e-7  # eps = BRO_SHIFT mean(diag(V^H V)): the conv and dense layers (with autograd)
NECK_SHIFT = 1e-5  # the neck's, detached (the reference takes it with .item())
SPECTRUM_CHUNK = 2**24  # complex entries of W per float64 step (256 MB in complex128)


def bro_rank(width: int, ratio: float) -> int:
    """The reference's rank of V for a layer of ``width`` and a rank ratio: width * ratio rounded
    down, width - 1 for ratio 1 and 1 for ratio 0."""
    rank = width - 1 if ratio == 1.0 else 1 if ratio == 0.0 else int(width * ratio)
    if not 0 < rank < width:
        raise ValueError(f"BRO needs a rank in [1, width - 1], got {rank} for width {width}, ratio {ratio}")
    return rank


def block_reflector(v: torch.Tensor, shift: float, rows: int | None = None, detach_shift: bool = False) -> torch.Tensor:
    """I - 2 V (V^H V + eps I)^-1 V^H for V (..., m, k), k < m, real or complex, eps = ``shift`` times
    the mean of diag(V^H V) per matrix (a constant for autograd where ``detach_shift``); only its first
    ``rows`` rows where given: (..., rows, m)."""
    m, k = v.shape[-2:]
    if k >= m:
        raise ValueError(f"a block reflector needs a tall V (rows > columns), got {m} x {k}")
    vh = v.mH
    gram = vh @ v
    eps = gram.diagonal(dim1=-2, dim2=-1).real.mean(-1) * shift
    eps = eps.detach() if detach_shift else eps
    eye_k = torch.eye(k, dtype=v.dtype, device=v.device)
    with one_cpu_thread(v.device):
        solved = torch.linalg.solve(gram + eps[..., None, None] * eye_k, vh)  # (V^H V + eps I)^-1 V^H
    top = v if rows is None else v[..., :rows, :]
    return torch.eye(top.shape[-2], m, dtype=v.dtype, device=v.device) - 2 * top @ solved


class BROConv(EvalCache):
    """BRO convolution with bias on (N, channels, H, H) (square inputs, any H), per frequency of the
    zero-padded (H + 2) x (H + 2) canvas; V of rank ``rank`` < channels."""

    def __init__(self, channels: int, rank: int, depth: int):
        super().__init__()
        if not 0 < rank < channels:
            raise ValueError(f"BROConv needs 0 < rank < channels, got rank {rank}, channels {channels}")
        self.channels, self.rank, self.scale = channels, rank, depth**-0.5
        # the reference's initialisation: X ~ N(0, 1) / (9 channels), gamma 1, b 0
        self.weight = nn.Parameter(torch.randn(channels, rank, 3, 3) / (9 * channels))
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))

    def kernel(self) -> torch.Tensor:
        """V = s gamma X with the k x k identity added on the centre tap: (channels, rank, 3, 3)."""
        v = self.weight * self.gamma * self.scale
        centre = torch.zeros_like(v)
        centre[: self.rank, :, 1, 1] = torch.eye(self.rank, dtype=v.dtype, device=v.device)
        return centre + v

    def spectrum(self, n: int) -> torch.Tensor:
        """W_f at rfft2's frequencies of the n x n canvas: (n, n//2+1, channels, channels), complex."""
        v = torch.fft.rfft2(self.kernel(), s=(n, n), norm="ortho").permute(2, 3, 0, 1)
        return hermitian_columns(block_reflector(v, BRO_SHIFT))

    def _derived(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b - running mean): the evaluation forward's spectrum and bias, in the weights' precision."""
        return self.spectrum(n), self.bias - self.running_mean

    def evaluated(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_derived(n)`` once per weights and canvas: what the forward, the bound and forward64 share."""
        return self.derived(lambda: self._derived(n), name=f"derived{n}")

    @staticmethod
    def canvas(in_shape: tuple[int, ...]) -> int:
        if len(in_shape) != 3 or in_shape[1] != in_shape[2]:
            raise ValueError(f"BROConv takes square inputs (channels, H, H), got {tuple(in_shape)}")
        return in_shape[1] + 2

    @staticmethod
    def real_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """crop(irfft2(W_f rfft2(pad(x)))) in unitary units, without the bias, in matrix products
        (``rounding``): the half spectrum [Re; Im] of the padded canvas by two real products
        (``real_rdft2``), W_f X_f at each frequency (one batched complex product of (N, c) by the
        (c, c) W_f^T over the n (n//2 + 1) frequencies: conventional complex arithmetic, each real
        output a sum of 2c real products, as a real 2c x 2c product would be), the inverse at the
        interior by two real products (``real_irdft2_crop``), / n^2. W stays complex: half the memory
        of its real 2c x 2c form, which at width 512 is 0.75 GB a layer."""
        b, c, n = x.shape[0], x.shape[1], x.shape[-1] + 2
        m = n // 2 + 1
        spectrum = real_rdft2(x).view(b, c, 2, n, m).permute(3, 4, 0, 2, 1)  # (j, col, sample, part, channel)
        real = w.real.dtype  # under bf16 autocast (amp) the DFT products come out in bf16, W in complex64
        spectrum = torch.complex(spectrum[..., 0, :].to(real), spectrum[..., 1, :].to(real)).reshape(n * m, b, c)
        product = torch.bmm(spectrum, w.reshape(n * m, c, c).mT)  # (frequency, sample, channel)
        product = torch.view_as_real(product).view(n, m, b, c, 2).permute(2, 3, 4, 0, 1).reshape(b, c, 2 * n, m)
        return real_irdft2_crop(product) / (n * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.canvas(tuple(x.shape[1:]))
        if not self.training:
            w, bias = self.evaluated(n)
            return self.real_conv(x, w.to(torch.promote_types(x.dtype, w.dtype))) + bias[:, None, None]
        # training runs the evaluation's products (faster here than torch.fft on this small canvas,
        # and what is trained is what is certified) on W_f made afresh, with autograd
        out = self.real_conv(x, self.spectrum(n))
        mean = out.mean((0, 2, 3))
        with torch.no_grad():  # centring in place of a normalisation: the batch mean, and its average
            self.running_mean.add_((mean - self.running_mean) * CENTRING_MOMENTUM)
        return out + (self.bias - mean)[:, None, None]

    def forward64(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward in float64 on the same W_f and bias: ``dft2`` (proved) on all n x n
        frequencies, W extended to them by conjugation, a few frequency rows at a time."""
        w, bias = self.evaluated(self.canvas(tuple(x.shape[1:])))
        x = F.pad(x.double(), (1, 1, 1, 1))
        n = x.shape[-1]
        spectrum = dft2(x.to(torch.complex128))
        product = torch.empty_like(spectrum)
        rows = torch.arange(n, device=x.device)
        for chunk in rows.split(max(1, SPECTRUM_CHUNK // (n * self.channels**2))):
            w_rows = full_spectrum(w, n, chunk).to(torch.complex128)
            product[:, :, chunk] = torch.einsum("hwoi,bihw->bohw", w_rows, spectrum[:, :, chunk])
        z = dft2(product, inverse=True).real / (n * n)
        return z[..., 1:-1, 1:-1] + bias.double()[:, None, None]

    def upper_bound(self, in_shape: tuple[int, ...]) -> float:
        """max_f ||W_f|| over the canvas's frequencies (the others are conjugates: the same norms),
        proved in float64 from the W_f the forward uses: the map is crop o F^-1 diag(W_f) F o pad with
        F unitary, the padding an isometry and the crop a restriction."""
        n = self.canvas(in_shape)
        return self.derived(lambda: self._bound(n), name=f"bound{n}")

    def _frequency_matrices(self, n: int):
        """The W_f of ``evaluated(n)`` in complex128 batches of at most SPECTRUM_CHUNK entries."""
        w = self.evaluated(n)[0].reshape(-1, self.channels, self.channels)
        return (part.to(torch.complex128) for part in w.split(max(1, SPECTRUM_CHUNK // self.channels**2)))

    def _bound(self, n: int) -> float:
        top = max(max_top_eigenvalue(part) for part in self._frequency_matrices(n))
        return math.sqrt(top) * (1 + ROUNDING_SLACK)

    def _frobenius(self, n: int) -> float:
        """max_f ||W_f||_F (>= || |W_f| ||), proved in float64."""
        top = max(frobenius_sq_bound(part).max().item() for part in self._frequency_matrices(n))
        return math.sqrt(top) * (1 + ROUNDING_SLACK)

    def rounding(self, in_shape: tuple[int, ...], dtype: torch.dtype) -> Rounding:
        """float64: ``forward64``'s steps in unitary units (an unnormalised DFT scales l2 norms by n,
        which cancels): each transform off by at most e relative (``dft2_error``, proved), each
        per-frequency product by sqrt2 gamma_{c+2} ||W_f||_F ||X_f|| (Higham sec. 3.6), the scaling
        by u, the bias by u of the sum; errors pass on through w = max_f ||W_f|| (``upper_bound``).
        float32: ``real_conv``'s five products (four real, one complex), proved the same way (``_real_error``)."""
        n, u = self.canvas(in_shape), unit(dtype)
        w = self.upper_bound(in_shape)
        fro = self.derived(lambda: self._frobenius(n), f"fro{n}")
        bias = self.evaluated(n)[1].detach().double().norm().item() * in_shape[1]
        if dtype == torch.float32:
            error = self._real_error(n, w, fro, bias, dtype)
        else:
            e, g = dft2_error(n, dtype), math.sqrt(2) * gamma(self.channels + 2, dtype) * fro

            def error(xn: float) -> float:
                err, size = e * xn, (1 + e) * xn  # X = F pad(x)
                err, size = w * err + g * size, (w + g) * size  # Z = W X
                err, size = err + (e + u * (1 + e)) * size, (1 + e) * (1 + u) * size  # F^-1 Z, scaled
                return err + u * (size + bias)  # + b

        ops = 8 * self.channels + 16 * n + 8
        tiny = underflow(ops, self.channels * n * n, dtype, float(n * n))
        return Rounding(error(1.0) - error(0.0), error(0.0) + tiny, True)

    def _real_error(self, n: int, w: float, fro: float, bias: float, dtype: torch.dtype):
        """The error of ``real_conv`` (+ b) on an input of norm xn, unnormalised until the last step.

        Each step is a batch of real inner products of length L with float32 matrices whose entries
        are within mu = ROOT_ULPS u of exact and at most a (1 + mu) in size (a = 1, or 2 in the last
        step): an output is within gamma_L a (1 + mu) ||v||_1 of the exact product with the computed
        matrix (Higham Thm 3.1, any order) and a mu ||v||_1 more of the exact one, ||v||_1 <= sqrt(L)
        ||v||_2 for its input v; over the R outputs sharing v, sqrt(R L) a c_L ||v||, c_L = gamma_L
        (1 + mu) + mu. So a step with exact matrix A turns an error E on an input of exact size S
        into ||A|| E + sqrt(R L) a c_L (S + E). Steps (H = n - 2, m = n//2 + 1, per channel):
        [P | Q] = x [C | S]: L = H, R = 2m, exact size <= sqrt(n) ||x|| (a row DFT);
        [Re X; Im X]: L = 2H, R = 2n, ||A|| <= sqrt(n) (columns of the n x n DFT), size n ||x||;
        W_f X_f: per frequency, every real output of the complex product (conventional arithmetic, as
        BLAS computes it, with or without FMA) is a 2c-term real inner product with a row of W_f's real
        form [[Re, -Im], [Im, Re]], so the error is w E + sqrt2 gamma_{2c} ||W_f||_F S (|.| of the real
        form has norm <= its Frobenius norm, sqrt2 ||W_f||_F), size w n ||x||;
        back rows: L = 2n, R = 2H, ||A|| <= sqrt(n); last: L = 2m, R = H, a = 2, ||A|| <= sqrt(2n) (a
        middle column counts as itself and its conjugate, the others at most once), and the exact
        cropped canvas is n^2 times the unitary map's, <= w n^2 ||x||; / n^2 rounds by u, + b by u of
        the sum. Underflows: at most 4 L TINY per output of each product (2L operations, each error
        carried on by < 2), added to E where they happen."""
        u, mu, h, m, c = unit(dtype), ROOT_ULPS * unit(dtype), n - 2, n // 2 + 1, self.channels
        rn = math.sqrt(n)

        def cost(length: int, outputs: int, scale: float = 1.0) -> float:
            return math.sqrt(outputs * length) * scale * (gamma(length, dtype) * (1 + mu) + mu)

        def tiny(length: int, outputs: int) -> float:
            return underflow(4 * length, outputs, dtype)

        g = math.sqrt(2) * gamma(2 * c, dtype) * fro

        def error(xn: float) -> float:
            err = cost(h, 2 * m) * xn + tiny(h, 2 * m * h * c)  # [P | Q]
            size = rn * xn
            err = rn * err + cost(2 * h, 2 * n) * (size + err) + tiny(2 * h, 2 * n * m * c)  # X
            size = n * xn
            err = w * err + g * (size + err) + tiny(2 * c, 2 * n * m * c)  # Z = W X
            size = w * n * xn
            err = rn * err + cost(2 * n, 2 * h) * (size + err) + tiny(2 * n, 2 * h * m * c)  # U
            size = rn * size
            err = math.sqrt(2 * n) * err + cost(2 * m, h, 2.0) * (size + err) + tiny(2 * m, h * h * c)
            size = w * n * n * xn  # the exact cropped canvas (unnormalised)
            err, size = (err + u * (size + err)) / (n * n), (1 + u) * (size + err) / (n * n)  # / n^2
            return err + u * (size + bias)  # + b

        return error


class BROResidualLinear(DerivedLinear):
    """W h + b on features -> features, W the block reflector of V = I_{:, :rank} + s gamma X (X ~ N(0,
    1) / features, gamma 1 per row, s = depth^(-1/2)): BRONet's BRO dense layer (``LiBroMLP``)."""

    def __init__(self, features: int, rank: int, depth: int):
        super().__init__()
        self.rank, self.scale = rank, depth**-0.5
        self.weight = nn.Parameter(torch.randn(features, rank) / features)
        self.gamma = nn.Parameter(torch.ones(features, 1))
        self.bias = nn.Parameter(torch.zeros(features))

    def free(self) -> torch.Tensor:
        eye = torch.eye(*self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)
        return eye + self.weight * self.gamma * self.scale

    def matrix(self) -> torch.Tensor:
        return block_reflector(self.free(), BRO_SHIFT)


class BROLinear(DerivedLinear):
    """Q h + b, (N, in_features) -> (N, out_features), out < in: Q the first out rows of the block
    reflector of a free X (in x out, ~ N(0, 1/in)): the BRO neck's dense map."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def matrix(self) -> torch.Tensor:
        return block_reflector(self.weight, NECK_SHIFT, rows=self.out_features, detach_shift=True)


class BROPatchConv(DerivedPatchConv):
    """The neck's p x p patch convolution (stride p) with Q (out, in p p) the first out rows of the
    block reflector of a free X (in p p x out, ~ N(0, 1/(in p p)))."""

    def __init__(self, in_channels: int, out_channels: int, patch: int):
        super().__init__(in_channels, out_channels, patch)
        fan_in = in_channels * patch * patch
        self.weight = nn.Parameter(torch.randn(fan_in, out_channels) / fan_in**0.5)

    def matrix(self) -> torch.Tensor:
        return block_reflector(self.weight, NECK_SHIFT, rows=self.out_channels, detach_shift=True)
