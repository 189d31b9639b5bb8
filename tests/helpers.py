"""Helpers shared by several test files (imported as ``from helpers import ...``: pytest puts
tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

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
