"""Local-Lip-B: the clipped activations, the sound and estimated local bounds, the loss.

Soundness is checked against what exact arithmetic says of small random nets: the masked local
bound is >= the spectral norm of the body's Jacobian (explicit, float64) at points sampled in the
ball; the pre-activation bounds contain every sampled pre-activation and a masked output never
moves; the interval step is compared with exact rational interval arithmetic; and the local bound
is never above the global sound bound. The nets get small random thresholds, so that many
neurons are masked and the checks have something to bite on.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cll import lipschitz, local_lipschitz, losses, models
from cll.config import build_config
from cll.errors import ConfigError
from cll.layers import ACTIVATIONS, ClippedMaxMin, ClippedReLU, MaxMin
from cll.lipschitz.rounding import EXACT
from cll.local_lipschitz import LocalBound, estimate_local, upper_bound_local

# (name, convs, dense, in_shape, activation): tiny GloRo-family nets
NETS = [
    ("mlp-relu", [], [8, 8, 6], (3,), "clipped_relu"),
    ("mlp-maxmin", [], [8, 8, 6], (3,), "clipped_maxmin"),
    ("conv-relu", [(4, 3, 1, 1), (6, 3, 2, 1)], [8], (1, 6, 6), "clipped_relu"),
    ("conv-maxmin", [(4, 3, 1, 1), (6, 3, 2, 1)], [8], (1, 6, 6), "clipped_maxmin"),
    ("conv-plain-maxmin", [(4, 3, 1, 1), (6, 3, 2, 1)], [8], (1, 6, 6), "maxmin"),
]


def make_net(convs, dense, in_shape, activation, seed=0, scale=0.5):
    """A tiny net with thresholds uniform in [0, scale] (max branch) / [-scale, 0] (min branch)."""
    torch.manual_seed(seed)
    model = models.gloro_net(convs, dense, 3, in_shape, activation=activation)
    with torch.no_grad():
        for m in model.body:
            for name, p in m.named_parameters():
                p.copy_(scale * torch.rand_like(p) * (-1 if name == "theta_min" else 1))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.normal_(0, 0.3)
    return model.eval()


def ball_samples(x: torch.Tensor, eps: float, n: int, seed: int = 0) -> torch.Tensor:
    """n points of the closed ball B(x, eps) (float64): uniform inside, a third on the sphere."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, x.numel(), generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    r = torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / x.numel())
    r[: n // 3] = 1.0
    return x.double().flatten() + eps * r * d


def head_distances(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """||W_r - W_i|| by explicit differences, (len(rows), C)."""
    return (w[rows][:, None, :] - w[None]).norm(dim=-1)


def certified_count(model, x, y, lip, eps, slack=0.0) -> int:
    """Samples whose float64 margins (lowered by ``slack`` times the logit scale) exceed
    eps * lip * ||W_y - W_i|| for every other class i."""
    z, w = copy.deepcopy(model).double()(x.double()), model.head.weight.double()
    margin = (z.gather(1, y[:, None]) - z - slack * z.abs().amax(1, keepdim=True)).scatter(1, y[:, None], math.inf)
    lip = torch.as_tensor(lip, dtype=torch.float64).reshape(-1, 1)
    return ((z.argmax(1) == y) & (margin > eps * lip * head_distances(w, y)).all(1)).sum().item()


def body_jacobian_norm(body64: nn.Module, point: torch.Tensor, in_shape) -> float:
    jac = torch.func.jacrev(lambda v: body64(v.view(1, *in_shape)).flatten())(point)
    return torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2).item()


# ------------------------------------------------------------------------------ the layers
def test_clipped_layers_forward_and_contract():
    torch.manual_seed(0)
    x = 3 * torch.randn(5, 4, 3, 3)
    relu = ClippedReLU((4, 3, 3), init=0.7)
    assert torch.equal(relu(x), x.clamp(0.0, 0.7))
    maxmin = ClippedMaxMin((4, 3, 3), init=0.7)
    plain = MaxMin()(x)
    assert torch.equal(maxmin(x), torch.cat([plain[:, :2].clamp(max=0.7), plain[:, 2:].clamp(min=-0.7)], 1))
    assert torch.equal(ClippedMaxMin((4, 3, 3), init=1e9)(x), plain)  # huge thresholds: plain MaxMin
    for layer in (relu, maxmin):
        assert layer.upper_bound((4, 3, 3)) == 1.0 and layer.exact_bound
        assert layer.rounding((4, 3, 3), torch.float32) == layer.rounding((4, 3, 3), torch.float64) == EXACT
        y = x + 0.1 * torch.randn_like(x)  # 1-Lipschitz in l2, per sample
        assert ((layer(x) - layer(y)).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) + 1e-6).all()
    with torch.no_grad():
        relu.theta.fill_(-1.0), maxmin.theta_max.fill_(-1.0), maxmin.theta_min.fill_(2.0)
    relu.constrain_(), maxmin.constrain_()
    assert relu.theta.min() == 0 and maxmin.theta_max.min() == 0 and maxmin.theta_min.max() == 0
    assert not relu.exact_bound  # every theta 0: a constant layer
    with pytest.raises(ValueError, match="even channel count"):
        ClippedMaxMin((3, 2, 2))


