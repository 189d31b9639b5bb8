"""The optimiser side of a run: the optimizer (AdamW, Adam, NAdam, SGD; optionally with Lookahead),
the per-iteration learning-rate schedule with its optional linear warm-up, and gradient clipping.

Lookahead (Zhang, Lucas, Hinton, Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS
2019) as LiResNet's ``train.py`` uses it through ``timm.optim.Lookahead`` (k 6, alpha 0.5): every k
optimizer steps each parameter p moves its slow copy s to s + alpha (p - s) and restarts from
there (p <- s); the slow copy is made at the first such update, from the weights of that moment,
as timm makes it, and the reference also pulls once at every epoch end (``sync_lookahead``). It is
kept inside the optimizer (a step post-hook, the slow copies in its per-parameter state and the
step count in its parameter groups), so the checkpoint's optimizer state carries it and a resumed
run goes on from the same slow weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import RunConfig

LOOKAHEAD_K, LOOKAHEAD_ALPHA = 6, 0.5  # timm's defaults, which LiResNet's recipe uses


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer; parameters of modules flagged ``no_weight_decay`` (HH1's angles, as in
    SOC's recipe) get no weight decay."""
    exempt = {id(p) for m in model.modules() if getattr(m, "no_weight_decay", False) for p in m.parameters()}
    params = [{"params": [p for p in model.parameters() if id(p) not in exempt]}]
    if exempt:
        params.append({"params": [p for p in model.parameters() if id(p) in exempt], "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "nadam": torch.optim.NAdam}[cfg.optimizer]
        optimizer = cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.lookahead:
        add_lookahead(optimizer)
    return optimizer


def add_lookahead(optimizer: torch.optim.Optimizer, k: int = LOOKAHEAD_K, alpha: float = LOOKAHEAD_ALPHA) -> None:
    """Lookahead around ``optimizer`` (module docstring): a pull towards the slow weights every k steps."""
    for group in optimizer.param_groups:
        group.update(lookahead_k=k, lookahead_alpha=alpha, lookahead_step=0)

    def after_step(opt, args, kwargs):
        for group in opt.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                _pull(opt, group)

    optimizer.register_step_post_hook(after_step)


@torch.no_grad()
def _pull(optimizer: torch.optim.Optimizer, group: dict) -> None:
    for p in group["params"]:
        if p.grad is None:  # (timm's rule; such a parameter has no optimizer state yet either)
            continue
        state = optimizer.state[p]
        if "lookahead_slow" not in state:
            state["lookahead_slow"] = p.detach().clone()
        slow = state["lookahead_slow"]
        slow.add_(p - slow, alpha=group["lookahead_alpha"])
        p.copy_(slow)


def sync_lookahead(optimizer: torch.optim.Optimizer) -> None:
    """The epoch-end pull of LiResNet's loop (a no-op without Lookahead); the step count goes on."""
    for group in optimizer.param_groups:
        if "lookahead_k" in group:
            _pull(optimizer, group)


def clip_gradients(optimizer: torch.optim.Optimizer, model: torch.nn.Module, max_norm: float) -> None:
    """Before every step of ``optimizer``, scale the gradients of ``model`` to a global l2 norm of at
    most ``max_norm`` (``clip_grad_norm_``). A step pre-hook, so that a data-parallel run registered
    first (``distributed.attach``) clips the all-reduced gradient, as DDP's reference clips it."""
    params = list(model.parameters())

    def before_step(opt, args, kwargs):
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    optimizer.register_step_pre_hook(before_step)


def make_schedule(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """LR multiplier per iteration (the reference steps its schedulers every iteration).

    With ``warmup_epochs`` (W iterations) the k-th step (k = 1, 2, ...) runs at k / W of the rate up
    to the W-th, and the schedule then runs on the iterations after the warm-up as if training began
    there: LiResNet's scheduler, whose cosine spans the epochs after its 20 warm-up epochs."""
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    span = max(total - warm, 1)
    if cfg.schedule == "multistep":
        epochs = cfg.milestones or [round(f * cfg.epochs) for f in (0.5, 0.75, 0.975)]
        steps = [e * steps_per_epoch for e in epochs]
        base = lambda it: cfg.gamma ** sum(it >= s for s in steps)
    elif cfg.schedule == "cosine":
        base = lambda it: 0.5 * (1 + math.cos(math.pi * min(it / span, 1.0)))
    elif cfg.schedule == "triangular":  # CPL's: 0 -> lr at 40%, -> lr/20 at 80%, -> 0 at the end
        base = lambda it: float(np.interp(it / span, [0, 0.4, 0.8, 1.0], [0, 1, 0.05, 0]))
    elif cfg.schedule == "exp":  # Local-Lip-B's: constant, then exponential decay to lr * gamma at the end
        start = (cfg.milestones[0] if cfg.milestones else 0.6 * cfg.epochs) * steps_per_epoch
        base = lambda it: cfg.gamma ** min(max(it - start, 0) / max(span - start, 1), 1.0)
    else:
        base = lambda it: 1.0
    if warm == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, base)
    # LambdaLR's index it is the (it + 1)-th step's
    factor = lambda it: (it + 1) / warm if it + 1 < warm else base(it + 1 - warm)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
