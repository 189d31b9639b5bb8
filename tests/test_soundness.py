"""Soundness of the certificates (issue 12): every layer's rounding bound covers its float error,
the peers take the screened float32 path with the float64 decisions, head distances never depend
on the batch, precision settings cannot leak in, and the audit attacks each point at its own radius."""

import copy
import math

import pytest
import torch
from helpers import LAYERS, screened_decides_as_float64
from test_peers import FAMILIES, blobs, tiny, trained_tiny
from torch import nn

from cll import certify, lipschitz, models
from cll import layers as L
from cll.attack import pgd_l2
from cll.certify.passes import float64_layer
from cll.certify.radius import certified_radius
from cll.lipschitz import layer_rounding
from cll.lipschitz.fft import dft2, dft2_direct, dft2_error, fft2_error, fft2_radix2
from cll.lipschitz.operators import row_distances


def _loud(layer: nn.Module) -> nn.Module:
    """Large biases, spread angles and scales: the rounding terms have something to do."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "bias":
                p.normal_(0, 3.0)
            elif name == "theta":
                p.uniform_(0, 6)
            elif name == "psi":
                p.normal_(0, 1)
    return layer.eval()


@pytest.mark.parametrize("name", sorted(name for name, case in LAYERS.items() if case.rounding))
def test_every_layer_bounds_its_own_rounding_in_both_precisions(name):
    """|float32 forward - exact| <= alpha32 ||x|| + beta32, measured against the float64 pass (itself
    within alpha64 ||x|| + beta64 of the exact layer), which computes the same function: both agree
    to float32 precision, so the float64 pass certifies the network the float32 pass runs."""
    make, shape, *_ = LAYERS[name]
    torch.manual_seed(0)
    layer = _loud(make())
    x = torch.randn(16, *shape) * 5
    with torch.no_grad():
        y32, y64 = layer(x), float64_layer(layer)(x.double())
    r32, r64 = layer_rounding(layer, shape, torch.float32), layer_rounding(layer, shape, torch.float64)
    norm = x.flatten(1).double().norm(dim=1)
    error = (y32.double() - y64).flatten(1).norm(dim=1)
    assert (error <= r32.alpha * norm + r32.beta + r64.alpha * norm + r64.beta).all()
    if r32.alpha == r32.beta == 0:  # a layer that claims to round nothing (MaxMin, padding, ...)
        assert (error == 0).all()
    else:
        assert (error > 0).any()  # rounding happened: the check was not vacuous
    assert (error <= 1e-5 * y64.flatten(1).norm(dim=1)).all()  # one function in two precisions
    assert r64.rigorous and r64.alpha < 1e-10
    assert r32.rigorous == (not isinstance(layer, L.SandwichConv))  # torch.fft: an estimate only


@pytest.mark.parametrize("n", [2, 8, 32])
def test_radix2_fft_is_the_dft_within_its_proved_error(n):
    torch.manual_seed(n)
    x = torch.randn(3, 5, n, n, dtype=torch.complex128)
    exact = torch.fft.fft2(x)
    assert torch.allclose(fft2_radix2(x), exact, rtol=0, atol=1e-10)
    assert torch.allclose(fft2_radix2(exact, inverse=True) / (n * n), x, rtol=0, atol=1e-12)
    # in complex64 the same algorithm stays within Higham's bound at u = 2^-24
    low = fft2_radix2(x.to(torch.complex64)).to(torch.complex128)
    error = (low - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert (error <= fft2_error(n, torch.float32)).all() and (error > 0).all()


@pytest.mark.parametrize("n", [3, 6, 7, 18, 34])
def test_direct_dft_is_the_dft_within_its_proved_error(n):
    """Any side (BRONet's canvases are 18 and 34): the same check as the radix-2 FFT's, and ``dft2``
    picks the direct DFT for these sides and the radix-2 FFT for powers of two."""
    torch.manual_seed(n)
    x = torch.randn(3, 5, n, n, dtype=torch.complex128)
    exact = torch.fft.fft2(x)
    assert torch.allclose(dft2_direct(x), exact, rtol=0, atol=1e-10)
    assert torch.allclose(dft2_direct(exact, inverse=True) / (n * n), x, rtol=0, atol=1e-12)
    four = torch.randn(2, 4, 4, dtype=torch.complex128)
    assert torch.equal(dft2(x), dft2_direct(x)) and torch.equal(dft2(four), fft2_radix2(four))
    low = dft2_direct(x.to(torch.complex64)).to(torch.complex128)
    error = (low - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert (error <= dft2_error(n, torch.float32)).all() and (error > 0).all()
    assert dft2_error(n, torch.float64) < 1e-12


def _sandwich_with_a_large_constant(seed: int = 0) -> nn.Module:
    """Two dense Sandwich layers: the first's pre-activations carry a constant of 1e6 (always active,
    so its output carries a large constant too), the second's bias takes that constant off again
    (computed in float64), so the body's output and the margins are of order 1, while float32 rounds
    the first layer's output by ~0.1: an error only the body's rounding bound sees."""
    torch.manual_seed(seed)
    body = nn.Sequential(L.SandwichLinear(6, 8), L.SandwichLinear(8, 8))
    with torch.no_grad():
        body[0].bias.fill_(1e6)
        model = models.LipschitzNet(body, nn.Linear(8, 3), (6,)).eval()
        constant = float64_layer(body[0])(torch.zeros(1, 6, dtype=torch.float64))[0]
        _, b, s_in, _, _ = body[1]._derived64()
        body[1].bias.copy_(-(s_in * (b @ constant)) + 0.5)
    return model


def test_a_sandwich_body_with_a_large_constant_is_never_over_certified():
    """The issue's counterexample: without the body's float32 rounding the radii exceed those of
    the exact network on most samples; with it (and the float64 pass where it decides) none does,
    and a float64 PGD inside the certified balls changes no label."""
    model = _sandwich_with_a_large_constant()
    x = torch.randn(200, 6)
    certifier = certify.Certifier(model, eps=[0.05, 0.1, 0.2])
    logits32, pred, radius = certifier(x)
    z64, err64, body64 = certifier.forward64(x)  # the exact logits to within ~1e-9
    exact_pred, exact = certified_radius(z64, model.head.weight, certifier.lip_body)
    slack = certified_radius(z64, model.head.weight, certifier.lip_body, err64, body64)[1]
    assert ((exact - slack) < 1e-6).all()  # the float64 pass pins the exact radius down
    w, k = model.head.weight, certifier.lip_body
    # the rule without the body's rounding: float32 margins less the head's rounding only
    head_only = certified_radius(logits32, w, k, certifier.forward32(x)[1])[1]
    assert (head_only > exact * (1 + 1e-3)).float().mean() > 0.3  # about half of them
    assert (radius <= exact * (1 + 1e-9) + 1e-12).all()
    assert ((radius > 0) == (exact > 1e-6)).float().mean() > 0.9  # and it does certify
    # a float64 attack within each certified ball
    steps, head64 = [float64_layer(layer) for layer in model.body], copy.deepcopy(model.head).double()

    class Exact(nn.Module):
        def forward(self, inputs):
            for step in steps:
                inputs = step(inputs)
            return head64(inputs)

    keep = (radius > 0) & (pred == exact_pred)
    adv = pgd_l2(Exact(), x[keep].double(), pred[keep], radius[keep].double() * (1 - 1e-6), steps=30, restarts=2)
    with torch.no_grad():
        assert (Exact()(adv).argmax(1) == pred[keep]).all()


_TRAINED: dict[str, nn.Module] = {}


def _trained_peer(family: str) -> nn.Module:
    """A tiny net of the family trained 10 steps on blobs (cached per family for this module)."""
    if family not in _TRAINED:
        _TRAINED[family] = trained_tiny(family, 10).eval()
    return _TRAINED[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_peers_take_the_screened_path_with_the_float64_decisions(family):
    """With eps a hair above sample radii, the screened certifier (float32 pass, float64 only where
    it decides) makes every decision the all-float64 certifier makes, recomputing some samples but
    not all, and its float32 pass certifies by itself where its analysis is rigorous."""
    model = _trained_peer(family)
    x, y = blobs(64, (3, 32, 32), seed=2)
    screened = screened_decides_as_float64(model, x, y)
    assert 0 < screened.recomputed < len(x)
    assert screened.forward32.rigorous == (family != "sandwich")


def test_a_certificate_never_depends_on_the_batch():
    """Two head rows 1e-6 apart: torch.cdist's |a|^2 + |b|^2 - 2ab form (used above 25 rows) gets
    their float32 distance wrong by a factor; the one helper does not, so every radius is the same
    in a batch of 100 and in batches of 10, and equal to the explicit float64 difference."""
    torch.manual_seed(0)
    model = models.create("moons-mlp", 10, (2,))
    with torch.no_grad():
        model.head.weight[1] = model.head.weight[0] + 1e-6 * torch.tensor([1.0] + [0.0] * 9)
    w = model.head.weight.detach()
    rows = torch.zeros(100, dtype=torch.long)
    explicit = (w[0].double() - w[1].double()).norm().item()
    assert not 0.5 * explicit < torch.cdist(w[rows], w)[0, 1].item() < 2 * explicit  # the hazard
    assert row_distances(w, rows)[0, 1].item() == pytest.approx(explicit, rel=1e-6)
    assert row_distances(w.double(), rows)[0, 1].item() == pytest.approx(explicit, rel=1e-12)
    # the rule on the same logits: bit for bit the same radius in a batch of 100 and of 10
    logits = torch.randn(100, 10, dtype=torch.float64)
    logits[:, 0] += 3
    whole = certified_radius(logits, w, 2.0)[1]
    parts = torch.cat([certified_radius(logits[i : i + 10], w, 2.0)[1] for i in range(0, 100, 10)])
    assert torch.equal(whole, parts) and (whole > 0).all()
    # ... and so is the loss's view of the pair (GloRo's bottom logit)
    from cll import losses

    z = logits.float().requires_grad_(True)
    full = losses.gloro_logits(z, w, 2.0, 0.1)
    sliced = torch.cat([losses.gloro_logits(z[i : i + 10], w, 2.0, 0.1) for i in range(0, 100, 10)])
    assert torch.equal(full, sliced)
    # the certifier end to end: equal up to the float32 forward's own batch-size noise
    x = torch.randn(100, 2)
    certifier = certify.Certifier(model, eps=[0.1])
    radius = certifier(x)[2]
    split = torch.cat([certifier(x[i : i + 10])[2] for i in range(0, 100, 10)])
    assert torch.allclose(radius, split, rtol=1e-5, atol=1e-9)


class Probe(nn.Identity):
    """An identity layer (bound 1, exact) that records the precision settings it runs under."""

    exact_bound = True

    def __init__(self, read):
        super().__init__()
        self.read, self.seen = read, []

    def forward(self, x):
        self.seen.append(self.read())
        return x

    def upper_bound(self, in_shape):
        return 1.0

    def rounding(self, in_shape, dtype):
        return lipschitz.Rounding(0.0, 0.0)


def test_the_certifier_runs_at_full_precision_whatever_the_caller_set():
    """Each precision switch set lower (bf16/TF32 inside float32 products): inside the certifier's
    passes every switch reads full precision, the decisions equal the default ones, and the caller's
    setting is back afterwards."""
    torch.manual_seed(0)
    b = torch.backends
    switches = [b.mkldnn.matmul, b.mkldnn.conv, b.cuda.matmul, b.cudnn.conv]
    probe = Probe(lambda: tuple(s.fp32_precision for s in switches))
    model = models.create("4C3F", 10, (1, 8, 8), width=0.25).eval()
    model.body = nn.Sequential(probe, *model.body)
    x, eps = torch.rand(64, 1, 8, 8), [0.01, 0.02]
    reference = certify.Certifier(model, eps=eps)(x)[2]
    lowered = [(b.mkldnn.matmul, "bf16"), (b.mkldnn.conv, "bf16"), (b.cuda.matmul, "tf32"), (b.cudnn.conv, "tf32")]
    for switch, value in [(None, "medium"), *lowered]:  # None: torch.set_float32_matmul_precision
        before = [s.fp32_precision for s in switches]
        if switch is None:
            torch.set_float32_matmul_precision(value)
        else:
            switch.fp32_precision = value
        setting = [s.fp32_precision for s in switches]
        try:
            probe.seen.clear()
            assert torch.equal(certify.Certifier(model, eps=eps)(x)[2], reference), value
            assert probe.seen and all(s == ("ieee",) * 4 for s in probe.seen), (switch, probe.seen)
            assert [s.fp32_precision for s in switches] == setting  # restored
        finally:
            torch.set_float32_matmul_precision("highest")
            for s, old in zip(switches, before):
                s.fp32_precision = old


def test_tracing_shapes_leaves_the_power_iterates_alone():
    """A training-mode dry forward advances SOC's and CPL's iterates; the bound (and train.json's
    lipschitz_bound) must be that of the state that was saved, so tracing restores every buffer."""
    torch.manual_seed(0)
    model = models.create("LipConv-5", 10, (3, 32, 32), width=1 / 8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = lipschitz.upper_bound_body(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert lipschitz.upper_bound_body(model) == first
    copy_ = copy.deepcopy(model).eval()
    assert lipschitz.upper_bound_body(copy_) == first  # the same state in evaluation mode


@pytest.mark.parametrize(
    "make", [lambda: L.CPLConv(4, 3, (6, 6)), lambda: L.SandwichLinear(6, 4), lambda: L.SOC(4, 4)],
    ids=["cpl", "sandwich", "soc"],
)  # fmt: skip
def test_a_deep_copy_never_keeps_a_stale_cache(make):
    torch.manual_seed(0)
    layer, other = make().eval(), make().eval()
    x = torch.randn(2, *((4, 6, 6) if not isinstance(layer, L.SandwichLinear) else (6,)))
    layer(x)  # fills the cache
    twin = copy.deepcopy(layer)
    twin.load_state_dict(other.state_dict())
    assert torch.equal(twin(x), other(x))
    with torch.no_grad():  # an in-place change of the weights outdates the cache as well
        other.weight.add_(0.1 * torch.randn_like(other.weight))
    assert not torch.equal(other(x), twin(x))


def test_estimates_are_null_where_power_iteration_does_not_follow_the_layers():
    torch.manual_seed(0)
    peer = tiny("cpl", 3, (3, 32, 32), head="lln")
    assert lipschitz.estimate_converged_body(peer) is None and lipschitz.estimate_constant(peer) is None
    gloro = models.create("2C2F", 10, (1, 8, 8))
    assert lipschitz.estimate_converged_body(gloro) <= lipschitz.upper_bound_body(gloro) * (1 + 1e-6)
    assert math.isfinite(lipschitz.estimate_constant(gloro))


@pytest.mark.slow
def test_the_audit_catches_a_bound_ten_percent_too_small():
    """A LipConv net is gradient-norm preserving (orthogonal layers, HH1): its certificates are
    nearly tight (nearest adversarial point / radius ~1.1), so a K_F scaled by 0.9 certifies radii
    that an attack at each point's own radius breaks; the true bound breaks nothing. (GloRo-family
    nets are looser, ratio >= 2 on a trained digits 4C3F: no attack can see 10 % there.)"""
    from cll.audit import audit
    from cll.lipschitz import bound

    model = _trained_peer("lipconv")
    x, y = blobs(8, (3, 32, 32), seed=3)
    honest = audit(model, x, y, [], steps=10, restarts=1)
    assert honest["broken"] == 0 and honest["own_radius"]["attacked"] >= 6
    assert 1 <= honest["tightness"]["quantiles"]["median"] < 1.2
    real, seen = bound.upper_bound_layer, []

    def too_small(layer, shape, *args, **kwargs):  # the first layer's bound (the normalisation), x 0.9
        seen.append(layer)
        return real(layer, shape, *args, **kwargs) * (0.9 if len(seen) == 1 else 1.0)

    bound.upper_bound_layer = too_small
    try:
        scaled = audit(model, x, y, [], steps=10, restarts=1)
    finally:
        bound.upper_bound_layer = real
    assert scaled["own_radius"]["broken"] >= 3 and scaled["broken"] >= 3
