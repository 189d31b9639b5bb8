"""Helpers shared by several test files (imported as ``from helpers import ...``: pytest puts
tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

from cll import certify
from cll.cli import main


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``cll argv`` in-process: (exit code, stdout, stderr). argparse errors exit via SystemExit."""
    capsys.readouterr()  # drop anything printed before
    try:
        rc = main(list(argv))
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def check_pipeline_outputs(results: Path, cells) -> None:
    """Every output of the tiny CI grid's pipeline exists: each cell's run files, the summary, the
    moons and digits tables and the three figures."""
    for cell in cells:
        for name in ("model.pt", "train.json", "certify.json"):
            assert (cell.path(results) / name).is_file(), cell.path(results) / name
    assert (results / "summary.csv").is_file()
    for table in ("moons", "digits"):
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / f"{table}.{ext}").stat().st_size > 0
    for figure in ("slack_vs_k", "cra_vs_p", "moons_boundaries"):
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{figure}.{ext}").stat().st_size > 0


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
