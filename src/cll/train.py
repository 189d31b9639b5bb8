"""The training loop: ``train(cfg, out_dir)`` trains one run and writes its run directory.

One step, in the CLL reference's order (the penalty refreshes the estimate CLL reads; docs/recipes.md):
  1. refresh the body's Lipschitz estimate K_F with ``pi_iters`` warm-started power iterations,
     keeping the graph (the penalty differentiates through them);
  2. loss = criterion(logits, y, W, K_F) + lip_penalty * (K_F * max_ij ||W_i - W_j||)^lip_pow;
  3. backward, optimizer step (gradient clipping and Lookahead where the run asks: ``cll.optim``),
     LR schedule step (per iteration).
At each epoch end the iterates are converged and the estimate is logged. The run is checkpointed
every ``checkpoint_every`` epochs with model, optimizer, schedule and RNG states, so rerunning the
same command resumes where it stopped. The sound bound is computed once at the end.
"""

from __future__ import annotations

import ctypes
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import batches, data, distributed, lipschitz, losses, models, results
from .config import RunConfig, build_config
from .errors import CllError, ConfigError
from .optim import clip_gradients, make_optimizer, make_schedule, sync_lookahead
from .progress import fmt_time


class TrainingDiverged(CllError):
    """The loss or K became NaN/Inf."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA GPU is visible; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_KEYS = ("config", "model", "optimizer", "schedule", "rng", "history", "epoch", "elapsed")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by ``train``; a truncated or foreign file fails in one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CllError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}); delete it to start the run afresh"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CllError(
            f"{str(path)!r} is not a cll checkpoint (it lacks "
            f"{', '.join(k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state)})"
        )
    return state


def build_model(cfg: RunConfig) -> torch.nn.Module:
    """The run's architecture for its data set, with the run's head (``auto``: the loss's own)."""
    info = data.dataset_info(cfg.dataset)
    head = losses.create(cfg).head if cfg.head == "auto" else cfg.head
    return models.create(
        cfg.arch,
        info.num_classes,
        info.in_shape,
        head=head,
        mean=info.mean,
        width=cfg.width,
        activation=cfg.activation,
        clip_init=cfg.clip_init,
    )


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[RunConfig, torch.nn.Module]:
    """The config and trained model of a run directory."""
    path = Path(run_dir) / results.MODEL
    if not path.is_file():
        raise CllError(f"no trained model at {str(path)!r}; run `cll train --out {run_dir}` first")
    state = load_checkpoint(path)
    cfg = build_config(state["config"])
    model = build_model(cfg)
    _load_weights(model, state, path)
    return cfg, model.to(device)


def _load_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    """The checkpoint's weights into ``model``; weights of another shape fail in one line."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        first = " ".join(str(err).split())[:300]
        raise CllError(
            f"checkpoint {str(path)!r} does not hold weights of its own config's model "
            f"({type(err).__name__}: {first}); delete it to start the run afresh"
        ) from None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees, to hand it out again: every allocation
    from the heap (no mmap, which glibc uses for blocks over 32 MB and unmaps on free) and no
    trimming of the heap's top. A CPU training step allocates and frees the same activations
    every step (8C2F at batch 256: ~4 GB); without this each step maps them afresh from the
    kernel, a page fault and a page of zeros per 4 kB, which took a third of an 8C2F step
    (bench/README.md). The peak resident size stays that of one step, plus fragmentation.
    Process-wide and idempotent; False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def prepare_model(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The model on ``device`` in the layout it trains in: channels-last memory for image models
    (NHWC convolutions: cuDNN's faster kernels on a GPU, oneDNN's on the CPU, where NCHW costs a
    reorder per call and up to 6x on a 3-channel input). On a GPU cudnn.benchmark (the conv
    algorithms are autotuned once: the input shape never changes), unless the run is
    deterministic; on the CPU malloc keeps freed memory (``keep_freed_memory``)."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    else:
        keep_freed_memory()
    if len(model.in_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device``, images channels-last, as ``prepare_model`` lays out the model."""
    if x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last), y.to(device, non_blocking=True)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def make_step(
    cfg: RunConfig,
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
):
    """One training step (steps 1-3 of the module docstring, without the LR schedule) as
    ``step(x, y, progress) -> (loss, logits)``, both detached and left on the device: nothing in
    the step waits for the GPU.

    ``amp`` (GPU only): the body's forward, and so its backward, under bf16 autocast; the head, the
    logits the loss sees, the loss and the power-iteration K stay fp32 (the reference trains in fp32,
    docs/recipes.md, so no recipe turns it on). ``compile``: the body's forward through
    torch.compile; the power iterations stay eager. Both use model(x) == head(body(x)), the
    interface the certifier relies on too.

    A loss with a ``local_estimate`` (Local-Lip-B) gets, in place of K_F, its per-sample estimate of
    the body's local constant around the batch (``cll.local_lipschitz``). Layers with a
    ``constrain_`` method (the clipped activations' thresholds) are projected back into their
    range after every optimizer step. ``grad_clip`` registers the clipping on ``optimizer`` here:
    a data-parallel ``distributed.attach`` must come first, so that the global gradient is clipped."""
    needs_k = criterion.needs_lipschitz or cfg.lip_penalty > 0
    local_estimate = getattr(criterion, "local_estimate", None)
    constrained = [m for m in model.modules() if hasattr(m, "constrain_")]
    body = torch.compile(model.body) if cfg.compile else model.body
    amp = cfg.amp and device.type == "cuda"
    if cfg.grad_clip is not None:
        clip_gradients(optimizer, model, cfg.grad_clip)

    def step(x: torch.Tensor, y: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        lip_body = lipschitz.estimate_body(model, cfg.pi_iters) if needs_k else None
        local = local_estimate(model, x, progress) if local_estimate is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            features = body(x)
        logits = model.head(features.float())
        loss = criterion(logits, y, model.head.weight, lip_body if local is None else local, progress)
        if cfg.lip_penalty > 0:
            loss = loss + losses.lipschitz_penalty(
                lip_body,
                model.head.weight,
                cfg.lip_penalty,
                cfg.lip_pow,
                distributed.batch_labels(y),
                cfg.lip_penalty_form,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for layer in constrained:
            layer.constrain_()
        return loss.detach(), logits.detach()

    return step


def train(cfg: RunConfig, out_dir: str | Path, log: Callable[[str], None] | None = None) -> dict:
    """Train one run into ``out_dir`` (resuming from its checkpoint if there is one) and return
    the content of ``train.json``."""
    out_dir = Path(out_dir)
    ckpt_path = out_dir / results.MODEL
    # under torchrun: join the process group, one GPU per rank, only rank 0 logs (cll.distributed)
    device = distributed.setup(resolve_device(cfg.device))
    log = distributed.main_only(log or (lambda line: print(line, file=sys.stderr, flush=True)))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)

    train_set, _test_set, info = data.load_dataset(
        cfg.dataset,
        root=cfg.data_root,
        augment=cfg.augment,
        seed=cfg.seed,
        max_train=cfg.max_train,
        max_test=cfg.max_test,
    )
    model = prepare_model(build_model(cfg), cfg, device)
    criterion = losses.create(cfg)
    optimizer = make_optimizer(cfg, model)
    drop_last = len(train_set) >= cfg.batch_size  # the reference drops the last partial batch
    steps_per_epoch = len(train_set) // cfg.batch_size if drop_last else 1
    schedule = make_schedule(cfg, optimizer, steps_per_epoch)
    history: list[dict] = []
    start_epoch, elapsed = 0, 0.0

    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("config") != cfg.to_dict():
            old = state.get("config") or {}
            diff = [k for k in cfg.to_dict() if old.get(k) != getattr(cfg, k)]
            raise ConfigError(
                f"{out_dir} holds a run with another config (differs in "
                f"{', '.join(diff) or 'format'}); use a new --out directory"
            )
        _load_weights(model, state, ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        _set_rng_state(state["rng"])
        history, start_epoch, elapsed = state["history"], state["epoch"], state["elapsed"]
        log(f"resuming {out_dir} at epoch {start_epoch}/{cfg.epochs}")

    distributed.attach(model, optimizer, log)  # data-parallel: global-batch gradients, shared iterates
    step = make_step(cfg, model, criterion, optimizer, device)  # (after attach: it clips the global gradient)
    in_memory = batches.in_memory(train_set, device)  # moons, digits: batches gathered on the device
    if cfg.amp and device.type != "cuda":
        log("amp: true has no effect on the CPU (bf16 autocast is a GPU option); training in fp32")
    t_start = time.time() - elapsed
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        # the shuffle order depends only on (seed, epoch), so a resumed run sees the same batches
        order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        loader = (
            in_memory.epoch(cfg.batch_size, order, drop_last)
            if in_memory is not None
            else DataLoader(
                train_set,
                batch_size=cfg.batch_size,
                shuffle=True,
                generator=order,
                drop_last=drop_last,
                num_workers=cfg.num_workers,
            )
        )
        t_epoch = t_note = time.time()
        total_loss = total_correct = total_n = 0.0
        for i, (x, y) in enumerate(loader):
            x, y = distributed.shard(*to_device(x, y, device))  # this rank's part of the batch
            progress = (epoch * steps_per_epoch + i) / (cfg.epochs * steps_per_epoch)
            loss, logits = step(x, y, progress)
            schedule.step()
            total_loss += loss * len(y)  # on the device: no sync per step
            total_correct += (logits.argmax(1) == y).sum()
            total_n += len(y)
            if time.time() - t_note > 30:  # long epochs: a line every 30 s
                t_note = time.time()
                rate = total_n / (t_note - t_epoch)
                log(
                    f"  epoch {epoch + 1} batch {i + 1}/{steps_per_epoch}  {rate:.0f} img/s  "
                    f"epoch ETA {fmt_time((steps_per_epoch - i - 1) * cfg.batch_size / rate)}"
                )

        sync_lookahead(optimizer)  # the epoch-end pull of LiResNet's Lookahead (no-op without it)
        total_loss, total_correct, total_n = distributed.all_sum(total_loss, total_correct, total_n)
        mean_loss = float(total_loss) / total_n
        # the converged estimate where one exists (None for the peers' families: see cll.lipschitz)
        k_est = lipschitz.estimate_constant(model, lipschitz.estimate_converged_body(model, cfg.pi_tol))
        if not (math.isfinite(mean_loss) and (k_est is None or math.isfinite(k_est))):
            kept = (
                f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written"
            )
            raise TrainingDiverged(
                f"training diverged at epoch {epoch + 1}: loss {mean_loss}, K {k_est}; "
                f"{kept} (try a smaller lr or a larger lip_penalty)"
            )
        now = time.time()
        history.append(
            {
                "epoch": epoch + 1,
                "loss": mean_loss,
                "accuracy": float(total_correct) / total_n,
                "lipschitz_estimate": k_est,
                "lr": schedule.get_last_lr()[0],
                "seconds": now - t_epoch,
            }
        )
        per_epoch = (now - t_start - elapsed) / (epoch + 1 - start_epoch)
        eta = per_epoch * (cfg.epochs - epoch - 1)
        h = history[-1]
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {h['loss']:.4f}  acc {100 * h['accuracy']:.1f}%  "
            f"K {'n/a' if k_est is None else f'{k_est:.4g}'}  lr {h['lr']:.2e}  {per_epoch:.1f} s/epoch  "
            f"ETA {fmt_time(eta)}"
        )
        last = epoch + 1 == cfg.epochs
        if distributed.is_main() and (last or (epoch + 1) % cfg.checkpoint_every == 0):
            results.save_torch(
                ckpt_path,
                {
                    "config": cfg.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": _rng_state(),
                    "history": history,
                    "epoch": epoch + 1,
                    "elapsed": now - t_start,
                },
            )

    if start_epoch >= cfg.epochs:
        log(f"{out_dir} is already trained ({cfg.epochs} epochs)")
    summary = {
        "config": cfg.to_dict(),
        "num_classes": info.num_classes,
        "in_shape": list(info.in_shape),
        "epochs": history,
        "wall_time": time.time() - t_start if start_epoch < cfg.epochs else elapsed,
        "lipschitz_estimate": history[-1]["lipschitz_estimate"] if history else None,
        "lipschitz_bound": lipschitz.upper_bound(model),
        "k_hf": losses.run_k_hf(cfg),
        "device": str(device),
    }
    if distributed.is_main():
        results.write_json(out_dir / results.TRAIN, summary)
    distributed.teardown()
    return summary
