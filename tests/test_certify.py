"""The certifier: the rule itself, and soundness against a strong attack on trained models."""

import math

import pytest
import torch
from helpers import screened_decides_as_float64

from cll import certify, data, lipschitz
from cll.attack import pgd_l2
from cll.certify import certified_radius
from cll.models import LipschitzNet

MOONS = dict(
    dataset="moons",
    arch="moons-mlp",
    loss="cll",
    eps=0.15,
    p=0.01,
    cll_form="per_logit",
    cll_offset="one-sided",
    lip_penalty=1e-6,
    batch_size=250,
    lr=0.01,
    epochs=30,
)
DIGITS = dict(
    dataset="digits", arch="2C2F", loss="cll", eps=0.3, p=0.1, lip_penalty=1e-3, batch_size=64, lr=3e-3, epochs=6
)
GLORO = dict(DIGITS, loss="gloro", eps=0.3)


def test_radius_rule():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    z = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    pred, radius = certified_radius(z, w, lip_body=2.0)
    # row 0: pred 0, gaps 2 over 2*sqrt(2) and 3 over 2*1 -> min = 1/sqrt(2)
    assert pred[0] == 0 and radius[0].item() == pytest.approx(1 / math.sqrt(2))
    # row 1: a tie between classes 0 and 1 has radius 0: never certified
    assert radius[1].item() == 0.0


def test_strict_inequality_and_label():
    """radius exactly eps is not certified; the prediction must equal the label."""
    head = torch.nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.5], [-0.5]]))
        head.bias.zero_()
    model = LipschitzNet(torch.nn.Sequential(torch.nn.Identity()), head, (1,))
    x = torch.ones(2, 1)  # z = (0.5, -0.5): margin 1, ||W_0 - W_1|| = 1, K_F = 1 -> radius 1
    out = certify.certify(model, [(x, torch.tensor([0, 1]))], [1.0, 0.999])
    assert out["clean_accuracy"] == 0.5
    assert out["cra"] == {"1": 0.0, "0.999": 0.5}


def _certified_points(cfg, model, eps_list, n=400):
    _, test_set, _ = data.load_dataset(cfg.dataset, seed=cfg.seed, max_test=n)
    x, y = next(iter(torch.utils.data.DataLoader(test_set, batch_size=n)))
    body = lipschitz.upper_bound_body(model)
    with torch.no_grad():
        pred, radius = certified_radius(model(x), model.head.weight, body)
    return x, y, pred, radius


@pytest.mark.slow
@pytest.mark.parametrize("values", [MOONS, DIGITS, GLORO], ids=["moons-cll", "digits-cll", "digits-gloro"])
def test_no_certified_point_is_broken_by_pgd(trained_run, values):
    cfg, model, _ = trained_run(**values)
    eps_list = [0.15] if cfg.dataset == "moons" else [36 / 255, 72 / 255, 108 / 255]
    x, y, pred, radius = _certified_points(cfg, model, eps_list)
    checked = 0
    for eps in eps_list:
        mask = (pred == y) & (radius > eps)
        if mask.sum() == 0:
            continue
        adv = pgd_l2(model, x[mask], y[mask], eps, steps=40, restarts=4)
        assert ((adv - x[mask]).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
        with torch.no_grad():
            broken = model(adv).argmax(1) != y[mask]
        assert broken.sum().item() == 0, f"{broken.sum().item()} certified points broken at eps {eps}"
        checked += mask.sum().item()
    assert checked > 0, "no certified point to attack: the test would prove nothing"


@pytest.mark.slow
def test_attack_is_strong_enough_to_matter(trained_run):
    """The same attack does break correctly classified points that are not certified at a large
    radius: so finding nothing on certified points means something."""
    cfg, model, _ = trained_run(**DIGITS)
    x, y, pred, radius = _certified_points(cfg, model, [2.0])
    mask = (pred == y) & (radius <= 2.0)
    adv = pgd_l2(model, x[mask], y[mask], 2.0, steps=40, restarts=2)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y[mask]).float().mean().item() > 0.5


@pytest.mark.slow
def test_certify_report(trained_run):
    _cfg, model, _ = trained_run(**DIGITS)
    _, test_set, _ = data.load_dataset("digits")
    out = certify.certify(model, torch.utils.data.DataLoader(test_set, batch_size=100), [36 / 255, 72 / 255, 108 / 255])
    assert set(out["cra"]) == {"0.1412", "0.2824", "0.4235"}
    assert out["n_samples"] == len(test_set)
    cras = list(out["cra"].values())
    assert all(0 <= c <= out["clean_accuracy"] <= 1 for c in cras)
    assert cras == sorted(cras, reverse=True)  # CRA falls with eps
    # the sound bound never certifies more than the (lower) estimate would
    assert all(out["cra"][k] <= out["cra_estimate"][k] for k in out["cra"])
    assert out["lipschitz_constant"] >= out["lipschitz_estimate"]