def test_activation_is_a_run_config_choice_for_gloro_nets_only():
    assert ACTIVATIONS.names() == ["maxmin", "clipped_maxmin", "clipped_relu"]
    plain = models.create("4C3F", 10, (1, 8, 8))
    clipped = models.create("4C3F", 10, (1, 8, 8), activation="clipped_maxmin", clip_init=[1, 2, 3, 4, 5, 6])
    convs = lambda m: [(c.in_channels, c.out_channels) for c in m.body if isinstance(c, nn.Conv2d)]
    assert convs(plain) == convs(clipped)  # 8C2F/4C3F mean the same network whatever the activation
    thresholds = [m.theta_max.flatten()[0].item() for m in clipped.body if isinstance(m, ClippedMaxMin)]
    assert thresholds == [1, 2, 3, 4, 5, 6]
    assert lipschitz.upper_bound_body(clipped) > 0  # the sound global bound knows the clipped layers
    with pytest.raises(ConfigError, match="6 activation layers"):
        models.create("4C3F", 10, (1, 8, 8), activation="clipped_relu", clip_init=[1, 2])
    with pytest.raises(ConfigError, match="applies to the GloRo-family"):
        models.create("CPL-S", 10, (3, 32, 32), activation="clipped_relu")
    with pytest.raises(ConfigError, match=r"activation: 'gelu' is not allowed.*clipped_relu"):
        build_config({"dataset": "digits", "arch": "4C3F", "loss": "local_lip_b", "activation": "gelu"})
    with pytest.raises(ConfigError, match="clip_init"):
        build_config({"dataset": "digits", "arch": "4C3F", "loss": "local_lip_b", "clip_init": [-1.0]})


# ------------------------------------------------------------------------------ soundness
@pytest.mark.parametrize("name,convs,dense,in_shape,activation", NETS, ids=[n[0] for n in NETS])
def test_local_bound_above_sampled_jacobians_and_below_global(name, convs, dense, in_shape, activation):
    model = make_net(convs, dense, in_shape, activation)
    body64 = copy.deepcopy(model.body).double()
    k_global = lipschitz.upper_bound_body(model)
    bound = LocalBound(model)
    torch.manual_seed(1)
    x = torch.rand(4, *in_shape)
    ratios = []
    for eps in (0.02, 0.2, 1.0):
        k = bound(x, eps)
        assert k.dtype == torch.float64 and k.shape == (4,)
        assert (k <= k_global).all(), (k, k_global)
        for i in range(len(x)):
            sampled = max(body_jacobian_norm(body64, p, in_shape) for p in ball_samples(x[i], eps, 60, seed=i))
            assert sampled <= k[i].item(), (eps, i, sampled, k[i].item())
            ratios.append(k[i].item() / k_global)
    if activation != "maxmin":  # the masks matter: some local bounds are far below the global one
        assert min(ratios) < 0.9, ratios
    else:  # nothing is ever constant: the local bound is the global one (up to rounding)
        assert min(ratios) > 1 - 1e-6, ratios


