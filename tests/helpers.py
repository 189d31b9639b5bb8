"""Helpers shared by several test files (imported as ``from helpers import ...``: pytest puts
tests/ on sys.path)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from cll import certify, lipschitz, losses, models
from cll import layers as L
from cll.cli import main
from cll.config import build_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CI_GRID = ROOT / ".test" / "config.yaml"  # the CI grid, run end to end once per session (conftest.ci_run)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``cll argv`` in-process: (exit code, stdout, stderr). argparse errors exit via SystemExit."""
    capsys.readouterr()  # drop anything printed before
    try:
        rc = main(list(argv))
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def snakemake(workdir: Path, *args: str, timeout: float = 120, env: dict | None = None):
    """Run the project's Snakefile with ``workdir`` as working directory (results/, logs/,
    .snakemake/ and mlflow.db all land there, never in the repository)."""
    return subprocess.run(
        [str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints: rule -> number of jobs."""
    block = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    counts = {}
    for line in block.splitlines()[3:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    return counts


FIGURES = ("slack_vs_k", "cra_vs_p", "moons_boundaries")


def check_pipeline_outputs(results: Path, grid, figures=FIGURES) -> None:
    """Every output of a grid's pipeline exists: each runnable cell's run files (audit.json
    included), the summary, each table of the grid and the figures (the grid's: a table of one
    moons cell has no slack to plot)."""
    for cell in grid.runnable():
        for name in ("model.pt", "train.json", "certify.json", "audit.json"):
            assert (cell.path(results) / name).is_file(), cell.path(results) / name
    assert (results / "summary.csv").is_file()
    for table in [t["name"] for t in grid.tables]:
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / f"{table}.{ext}").stat().st_size > 0
    for figure in figures:
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{figure}.{ext}").stat().st_size > 0


# ---------------------------------------------------------------- a one-row grid on two moons
MOONS_ROW = {"method": "CLL", "dataset": "moons", "arch": "moons-mlp", "loss": "cll", "eps": 0.15, "p": 0.01}


def moons_grid(experiment: str = "x", results: str | Path | None = None, table: str = "t", **row) -> dict:
    """A grid of one table holding one CLL row on two moons (MOONS_ROW; ``row`` changes or adds
    row keys: p, set, audit, ...); ``results``: the grid's results folder (else the default)."""
    grid = {"experiment": experiment, "tables": [{"name": table, "rows": [{**MOONS_ROW, **row}]}]}
    if results is not None:
        grid["results"] = str(results)
    return grid


# ---------------------------------------------------------------- layers
class LayerCase(NamedTuple):
    build: object  # () -> the layer (seeded by the caller)
    shape: tuple[int, ...]  # its input shape, without the batch
    one_lipschitz: bool = True  # by construction (tests/test_peers.py measures it)
    rounding: bool = True  # has a proved float64 rounding bound at this shape (tests/test_soundness.py)


# Every layer cll bounds, at small sizes (tests/test_layers.py: each class of cll.layers.__all__
# appears): tests/test_peers.py checks the bound against the measured constant of each 1-Lipschitz
# one, tests/test_soundness.py each one's rounding bound against its float error. SandwichConv on
# 6 x 6 has no float64 rounding bound (its radix-2 FFT needs a power of two: the layer refuses).
LAYERS = {
    # cll's own layers
    "soc-3x3": LayerCase(lambda: L.SOC(4, 4, 3), (4, 6, 6)),
    "soc-3x3-stride2": LayerCase(lambda: L.SOC(2, 6, 3, stride=2), (2, 6, 6)),
    "soc-1x1-stride2-shrink": LayerCase(lambda: L.SOC(4, 8, 1, stride=2), (4, 4, 4)),
    "soc": LayerCase(lambda: L.SOC(8, 8, 3), (8, 8, 8)),
    "soc-stride2": LayerCase(lambda: L.SOC(4, 16, 3, stride=2), (4, 8, 8)),
    "soc-summed-in-blocks": LayerCase(lambda: L.SOC(32, 32, 3), (32, 5, 5)),  # 4 blocks of 72 products
    "cpl-conv": LayerCase(lambda: L.CPLConv(4, 3, (6, 6)), (4, 6, 6)),
    "cpl-conv-8x8": LayerCase(lambda: L.CPLConv(6, 5, (8, 8)), (6, 8, 8)),
    "cpl-linear": LayerCase(lambda: L.CPLLinear(12, 20), (12,)),
    "cpl-dense": LayerCase(lambda: L.CPLLinear(40, 30), (40,)),
    "sll-conv": LayerCase(lambda: L.SLLConv(4, 3), (4, 6, 6)),
    "sll-conv-8x8": LayerCase(lambda: L.SLLConv(6, 5), (6, 8, 8)),
    "sll-linear": LayerCase(lambda: L.SLLLinear(12, 20), (12,)),
    "sll-dense": LayerCase(lambda: L.SLLLinear(40, 30), (40,)),
    "sandwich-conv": LayerCase(lambda: L.SandwichConv(3, 4, 3, (6, 6)), (3, 6, 6), rounding=False),
    "sandwich-conv-8x8": LayerCase(lambda: L.SandwichConv(4, 6, 3, (8, 8)), (4, 8, 8)),
    "sandwich-conv-stride2": LayerCase(lambda: L.SandwichConv(2, 5, 3, (6, 6), stride=2), (2, 6, 6), rounding=False),
    "sandwich-conv-stride2-8x8": LayerCase(lambda: L.SandwichConv(4, 6, 3, (8, 8), stride=2), (4, 8, 8)),
    "sandwich-linear": LayerCase(lambda: L.SandwichLinear(12, 7), (12,)),
    "sandwich-dense": LayerCase(lambda: L.SandwichLinear(20, 12), (20,)),
    "liresnet-block": LayerCase(lambda: L.LiResBlock(4, 3), (4, 6, 6), one_lipschitz=False),
    "liresnet-block-8x8": LayerCase(lambda: L.LiResBlock(6, 12), (6, 8, 8), one_lipschitz=False),
    "cholesky-linear": LayerCase(lambda: L.CholeskyLinear(20, 12), (20,)),
    "cholesky-residual-linear": LayerCase(lambda: L.CholeskyResidualLinear(16, 8), (16,)),
    "cholesky-patch-conv": LayerCase(lambda: L.CholeskyPatchConv(3, 8, 2), (3, 8, 8)),
    # BRO conv: canvases 8 (radix-2 FFT in the float64 pass), 7 (odd: the direct DFT, no Nyquist column)
    "bro-conv": LayerCase(lambda: L.BROConv(4, 2, 3), (4, 6, 6)),
    "bro-conv-odd-canvas": LayerCase(lambda: L.BROConv(6, 3, 12), (6, 5, 5)),
    "bro-residual-linear": LayerCase(lambda: L.BROResidualLinear(16, 4, 8), (16,)),
    "bro-linear": LayerCase(lambda: L.BROLinear(20, 12), (20,)),
    "bro-patch-conv": LayerCase(lambda: L.BROPatchConv(3, 8, 2), (3, 8, 8)),
    "householder": LayerCase(lambda: L.HouseHolder(6), (6, 3, 3)),
    "hh1": LayerCase(lambda: L.HouseHolder(8), (8, 4, 4)),
    "maxmin": LayerCase(lambda: L.MaxMin(), (6, 3, 3)),
    "maxmin-halves": LayerCase(lambda: L.MaxMinHalves(), (6, 3, 3)),
    "clipped-maxmin": LayerCase(lambda: L.ClippedMaxMin((6, 3, 3), init=0.5), (6, 3, 3)),
    "clipped-relu": LayerCase(lambda: L.ClippedReLU((12,), init=0.5), (12,)),
    "padding-channels": LayerCase(lambda: L.PaddingChannels(8), (3, 4, 4)),
    "normalize": LayerCase(lambda: L.Normalize([0.4, 0.5, 0.6], 0.2507), (3, 4, 4), one_lipschitz=False),
    # torch's layers in cll's table (cll.lipschitz.bound.TORCH_LAYERS)
    "sum-pool": LayerCase(lambda: nn.AvgPool2d(4, divisor_override=4), (3, 8, 8)),
    "conv": LayerCase(lambda: nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8), one_lipschitz=False),
    "dense": LayerCase(lambda: nn.Linear(30, 20), (30,), one_lipschitz=False),
}


def plain_maxmin(x: torch.Tensor) -> torch.Tensor:
    """MaxMin as autograd sees it without the custom function (maximum, minimum, cat)."""
    pairs = x.unflatten(1, (x.shape[1] // 2, 2))
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def screened_decides_as_float64(model, x: torch.Tensor, y: torch.Tensor) -> certify.Certifier:
    """Place three eps a hair (1e-9, far above float64 noise, far below the float32 bound) above
    sample radii (quantiles 0.2, 0.5, 0.8 of the certified ones) and check that the screened
    certifier decides every sample as the certifier without eps (float64 for every sample) does.
    Returns the screened certifier, for the caller's checks of what it recomputed."""
    _, pred_all, radius_all = certify.Certifier(model)(x)
    certified = radius_all[(pred_all == y) & (radius_all > 0)]
    assert len(certified) > 10, "too few certified samples to place eps among their radii"
    eps = [certified.sort().values[int(q * len(certified))].item() * (1 + 1e-9) for q in (0.2, 0.5, 0.8)]
    screened = certify.Certifier(model, eps=eps)
    _, pred, radius = screened(x, y)
    for e in eps:
        assert torch.equal((pred == y) & (radius > e), (pred_all == y) & (radius_all > e))
    return screened


# ---------------------------------------------------------------- today's hosts
def host_step_and_certify(arch: str, loss: str, num_classes: int, shape: tuple[int, ...], **keys):
    """One training step of a host (LiResNet, BRONet) with its own loss, every gradient finite, then
    a certification of the 4 samples: (model, x, certify's output)."""
    torch.manual_seed(0)
    cfg = build_config({"dataset": "cifar100", "arch": arch, "loss": loss, "eps": "36/255", **keys})
    criterion = losses.create(cfg)
    model = models.create(arch, num_classes, shape, head=criterion.head, mean=[0.4] * 3)
    assert model.body[0].mean.flatten().tolist() == [0.5] * 3  # the reference's x - 0.5, whatever the data
    x, y = torch.rand(4, *shape), torch.randint(0, num_classes, (4,))
    k = lipschitz.estimate_body(model, cfg.pi_iters)
    criterion(model(x), y, model.head.weight, k, 0.3).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    out = certify.certify(model, [(x, y)], [36 / 255])
    assert out["rounding"] == "rigorous" and out["float32_rounding"] == "rigorous"
    assert out["lipschitz_body"] >= 1 and 0 <= out["cra"]["0.1412"] <= out["clean_accuracy"] <= 1
    return model, x, out
