"""Training losses: CLL (pairwise and per-logit), GloRo (bottom class, TRADES), cross-entropy,
the peers' own losses: SOC's cross-entropy with certificate regularisation, CPL's multi-class
hinge, SLL's (and LBDN's) offset cross-entropy, Local-Lip-B's loss on a local bound, LiResNet's EMMA
(``cll.emma``) and BRONet's Logit Annealing (``cll.logit_annealing``). Their common base, ``Loss``, is
``cll.loss_base``.

Every loss is called as ``loss(logits, target, head_weight, lip_body, progress)``:
``logits`` (N, C), ``target`` (N,) int64, ``head_weight`` the classifier's W (C, d), ``lip_body``
the body's Lipschitz estimate K_F (a scalar tensor, refreshed by power iteration earlier in the
same step, with gradient), ``progress`` the fraction of training done in [0, 1] (for schedules).
A loss with a ``local_estimate(model, x, progress)`` method (Local-Lip-B) receives what that
returns in place of K_F: per-sample local constants and a sparsity term (``cll.local_lipschitz``).

The K penalty ``lambda * K^pow`` is a separate term (``lipschitz_penalty``), added by the trainer
for any loss, as in the CLL reference code (github.com/mlosch/CLL, ``GlobalLipschitzDecay``),
or in the SOC/CPL/SLL code bases' form lambda * (max over the batch of K_F ||W_t - W_j||)^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .emma import EMMA
from .lipschitz.operators import max_row_distance, row_distances
from .local_lipschitz import LocalEstimate, estimate_local
from .logit_annealing import LogitAnnealing
from .loss_base import Loss
from .registry import Registry

LOSSES = Registry("loss")


# ---------------------------------------------------------------- CLL
def k_hf(eps: float, p: float) -> float:
    """K^(h o f) = 1/sigma = log((2-p)/p) / eps: the Lipschitz constant of the calibrated model.

    Losch, Stutz, Schiele, Fritz, "Certified Robust Models with Slack Control and Large Lipschitz
    Constants", GCPR 2023, arXiv 2309.06166. The reference code puts p/2 in each tail:
    sigma = 2 eps / (logit(1 - p/2) - logit(p/2)) = eps / log((2-p)/p), which
    is the convention of every K^(h o f) value printed on the poster (e.g. eps 0.5, p 0.01 -> 10.6).
    """
    return math.log((2.0 - p) / p) / eps


def run_k_hf(cfg) -> float | None:
    """The K^(h o f) a run reports: k_hf(eps, p) for CLL runs, None for other losses."""
    return k_hf(cfg.eps, cfg.p) if cfg.loss == "cll" else None


def cll_sigma(eps: float, p: float) -> float:
    """Temperature sigma = eps / log((2-p)/p), computed in float64 (stable down to p = 1e-15)."""
    return 1.0 / k_hf(eps, p)


def cll_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    head_weight: torch.Tensor,
    lip_body: torch.Tensor | float,
    eps: float,
    p: float,
    delta: float | None = None,
    form: str = "pairwise",
    offset: str = "two-sided",
    k_scale: float = 1.0,
    head_gradient: bool = False,
) -> torch.Tensor:
    """Calibrated Lipschitz-margin loss (Losch et al. 2023), batch mean.

    pairwise (the ``CLL`` class of the reference; default):
        u_j = (z_j - z_t) / (k_scale * sigma * K_F * ||W_t - W_j||) + delta/sigma  (j != t),
        u_t = -delta/sigma (two-sided) or 0 (one-sided);  loss = CE(u, t), i.e.
        log(1 + sum_{j!=t} exp((-d_tj + 2 delta)/sigma)) with d_tj = (z_t - z_j)/(K_F ||W_t-W_j||),
        the certified distance to the t/j boundary (two-sided: centred at 2 delta; one-sided: delta).
    per_logit (``KeepLipschitzMarginCELossV2``, the 6C2F/8C2F/two-moons recipes):
        u_i = z_i / (k_scale * sigma * K_F * ||W_i||) + delta/sigma * (+1 if i != t else -1 or 0).

    K_F and W are detached here: CLL's gradient flows through the logits only; K is steered by the
    separate penalty. ``head_gradient``: W's row distances (norms) keep their gradient, as SOC's
    ``train_robust.py`` trains (its ``--detach_K`` never reaches the loss). ``delta`` (the offset)
    defaults to ``eps``. ``k_scale`` is not applied to the offset.
    """
    sigma = cll_sigma(eps, p)
    delta = eps if delta is None else delta
    w = head_weight if head_gradient else head_weight.detach()
    k_f = lip_body.detach() if torch.is_tensor(lip_body) else torch.tensor(lip_body)
    scale = k_scale * sigma * k_f.to(logits.dtype)
    if form == "pairwise":
        k_tj = row_distances(w, target)  # (N, C): ||W_t - W_j||
        # K_tt is 0 and so is z_t - z_t: any nonzero filler avoids 0/0 (NaN gradients otherwise)
        k_tj = k_tj.scatter(1, target[:, None], 1.0)
        u = (logits - logits.gather(1, target[:, None])) / (scale * k_tj)
    elif form == "per_logit":
        u = logits / (scale * w.norm(dim=1))
    else:
        raise ValueError(f"unknown CLL form {form!r}; allowed: pairwise, per_logit")
    if offset not in ("two-sided", "one-sided"):
        raise ValueError(f"unknown CLL offset {offset!r}; allowed: two-sided, one-sided")
    target_offset = -delta / sigma if offset == "two-sided" else 0.0
    shift = torch.full_like(u, delta / sigma).scatter(1, target[:, None], target_offset)
    return F.cross_entropy(u + shift, target)


def polynomial(start: float, end: float, power: float, progress: float) -> float:
    """The reference's PolynomialScheduler: end + (start - end) * (1 - progress)^power."""
    return end + (start - end) * (1.0 - min(max(progress, 0.0), 1.0)) ** power