@pytest.mark.parametrize("name,convs,dense,in_shape,activation", NETS[:4], ids=[n[0] for n in NETS[:4]])
def test_masks_never_drop_a_neuron_that_moves_in_the_ball(name, convs, dense, in_shape, activation):
    model = make_net(convs, dense, in_shape, activation, seed=2)
    body64 = copy.deepcopy(model.body).double()
    acts = [i for i, m in enumerate(body64) if isinstance(m, (ClippedReLU, MaxMin))]
    torch.manual_seed(3)
    x = torch.rand(3, *in_shape)
    for eps in (0.05, 0.5):
        trace = []
        LocalBound(model)(x, eps, trace=trace)
        assert len(trace) == len(acts)
        masked = 0
        for i in range(len(x)):
            points = ball_samples(x[i], eps, 400, seed=10 + i).view(-1, *in_shape)
            h = torch.cat([x[i : i + 1].double(), points])
            for index, layer in enumerate(body64):
                if index in acts:
                    lo, hi, varies = trace[acts.index(index)]
                    assert (lo[i] <= h).all() and (h <= hi[i]).all()  # every sampled pre-activation
                    out = layer(h)
                    fixed = ~varies[i]
                    assert (out[:, fixed] == out[:1, fixed]).all()  # a masked output never moves
                    masked += fixed.sum().item()
                    # the proof's premise: the activation's Jacobian J = D J E at every sampled point
                    e_mask = local_lipschitz.activation_masks(layer, lo[i : i + 1], hi[i : i + 1])[0][0]
                    jac = torch.func.vmap(torch.func.jacrev(lambda v, f=layer: f(v[None])[0]))(h)
                    jac = jac.reshape(len(h), fixed.numel(), -1)
                    assert (jac[:, fixed.flatten()] == 0).all() and (jac[:, :, ~e_mask.flatten()] == 0).all()
                    h = out
                else:
                    h = layer(h)
        assert masked > 0


def test_first_layer_bounds_are_the_exact_ranges():
    """For the first layer the ball bound is the exact range c_k -+ eps ||W_k|| over the ball: the
    sound bounds hold it and exceed it only by rounding."""
    model = make_net([], [6, 4], (5,), "clipped_relu", seed=4)
    x, eps = torch.rand(3, 5), 0.3
    trace = []
    LocalBound(model)(x, eps, trace=trace)
    lo, hi, _ = trace[0]
    layer = model.body[0]
    w, b = layer.weight.double(), layer.bias.double()
    centre = x.double() @ w.t() + b
    reach = eps * w.norm(dim=1)
    assert (lo <= centre - reach).all() and (hi >= centre + reach).all()
    assert torch.allclose(lo, centre - reach, rtol=0, atol=1e-12) and torch.allclose(hi, centre + reach, atol=1e-12)


def _exact_box(w, b, lo, hi):
    """Exact rational interval image of the box [lo, hi] under z -> W z + b (lists of Fractions)."""
    rows = []
    for wk, bk in zip(w, b):
        low = sum((min(a * lj, a * hj) for a, lj, hj in zip(wk, lo, hi)), Fraction(bk))
        high = sum((max(a * lj, a * hj) for a, lj, hj in zip(wk, lo, hi)), Fraction(bk))
        rows.append((low, high))
    return rows


def test_interval_step_contains_exact_rational_interval_arithmetic():
    """_affine_bounds in float64 against exact interval arithmetic on the same float32 weights,
    with inputs chosen for cancellation (large, nearly opposite terms)."""
    torch.manual_seed(5)
    layer = nn.Linear(40, 6)
    with torch.no_grad():
        layer.weight.mul_(1e3), layer.bias.mul_(1e4)
    centre = torch.randn(2, 40, dtype=torch.float64) * 1e4
    lo, hi = centre - 1e-3, centre + torch.rand(2, 40, dtype=torch.float64)
    lo_f, hi_f = local_lipschitz._affine_bounds(layer, lo, hi, sound=True)
    p_lo, p_hi = local_lipschitz._affine_bounds(layer, centre, centre, sound=True)
    to_q = lambda t: [Fraction(v) for v in t.tolist()]
    w = [to_q(row) for row in layer.weight.double()]
    b = to_q(layer.bias.double())
    for n in range(2):
        boxes = _exact_box(w, b, to_q(lo[n]), to_q(hi[n]))
        points = _exact_box(w, b, to_q(centre[n]), to_q(centre[n]))
        for k, ((low, high), (value, _)) in enumerate(zip(boxes, points)):
            assert Fraction(lo_f[n, k].item()) <= low and high <= Fraction(hi_f[n, k].item())
            assert Fraction(p_lo[n, k].item()) <= value <= Fraction(p_hi[n, k].item())
            scale = float(abs(low) + abs(high)) + 1.0
            assert float(low - Fraction(lo_f[n, k].item())) < 1e-9 * scale  # and only rounding wider


