"""cll.optim: the optimizers, Lookahead as LiResNet's timm copy steps it, the learning-rate warm-up
as LiResNet's scheduler computes it, and gradient clipping inside the training step."""

import copy
import math

import pytest
import torch

from cll import losses, optim
from cll.config import build_config

MOONS = {"dataset": "moons", "arch": "moons-mlp", "loss": "ce"}


def _schedule(steps_per_epoch: int, **keys) -> list[float]:
    cfg = build_config({**MOONS, **keys})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = optim.make_schedule(cfg, opt, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])  # the rate this step runs at
        opt.step()
        schedule.step()
    return lrs


def test_warmup_then_cosine_is_liresnets_scheduler():
    """tools/scheduler.py of LiResNet, per step k = 1, 2, ...: k / W below W warm-up iterations, then
    0.5 (1 + cos(pi (k - W) / (total - W))) (its 1e-5 floor only touches the last steps: not kept)."""
    epochs, per_epoch, warm_epochs = 10, 7, 2
    lrs = _schedule(per_epoch, epochs=epochs, schedule="cosine", warmup_epochs=warm_epochs, lr=2e-3)
    warm, total = warm_epochs * per_epoch, epochs * per_epoch
    for k, lr in enumerate(lrs, start=1):
        ratio = k / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))
        assert lr == pytest.approx(2e-3 * ratio, rel=1e-12, abs=1e-18), k


def test_no_warmup_leaves_the_schedules_as_they_were():
    lrs = _schedule(5, epochs=4, schedule="cosine")
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * it / 20)) for it in range(20)], rel=1e-12)
    assert _schedule(5, epochs=4, schedule="multistep", milestones=[2])[9:11] == pytest.approx([1e-3, 1e-4])


def test_nadam_with_the_runs_betas():
    cfg = build_config({**MOONS, "optimizer": "nadam", "betas": [0.8, 0.99], "weight_decay": 0.0})
    opt = optim.make_optimizer(cfg, torch.nn.Linear(3, 2))
    assert type(opt) is torch.optim.NAdam and opt.param_groups[0]["betas"] == (0.8, 0.99)


def _constant_gradient_steps(opt, p, n):
    for _ in range(n):
        opt.zero_grad()
        p.grad = torch.ones_like(p)
        opt.step()


def test_lookahead_pulls_every_k_steps_from_the_slow_copy_made_at_the_first_pull():
    """SGD lr 1 on a constant gradient 1 from 0: step 6 makes the slow copy (-6, no move); step 12
    pulls to -6 + 0.5 (-12 + 6) = -9; three more steps and the epoch-end sync pull to -10.5."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    optim.add_lookahead(opt)
    _constant_gradient_steps(opt, p, 6)
    assert p.tolist() == [-6.0, -6.0]
    _constant_gradient_steps(opt, p, 6)
    assert p.tolist() == [-9.0, -9.0]
    _constant_gradient_steps(opt, p, 3)
    optim.sync_lookahead(opt)
    assert p.tolist() == [-10.5, -10.5]
    # the slow copy and the step count live in the optimizer's state: a resumed run goes on alike
    q = torch.nn.Parameter(p.detach().clone())
    resumed = torch.optim.SGD([q], lr=1.0)
    optim.add_lookahead(resumed)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # (as saved: no tensor shared)
    _constant_gradient_steps(opt, p, 3)
    _constant_gradient_steps(resumed, q, 3)
    assert p.tolist() == q.tolist() == [-12.0, -12.0]  # step 18: slow -10.5 + 0.5 (-13.5 + 10.5)


def test_grad_clip_bounds_the_update_of_a_training_step():
    """grad_clip clips the global gradient norm before the optimizer sees it: with SGD lr 1 and no
    momentum the step moves the weights by at most that norm."""
    from cll.train import build_model, make_step

    cfg = build_config({**MOONS, "optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "grad_clip": 1e-3})
    torch.manual_seed(0)
    model = build_model(cfg)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = optim.make_optimizer(cfg, model)
    step = make_step(cfg, model, losses.create(cfg), opt, torch.device("cpu"))
    step(torch.randn(32, 2) * 10, torch.randint(0, 2, (32,)), 0.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm().item() <= 1e-3 * (1 + 1e-5)
