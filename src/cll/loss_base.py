"""What every training loss of ``cll.losses`` is: a module ``loss(logits, target, head_weight,
lip_body, progress)`` with the few class attributes below, which the trainer and the certifier read.
A leaf of its own, so that a loss defined beside its formula (``cll.emma``, ``cll.logit_annealing``)
and the registry in ``cll.losses`` that builds it share one base without importing each other."""

from __future__ import annotations

from torch import nn


class Loss(nn.Module):
    """What the trainer and the certifier read from a loss besides its forward."""

    needs_lipschitz: bool  # it reads K_F: the trainer refreshes the power iteration every step
    head = "linear"  # the head of a run with head: auto (the CLL reference's unconstrained last layer)
    local_certificate = False  # its runs are certified and audited with sound local bounds as well