class CLL(Loss):
    """CLL with its K_scale schedule (poly from ``k_scale_start`` to 1; 8C2F recipe: 0.01, power 10)."""

    needs_lipschitz = True

    def __init__(
        self,
        eps: float,
        p: float,
        delta: float | None = None,
        form: str = "pairwise",
        offset: str = "two-sided",
        k_scale_start: float = 1.0,
        k_scale_power: float = 10.0,
        head_gradient: bool = False,
    ):
        super().__init__()
        self.eps, self.p, self.delta, self.form, self.offset = eps, p, delta, form, offset
        self.k_scale_start, self.k_scale_power, self.head_gradient = k_scale_start, k_scale_power, head_gradient

    def forward(self, logits, target, head_weight, lip_body, progress: float = 1.0):
        k_scale = polynomial(self.k_scale_start, 1.0, self.k_scale_power, progress)
        return cll_loss(
            logits, target, head_weight, lip_body, self.eps, self.p, self.delta, self.form, self.offset, k_scale,
            self.head_gradient,
        )  # fmt: skip


# ---------------------------------------------------------------- GloRo
def gloro_logits(
    logits: torch.Tensor, head_weight: torch.Tensor, lip_body: torch.Tensor | float, eps: float
) -> torch.Tensor:
    """The C+1 logits [z, y_bot] of GloRo (Leino et al., ICML 2021, arXiv 2102.08452, eq. 5):
    y_bot = max_{i != j} (z_i + eps * K_F * ||W_j - W_i||) with j = argmax z (no gradient through
    the argmax). The bound keeps its gradient: GloRo trains through K."""
    j = logits.detach().argmax(1)
    k_ji = lip_body * row_distances(head_weight, j)  # (N, C)
    others = (logits + eps * k_ji).scatter(1, j[:, None], float("-inf"))
    return torch.cat([logits, others.max(1, keepdim=True).values], dim=1)


def gloro_loss(logits, target, head_weight, lip_body, eps: float, trades: float = 0.0):
    """CE over GloRo's C+1 logits (the bottom class is never a label), or with ``trades`` > 0 the
    TRADES form CE(z, y) + trades * KL([softmax(z), 0] || softmax([z, y_bot])), where the KL equals
    logsumexp([z, y_bot]) - logsumexp(z)."""
    augmented = gloro_logits(logits, head_weight, lip_body, eps)
    if trades == 0:
        return F.cross_entropy(augmented, target)
    kl = torch.logsumexp(augmented, 1) - torch.logsumexp(logits, 1)
    return F.cross_entropy(logits, target) + trades * kl.mean()


class GloRo(Loss):
    """GloRo loss with its eps warm-up: poly 0 -> eps (power 5) over the first ``eps_warmup`` fraction
    of training (the CLL repo's PyTorch GloRo baseline ramps over the whole run: 1.0).

    ``head_gradient`` (the CLL repo's ``GloroLoss``, github.com/mlosch/CLL, unconstrained/model/
    losses.py): K_F enters as the whole model's estimate K_F * max_ij ||W_i - W_j|| divided by that
    max detached: the same value, but its gradient also pushes the head's largest row distance down
    (measured: it trains a smaller K and a lower CRA than K_F of the body alone)."""

    needs_lipschitz = True

    def __init__(
        self,
        eps: float,
        trades: float = 0.0,
        eps_warmup: float = 1.0,
        warmup_power: float = 5.0,
        head_gradient: bool = True,
    ):
        super().__init__()
        self.eps, self.trades, self.eps_warmup, self.warmup_power = eps, trades, eps_warmup, warmup_power
        self.head_gradient = head_gradient

    def current_eps(self, progress: float) -> float:
        if self.eps_warmup <= 0:
            return self.eps
        return polynomial(0.0, self.eps, self.warmup_power, progress / self.eps_warmup)

    def forward(self, logits, target, head_weight, lip_body, progress: float = 1.0):
        if self.head_gradient:
            head = max_row_distance(head_weight)
            lip_body = lip_body * head / head.detach()
        return gloro_loss(logits, target, head_weight, lip_body, self.current_eps(progress), self.trades)


