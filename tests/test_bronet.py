"""BRONet (cll.layers.bro, cll.models.bronet): the block reflector's closed form, the BRO convolution
as a reflector per frequency of the zero-padded canvas, bounds that are the norms of the float32
matrices the forward uses (not 1 by construction), the dense and neck BRO layers, the reference's
parameter counts, and a Logit Annealing step that certifies. (Each layer's bound against the exact
Jacobian norm and its rounding against float64: tests/test_peers.py and tests/test_soundness.py,
via helpers.LAYERS.)"""

import pytest
import torch
import torch.nn.functional as F
from helpers import host_step_and_certify
from test_peers import jacobian_norm

from cll import certify, lipschitz, models
from cll import layers as L
from cll.layers.bro import BRO_SHIFT, block_reflector, bro_rank
from cll.lipschitz.fft import real_irdft2_crop, real_rdft2


# ---------------------------------------------------------------- the block reflector
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_block_reflector_reflects_the_column_space_and_its_shift_keeps_the_norm_at_one(dtype):
    torch.manual_seed(0)
    v = torch.randn(3, 9, 4, dtype=dtype)
    eye = torch.eye(9, dtype=dtype).expand(3, 9, 9)
    w = block_reflector(v, 0.0)
    torch.testing.assert_close(w, w.mH)  # Hermitian
    torch.testing.assert_close(w @ w, eye)  # an involution: unitary
    torch.testing.assert_close(w @ v, -v)  # -1 on the column space of V
    complement = torch.linalg.qr(v, mode="complete").Q[..., 4:]
    torch.testing.assert_close(w @ complement, complement)  # +1 on its complement
    # the reference's shift eps = c mean(diag(V^H V)): eigenvalues 1 - 2 s^2 / (s^2 + eps) and 1
    shift = 0.05
    w = block_reflector(v, shift)
    s2 = torch.linalg.svdvals(v) ** 2
    eps = shift * v.abs().square().sum(-2).mean(-1, keepdim=True)
    expected = torch.cat([1 - 2 * s2 / (s2 + eps), torch.ones(3, 5, dtype=torch.float64)], -1).sort(-1).values
    torch.testing.assert_close(torch.linalg.eigvalsh(w), expected)
    assert torch.linalg.matrix_norm(w, ord=2).max().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(block_reflector(v, shift, rows=2), w[..., :2, :])  # the neck's first rows
    with pytest.raises(ValueError, match="tall"):
        block_reflector(v.mT, shift)


def test_rank_follows_the_references_mapping():
    assert [bro_rank(512, r) for r in (0.5, 0.125, 1.0, 0.0)] == [256, 64, 511, 1]
    with pytest.raises(ValueError, match="rank"):
        bro_rank(1, 0.5)


# ---------------------------------------------------------------- the BRO convolution
def _bro_conv(channels=4, rank=2, depth=3, seed=0, dtype=torch.float64) -> L.BROConv:
    """A BRO conv far from its initialisation: V well away from the centre identity."""
    torch.manual_seed(seed)
    layer = L.BROConv(channels, rank, depth).to(dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.4)
        layer.gamma.uniform_(0.5, 1.5)
        layer.bias.normal_(0, 1)
        layer.running_mean.normal_(0, 1)
    return layer.eval()


def _canvas_spectrum(layer: L.BROConv, n: int) -> torch.Tensor:
    """W_f at all n x n frequencies, recomputed from the definition: the block reflector (shift 1e-7)
    of the DFT of V zero-filled to n x n, tap (a, b) at offset (a, b), by an explicit inverse."""
    v = torch.fft.fft2(layer.kernel().detach(), s=(n, n)).permute(2, 3, 0, 1)  # (n, n, c, k)
    gram = v.mH @ v
    eps = BRO_SHIFT * gram.diagonal(dim1=-2, dim2=-1).real.mean(-1)
    inverse = torch.linalg.inv(gram + eps[..., None, None] * torch.eye(layer.rank, dtype=v.dtype))
    return torch.eye(layer.channels, dtype=v.dtype) - 2 * v @ inverse @ v.mH


