"""Data-parallel training (cll.distributed) on the CPU: torchrun with 2 processes and the gloo
backend gives the same run as one process on the same global batches, within float tolerance.

1. The primitives, in a small script under torchrun: uneven slices of a batch (13 + 12 of 25),
   gradients weighted by slice size so that they equal the whole batch's, iterates (buffers)
   taken from rank 0, sums over ranks.
2. `cll train` end to end: a digits CLL run with the K penalty in its batch form, an odd
   batch size and two epochs, once in one process and once under torchrun with 2 processes:
   same per-epoch loss, accuracy and K estimate, same final weights and power-iteration iterates,
   and only rank 0 wrote files and logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cll.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


PRIMITIVES = r"""
import json, sys
import torch
from cll import distributed

device = distributed.setup(torch.device("cpu"))
rank = int(__import__("os").environ["RANK"])
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
model.register_buffer("u", torch.full((4,), float(rank)))   # deliberately different per rank
with torch.no_grad():
    model.weight.add_(rank)                                  # so are the weights, before attach
opt = torch.optim.SGD(model.parameters(), lr=0.0)            # lr 0: keep the weights, read the grads
distributed.attach(model, opt)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(25, 3, generator=g), torch.randint(0, 2, (25,), generator=g)
xs, ys = distributed.shard(x, y)
loss = torch.nn.functional.cross_entropy(model(xs), ys)
opt.zero_grad()
loss.backward()
model.u.add_(10.0 * rank)                                    # drift during the step
opt.step()
totals = distributed.all_sum(loss.detach() * len(ys), len(ys))
json.dump({"n": len(ys), "labels": distributed.batch_labels(ys).tolist(), "grad": model.weight.grad.tolist(),
           "bias_grad": model.bias.grad.tolist(), "weight": model.weight.tolist(), "u": model.u.tolist(),
           "totals": totals}, open(f"rank{rank}.json", "w"))