# ------------------------------------------------------------------ rounding of the forward pass
def _exact_logits(model, x_row):
    """The logits of the exact network (float32 parameters read as rationals) at one input
    (nested lists: [c][i][j] for images, flat for vectors)."""
    from fractions import Fraction

    from cll.layers import MaxMin

    def exact(v):
        return [exact(u) for u in v] if isinstance(v, list) else Fraction(float(v))

    def flat(v):
        return [t for u in v for t in flat(u)] if isinstance(v, list) else [v]

    h = exact(x_row)
    for layer in list(model.body) + [model.head]:
        if isinstance(layer, torch.nn.Linear):
            w, b = exact(layer.weight.detach().tolist()), exact(layer.bias.detach().tolist())
            h = [sum((wij * hj for wij, hj in zip(row, h)), bi) for row, bi in zip(w, b)]
        elif isinstance(layer, torch.nn.Conv2d):
            w, b = exact(layer.weight.detach().tolist()), exact(layer.bias.detach().tolist())
            (s, _), (p, _), (k, _) = layer.stride, layer.padding, layer.kernel_size
            size = len(h[0])
            out = (size + 2 * p - k) // s + 1

            def pixel(c, i, j):
                return h[c][i][j] if 0 <= i < size and 0 <= j < size else 0

            h = [
                [
                    [
                        sum(
                            (
                                w[o][c][a][d] * pixel(c, i * s + a - p, j * s + d - p)
                                for c in range(len(h))
                                for a in range(k)
                                for d in range(k)
                            ),
                            b[o],
                        )
                        for j in range(out)
                    ]
                    for i in range(out)
                ]
                for o in range(len(w))
            ]
        elif isinstance(layer, MaxMin):
            pairs = list(zip(h[0::2], h[1::2]))
            if isinstance(h[0], list):  # channels: elementwise over their pixels
                h = [[[max(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)] for a, b in pairs] + [
                    [[min(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)] for a, b in pairs
                ]
            else:
                h = [max(p) for p in pairs] + [min(p) for p in pairs]
        elif isinstance(layer, torch.nn.Flatten):
            h = flat(h)
        else:
            raise AssertionError(f"no exact evaluation for {layer}")
    return h


def test_float64_rounding_bound_covers_the_exact_logits():
    """Against exact rational arithmetic: |z64 - z| <= r_i + ||W_i|| E for every logit, while the
    float32 pass is off by far more than the float64 bound (which is why margins are recomputed)."""
    torch.manual_seed(7)
    model = __import__("cll.models", fromlist=["create"]).create("moons-mlp", 2, (2,))
    with torch.no_grad():  # large, varied weights and inputs make rounding visible
        for layer in model.body:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(3.0)
                layer.bias.normal_(0, 5.0)
    x = torch.randn(6, 2) * 100
    forward = certify.Certifier(model).forward64
    z64, logit_error, body_error = forward(x)
    z32 = model(x).double()
    w_norm = model.head.weight.detach().double().norm(dim=1)
    worst32 = worst64 = 0.0
    for n in range(len(x)):
        exact = torch.tensor([float(v) for v in _exact_logits(model, x[n].tolist())], dtype=torch.float64)
        bound = logit_error[n] + w_norm * body_error[n]
        assert ((z64[n] - exact).abs() <= bound).all(), (z64[n] - exact, bound)
        scale = exact.abs().max().item()
        worst64 = max(worst64, (bound.max() / scale).item())
        worst32 = max(worst32, ((z32[n] - exact).abs().max() / scale).item())
    assert worst64 < 1e-9  # the bound is negligible next to any margin that matters
    assert worst32 > 1e3 * worst64  # ... while float32 margins are not exact at all


def _loud_rounding(model):
    """Large, varied weights and biases: float32 rounding becomes visible in the logits."""
    with torch.no_grad():
        for layer in model.body:
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                layer.weight.mul_(3.0)
                layer.bias.normal_(0, 5.0)
    return model


@pytest.mark.parametrize("arch,in_shape,scale", [("moons-mlp", (2,), 100.0), ("2C2F", (1, 6, 6), 10.0)])
def test_float32_rounding_bound_covers_the_exact_logits(arch, in_shape, scale):
    """Against exact rational arithmetic: the float32 pass model(x) is within its own bound
    (Float32Pass: logit error r_i + ||W_i|| E) of the exact logits, for dense and conv layers."""
    from cll import models

    torch.manual_seed(11)
    model = _loud_rounding(models.create(arch, 10 if len(in_shape) == 3 else 2, in_shape))
    x = torch.randn(4, *in_shape) * scale
    bound32 = certify.Certifier(model).forward32
    z32, logit_error, body_error = bound32(x)
    assert torch.equal(z32, model(x))  # the certified logits are model(x) itself
    w_norm = model.head.weight.detach().double().norm(dim=1)
    slack = 0.0
    for n in range(len(x)):
        exact = torch.tensor([float(v) for v in _exact_logits(model, x[n].tolist())], dtype=torch.float64)
        bound = logit_error[n] + w_norm * body_error[n]
        off = (z32[n].double() - exact).abs()
        assert (off <= bound).all(), (off, bound)
        slack = max(slack, (off / bound).max().item())
    assert slack > 0  # rounding did happen, the bound was not vacuous by a missing case
    assert (bound / exact.abs().max()).max() < 5e-2  # ... and it is not vacuous by size either (worst case)


def test_nonnegative_norm_bound_is_an_upper_bound_close_to_the_norm():
    torch.manual_seed(3)
    for shape in [(5, 7), (64, 32), (512, 300)]:
        m = torch.rand(shape, dtype=torch.float64) ** 3
        m[0] = 0  # a zero row and column must not break the positivity of the iterate
        m[:, 1] = 0
        exact = torch.linalg.matrix_norm(m, 2).item()
        bound = lipschitz.nonnegative_norm_bound(m)
        assert exact <= bound <= exact * (1 + 1e-6)
    # for a conv, || sum_s |K_s| || bounds the norm of the conv with |K| at any stride and padding
    weight = torch.randn(6, 4, 3, 3)
    absolute = weight.abs().sum((2, 3)).double()
    for stride, padding in [(1, 1), (2, 1), (2, 0)]:
        matrix = lipschitz.conv_matrix(weight.abs(), (4, 7, 7), (stride, stride), (padding, padding))
        assert torch.linalg.matrix_norm(matrix, 2).item() <= lipschitz.nonnegative_norm_bound(absolute)


@pytest.mark.slow
@pytest.mark.parametrize("values", [MOONS, DIGITS], ids=["moons", "digits"])
def test_float64_only_where_it_decides_gives_the_same_certificates(trained_run, values):
    """The certifier settles most samples with the float32 bound and recomputes the rest in float64:
    at eps placed among the radii every decision equals that of the float64 pass over every sample."""
    cfg, model, _ = trained_run(**values)
    _, test_set, _ = data.load_dataset(cfg.dataset, seed=cfg.seed, max_test=400)
    x, y = next(iter(torch.utils.data.DataLoader(test_set, batch_size=400)))
    screened = screened_decides_as_float64(model, x, y)
    # the float32 bound cannot settle a sample whose radius is that close to an eps: recomputed, first
    # from the restart layer on (the dense layers), then from the input where that does not settle it
    assert 0 < screened.recomputed < len(x)
    assert screened.forward32.restart is not None and screened.resumed >= screened.recomputed


def test_rounding_term_is_subtracted_from_the_margin():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0]])
    _, plain = certified_radius(z, w, lip_body=1.0)
    assert plain.item() == pytest.approx(1 / math.sqrt(2))
    _, head = certified_radius(z, w, 1.0, logit_error=torch.tensor([[0.1, 0.2]]))
    assert head.item() == pytest.approx(0.7 / math.sqrt(2))
    _, body = certified_radius(z, w, 1.0, body_error=torch.tensor([0.1]))
    assert body.item() == pytest.approx(1 / math.sqrt(2) - 0.1)
    # an error larger than the margin leaves nothing certified, never a negative radius
    _, gone = certified_radius(z, w, 1.0, logit_error=torch.tensor([[0.6, 0.6]]))
    assert gone.item() == 0.0


