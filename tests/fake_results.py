"""A fake results tree for the summary, tables and figures tests (``from fake_results import ...``).

A small grid whose run directories get hand-written train.json/certify.json files with known
numbers, so every rendered table cell can be checked exactly (means, ± std over two seeds, signed
differences to the baseline, pending and not-run rows, K^(h∘f) from k_hf for CLL and from the
certified bound otherwise).
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import yaml

from cll import results
from cll.certify import eps_key
from cll.grid import load_grid
from cll.losses import k_hf
from cll.summary import aggregate_grid

E36, E72, E108 = (eps_key(n / 255) for n in (36, 72, 108))

GRID = {
    "experiment": "test-aggregate",
    "results": "res",
    "tables": [
        {
            "name": "digits",
            "title": "Digits, 4C3F",
            "rows": [
                # a GloRo row on another model, listed first: CLL 4C3F must still compare to GloRo 4C3F
                {"method": "GloRo", "dataset": "digits", "arch": "2C2F", "loss": "gloro", "eps": 0.15, "seeds": [0]},
                {"method": "GloRo", "dataset": "digits", "arch": "4C3F", "loss": "gloro", "eps": 0.15, "seeds": [0, 1]},
                {
                    "method": "CLL",
                    "dataset": "digits",
                    "arch": "4C3F",
                    "loss": "cll",
                    "eps": 0.15,
                    "p": 0.3,
                    "seeds": [0, 1],
                    "baseline": "GloRo",
                },
                {
                    "method": "CLL",
                    "dataset": "digits",
                    "arch": "2C2F",
                    "loss": "cll",
                    "eps": 0.15,
                    "p": 0.3,
                    "seeds": [0, 1],
                    "baseline": "GloRo",
                },  # only seed 0 has run
                {"method": "CE", "dataset": "digits", "arch": "4C3F", "loss": "ce", "eps": 0.15},  # not run
                {
                    "method": "SOC",
                    "dataset": "digits",
                    "arch": "LipConv-20",
                    "loss": "cll",
                    "eps": 0.15,
                    "pending": "LipConv is not implemented",
                },
            ],
        },
        {
            "name": "moons",
            "title": "Two moons",
            "rows": [
                {
                    "method": "CLL",
                    "dataset": "moons",
                    "arch": "moons-mlp",
                    "loss": "cll",
                    "eps": 0.15,
                    "p": [0.75, 0.25],
                    "set": {"certify_eps": [0.15]},
                },
            ],
        },
    ],
}

# (arch, loss, p, seed) -> clean accuracy, CRA at 36/72/108 /255 (or at 0.15 for moons), certified K
FAKE = {
    ("2C2F", "gloro", 0.3, 0): (0.300, [0.200, 0.100, 0.050], 2.0),
    ("4C3F", "gloro", 0.3, 0): (0.392, [0.251, 0.150, 0.090], 3.8),
    ("4C3F", "gloro", 0.3, 1): (0.398, [0.255, 0.146, 0.094], 4.0),
    ("4C3F", "cll", 0.3, 0): (0.396, [0.261, 0.170, 0.085], 12.0),
    ("4C3F", "cll", 0.3, 1): (0.400, [0.265, 0.166, 0.089], 12.4),
    ("2C2F", "cll", 0.3, 0): (0.310, [0.215, 0.120, 0.040], 9.0),
    ("moons-mlp", "cll", 0.75, 0): (0.970, [0.902], 300.0),
    ("moons-mlp", "cll", 0.25, 0): (1.000, [0.988], 250.0),
}


# (arch, loss, p, seed) -> audit.json's own-radius points attacked, tightness median, Lipschitz tightness
FAKE_AUDIT = {("4C3F", "gloro", 0.3, 0): (80, 2.0, 0.5), ("4C3F", "gloro", 0.3, 1): (90, 2.4, 0.6)}
# cells whose certify.json has no power-iteration estimate (as for the peers' families)
NO_ESTIMATE = {("2C2F", "cll", 0.3, 0)}


def write_fake_run(run: Path, cell, clean: float, cra: list[float], lipschitz: float) -> None:
    """train.json, certify.json (and audit.json for FAKE_AUDIT's cells) as cll train / certify / audit
    write them, with chosen numbers."""
    key = (cell.arch, cell.loss, cell.p, cell.seed)
    cfg = cell.run_config()
    khf = k_hf(cfg.eps, cfg.p) if cfg.loss == "cll" else None
    results.write_json(
        run / results.TRAIN,
        {
            "config": cfg.to_dict(),
            "num_classes": 10,
            "in_shape": [1, 8, 8],
            "epochs": [
                {"epoch": 1, "loss": 0.9, "accuracy": 0.5, "lipschitz_estimate": 1.0, "lr": 1e-3, "seconds": 1.0},
                {"epoch": 2, "loss": 0.7, "accuracy": 0.6, "lipschitz_estimate": 1.1, "lr": 1e-3, "seconds": 1.0},
            ],
            "wall_time": 2.5,
            "lipschitz_estimate": 1.1,
            "lipschitz_bound": lipschitz,
            "k_hf": khf,
            "device": "cpu",
        },
    )
    by_eps = dict(zip([eps_key(e) for e in cfg.certify_eps], cra))
    results.write_json(
        run / results.CERTIFY,
        {
            "clean_accuracy": clean,
            "cra": by_eps,
            "cra_estimate": None if key in NO_ESTIMATE else by_eps,
            "lipschitz_constant": lipschitz,
            "lipschitz_estimate": None if key in NO_ESTIMATE else 0.9 * lipschitz,
            "lipschitz_body": 1.0,
            "k_hf": khf,
            "n_samples": 360,
            "eps": cfg.certify_eps,
            "seconds": 0.1,
        },
    )
    if key in FAKE_AUDIT:
        attacked, tightness, lipschitz_tightness = FAKE_AUDIT[key]
        results.write_json(
            run / results.AUDIT,
            {
                "own_radius": {"attacked": attacked, "broken": 0},
                "tightness": {"quantiles": {"median": tightness}, "points": attacked, "no_adversarial_found": 0},
                "lipschitz_lower": lipschitz_tightness * lipschitz,
                "lipschitz_upper": lipschitz,
                "lipschitz_tightness": lipschitz_tightness,
                "broken": 0,
            },
        )


def write_fake_tree(tmp_path: Path, grid: dict = GRID) -> tuple[Path, Path]:
    """(grid file, results root) of the fake tree: runs of FAKE written, the rest absent."""
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid, sort_keys=False))
    root = tmp_path / "res"
    for cell in load_grid(grid_path).cells:
        key = (cell.arch, cell.loss, cell.p, cell.seed)
        if cell.pending is None and key in FAKE:
            write_fake_run(cell.path(root), cell, *FAKE[key])
    return grid_path, root


def write_fake_summary(tmp_path: Path, grid: dict = GRID) -> Path:
    """The fake tree and its summary.csv; returns the summary's path."""
    path, _ = aggregate_grid(*write_fake_tree(tmp_path, grid))
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def with_published(grid: dict) -> dict:
    """The fake grid with published numbers on five digits rows, chosen so that each verdict
    occurs: GloRo 4C3F within one seed-std, CLL 4C3F within 1 point (not within its std), GloRo
    2C2F off by 1.5 points, CE (not run) and SOC (pending) not run yet."""
    grid = copy.deepcopy(grid)
    rows = grid["tables"][0]["rows"]
    rows[0]["published"] = {"source": "Paper B, Table 3", "clean": 0.315}
    rows[1]["published"] = {
        "source": "Paper A, Table 1",
        "clean": 0.397,
        "eps": ["36/255", "72/255", "108/255"],
        "cra": [0.255, 0.150, 0.090],
        "k_hf": 3.9,
    }
    rows[2]["published"] = {"source": "Paper A, Table 1", "clean": 0.398, "eps": ["36/255"], "cra": [0.255]}
    rows[4]["published"] = {"source": "Paper A, Table 1", "clean": 0.5}
    rows[5]["published"] = {"source": "Paper A, Table 1", "clean": 0.4, "eps": [0.15], "cra": [0.3], "k_hf": 6.4}
    return grid