def test_masked_norm_and_row_norms_bound_the_exact_values():
    torch.manual_seed(6)
    layer = nn.Linear(30, 20)
    a = layer.weight.detach().double()
    e, d = torch.rand(5, 20) < 0.6, torch.rand(5, 30) < 0.4
    e[0], d[0] = True, True  # an unmasked sample shares the full matrix's Gram
    bound = local_lipschitz._masked_norm_bound(a, e, d)
    for n in range(5):
        exact = torch.linalg.matrix_norm(a * e[n, :, None] * d[n, None, :], ord=2).item()
        assert exact <= bound[n].item() <= exact * (1 + 1e-9) + 1e-300
    rows = local_lipschitz._row_norms(layer, d, (30,), sound=True)
    w = [[Fraction(v) for v in row] for row in a.tolist()]
    for n in range(5):
        for k in range(20):
            exact = sum((wkj * wkj for wkj, keep in zip(w[k], d[n].tolist()) if keep), Fraction(0))
            assert Fraction(rows[n, k].item()) ** 2 >= exact


def test_upper_bound_local_is_per_sample_and_rejects_unknown_layers():
    model = make_net([], [8, 6], (3,), "clipped_relu", seed=7)
    x = torch.rand(4, 3)
    together = upper_bound_local(model, x, 0.1)
    alone = torch.stack([upper_bound_local(model, x[i : i + 1], 0.1)[0] for i in range(4)])
    assert torch.equal(together, alone)
    assert (upper_bound_local(model, x, 0.0) <= together).all()  # a smaller ball, more masked
    with pytest.raises(ValueError, match="eps must be"):
        upper_bound_local(model, x, -1.0)
    odd = copy.deepcopy(model)
    odd.body[1] = nn.Tanh()
    with pytest.raises(TypeError, match="no local bound for layer type Tanh"):
        upper_bound_local(odd, x, 0.1)