@pytest.mark.slow
def test_certify_reports_rounding_and_refuses_a_foreign_forward(trained_run):
    from cll.errors import CllError

    _cfg, model, _ = trained_run(**MOONS)
    _, test_set, _ = data.load_dataset("moons", max_test=500)
    loader = torch.utils.data.DataLoader(test_set, batch_size=250)
    out = certify.certify(model, loader, [0.15])
    assert out["rounding"] == "rigorous"
    assert 0 <= out["float64_share"] < 0.1  # the float32 bound settles almost every sample
    assert 0 <= out["float32_gap"] < 1e-4
    assert set(out["cra_unrounded"]) == {"0.15"}
    everything = certify.Certifier(model)  # no eps: every sample through the float64 pass
    everything(next(iter(loader))[0])
    assert everything.recomputed == 250 and 0 < everything.max_gap < 1e-4
    # the float64 margins and their rounding term cost (almost) nothing against float32 margins
    assert abs(out["cra"]["0.15"] - out["cra_unrounded"]["0.15"]) <= 2 / 500

    class Doubled(type(model)):
        def forward(self, x):
            return 2 * super().forward(x)

    model.__class__ = Doubled
    try:
        with pytest.raises(CllError, match="does not follow the certifier's interface"):
            certify.certify(model, loader, [0.15])
    finally:
        model.__class__ = Doubled.__mro__[1]


@pytest.mark.parametrize(
    "arch,in_shape,classes", [("moons-mlp", (2,), 2), ("2C2F", (1, 12, 12), 10), ("4C3F", (1, 8, 8), 10)]
)
def test_certifier_k_is_the_sound_body_bound(arch, in_shape, classes):
    """The certifier forms K_F from the per-layer bounds its float64 pass needs anyway: it must be
    exactly lipschitz.upper_bound_body's."""
    from cll import models

    torch.manual_seed(8)
    model = models.create(arch, classes, in_shape)
    assert certify.Certifier(model).lip_body == lipschitz.upper_bound_body(model)
