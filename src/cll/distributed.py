"""Data-parallel training over several processes (one per GPU), started by torchrun:

    torchrun --standalone --nproc-per-node 4 -m cll.cli train --out DIR --set ...

(the workflow's train rule does this for a cell whose row asks for ``resources: {gpus: N}``,
N > 1, inside one Slurm job). Without torchrun's environment (WORLD_SIZE unset or 1) every
function here is a no-op and training is the single-process loop of ``cll.train``.

What one step computes is exactly the single-process step on the same global batch:

* every rank draws the same global batch (the shuffle order depends only on seed and epoch, so
  augmentation too is the same) and keeps a contiguous slice of it (``shard``). The price: each
  rank loads and augments the whole batch (give the job enough cpus for its DataLoader
  workers); the network's forward and backward, which dominate, are split;
* each rank's loss is its slice's batch mean plus the K penalty. All our losses are batch means
  (cll.losses), so the global batch's gradient is sum_r (n_r / N) * grad_r, which ``attach``'s
  optimizer pre-hook all-reduces before every optimizer step (slices may differ in size by one);
* the penalty depends on weights, power-iteration iterates and, in its ``batch`` form, on the
  labels of the batch: it is computed from the *global* batch's labels (``batch_labels``) and from
  iterates that rank 0 broadcasts after every step, so it is the same number on every rank;
* parameters start equal (same seed, then broadcast from rank 0) and receive equal gradients, so
  the optimizers stay in step without further communication;
* only rank 0 logs and writes files (``is_main``, ``main_only``); epoch metrics are summed over
  the ranks first (``all_sum``).

The backend is NCCL on GPUs (each rank uses the GPU of its LOCAL_RANK) and gloo on the CPU
(tests/test_distributed.py checks on the CPU with 2 processes that the final metrics and weights
match one process). We all-reduce one flat gradient buffer per step instead of wrapping the
model in DistributedDataParallel: the trainer calls body, head and the power iterations
separately, and the penalty's gradient reaches the weights outside the model's forward.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import CllError


@dataclass
class _State:
    rank: int = 0
    world: int = 1
    active: bool = False  # a process group is up
    weight: float = 1.0  # this rank's share n_r / N of the current global batch
    labels: torch.Tensor | None = None  # the current global batch's labels


_STATE = _State()


def world_size() -> int:
    return _STATE.world


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the one process that logs and writes."""
    return _STATE.rank == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group if there is one; return this rank's device (its own GPU,
    ``cuda:LOCAL_RANK``, when ``device`` is CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _STATE.active:
        return device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise CllError(
                f"process {rank} of {world} wants GPU {local}, but only "
                f"{torch.cuda.device_count()} are visible; start one process per GPU"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    _STATE.rank, _STATE.world, _STATE.active = rank, world, True
    return device


def teardown() -> None:
    """Leave the process group (rank and world size stay known for ``is_main``)."""
    if _STATE.active:
        dist.destroy_process_group()
        _STATE.active = False


def main_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0, silence elsewhere (one progress line per epoch, not one per GPU)."""
    return log if is_main() else (lambda line: None)


def _flat_broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank: one broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, log: Callable[[str], None] | None = None) -> None:
    """Make ``optimizer`` step with the global batch's gradient: before every step, all-reduce
    the weighted gradients (one flat buffer), then give every rank rank 0's power-iteration
    iterates (the model's buffers). Also starts all ranks from rank 0's weights and buffers."""
    if not _STATE.active:
        return
    _flat_broadcast(list(model.parameters()) + list(model.buffers()))
    if log is not None:
        log(
            f"data-parallel over {_STATE.world} processes ({dist.get_backend()}): "
            f"each takes 1/{_STATE.world} of every batch"
        )

    def before_step(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if params:
            flat = torch.cat([p.grad.reshape(-1) for p in params]) * _STATE.weight
            dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        # backward is done, so the iterates this step used are no longer needed: copy in place
        _flat_broadcast(list(model.buffers()))

    optimizer.register_step_pre_hook(before_step)


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of a global batch (sizes differ by at most one); remembers
    its share of the batch and the batch's labels for the step."""
    if not _STATE.active:
        return x, y
    n, world, rank = len(y), _STATE.world, _STATE.rank
    if n < world:
        raise CllError(
            f"a batch of {n} samples cannot be split over {world} processes; "
            f"use a batch_size (and a training set) of at least {world}"
        )
    start, stop = rank * n // world, (rank + 1) * n // world
    _STATE.weight, _STATE.labels = (stop - start) / n, y
    return x[start:stop], y[start:stop]


def batch_labels(y: torch.Tensor) -> torch.Tensor:
    """The labels of the whole global batch (for the ``batch`` form of the K penalty, which
    takes a max over the batch's labels): every rank then computes the same penalty."""
    if not _STATE.active or _STATE.labels is None:
        return y
    return _STATE.labels.to(y.device, non_blocking=True)


def all_sum(*values: float | torch.Tensor) -> list[float]:
    """Sums over the ranks of a few numbers (epoch totals of loss, correct, samples)."""
    if not _STATE.active:
        return [float(v) for v in values]
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    dist.all_reduce(flat)
    return flat.tolist()