distributed.teardown()
"""


@pytest.mark.slow
def test_primitives_under_torchrun(tmp_path):
    (tmp_path / "script.py").write_text(PRIMITIVES)
    run = torchrun("script.py", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # the reference: one process, the whole batch, rank 0's weights
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(25, 3, generator=g), torch.randint(0, 2, (25,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()

    assert [r["n"] for r in ranks] == [12, 13]  # contiguous slices, sizes differ by one
    for r in ranks:
        assert r["labels"] == y.tolist()  # the global batch's labels, for the batch-form penalty
        assert torch.allclose(torch.tensor(r["weight"]), model.weight.detach())  # rank 0's start
        assert torch.allclose(torch.tensor(r["grad"]), model.weight.grad, atol=1e-6)  # the batch's gradient
        assert torch.allclose(torch.tensor(r["bias_grad"]), model.bias.grad, atol=1e-6)
        assert r["u"] == [0.0] * 4  # rank 0's iterates after the step, on both ranks
        assert r["totals"][1] == 25 and r["totals"][0] == pytest.approx(25 * loss.item(), rel=1e-5)


CONFIG = [
    "dataset=digits",
    "arch=4C3F",
    "loss=cll",
    "eps=0.15",
    "p=0.3",
    "epochs=2",
    "batch_size=25",
    "max_train=100",
    "max_test=100",
    "lr=1.0e-3",
    "lip_penalty=1.0e-3",
    "pi_iters=2",
    "num_workers=0",
]


def _compare(single: Path, parallel: Path) -> dict:
    """Largest relative differences between two run directories (history and final state)."""
    a, b = (json.loads((d / "train.json").read_text()) for d in (single, parallel))
    assert a["config"] == b["config"] and len(a["epochs"]) == len(b["epochs"]) == 2
    out = {}
    for key in ("loss", "lipschitz_estimate"):
        out[key] = max(abs(x[key] - y[key]) / abs(x[key]) for x, y in zip(a["epochs"], b["epochs"]))
    out["accuracy"] = max(abs(x["accuracy"] - y["accuracy"]) for x, y in zip(a["epochs"], b["epochs"]))
    out["bound"] = abs(a["lipschitz_bound"] - b["lipschitz_bound"]) / a["lipschitz_bound"]
    sa, sb = (load_checkpoint(d / "model.pt")["model"] for d in (single, parallel))
    assert sa.keys() == sb.keys()
    weights = [k for k in sa if not k.startswith("power.")]
    out["weights"] = max(
        ((sa[k].double() - sb[k].double()).abs().max() / sa[k].double().abs().max()).item() for k in weights
    )
    out["weights_abs"] = max((sa[k].double() - sb[k].double()).abs().max().item() for k in weights)
    # the power-iteration iterates are unit vectors, compared by direction
    out["iterates"] = max(
        1
        - torch.nn.functional.cosine_similarity(sa[k].double().flatten(), sb[k].double().flatten(), dim=0).abs().item()
        for k in sa
        if k.startswith("power.")
    )
    return out


# Local-Lip-B: per-sample local estimates, a sparsity term, thresholds projected after each step
LOCAL_LIP_B = [
    *(c for c in CONFIG if not c.startswith(("loss=", "p=", "lip_penalty="))),
    "loss=local_lip_b",
    "activation=clipped_maxmin",
    "eps_warmup=0.5",
    "lip_penalty=0",
]


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("config", [[*CONFIG, "lip_penalty_form=batch"], LOCAL_LIP_B], ids=["cll", "local_lip_b"])
def test_two_processes_match_one(tmp_path, config):
    """The batch form of the K penalty (a max over the batch's labels) is the one that differs
    per rank unless the ranks share the global batch's labels; the global form depends on
    weights and iterates only, which the primitives test covers. Local-Lip-B's loss is a batch
    mean of per-sample terms and a mean sparsity term over the slice's bounds."""
    single = subprocess.run(
        [sys.executable, "-m", "cll.cli", "train", "--out", "single", "--set", *config],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert single.returncode == 0, single.stderr[-3000:]
    run = torchrun("-m", "cll.cli", "train", "--out", "parallel", "--set", *config, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    # rank 0 alone logged (one line per epoch, one summary line) and wrote the run directory
    assert "data-parallel over 2 processes (gloo)" in run.stderr
    assert run.stderr.count("epoch 2/2 ") == 1 and run.stdout.count("trained 4C3F on digits") == 1
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == ["model.pt", "train.json"]

    # Tolerances: one process with 2 threads instead of 1 differs from itself by as much (float32
    # sums in another order; Adam's normalisation magnifies the noise of near-zero gradients):
    # measured 9e-6 on the loss, 2e-4 on the weights, 1e-2 on an iterate's entries. Local-Lip-B's
    # masks are thresholded bounds, which such noise flips: there 4e-5 on the loss, 3e-4 on K, 5e-4
    # on the iterates' directions, and a bias entry near 0 (max |b| ~ 4e-3 after 8 steps) moves by
    # one Adam step (lr 1e-3) in the other direction: relative to that bias up to 0.2 (measured), so
    # there a tensor passes within 10 % of its largest entry or within two Adam steps.
    cll = "loss=cll" in config
    diff = _compare(tmp_path / "single", tmp_path / "parallel")
    print(f"2 processes vs 1: {diff}")
    k_tol = 1e-4 if cll else 1e-3
    assert diff["loss"] < 1e-4 and diff["lipschitz_estimate"] < k_tol and diff["bound"] < k_tol, diff
    assert diff["accuracy"] < 1.5 / 100, diff  # at most one argmax flip over an epoch (of 100)
    weights_ok = diff["weights"] < 2e-3 if cll else (diff["weights"] < 0.1 or diff["weights_abs"] < 2 * 1.0e-3)
    assert weights_ok and diff["iterates"] < (1e-3 if cll else 2e-3), diff