@pytest.mark.parametrize("side", [4, 5])  # canvases 6 and 7 (odd: rfft2 has no Nyquist column)
def test_bro_conv_is_a_reflector_per_frequency_of_the_zero_padded_canvas(side):
    """pad by 1, W_f per frequency of the (side + 2)^2 canvas, crop, + b - running mean; on the canvas
    the map is real, symmetric and orthogonal (up to the 1e-7 shift), with eigenvalue -1 of
    multiplicity rank per frequency and +1 for the rest: trace n^2 (channels - 2 rank)."""
    layer, n = _bro_conv(), side + 2
    w = _canvas_spectrum(layer, n)
    x = torch.randn(3, 4, side, side, dtype=torch.float64)
    canvas = torch.fft.ifft2(torch.einsum("hwoi,bihw->bohw", w, torch.fft.fft2(F.pad(x, (1, 1, 1, 1)))))
    assert canvas.imag.abs().max().item() < 1e-12  # W_{-f} = conj(W_f): a real operator
    expected = canvas.real[..., 1:-1, 1:-1] + (layer.bias - layer.running_mean)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    # the canvas operator as an explicit matrix
    basis = torch.eye(4 * n * n, dtype=torch.float64).reshape(-1, 4, n, n)
    m = torch.fft.ifft2(torch.einsum("hwoi,bihw->bohw", w, torch.fft.fft2(basis))).real.reshape(4 * n * n, -1)
    torch.testing.assert_close(m, m.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(m @ m.T, torch.eye(4 * n * n, dtype=torch.float64), rtol=0, atol=1e-5)
    assert torch.trace(m).item() == pytest.approx(n * n * (4 - 2 * 2), abs=1e-4)


def test_bro_conv_bound_is_the_largest_norm_of_the_float32_matrices_used():
    """Nearly dependent columns of V make the Gram matrix of the solve ill-conditioned: the float32
    W_f the forward uses are visibly not orthogonal (||W_f|| - 1 ~ 3e-5; float64 gives 1 to 1e-9),
    and the bound is their largest norm (float64 SVD here), not 1; the exact Jacobian norm of the
    layer on those matrices (its float64 pass, differentiated) is within it."""
    torch.manual_seed(0)
    layer = L.BROConv(6, 3, 1)
    with torch.no_grad():
        layer.weight.normal_(0, 1)
        layer.weight[:, 1] = layer.weight[:, 0] + 1e-3 * torch.randn(6, 3, 3)
        layer.gamma.fill_(10.0)
    layer.eval()
    shape = (6, 4, 4)
    w = layer.evaluated(6)[0]
    assert w.dtype == torch.complex64
    largest = torch.linalg.matrix_norm(w.to(torch.complex128), ord=2).max().item()
    bound = lipschitz.upper_bound_layer(layer, shape)
    assert largest <= bound <= largest * (1 + 1e-8) and bound > 1 + 1e-5
    double = L.BROConv(6, 3, 1).double()
    double.load_state_dict(layer.state_dict())
    assert lipschitz.upper_bound_layer(double.eval(), shape) < 1 + 1e-8  # ROUNDING_SLACK: 1e-9
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer.forward64(v[None])[0], x).reshape(96, 96)
    assert torch.linalg.matrix_norm(jac, ord=2).item() <= bound


def test_both_roundings_are_proved_on_the_references_canvas():
    """CIFAR's 16 x 16 features give an 18 x 18 canvas (not a power of two: the direct DFT in float64,
    real cos/sin products in float32): the float64 pass agrees with the float32 forward within the
    two rounding terms, both rigorous."""
    layer = _bro_conv(dtype=torch.float32)
    shape = (4, 16, 16)
    x = 5 * torch.randn(8, *shape)
    with torch.no_grad():
        gap = (layer(x).double() - layer.forward64(x)).flatten(1).norm(dim=1)
    r32, r64 = layer.rounding(shape, torch.float32), layer.rounding(shape, torch.float64)
    norm = x.flatten(1).double().norm(dim=1)
    assert (gap > 0).all() and (gap <= r32.alpha * norm + r32.beta + r64.alpha * norm + r64.beta).all()
    assert r32.rigorous and r64.rigorous and r64.alpha < 1e-12 and r32.alpha < 1e-3


