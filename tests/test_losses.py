"""CLL against the spec's closed forms and the poster's K^(h o f) column; GloRo; the K penalty."""

import math

import pytest
import torch
import torch.nn.functional as F

from cll import lipschitz, losses, models
from cll.certify import certified_radius


@pytest.mark.parametrize(
    "eps,p,poster", [(0.5, 0.01, 10.6), (1.0, 0.025, 4.4), (0.15, 0.3, 11.6), (1.0, 1e-3, 7.6), (1.0, 3e-3, 6.5)]
)
def test_k_hf_reproduces_poster_column(eps, p, poster):
    assert round(losses.k_hf(eps, p), 1) == poster


@pytest.mark.parametrize("p,poster", [(0.75, 3.4), (0.25, 13.0), (0.01, 35.3), (1e-4, 66.0)])
def test_k_hf_two_moons_panels(p, poster):
    assert round(losses.k_hf(0.15, p), 1) == poster


def _case():
    # 2 samples, 3 classes, head rows chosen so that the pairwise norms are easy: W (3, 2)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -2.0]])
    z = torch.tensor([[2.0, 0.5, -1.0], [0.3, 0.1, 0.9]])
    y = torch.tensor([0, 2])
    return z, y, w


def _pair_dist(w, t, j):
    return (w[t] - w[j]).norm().item()


@pytest.mark.parametrize("offset,shift", [("two-sided", 2), ("one-sided", 1)])
def test_pairwise_closed_form(offset, shift):
    """loss = log(1 + sum_{j != t} exp(((z_j - z_t)/(K_F K_tj) + shift*delta)/sigma)), batch mean."""
    z, y, w = _case()
    eps, p, k_f = 0.3, 0.1, 1.7
    sigma = eps / math.log((2 - p) / p)
    expected = []
    for n in range(2):
        t = y[n].item()
        s = sum(
            math.exp(((z[n, j] - z[n, t]).item() / (k_f * _pair_dist(w, t, j)) + shift * eps) / sigma)
            for j in range(3)
            if j != t
        )
        expected.append(math.log1p(s))
    got = losses.cll_loss(z, y, w, torch.tensor(k_f), eps, p, offset=offset)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


@pytest.mark.parametrize("offset,target_sign", [("two-sided", -1), ("one-sided", 0)])
def test_per_logit_closed_form(offset, target_sign):
    z, y, w = _case()
    eps, p, k_f, k_scale, delta = 0.3, 0.1, 1.7, 0.5, 0.2
    sigma = eps / math.log((2 - p) / p)
    total = 0.0
    for n in range(2):
        t = y[n].item()
        u = [
            z[n, i].item() / (k_scale * sigma * k_f * w[i].norm().item())
            + delta / sigma * (1 if i != t else target_sign)
            for i in range(3)
        ]
        total += -u[t] + math.log(sum(math.exp(v) for v in u))
    got = losses.cll_loss(z, y, w, k_f, eps, p, delta=delta, form="per_logit", offset=offset, k_scale=k_scale)
    assert got.item() == pytest.approx(total / 2, rel=1e-5)


def test_sigmoid_reading_of_pairwise_form():
    """Binary case: the loss is -log h((d - 2 delta)/sigma); at d = eps the sigmoid is p/2."""
    eps, p = 0.25, 0.05
    w = torch.tensor([[0.5], [-0.5]])  # ||W_0 - W_1|| = 1
    d = eps  # certified distance: z_0 - z_1 = d with K_F = 1
    z = torch.tensor([[d / 2, -d / 2]])
    loss = losses.cll_loss(z, torch.tensor([0]), w, 1.0, eps, p)
    assert math.exp(-loss.item()) == pytest.approx(p / 2, rel=1e-6)


@pytest.mark.parametrize("form", ["pairwise", "per_logit"])
@pytest.mark.parametrize("p", [0.5, 1e-3, 1e-8, 1e-15])
def test_gradients_finite_for_tiny_p(form, p):
    torch.manual_seed(0)
    z = (10 * torch.randn(64, 10)).requires_grad_()
    w = torch.randn(10, 16)
    y = torch.randint(0, 10, (64,))
    loss = losses.cll_loss(z, y, w, torch.tensor(3.0), 0.15, p, form=form)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_cll_detaches_k_and_head():
    w = torch.randn(4, 3, requires_grad=True)
    k = torch.tensor(2.0, requires_grad=True)
    z = torch.randn(8, 4, requires_grad=True)
    losses.cll_loss(z, torch.randint(0, 4, (8,)), w, k, 0.2, 0.1).backward()
    assert w.grad is None and k.grad is None and z.grad is not None


def test_k_scale_schedule():
    cll = losses.CLL(0.15, 0.3, k_scale_start=0.01, k_scale_power=10)
    assert losses.polynomial(0.01, 1.0, 10, 0.0) == pytest.approx(0.01)
    assert losses.polynomial(0.01, 1.0, 10, 1.0) == pytest.approx(1.0)
    z, y, w = _case()
    early, late = cll(z, y, w, 1.0, progress=0.0), cll(z, y, w, 1.0, progress=1.0)
    assert late.item() == pytest.approx(losses.cll_loss(z, y, w, 1.0, 0.15, 0.3).item())
    assert early.item() != pytest.approx(late.item())


