"""Logit Annealing (LA), BRONet's loss (Lai, Huang, Kung, Chen, "Enhancing Certified Robustness via
Block Reflector Orthogonal Layers and Logit Annealing Loss", ICML 2025, arXiv 2505.15174; code
github.com/ntuaislab/BRONet, ``bronet/models/margin_layer.py::logit_annealing_loss`` with its
``_logit_annealing_loss``), trained at LiResNet's eps schedule (``cll.emma.emma_eps``: the reference's
``train.py::eps_fn`` is LiResNet's), registered as ``logit_annealing`` in ``cll.losses``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .emma import EMMA, emma_logits


def logit_annealing_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    head_weight: torch.Tensor,
    lip_body: torch.Tensor | float,
    eps: float,
    offset: float,
    temperature: float,
    gamma: float,
) -> torch.Tensor:
    """LA, batch mean. On EMMA's lifted logits z' = z + eps s m (``cll.emma.emma_logits``: each other
    class i raised by what a perturbation of size eps s_i could add to its margin, s detached), with
    the label's logit lowered by an offset o and every logit divided by a temperature T:

        l   = CE((z' - o e_t) / T, t)            (e_t: the one-hot vector of the label t)
        p_t = exp(-l)                             (the softmax probability of t there)
        LA  = T (1 - p_t)^gamma l

    The factor (1 - p_t)^gamma (the focal loss's form, Lin et al., ICCV 2017) anneals the loss of a
    sample as its lifted, offset margin grows: a sample already past the margin the offset asks for
    costs little and pulls little, so the capacity a Lipschitz network has for margins goes to the
    samples still short of it rather than to enlarging the large ones further (the paper's argument
    for LA over the offset cross-entropy, which keeps rewarding large margins). p_t keeps its
    gradient, as in the reference. gamma = 0 gives SLL's offset cross-entropy T CE((z' - o e_t)/T, t)
    on the lifted logits. The reference's configs: o = 2, T = 0.75, gamma = 5."""
    lifted = emma_logits(logits, target, head_weight, lip_body, eps)
    shifted = lifted - offset * F.one_hot(target, logits.shape[1]).to(logits.dtype)
    ce = F.cross_entropy(shifted / temperature, target, reduction="none")
    return (temperature * (1 - torch.exp(-ce)) ** gamma * ce).mean()


class LogitAnnealing(EMMA):
    """LA (``logit_annealing_loss``) at EMMA's training eps (the schedule of ``cll.emma.EMMA``)."""

    def __init__(
        self,
        eps: float,
        start: float,
        end: float,
        ramp: float,
        epochs: int,
        offset: float,
        temperature: float,
        gamma: float,
    ):
        super().__init__(eps, start, end, ramp, epochs)
        self.offset, self.temperature, self.gamma = offset, temperature, gamma

    def forward(self, logits, target, head_weight, lip_body, progress: float = 1.0):
        eps = self.current_eps(progress)
        return logit_annealing_loss(
            logits, target, head_weight, lip_body, eps, self.offset, self.temperature, self.gamma
        )