@pytest.mark.parametrize("side", [4, 5, 16])  # canvases 6, 7 (odd: no Nyquist column), 18
def test_real_dft_products_are_rfft2_and_irfft2_on_the_canvas(side):
    """``real_rdft2`` is rfft2 of the padded input ([Re; Im], unnormalised) and ``real_irdft2_crop``
    irfft2's interior for any half spectrum, conjugate-symmetric or not (irfft2 drops the imaginary
    parts of columns 0 and n/2 and takes the real part of the row transform): float64 to 1e-12."""
    torch.manual_seed(side)
    n = side + 2
    x = torch.randn(3, 2, side, side, dtype=torch.float64)
    half = torch.fft.rfft2(F.pad(x, (1, 1, 1, 1)))
    torch.testing.assert_close(real_rdft2(x), torch.cat([half.real, half.imag], -2), rtol=0, atol=1e-12)
    z = torch.randn(3, 2, n, n // 2 + 1, dtype=torch.complex128)
    expected = torch.fft.irfft2(z, s=(n, n))[..., 1:-1, 1:-1] * n * n
    torch.testing.assert_close(real_irdft2_crop(torch.cat([z.real, z.imag], -2)), expected, rtol=0, atol=1e-11)


def _torch_fft_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The reference's frequency convolution (no bias): crop(irfft2(W_f rfft2(pad(x)))), unitary."""
    x = F.pad(x, (1, 1, 1, 1))
    n = x.shape[-1]
    z = torch.einsum("hwoi,bihw->bohw", w, torch.fft.rfft2(x, norm="ortho"))
    return torch.fft.irfft2(z, s=(n, n), norm="ortho")[..., 1:-1, 1:-1]


@pytest.mark.parametrize("side", [5, 16])
def test_real_forward_is_the_torch_fft_forward_within_float32_rounding(side):
    """The forward (real products, proved; training and evaluation) computes the function the
    reference's torch.fft one does: float32 outputs within the proved bound plus torch.fft's
    estimate; the float32 bound holds against the float64 pass on inputs of every scale; and the
    training branch is the evaluation's products on the same W, bitwise."""
    layer = _bro_conv(channels=6, rank=3, dtype=torch.float32)
    shape = (6, side, side)
    n = side + 2
    x = torch.randn(16, *shape) * torch.logspace(-3, 3, 16)[:, None, None, None]
    w, bias = layer.evaluated(n)
    with torch.no_grad():
        new, old, exact = layer(x), _torch_fft_conv(x, w) + bias[:, None, None], layer.forward64(x)
    r32, r64 = layer.rounding(shape, torch.float32), layer.rounding(shape, torch.float64)
    norm = x.flatten(1).double().norm(dim=1)
    proved = r32.alpha * norm + r32.beta
    assert ((new.double() - exact).flatten(1).norm(dim=1) <= proved + r64.alpha * norm + r64.beta).all()
    gap = (new - old).double().flatten(1).norm(dim=1)
    assert (gap <= 2 * proved).all() and (gap <= 1e-5 * exact.flatten(1).norm(dim=1)).all()
    layer.train()
    with torch.no_grad():
        trained = layer.real_conv(x, layer.spectrum(n))
    assert torch.equal(trained + bias[:, None, None], new)


def test_bro_conv_training_centres_by_the_batch_mean_and_keeps_a_running_mean():
    layer = _bro_conv().train()
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    before = layer.running_mean.clone()
    out = layer(x)
    branch = _torch_fft_conv(x, layer.spectrum(7))
    mean = branch.mean((0, 2, 3))
    torch.testing.assert_close(out, branch - mean[:, None, None] + layer.bias[:, None, None], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, before + 0.1 * (mean - before), rtol=0, atol=1e-12)
    out.square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.gamma.grad.abs().sum() > 0


def test_bro_conv_trains_under_bf16_autocast():
    """amp (bf16 autocast around the body): the DFT products run in bf16, the complex per-frequency
    product in complex64; the output is the fp32 one to bf16 precision, and gradients flow."""
    torch.manual_seed(4)
    layer = _bro_conv(dtype=torch.float32).train()
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    with torch.no_grad():
        exact = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    torch.testing.assert_close(out.float(), exact, rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    assert x.grad.isfinite().all() and layer.weight.grad.abs().sum() > 0


def test_bro_conv_training_gradients_are_the_torch_fft_ones_in_float64():
    """Training's real products differentiate to the reference's torch.fft gradients (float64)."""
    torch.manual_seed(3)
    layer = _bro_conv().train()
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [x, layer.weight, layer.gamma, layer.bias]
    ours = torch.autograd.grad(layer(x).square().sum(), params)
    branch = _torch_fft_conv(x, layer.spectrum(7))
    theirs = branch - branch.mean((0, 2, 3))[:, None, None] + layer.bias[:, None, None]
    for a, b in zip(ours, torch.autograd.grad(theirs.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the dense and neck BRO layers
@pytest.mark.parametrize(
    "make", [lambda: L.BROResidualLinear(24, 6, 4), lambda: L.BROLinear(40, 24)], ids=["residual", "neck"]
)
def test_dense_bound_is_the_norm_of_the_float32_matrix_used(make):
    torch.manual_seed(1)
    layer = make().eval()
    q = layer.derived(layer.matrix)
    assert q.dtype == torch.float32
    exact = torch.linalg.matrix_norm(q.double(), ord=2).item()
    bound = lipschitz.upper_bound_layer(layer, (q.shape[1],))
    assert exact <= bound <= exact * (1 + 1e-8) and bound == pytest.approx(1, abs=1e-5)
    v = layer.free() if isinstance(layer, L.BROResidualLinear) else layer.weight
    full = block_reflector(v.detach().double(), 1e-7 if isinstance(layer, L.BROResidualLinear) else 1e-5)
    torch.testing.assert_close(q.double(), full[: q.shape[0]], rtol=0, atol=1e-5)  # the reflector's first rows


def test_residual_bro_dense_is_the_reflector_of_the_identity_plus_the_scaled_branch():
    layer = L.BROResidualLinear(8, 3, 4)
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 1.5)
    v = torch.eye(8, 3) + layer.weight * layer.gamma / 2
    torch.testing.assert_close(layer.free(), v)
    q = layer.matrix()
    torch.testing.assert_close(q, q.T)
    q.sum().backward()  # the shift keeps its gradient here, as in the reference's dense layers
    assert layer.weight.grad.abs().sum() > 0 and layer.gamma.grad.abs().sum() > 0


def test_bro_patch_conv_is_q_on_disjoint_patches():
    torch.manual_seed(2)
    layer = L.BROPatchConv(3, 8, 2).double().eval()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    q = layer.derived(layer.matrix)
    assert q.shape == (8, 12)
    patches = x.unfold(1, 2, 2).unfold(2, 2, 2).permute(1, 2, 0, 3, 4).reshape(16, 12)  # (position, c p p)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[None])[0].reshape(8, 16).T, patches @ q.T)
    exact = jacobian_norm(layer, x)
    assert exact <= lipschitz.upper_bound_layer(layer, (3, 8, 8)) <= exact * (1 + 1e-8)


# ---------------------------------------------------------------- the architecture
# (the parameter counts of the reference builds: tests/test_models.py, HOST_PARAMS)


def test_skeletons_of_the_references_configs():
    with torch.device("meta"):
        cifar = models.create("BRONet-L12W512", 100, (3, 32, 32), head="lln")
        tiny = models.create("BRONet-L6W512", 200, (3, 64, 64), head="lln")
    kinds = [type(m).__name__ for m in cifar.body]
    assert kinds[:3] == ["Normalize", "Conv2d", "MaxMinHalves"]
    assert kinds[3:27] == ["BROConv", "MaxMinHalves"] * 12
    assert (cifar.body[3].rank, cifar.body[3].scale) == (256, 12**-0.5)
    assert kinds[27:31] == ["CholeskyPatchConv", "Flatten", "CholeskyLinear", "MaxMinHalves"]
    assert kinds[31:] == ["CholeskyResidualLinear", "MaxMinHalves"] * 8
    kinds = [type(m).__name__ for m in tiny.body]
    assert kinds[3:15] == ["BROConv", "MaxMinHalves"] * 6 and tiny.body[3].rank == 64
    assert kinds[15:19] == ["BROPatchConv", "Flatten", "BROLinear", "MaxMinHalves"]
    assert tiny.body[17].weight.shape == (512 * 8 * 8, 2048)
    assert kinds[19:] == ["BROResidualLinear", "MaxMinHalves"] * 4 and tiny.body[19].rank == 256
    assert (tiny.head.in_features, tiny.head.out_features) == (2048, 200)
    with pytest.raises(ValueError, match="32x32 and 64x64"):
        models.create("BRONet-L2W32", 10, (1, 28, 28))


@pytest.mark.parametrize("num_classes,shape", [(10, (3, 32, 32)), (200, (3, 64, 64))])
def test_bronet_trains_a_logit_annealing_step_and_certifies(num_classes, shape):
    model, x, _ = host_step_and_certify("BRONet-L2W32", "logit_annealing", num_classes, shape, offset=2.0)
    assert len(model.power.iterates()) == 1 and not model.power.complete  # the stem; BRO counted as 1
    # the float64 pass (BRO convs on the canvas by cll's own DFT) gives the float32 logits to ~1e-6
    certifier = certify.Certifier(model)
    z64, err64, _ = certifier.forward64(x)
    with torch.no_grad():
        torch.testing.assert_close(z64.float(), model(x), rtol=1e-4, atol=1e-5)
    assert (err64 < 1e-9).all()
