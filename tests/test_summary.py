"""Tests for ``cll aggregate`` (src/cll/summary.py): run directories -> summary.csv, on the fake
results tree of tests/fake_results.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from fake_results import E36, GRID, read_csv, with_published, write_fake_summary, write_fake_tree

from cll.cli import main
from cll.grid import load_grid
from cll.summary import (
    AUDIT_COLUMNS,
    CELL_COLUMNS,
    MODEL_COLUMNS,
    PUBLISHED_COLUMNS,
    aggregate_grid,
    read_summary,
)


@pytest.fixture
def fake_tree(tmp_path) -> tuple[Path, Path]:
    return write_fake_tree(tmp_path)


@pytest.fixture
def summary(fake_tree) -> Path:
    path, _ = aggregate_grid(*fake_tree)
    return path


def test_summary_has_one_row_per_cell_in_grid_order(fake_tree, summary):
    grid = load_grid(fake_tree[0])
    rows = read_csv(summary)
    assert len(rows) == len(grid.cells) == 11
    assert [(r["table"], r["method"], r["arch"], r["seed"]) for r in rows] == [
        (c.table, c.method, c.arch, str(c.seed)) for c in grid.cells
    ]
    assert [r["status"] for r in rows] == ["done"] * 6 + ["missing", "missing", "pending", "done", "done"]
    assert rows[8]["pending"] == "LipConv is not implemented"
    assert all(r["run_dir"] == c.path(".").as_posix() for r, c in zip(rows, grid.cells))


def test_summary_columns_and_values(summary):
    with summary.open(newline="") as f:
        header = next(csv.reader(f))
    assert header[:14] == CELL_COLUMNS + ["clean_accuracy"]
    assert header[14:22] == [f"cra_{k}" for k in ("0.1412", "0.15", "0.2824", "0.4235")] + [
        f"cra_estimate_{k}" for k in ("0.1412", "0.15", "0.2824", "0.4235")
    ]
    assert header[22:29] == MODEL_COLUMNS
    assert header[29:34] == AUDIT_COLUMNS  # two runs of the fake tree were audited
    assert header[34:37] == PUBLISHED_COLUMNS  # empty here: no row has published numbers
    assert header[37:40] == ["cfg_dataset", "cfg_arch", "cfg_loss"]
    rows = read_summary(summary)
    cll = rows[3]  # CLL 4C3F seed 0
    assert (cll["clean_accuracy"], cll[f"cra_{E36}"], cll["lipschitz_constant"]) == (0.396, 0.261, 12.0)
    assert cll["k_hf"] == pytest.approx(math.log(1.7 / 0.3) / 0.15)
    assert (cll["train_loss"], cll["train_accuracy"], cll["wall_time"], cll["n_samples"]) == (0.7, 0.6, 2.5, 360)
    assert rows[1]["k_hf"] is None and rows[1]["baseline"] is None and rows[3]["baseline"] == "GloRo"
    assert json.loads(cll["cfg_certify_eps"]) == [36 / 255, 72 / 255, 108 / 255]  # exact floats
    assert rows[6]["clean_accuracy"] is None and rows[6]["cfg_arch"] == "2C2F"  # missing: planned config


def test_published_numbers_are_copied_onto_every_cell_of_their_row(tmp_path):
    rows = read_summary(write_fake_summary(tmp_path, with_published(GRID)))
    gloro = [r for r in rows if r["method"] == "GloRo" and r["arch"] == "4C3F"]
    assert len(gloro) == 2  # two seeds, the same published numbers
    for row in gloro:
        assert (row["published_source"], row["published_clean"], row["published_k_hf"]) == (
            "Paper A, Table 1",
            0.397,
            3.9,
        )
        assert (row[f"published_cra_{E36}"], row["published_cra_0.2824"], row["published_cra_0.4235"]) == (
            0.255,
            0.15,
            0.09,
        )
    soc = next(r for r in rows if r["method"] == "SOC")
    assert soc["published_cra_0.15"] == 0.3 and soc[f"published_cra_{E36}"] is None
    assert all(r["published_source"] is None for r in rows if r["table"] == "moons")


def test_summary_is_rewritten_identically(fake_tree, summary):
    before = summary.read_bytes()
    summary.unlink()
    aggregate_grid(*fake_tree)
    assert summary.read_bytes() == before


def test_cli_aggregate(fake_tree, capsys):
    grid_path, root = fake_tree
    assert main(["aggregate", "--grid", str(grid_path), "--results", str(root)]) == 0
    assert "11 cells (8 done, 2 missing, 1 pending)" in capsys.readouterr().out
    assert (root / "summary.csv").is_file()


def test_missing_grid_is_a_one_line_error(tmp_path, capsys):
    capsys.readouterr()
    assert main(["aggregate", "--grid", str(tmp_path / "grid.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