# ------------------------------------------------------------------------------ the estimate and the loss
def test_estimate_has_gradients_and_sparsity_for_every_threshold():
    model = make_net([(4, 3, 1, 1)], [8], (1, 6, 6), "clipped_maxmin", seed=8, scale=2.0).train()
    est = estimate_local(model, torch.rand(5, 1, 6, 6), 0.2, n_iter=3)
    assert est.lip.shape == (5,) and (est.lip > 0).all() and est.sparsity > 0
    (est.lip.sum() + est.sparsity).backward()
    for name, p in model.named_parameters():
        if not name.startswith("head"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the sparsity term reaches every clipped layer's thresholds (where its hinge is active)
    clipped = [m for m in model.body if isinstance(m, ClippedMaxMin)]
    assert all(m.theta_max.grad.abs().sum() + m.theta_min.grad.abs().sum() > 0 for m in clipped)


def test_worst_logits_decide_as_the_certificate_rule():
    torch.manual_seed(9)
    z, w, lip, y, eps = torch.randn(300, 5), torch.randn(5, 7), torch.rand(300) * 2, torch.randint(0, 5, (300,)), 0.3
    worst = losses.worst_logits(z, y, w, lip, eps)
    margin_ok = ((z.gather(1, y[:, None]) - z) > eps * lip[:, None] * head_distances(w, y)).scatter(1, y[:, None], True)
    assert torch.equal(worst.argmax(1) == y, margin_ok.all(1))


def test_local_lip_b_loss_ramps_and_trains():
    cfg = build_config(
        {"dataset": "digits", "arch": "4C3F", "loss": "local_lip_b", "eps": 0.2, "eps_warmup": 0.5, "pi_iters": 2}
    )
    criterion = losses.create(cfg)
    assert criterion.ramp(0.0) == 0.0 and criterion.ramp(0.25) == 0.5 and criterion.ramp(0.9) == 1.0
    model = make_net([(4, 3, 1, 1)], [16], (1, 6, 6), "clipped_relu", seed=10, scale=1.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(11)
    x, y = torch.rand(32, 1, 6, 6), torch.randint(0, 3, (32,))
    first = None
    for _ in range(30):
        est = criterion.local_estimate(model, x, progress=1.0)
        loss = criterion(model(x), y, model.head.weight, est, progress=1.0)
        assert torch.isfinite(loss)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    z = model(x).detach()  # at progress 0: plain cross-entropy
    assert criterion(z, y, model.head.weight, est, progress=0.0).item() == pytest.approx(F.cross_entropy(z, y).item())


# ------------------------------------------------------------------------------ certificates
def test_the_certifier_and_the_audit_use_the_local_bound():
    """certify(local=True) counts under the sound local bound what the rule counts when recomputed
    without screening from plain float64 margins, the global CRA beside it; the audit attacks the
    local certificates and breaks none."""
    from cll import audit, certify

    model = make_net([(4, 3, 1, 1), (6, 3, 2, 1)], [8], (1, 6, 6), "clipped_relu", seed=12)
    torch.manual_seed(13)
    x = torch.rand(40, 1, 6, 6)
    y = model(x).argmax(1)  # every prediction right: the counts are about the radii
    eps = [1e-3, 1e-2]
    out = certify.certify(model, [(x, y)], eps, local=True, local_estimate_iters=50)
    assert out["clean_accuracy"] == 1.0
    k_global = lipschitz.upper_bound_body(model)
    for e in eps:
        key = certify.eps_key(e)
        local, by_global = round(out["cra"][key] * 40), round(out["cra_global"][key] * 40)
        assert by_global <= local <= 40
        # the rounding terms lower the margins by far less than 1e-9 of the logit scale
        k = upper_bound_local(model, x, e)
        assert certified_count(model, x, y, k, e, 1e-9) <= local <= certified_count(model, x, y, k, e)
        assert certified_count(model, x, y, k_global, e, 1e-9) <= by_global <= certified_count(model, x, y, k_global, e)
    assert out["cra"][certify.eps_key(1e-2)] > out["cra_global"][certify.eps_key(1e-2)] and out["local_share"] > 0
    audited = audit.audit(model, x, y, eps, steps=10, restarts=1, local=True)
    plain = audit.audit(model, x, y, eps, steps=10, restarts=1)
    key = certify.eps_key(1e-2)
    assert audited["per_eps"][key]["certified"] == round(out["cra"][key] * 40) > plain["per_eps"][key]["certified"]
    assert audited["broken"] == 0


@pytest.mark.workflow(seconds=20)
@pytest.mark.timeout(900)
def test_digits_run_through_the_workflow_is_certified_and_audited(ci_run):
    """The CI grid's Local-Lip-B cell through train -> certify -> audit -> tables (the CI grid's
    run, conftest.ci_run); then the run's local certificates: never fewer than the global ones,
    and none broken by an attack at its own radius."""
    from cll import attack, certify, data
    from cll.results import read_json
    from cll.train import load_run

    ci_run.check()
    (cell,) = [c for c in ci_run.grid.runnable() if c.loss == "local_lip_b"]
    run_dir = cell.path(ci_run.results)
    certified = read_json(run_dir / "certify.json")
    assert certified["cra"]["0.005"] > 0  # the global certificate already certifies a few points
    assert read_json(run_dir / "audit.json")["broken"] == 0
    assert (ci_run.results / "tables" / "digits-local.md").is_file()

    cfg, model = load_run(run_dir)
    _, test, _ = data.load_dataset("digits", augment=False, seed=cfg.seed, max_test=cfg.max_test)  # as cll certify
    x, y = map(torch.cat, zip(*torch.utils.data.DataLoader(test, batch_size=1000)))
    out = certify.certify(model, [(x, y)], [0.005, 0.01], local=True, local_estimate_iters=50)
    # cll certify gave the same certificates: the global CRA, and the sound local one as its CRA
    for key in ("0.005", "0.01"):
        assert out["cra_global"][key] == certified["cra_global"][key]
        assert out["cra"][key] == certified["cra"][key] > certified["cra_global"][key]
    # attack the points the local bound certifies at eps = 0.01 (with margins lowered by 1e-9 of
    # the logit scale, far more than their rounding: a subset of the certified ones), inside that radius
    k = upper_bound_local(model, x, 0.01)
    z, w = copy.deepcopy(model).double()(x.double()), model.head.weight.double()
    margin = (z.gather(1, y[:, None]) - z - 1e-9 * z.abs().amax(1, keepdim=True)).scatter(1, y[:, None], math.inf)
    sure = (z.argmax(1) == y) & (margin > 0.01 * k[:, None] * head_distances(w, y)).all(1)
    assert 0 < sure.sum() <= round(out["cra"]["0.01"] * len(y))
    adversarial = attack.pgd_l2(model, x[sure], y[sure], 0.01, steps=50, restarts=2)
    assert (model(adversarial).argmax(1) == y[sure]).all()