class CrossEntropy(Loss):
    """Plain cross-entropy on the logits (a non-robust baseline; K still logged and certified)."""

    needs_lipschitz = False

    def forward(self, logits, target, head_weight=None, lip_body=None, progress: float = 1.0):
        return F.cross_entropy(logits, target)


# ---------------------------------------------------------------- the peers' own losses
def label_radius(
    logits: torch.Tensor, target: torch.Tensor, head_weight: torch.Tensor, lip_body: torch.Tensor | float
) -> torch.Tensor:
    """min_{j != t} (z_t - z_j) / (K_F ||W_t - W_j||) for the LABEL t (negative when misclassified):
    the certified radius of SOC's certificate regulariser (pairwise, as for its LLN head)."""
    k_tj = row_distances(head_weight, target) * lip_body
    k_tj = k_tj.scatter(1, target[:, None], 1.0)
    radius = (logits.gather(1, target[:, None]) - logits) / k_tj
    return radius.scatter(1, target[:, None], float("inf")).min(1).values


class CertificateRegularisedCE(Loss):
    """SOC's loss: CE(z, y) - gamma * mean(ReLU(certified radius)) (Singla, Singla, Feizi, ICLR 2022,
    "certificate regularisation"; gamma 0 is plain cross-entropy)."""

    needs_lipschitz = True
    head = "lln"  # as SOC's scripts train it (--lln)

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target, head_weight, lip_body, progress: float = 1.0):
        loss = F.cross_entropy(logits, target)
        if self.gamma > 0:
            loss = loss - self.gamma * F.relu(label_radius(logits, target, head_weight, lip_body)).mean()
        return loss


class MultiMarginHinge(Loss):
    """CPL's loss: (1/C) sum_{i != y} max(0, margin - z_y + z_i), margin 0.7 (Meunier et al. 2022)."""

    needs_lipschitz = False
    head = "trunc"  # CPL's and SLL's default last layer: the first C features

    def __init__(self, margin: float):
        super().__init__()
        self.margin = margin

    def forward(self, logits, target, head_weight=None, lip_body=None, progress: float = 1.0):
        return F.multi_margin_loss(logits, target, p=1, margin=self.margin)


class OffsetCrossEntropy(Loss):
    """SLL's (and LBDN's) loss: tau * CE((z - u * onehot(y)) / tau, y), offset u = 3 sqrt2 / 2 and
    temperature tau = 0.25 by default (Araujo et al., ICLR 2023; Prach & Lampert, ECCV 2022)."""

    needs_lipschitz = False
    head = "trunc"  # CPL's and SLL's default last layer: the first C features

    def __init__(self, offset: float, temperature: float):
        super().__init__()
        self.offset, self.temperature = offset, temperature

    def forward(self, logits, target, head_weight=None, lip_body=None, progress: float = 1.0):
        shifted = logits - self.offset * F.one_hot(target, logits.shape[1]).to(logits.dtype)
        return self.temperature * F.cross_entropy(shifted / self.temperature, target)


# ---------------------------------------------------------------- Local-Lip-B
def worst_logits(logits: torch.Tensor, target: torch.Tensor, head_weight: torch.Tensor, lip: torch.Tensor, eps: float):
    """z_j + eps * K(x) * ||W_j - W_t|| for j != t, z_t for the label t: the worst logits over the
    ball B(x, eps) when the body is K(x)-Lipschitz on it (the ball-only BCP translation; Lee, Lee,
    Park, "Lipschitz-Certifiable Training with a Tight Outer Bound", NeurIPS 2020). ``lip`` (N,)."""
    return logits + eps * lip[:, None] * row_distances(head_weight, target)


