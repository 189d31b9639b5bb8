"""Power iteration and the sound bound against the exact operator norm from the explicit matrix."""

import itertools
import math

import pytest
import torch
from torch import nn

from cll import lipschitz, models
from cll.layers import MaxMin

# every conv configuration the GloRo-family nets use, and the rest of the grid:
# kernel 3 and 4, stride 1 and 2, padding 0 and 1, on inputs whose size the stride does and
# does not divide
CONVS = list(itertools.product([3, 4], [1, 2], [0, 1], [7, 8]))


def exact_norm(layer, in_shape):
    matrix = lipschitz.explicit_matrix(layer, in_shape)
    return torch.linalg.matrix_norm(matrix, ord=2).item()


def converged_estimate(layer, in_shape):
    body = nn.Sequential(layer)
    power = lipschitz.PowerIteration(body, in_shape)
    return power.converge(tol=1e-10, max_iter=20_000)[0]


@pytest.mark.parametrize("k,stride,padding,size", CONVS)
def test_conv_estimate_and_bound_match_explicit_matrix(k, stride, padding, size):
    torch.manual_seed(k * 100 + stride * 10 + padding + size)
    layer = nn.Conv2d(3, 5, k, stride=stride, padding=padding)
    in_shape = (3, size, size)
    exact = exact_norm(layer, in_shape)
    estimate = converged_estimate(layer, in_shape)
    assert abs(estimate - exact) <= 1e-3 * exact
    for method in ("fft", "explicit", "auto"):
        bound = lipschitz.upper_bound_layer(layer, in_shape, method=method)
        assert bound >= exact
        assert bound >= estimate
    # the FFT bound is the circular norm: an upper bound, but not a wild one
    assert lipschitz.upper_bound_layer(layer, in_shape, method="fft") <= 1.6 * exact


def test_fft_bound_is_exact_for_circular_case():
    # a 1x1 conv is a per-pixel matrix: circular and zero-padded operators coincide
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 1)
    exact = exact_norm(layer, (4, 5, 5))
    fft = lipschitz.upper_bound_layer(layer, (4, 5, 5), method="fft")
    assert fft == pytest.approx(exact, rel=1e-8)


def test_linear_estimate_and_bound():
    torch.manual_seed(1)
    layer = nn.Linear(30, 20)
    exact = torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2).item()
    assert converged_estimate(layer, (30,)) == pytest.approx(exact, rel=1e-3)
    assert lipschitz.upper_bound_layer(layer, (30,)) >= exact


def test_adjoint_is_exact():
    # <A u, v> == <u, A^T v> for the stride-2 case the reference got wrong (dropped last row)
    torch.manual_seed(2)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    forward, adjoint = lipschitz.linear_operator(layer, (3, 8, 8))
    u = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    w = layer.weight.detach().double()
    layer.weight.data = w
    v = torch.randn_like(forward(u))
    assert (forward(u) * v).sum().item() == pytest.approx((u * adjoint(v)).sum().item(), rel=1e-10)


def test_unknown_layer_type_is_never_assumed_1_lipschitz():
    with pytest.raises(TypeError, match="no Lipschitz bound"):
        lipschitz.upper_bound_layer(nn.Softplus(), (4,))