def test_gloro_bottom_logit_matches_certificate():
    """y_bot < z_j exactly when the certified radius of the prediction exceeds eps."""
    torch.manual_seed(1)
    z, w, k_f, eps = torch.randn(200, 5), torch.randn(5, 7), 0.8, 0.3
    aug = losses.gloro_logits(z, w, k_f, eps)
    pred, radius = certified_radius(z, w, k_f)
    certified = aug[:, -1] < aug.gather(1, pred[:, None]).squeeze(1)
    assert torch.equal(certified, radius > eps)


def test_gloro_trades_and_warmup():
    torch.manual_seed(2)
    z, w, y = torch.randn(16, 4, requires_grad=True), torch.randn(4, 3), torch.randint(0, 4, (16,))
    plain = losses.gloro_loss(z, y, w, 1.0, 0.1)
    trades = losses.gloro_loss(z, y, w, 1.0, 0.1, trades=1.5)
    assert plain.item() >= F.cross_entropy(z, y).item() - 1e-6  # the bottom class only adds mass
    assert trades.item() >= F.cross_entropy(z, y).item()
    g = losses.GloRo(0.15, eps_warmup=0.5)
    assert g.current_eps(0.0) == 0.0 and g.current_eps(0.5) == pytest.approx(0.15)
    assert 0 < g.current_eps(0.1) < 0.15


def test_cll_head_gradient_is_socs_train_robust_cll():
    """cll_head_gradient: the loss of SOC's train_robust.py as its scripts run it (K_tj L not
    detached, no penalty): CE(((z - z_t) / (L ||W_t - W_j||) + delta) / sigma), written out here;
    without it W gets no gradient from CLL."""
    torch.manual_seed(5)
    z, y, w0, lip, eps, p = torch.randn(16, 5), torch.randint(0, 5, (16,)), torch.randn(5, 7), 2.5, 0.15, 0.1

    def reference(w):
        k = torch.norm(w[y][:, :, None] - w.t()[None], dim=1).scatter(1, y[:, None], 1.0) * lip
        q = math.log((1 - p / 2) / (p / 2)) - math.log((p / 2) / (1 - p / 2))
        delta = torch.full_like(z, eps).scatter(1, y[:, None], -eps)
        return F.cross_entropy(((z - z.gather(1, y[:, None])) / k + delta) / (2 * eps / q), y)

    w_ref, w = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    expected = reference(w_ref)
    expected.backward()
    loss = losses.CLL(eps, p, head_gradient=True)(z, y, w, torch.tensor(lip))
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-7)
    assert not losses.CLL(eps, p)(z, y, w, torch.tensor(lip)).requires_grad  # detached: nothing reaches W
    assert w_ref.grad.abs().max() > 1e-3


def test_gloro_head_gradient_is_the_reference_gloro_loss():
    """With head_gradient (the CLL reference's GloroLoss), K_F has its value but the gradient of
    K_F * m(W) / m(W) detached, m = max_ij ||W_i - W_j||: the head gets the extra term
    dL/dK * K / m * grad m on top of what K_F of the body alone gives it."""
    torch.manual_seed(4)
    z, y = torch.randn(32, 5), torch.randint(0, 5, (32,))
    w0, k0 = torch.randn(5, 7), 0.9

    def grads(head_gradient):
        w, k = w0.clone().requires_grad_(True), torch.tensor(k0, requires_grad=True)
        loss = losses.GloRo(0.3, eps_warmup=0.0, head_gradient=head_gradient)(z, y, w, k)
        loss.backward()
        return loss.item(), w.grad, k.grad

    (with_head, g_with, dk), (plain, g_plain, dk_plain) = grads(True), grads(False)
    assert with_head == pytest.approx(plain, rel=1e-6) and dk.item() == pytest.approx(dk_plain.item(), rel=1e-6)
    w = w0.clone().requires_grad_(True)
    m = torch.cdist(w, w).max()  # an independent evaluation of the largest row distance
    m.backward()
    extra = dk_plain * k0 / m.item() * w.grad
    assert extra.abs().max() > 1e-3  # the term is not negligible here
    torch.testing.assert_close(g_with - g_plain, extra, rtol=1e-4, atol=1e-6)


def test_penalty_gradient_flows_through_power_iterations():
    torch.manual_seed(3)
    model = models.create("moons-mlp", 2, (2,))
    k = lipschitz.estimate_body(model, n_iter=5)
    penalty = losses.lipschitz_penalty(k, model.head.weight, lam=1e-2)
    penalty.backward()
    grads = [m.weight.grad for m in model.body if hasattr(m, "weight")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.head.weight.grad.abs().sum() > 0
    # the penalty is lambda * (K_F * max pairwise row distance)^2
    expected = 1e-2 * (k.item() * torch.pdist(model.head.weight).max().item()) ** 2
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
