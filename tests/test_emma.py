"""EMMA (cll.emma) against hand-computed values and its closed forms; its eps schedule against
LiResNet's ``eps_fn``; the registered loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from cll import losses
from cll.config import build_config
from cll.emma import emma_eps, emma_loss

# unit rows (an LLN head): ||W_0 - W_1|| = ||W_0 - W_2|| = sqrt 2, ||W_1 - W_2|| = 2
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])


def test_hand_computed_value():
    """Label 0, K_F 2, eps 0.5: m_1 = m_2 = 2 sqrt2. Class 1 trails by 0.5 < eps m_1 = sqrt2, so
    s_1 = 0.5 / sqrt2 and z_1 is lifted by exactly 0.5 to tie with z_0; class 2 trails by 5 > sqrt2, so
    s_2 = 1 and z_2 is lifted by eps m_2 = sqrt2."""
    z, y = torch.tensor([[2.0, 1.5, -3.0]]), torch.tensor([0])
    lifted = [2.0, 2.0, -3.0 + math.sqrt(2)]
    expected = -lifted[0] + math.log(sum(math.exp(v) for v in lifted))
    assert emma_loss(z, y, W, 2.0, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_closed_forms_of_the_three_regimes():
    k, eps = torch.tensor(1.5), 0.2
    m = k * torch.tensor([[0.0, math.sqrt(2), math.sqrt(2)], [math.sqrt(2), 0.0, 2.0]])  # K_F ||W_t - W_i||, t = 0, 1
    y = torch.tensor([0, 1])
    # every class trails by more than eps m_i: s = 1, GloRo's margin on every class (the reference's margin_loss)
    far = torch.tensor([[3.0, 0.0, -1.0], [-1.0, 2.0, 0.0]])
    assert emma_loss(far, y, W, k, eps).item() == pytest.approx(F.cross_entropy(far + eps * m, y).item(), rel=1e-6)
    # a class ahead of the label: pushed by 0.01 eps only
    wrong = torch.tensor([[0.0, 1.0, -5.0], [0.0, 2.0, 0.0]])
    scale = torch.tensor([[0.0, 0.01, 1.0], [1.0, 0.0, 1.0]])
    assert emma_loss(wrong, y, W, k, eps).item() == pytest.approx(
        F.cross_entropy(wrong + eps * scale * m, y).item(), rel=1e-6
    )


def test_gradient_treats_the_radii_as_constants_and_reaches_k_and_the_head():
    torch.manual_seed(0)
    z, y = torch.randn(16, 5, requires_grad=True), torch.randint(0, 5, (16,))
    w, k = torch.randn(5, 4, requires_grad=True), torch.tensor(1.3, requires_grad=True)
    loss = emma_loss(z, y, w, k, 0.4)
    loss.backward()
    with torch.no_grad():  # the same loss with s and m frozen: its gradient in z must be EMMA's
        m = k * torch.cdist(w[y], w)
        gap = z.gather(1, y[:, None]) - z
        shift = 0.4 * (gap / (0.4 * m).clamp_min(1e-8)).clamp(0.01, 1.0) * m
    z2 = z.detach().clone().requires_grad_(True)
    F.cross_entropy(z2 + shift, y).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert k.grad.item() > 0 and w.grad.abs().sum() > 0  # a larger K_F or row distance costs loss


@pytest.mark.parametrize("epoch,factor", [(0, 0.1), (1, 0.1 + 2.9 / 400), (200, 1.55), (399, 0.1 + 2.9 * 399 / 400)])
def test_eps_schedule_is_the_references_per_epoch_ramp(epoch, factor):
    """LiResNet's eps_fn at 800 epochs: eps (0.1 + 2.9 min(2 epoch / 800, 1)), constant within an epoch."""
    eps, steps = 36 / 255, 195
    for i in (0, 97, steps - 1):
        progress = (epoch * steps + i) / (800 * steps)
        assert emma_eps(eps, 0.1, 3.0, 0.5, 800, progress) == pytest.approx(eps * factor, rel=1e-12)
    assert emma_eps(eps, 0.1, 3.0, 0.5, 800, 0.75) == pytest.approx(3 * eps)
    assert emma_eps(eps, 0.1, 3.0, 0.0, 800, 0.0) == pytest.approx(3 * eps)  # no ramp: the end value


def test_registered_loss_reads_the_run_config():
    cfg = build_config(
        {"dataset": "cifar100", "arch": "LiResNet-L2W32", "loss": "emma", "eps": "36/255", "eps_warmup": 0.5}
    )
    emma = losses.create(cfg)
    assert emma.head == "lln" and emma.needs_lipschitz
    z, y = torch.tensor([[2.0, 1.5, -3.0]]), torch.tensor([0])
    at_start = emma(z, y, W, 2.0, progress=0.0)
    assert at_start.item() == pytest.approx(emma_loss(z, y, W, 2.0, 0.1 * 36 / 255).item())
    assert emma(z, y, W, 2.0, progress=0.9).item() == pytest.approx(emma_loss(z, y, W, 2.0, 3 * 36 / 255).item())