def test_maxmin_is_1_lipschitz():
    torch.manual_seed(3)
    act = MaxMin()
    x, y = torch.randn(100, 6, 3, 3), torch.randn(100, 6, 3, 3)
    ratio = (act(x) - act(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() <= 1 + 1e-6


@pytest.mark.parametrize("arch,in_shape", [("4C3F", (1, 8, 8)), ("2C2F", (1, 12, 12)), ("moons-mlp", (2,))])
def test_model_bound_covers_true_constant(arch, in_shape):
    """K (sound) >= converged estimate, and no pair of inputs beats K: |dz_i - dz_j| <= K ||dx||."""
    torch.manual_seed(4)
    model = models.create(arch, 10 if arch != "moons-mlp" else 2, in_shape)
    bound = lipschitz.upper_bound(model)
    assert bound >= lipschitz.estimate_constant(model)
    x = torch.rand(256, *in_shape)
    y = x + 1e-2 * torch.randn_like(x)
    with torch.no_grad():
        dz = model(x) - model(y)
    gaps = (dz[:, :, None] - dz[:, None, :]).abs().flatten(1).max(1).values
    ratio = gaps / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() <= bound


def test_training_estimate_has_gradient_and_warm_starts():
    torch.manual_seed(5)
    model = models.create("2C2F", 10, (1, 12, 12))
    k = lipschitz.estimate_body(model, n_iter=5)
    k.backward()
    assert model.body[0].weight.grad is not None and torch.isfinite(model.body[0].weight.grad).all()
    # iterates persist: after convergence, one more iteration barely moves the estimate
    converged = lipschitz.estimate_converged_body(model)
    again = lipschitz.estimate_body(model, n_iter=1).item()
    assert again == pytest.approx(converged, rel=1e-4)
    assert "power.u0" in model.state_dict()


def test_body_bound_is_product_of_layers():
    torch.manual_seed(6)
    model = models.create("moons-mlp", 2, (2,))
    layers = [m for m in model.body if isinstance(m, nn.Linear)]
    product = math.prod(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2).item() for m in layers)
    assert lipschitz.upper_bound_body(model) == pytest.approx(product, rel=1e-8)


# ---------------------------------------------------------------- the fast paths (Performance issue)
def full_fft_bound(weight, in_shape, stride, padding):
    """The FFT bound as first written: fft2 over every frequency, float64 eigvalsh at each."""
    w = weight.detach().double()
    c_out, c_in, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    nh, nw = math.ceil((in_shape[1] + 2 * ph) / sh), math.ceil((in_shape[2] + 2 * pw) / sw)
    kh2, kw2 = math.ceil(kh / sh), math.ceil(kw / sw)
    padded = w.new_zeros(c_out, c_in, kh2 * sh, kw2 * sw)
    padded[:, :, :kh, :kw] = w
    poly = padded.reshape(c_out, c_in, kh2, sh, kw2, sw).permute(0, 1, 3, 5, 2, 4)
    poly = poly.reshape(c_out, c_in * sh * sw, kh2, kw2)
    a = torch.fft.fft2(poly, s=(nh, nw)).permute(2, 3, 0, 1)
    gram = a @ a.mH if a.shape[-2] <= a.shape[-1] else a.mH @ a
    return math.sqrt(torch.linalg.eigvalsh(gram)[..., -1].max().item()) * (1 + lipschitz.ROUNDING_SLACK)


@pytest.fixture
def always_prune(monkeypatch):
    """Send even tiny layers through the pruned (Gram-iteration) path of conv_fft_bound."""
    monkeypatch.setattr(lipschitz.conv, "FFT_DIRECT_SIZE", 0)
    monkeypatch.setattr(lipschitz.conv, "FFT_SEEDS", 1)
    monkeypatch.setattr(lipschitz.conv, "FFT_PRUNE_DEVICES", ("cpu", "cuda"))


@pytest.mark.parametrize("k,stride,padding,size", CONVS)
def test_pruned_fft_bound_equals_full_eigvalsh_and_covers_exact(always_prune, k, stride, padding, size):
    torch.manual_seed(k * 100 + stride * 10 + padding + size)
    layer = nn.Conv2d(3, 5, k, stride=stride, padding=padding)
    in_shape = (3, size, size + 1)
    fast = lipschitz.conv_fft_bound(layer.weight, in_shape, layer.stride, layer.padding)
    assert fast == pytest.approx(full_fft_bound(layer.weight, in_shape, layer.stride, layer.padding), rel=1e-12)
    assert fast >= exact_norm(layer, in_shape)


@pytest.mark.parametrize("flat", [False, True])
def test_pruned_fft_bound_equals_full_eigvalsh_on_wide_layers(monkeypatch, flat):
    # channels above FFT_DIRECT_SIZE take the pruned path (on a GPU; here forced); a near-orthogonal kernel
    # has an almost flat spectrum, the hard case for pruning (many frequencies near the top)
    monkeypatch.setattr(lipschitz.conv, "FFT_PRUNE_DEVICES", ("cpu", "cuda"))
    torch.manual_seed(7 + flat)
    w = torch.randn(40, 36, 3, 3)
    if flat:
        w = 0.02 * w
        w[:, :, 1, 1] += torch.linalg.qr(torch.randn(40, 40))[0][:, :36]
    for stride, padding in (((1, 1), (1, 1)), ((2, 2), (0, 0))):
        fast = lipschitz.conv_fft_bound(w, (36, 9, 10), stride, padding)
        assert fast == pytest.approx(full_fft_bound(w, (36, 9, 10), stride, padding), rel=1e-12)


def test_pruning_bound_is_an_upper_bound(always_prune):
    # the Gram-iteration bound itself, at every step count, never falls below the exact maximum
    torch.manual_seed(8)
    a = torch.randn(6, 7, 5, dtype=torch.complex128)
    exact = torch.linalg.matrix_norm(a, ord=2).square()
    g = lipschitz.operators.gram(a)
    carry = torch.zeros(6, dtype=torch.float64)
    for k in range(6):
        scale = torch.linalg.matrix_norm(g)
        assert (carry + scale.log() / 2**k >= exact.log() - 1e-12).all()
        carry = carry + scale.log() / 2**k
        g = g / scale[:, None, None]
        g = g.mH @ g
    assert lipschitz.conv.max_top_eigenvalue(a) == pytest.approx(exact.max().item(), rel=1e-12)


def reference_converge(power, tol, max_iter):
    """PowerIteration.converge as first written: one host read per iteration and layer."""
    norms = []
    for i, (layer, shape) in enumerate(power._layers):
        forward, adjoint = lipschitz.linear_operator(layer, shape)
        u = getattr(power, f"u{i}")
        sigma = forward(u).norm().item()
        for _ in range(max_iter):
            v = adjoint(forward(u))
            u = v / (v.norm() + 1e-30)
            new = forward(u).norm().item()
            done = abs(new - sigma) <= tol * max(new, 1e-30)
            sigma = new
            if done:
                break
        setattr(power, f"u{i}", u)
        norms.append(sigma)
    return norms


@pytest.mark.parametrize(
    "tol,max_iter,check_every", [(1e-7, 10_000, 16), (1e-4, 10_000, 3), (1e-12, 7, 4), (1e-7, 0, 16)]
)
def test_converge_matches_per_iteration_check(tol, max_iter, check_every):
    # blocked reads stop every layer at the same iteration as reading at every iteration would
    torch.manual_seed(9)
    model = models.create("4C3F", 10, (1, 12, 12))
    start = [u.clone() for u in model.power.iterates()]
    fast = model.power.converge(tol, max_iter, check_every=check_every)
    fast_u = [u.clone() for u in model.power.iterates()]
    for i, u in enumerate(start):
        setattr(model.power, f"u{i}", u)
    slow = reference_converge(model.power, tol, max_iter)
    assert fast == slow
    assert all(torch.equal(a, b) for a, b in zip(fast_u, model.power.iterates()))


def test_direct_fft_path_equals_full_eigvalsh():
    # the CPU path: rfft2's half of the frequencies, float64 eigvalsh at each
    torch.manual_seed(10)
    w = torch.randn(12, 10, 3, 3)
    for stride, padding in (((1, 1), (1, 1)), ((2, 2), (0, 0))):
        assert lipschitz.conv_fft_bound(w, (10, 9, 8), stride, padding) == pytest.approx(
            full_fft_bound(w, (10, 9, 8), stride, padding), rel=1e-12
        )


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Linear(40, 30), (40,)),
        (nn.Conv2d(3, 8, 3, padding=1), (3, 9, 9)),
        (nn.Conv2d(4, 6, 4, stride=2, padding=1), (4, 9, 9)),
        (nn.Conv2d(4, 6, 3, stride=2), (4, 10, 11)),
    ],
    ids=["linear", "conv", "conv-stride2", "conv-stride2-uneven"],
)
@pytest.mark.parametrize("n_iter", [1, 5])
def test_power_norm_gradient_equals_autograd_through_the_iterations(layer, shape, n_iter):
    """The hand-written backward of the training power iteration (all weight gradients in one
    call) gives the gradient autograd gives through the plain loop, and the same forward values."""
    torch.manual_seed(5)
    layer = layer.double()
    u = torch.randn(1, *shape, dtype=torch.float64)
    u = u / u.norm()
    sigma, u_new = lipschitz.power_norm(layer, shape, u, n_iter)
    (grad,) = torch.autograd.grad(3 * sigma, layer.weight)
    forward, adjoint = lipschitz.linear_operator(layer, shape)
    u_ref = lipschitz.power_iterate(forward, adjoint, u, n_iter)
    sigma_ref = forward(u_ref).norm() / (u_ref.norm() + 1e-12)
    (grad_ref,) = torch.autograd.grad(3 * sigma_ref, layer.weight)
    assert sigma.item() == sigma_ref.item() and torch.equal(u_new, u_ref.detach())
    assert not u_new.requires_grad
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)
