"""LiResNet (cll.layers.liresnet, cll.models.liresnet): the residual block is one convolution whose
bound is its own norm, the Cholesky layers' bounds are the norms of the float32 matrices they use,
the architecture has the reference's parameter counts, trains a step with K_F through the blocks,
and certifies. (Each layer's rounding against float64: tests/test_soundness.py, via helpers.LAYERS.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import host_step_and_certify
from test_peers import jacobian_norm
from torch import nn

from cll import layers as L
from cll import lipschitz, models
from cll.layers.liresnet import cholesky_orthogonal
from cll.lipschitz.estimate import operator_of, power_iterate
from cll.lipschitz.operators import linear_operator


def _block(channels=4, depth=2, seed=0) -> L.LiResBlock:
    """A float64 block far from the identity: ||K|| well away from 1 and from 1 + ||V||."""
    torch.manual_seed(seed)
    block = L.LiResBlock(channels, depth).double()
    with torch.no_grad():
        block.weight.normal_(0, 0.4)
        block.gamma.uniform_(0.5, 1.5)
        block.bias.normal_(0, 1)
        block.running_mean.normal_(0, 1)
    return block.eval()


def test_block_is_one_convolution_and_its_bound_is_that_convolutions_norm():
    shape = (4, 6, 6)
    block = _block()
    exact = jacobian_norm(block, torch.randn(shape, dtype=torch.float64))  # affine: the operator's norm
    bound = lipschitz.upper_bound_layer(block, shape)
    assert exact <= bound <= exact * (1 + 1e-6)  # the explicit matrix at this size: exact
    # far tighter than 1 + ||conv_V||, the bound of a residual block taken as identity plus a branch
    branch = lipschitz.spectral_norm_exact(lipschitz.conv_matrix(block.residual_kernel(), shape, (1, 1), (1, 1)))
    assert bound < 0.9 * (1 + branch)
    # the evaluation forward is x + conv(x; s gamma V) + b - running mean, computed as one convolution
    x = torch.randn(3, *shape, dtype=torch.float64)
    expected = x + F.conv2d(x, block.weight * block.gamma / math.sqrt(2), padding=1)
    expected = expected + (block.bias - block.running_mean)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block.forward64(x.float()), block(x.float().double()), rtol=0, atol=1e-12)


def test_block_training_centres_by_the_batch_mean_and_keeps_a_running_mean():
    block = _block().train()
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    before = block.running_mean.clone()
    out = block(x)
    branch = F.conv2d(x, block.residual_kernel(), padding=1)
    mean = branch.mean((0, 2, 3))
    torch.testing.assert_close(out, x + branch - mean[:, None, None] + block.bias[:, None, None])
    torch.testing.assert_close(block.running_mean, before + 0.1 * (mean - before))


def test_power_iteration_follows_the_folded_kernel_with_gradient():
    """K_F's training estimate includes every block's ||conv_K|| (the reference's sub_lipschitz), with
    gradient to V and gamma, and converges to the exact norm from below."""
    torch.manual_seed(0)
    model = models.create("LiResNet-L2W32", 10, (3, 32, 32))
    blocks = [m for m in model.body if isinstance(m, L.LiResBlock)]
    assert len(model.power.iterates()) == 1 + len(blocks)  # the stem conv and each block
    k = lipschitz.estimate_body(model, 3)
    k.backward()
    assert all(b.weight.grad.abs().sum() > 0 and b.gamma.grad.abs().sum() > 0 for b in blocks)
    shape = (4, 6, 6)
    small = models.LipschitzNet(nn.Sequential(_block().float(), L.MaxMinHalves()), nn.Linear(4 * 36, 3), shape)
    (sigma,) = small.power.converge(tol=1e-12)
    assert sigma == pytest.approx(jacobian_norm(small.body[0].double(), torch.zeros(shape, dtype=torch.float64)))


@pytest.mark.parametrize("arch", ["LiResNet-L2W32", "BRONet-L2W32"])
def test_training_estimate_differentiates_the_last_application_only_as_the_references(arch):
    """The hosts' references iterate without gradient and differentiate sigma = ||A u_n|| / ||u_n|| at
    the final iterate; the value is the full-gradient path's exactly, the gradient that of sigma with
    u_n held constant (and it differs from the gradient through every step, which the GloRo family's
    CLL reference takes)."""
    torch.manual_seed(0)
    model = models.create(arch, 10, (3, 32, 32))
    assert model.power.last_step_gradient
    start = [u.clone() for u in model.power.iterates()]
    k = lipschitz.estimate_body(model, 3, update=False)
    (grad,) = torch.autograd.grad(k, model.body[1].weight)
    expected = torch.ones(())
    for (layer, shape), u in zip(model.power._layers, start):
        geometry, weight = operator_of(layer)
        forward, _ = linear_operator(geometry, shape, weight)
        with torch.no_grad():
            u = power_iterate(*linear_operator(geometry, shape, weight.detach()), u, 3)
        expected = expected * forward(u).norm() / (u.norm() + 1e-12)
    expected = expected * model.input_lipschitz  # estimate_body's product
    torch.testing.assert_close(k, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, model.body[1].weight)[0])
    model.power.last_step_gradient = False
    (full,) = torch.autograd.grad(lipschitz.estimate_body(model, 3, update=False), model.body[1].weight)
    assert not torch.allclose(full, grad, rtol=1e-3)


@pytest.mark.parametrize("make", [lambda: L.CholeskyLinear(40, 24), lambda: L.CholeskyResidualLinear(24, 8)])
def test_cholesky_bound_is_the_norm_of_the_float32_matrix_used(make):
    """Q Q^T = I - eps (L^T L)^-1 < I in exact arithmetic; the float32 Q is that only up to rounding,
    and the bound is the norm of the float32 Q itself (float64 SVD here), tight to 1e-8."""
    torch.manual_seed(1)
    layer = make().eval()
    q = layer.derived(layer.matrix)
    assert q.dtype == torch.float32
    exact = torch.linalg.matrix_norm(q.double(), ord=2).item()
    bound = lipschitz.upper_bound_layer(layer, (q.shape[1],))
    assert exact <= bound <= exact * (1 + 1e-8) and bound < 1
    # the exact-arithmetic identity, in float64
    x = layer.free().detach().double()
    gram = x @ x.T
    chol = torch.linalg.cholesky(gram + 1e-3 * gram.diagonal().mean() * torch.eye(len(x), dtype=torch.float64))
    q64 = cholesky_orthogonal(x)
    chol_inv = torch.linalg.inv(chol)
    inverse = chol_inv @ chol_inv.T  # (L^T L)^-1
    eps = 1e-3 * gram.diagonal().mean()
    torch.testing.assert_close(q64 @ q64.T, torch.eye(len(x), dtype=torch.float64) - eps * inverse)


def test_cholesky_patch_conv_is_q_on_disjoint_patches():
    torch.manual_seed(2)
    layer = L.CholeskyPatchConv(3, 8, 2).double().eval()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    q = layer.derived(layer.matrix)
    patches = x.unfold(1, 2, 2).unfold(2, 2, 2).permute(1, 2, 0, 3, 4).reshape(16, 12)  # (position, c p p)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[None])[0].reshape(8, 16).T, patches @ q.T)
    exact = jacobian_norm(layer, x)
    assert exact == pytest.approx(torch.linalg.matrix_norm(q, ord=2).item(), rel=1e-9)
    assert exact <= lipschitz.upper_bound_layer(layer, (3, 8, 8)) <= exact * (1 + 1e-8)


# ---------------------------------------------------------------- the architecture
# (the parameter counts of the reference builds: tests/test_models.py, HOST_PARAMS)


def test_l12w512_skeleton():
    with torch.device("meta"):
        model = models.create("LiResNet-L12W512", 200, (3, 64, 64), head="lln")
    kinds = [type(m).__name__ for m in model.body]
    assert kinds[:3] == ["Normalize", "Conv2d", "MaxMinHalves"] and model.body[0].std == 1.0
    stem = model.body[1]
    assert (stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == (512, (5, 5), (2, 2), (2, 2))
    assert kinds[3:27] == ["LiResBlock", "MaxMinHalves"] * 12 and model.body[3].scale == 12**-0.5
    assert kinds[27:31] == ["CholeskyPatchConv", "Flatten", "CholeskyLinear", "MaxMinHalves"]
    assert model.body[29].weight.shape == (2048, 512 * 8 * 8)
    assert kinds[31:] == ["CholeskyResidualLinear", "MaxMinHalves"] * 8 and model.body[31].scale == 8**-0.5
    assert (model.head.in_features, model.head.out_features) == (2048, 200)


def test_only_32_and_64_pixel_inputs():
    with pytest.raises(ValueError, match="32x32 and 64x64"):
        models.create("LiResNet-L2W32", 10, (1, 28, 28))


@pytest.mark.parametrize("num_classes,shape", [(10, (3, 32, 32)), (100, (3, 32, 32)), (200, (3, 64, 64))])
def test_liresnet_trains_an_emma_step_and_certifies(num_classes, shape):
    host_step_and_certify("LiResNet-L2W32", "emma", num_classes, shape)
