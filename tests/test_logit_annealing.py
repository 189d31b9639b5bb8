"""Logit Annealing (cll.logit_annealing) against a hand-computed value and its closed forms (the
offset cross-entropy at gamma 0, the annealing factor, its gradient with p_t attached); the
registered loss with its run-config keys and EMMA's eps schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from cll import losses
from cll.config import build_config
from cll.emma import emma_logits, emma_loss
from cll.logit_annealing import logit_annealing_loss

# unit rows (an LLN head): ||W_0 - W_1|| = ||W_0 - W_2|| = sqrt 2, ||W_1 - W_2|| = 2
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])


def test_hand_computed_value():
    """Label 0, K_F 2, eps 0.5 (test_emma's case): the lifted logits are (2, 2, -3 + sqrt2); offset 2
    and temperature 0.5 make them (0, 4, -6 + 2 sqrt2), so l = log(1 + e^4 + e^(-6 + 2 sqrt2)) and
    LA = 0.5 (1 - e^-l)^3 l."""
    z, y = torch.tensor([[2.0, 1.5, -3.0]]), torch.tensor([0])
    ce = math.log(1 + math.exp(4) + math.exp(-6 + 2 * math.sqrt(2)))
    expected = 0.5 * (1 - math.exp(-ce)) ** 3 * ce
    assert logit_annealing_loss(z, y, W, 2.0, 0.5, 2.0, 0.5, 3.0).item() == pytest.approx(expected, rel=1e-6)


def test_closed_forms():
    torch.manual_seed(0)
    z, y = 3 * torch.randn(16, 3), torch.randint(0, 3, (16,))
    k, eps, offset, temp = 1.5, 0.2, 2.0, 0.75
    lifted = emma_logits(z, y, W, k, eps)
    shifted = (lifted - offset * F.one_hot(y, 3)) / temp
    ce = F.cross_entropy(shifted, y, reduction="none")
    # gamma 0: SLL's offset cross-entropy (cll.losses.OffsetCrossEntropy) on EMMA's lifted logits
    plain = losses.OffsetCrossEntropy(offset, temp)(lifted, y)
    assert logit_annealing_loss(z, y, W, k, eps, offset, temp, 0.0).item() == pytest.approx(plain.item(), rel=1e-6)
    # gamma > 0: each sample's offset CE times (1 - p_t)^gamma, p_t its softmax probability of the label
    p_t = F.softmax(shifted, 1).gather(1, y[:, None])[:, 0]
    expected = (temp * (1 - p_t) ** 5 * ce).mean()
    assert logit_annealing_loss(z, y, W, k, eps, offset, temp, 5.0).item() == pytest.approx(expected.item(), rel=1e-5)
    # offset 0, temperature 1, gamma 0: EMMA itself
    assert logit_annealing_loss(z, y, W, k, eps, 0.0, 1.0, 0.0).item() == pytest.approx(
        emma_loss(z, y, W, k, eps).item(), rel=1e-6
    )
    # a sample well past its margin costs (1 - p_t)^5 ~ 1e-16 of its offset CE: next to nothing
    far, label = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    la = logit_annealing_loss(far, label, W, k, eps, offset, temp, 5.0).item()
    plain = losses.OffsetCrossEntropy(offset, temp)(emma_logits(far, label, W, k, eps), label).item()
    assert 0 < la < 1e-12 * plain


def test_gradient_keeps_p_t_attached():
    """d LA / d z_j for one sample, no lift (eps 1e-9, far below every margin): with l the offset CE
    and p = e^-l, d/dl [T (1 - p)^g l] = T ((1 - p)^g + g (1 - p)^(g-1) p l), and dl/dz_j =
    (softmax_j - [j = t]) / T."""
    z = torch.tensor([[0.3, 1.0, -0.5]], requires_grad=True)
    y, offset, temp, g = torch.tensor([0]), 2.0, 0.75, 5.0
    logit_annealing_loss(z, y, W, 1.0, 1e-9, offset, temp, g).backward()
    with torch.no_grad():
        shifted = (z - offset * F.one_hot(y, 3)) / temp
        soft = F.softmax(shifted, 1)
        p = soft[0, 0].item()
        ce = -math.log(p)
        outer = temp * ((1 - p) ** g + g * (1 - p) ** (g - 1) * p * ce)
        expected = outer * (soft - F.one_hot(y, 3)) / temp
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-7)


def test_registered_loss_reads_the_run_config():
    cfg = build_config(
        {
            "dataset": "cifar100", "arch": "BRONet-L2W32", "loss": "logit_annealing", "eps": "36/255",
            "eps_warmup": 0.5, "offset": 2.0, "temperature": 0.75, "la_gamma": 4.0, "epochs": 800,
        }
    )  # fmt: skip
    la = losses.create(cfg)
    assert la.head == "lln" and la.needs_lipschitz
    z, y = torch.tensor([[2.0, 1.5, -3.0]]), torch.tensor([0])
    for progress, factor in ((0.0, 0.1), (0.9, 3.0)):  # EMMA's ramp: 0.1 eps -> 3 eps over the first half
        expected = logit_annealing_loss(z, y, W, 2.0, factor * 36 / 255, 2.0, 0.75, 4.0)
        assert la(z, y, W, 2.0, progress=progress).item() == pytest.approx(expected.item(), rel=1e-6)