class LocalLipB(Loss):
    """Local-Lip-B's loss (Huang, Zhang, Shi, Kolter, Anandkumar, NeurIPS 2021, arXiv 2111.01395):

        kappa CE(z, y) + (1 - kappa) (CE(worst_logits(z, y, K(x), eps_t), y) + sparsity * S)

    with K(x) the per-sample local estimate of the body on B(x, eps_t) and S its sparsity term
    (``cll.local_lipschitz.estimate_local``, ``pi_iters`` power iterations). eps_t ramps linearly
    0 -> eps and kappa 1 -> 0 over the first ``eps_warmup`` fraction of training, as the paper's
    code does per iteration. Its BCP head refines the last layer's worst case with the interval
    box; that refinement is an iteration that returns a feasible point (a lower value) unless it
    converges, so the ball-only form is used here, the one the certificate uses."""

    needs_lipschitz = False
    local_certificate = True

    def __init__(self, eps: float, sparsity: float, eps_warmup: float, pi_iters: int):
        super().__init__()
        self.eps, self.sparsity, self.eps_warmup, self.pi_iters = eps, sparsity, eps_warmup, pi_iters

    def ramp(self, progress: float) -> float:
        """The fraction of the ramp done: eps_t = eps * ramp, kappa = 1 - ramp."""
        return 1.0 if self.eps_warmup <= 0 else min(max(progress / self.eps_warmup, 0.0), 1.0)

    def local_estimate(self, model: nn.Module, x: torch.Tensor, progress: float) -> LocalEstimate:
        return estimate_local(model, x, self.eps * self.ramp(progress), self.pi_iters)

    def forward(self, logits, target, head_weight, lip_body: LocalEstimate, progress: float = 1.0):
        ramp = self.ramp(progress)
        worst = worst_logits(logits, target, head_weight, lip_body.lip, self.eps * ramp)
        robust = F.cross_entropy(worst, target) + self.sparsity * lip_body.sparsity
        return (1 - ramp) * F.cross_entropy(logits, target) + ramp * robust


# ---------------------------------------------------------------- the K penalty
def lipschitz_penalty(
    lip_body: torch.Tensor,
    head_weight: torch.Tensor,
    lam: float,
    power: float = 2.0,
    target: torch.Tensor | None = None,
    form: str = "global",
) -> torch.Tensor:
    """The K penalty, with gradient through K_F (and its power iterations) and through W.

    ``global`` (the reference's GlobalLipschitzDecay): lambda * (K_F * max_ij ||W_i - W_j||)^power.
    ``batch`` (CLL inside SOC/CPL/SLL, as those code bases penalise K): lambda * (max over the
    batch's labels t and all classes j of K_F * K_tj)^power, with K_tt := 1."""
    if form == "global":
        return lam * (lip_body * max_row_distance(head_weight)) ** power
    if form == "batch":
        k_tj = row_distances(head_weight, target).scatter(1, target[:, None], 1.0)
        return lam * (lip_body * k_tj.max()) ** power
    raise ValueError(f"unknown penalty form {form!r}; allowed: global, batch")


# ---------------------------------------------------------------- registry (built from a RunConfig)
@LOSSES.register("cll")
def _cll(cfg) -> CLL:
    return CLL(
        cfg.eps, cfg.p, cfg.delta, cfg.cll_form, cfg.cll_offset, cfg.k_scale_start, cfg.k_scale_power,
        cfg.cll_head_gradient,
    )  # fmt: skip


@LOSSES.register("gloro")
def _gloro(cfg) -> GloRo:
    return GloRo(cfg.eps, cfg.trades, cfg.eps_warmup, head_gradient=cfg.gloro_head_gradient)


@LOSSES.register("ce")
def _ce(cfg) -> CrossEntropy:
    return CrossEntropy()


@LOSSES.register("soc_cr")
def _soc_cr(cfg) -> CertificateRegularisedCE:
    return CertificateRegularisedCE(cfg.cr_gamma)


@LOSSES.register("cpl_hinge")
def _cpl_hinge(cfg) -> MultiMarginHinge:
    return MultiMarginHinge(cfg.hinge_margin)


@LOSSES.register("sll_offset_ce")
def _sll_offset_ce(cfg) -> OffsetCrossEntropy:
    return OffsetCrossEntropy(cfg.offset, cfg.temperature)


@LOSSES.register("local_lip_b")
def _local_lip_b(cfg) -> LocalLipB:
    return LocalLipB(cfg.eps, cfg.sparsity, cfg.eps_warmup, cfg.pi_iters)


def _emma_schedule(cfg) -> tuple[float, float, float, int]:
    """(start, end, ramp, epochs) of EMMA's training eps (``cll.emma.emma_eps``), LA's too."""
    return cfg.emma_eps_start, cfg.emma_eps_end, cfg.eps_warmup, cfg.epochs


@LOSSES.register("emma")
def _emma(cfg) -> EMMA:
    return EMMA(cfg.eps, *_emma_schedule(cfg))


@LOSSES.register("logit_annealing")
def _logit_annealing(cfg) -> LogitAnnealing:
    return LogitAnnealing(cfg.eps, *_emma_schedule(cfg), cfg.offset, cfg.temperature, cfg.la_gamma)


def create(cfg) -> nn.Module:
    """The loss named by ``cfg.loss``, with its hyperparameters from the run config."""
    return LOSSES.create(cfg.loss, cfg=cfg)


def names() -> list[str]:
    return LOSSES.names()
