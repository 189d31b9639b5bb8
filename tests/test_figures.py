"""Tests for ``cll figures`` (src/cll/figures.py): from the fake results tree of
tests/fake_results.py (no models: the moons panel is skipped), and from two tiny moons models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from fake_results import write_fake_summary

from cll import figures
from cll.cli import main
from cll.grid import load_grid
from cll.train import train


def test_cli_figures_from_the_fake_tree(tmp_path, capsys):
    summary = write_fake_summary(tmp_path)
    out_dir = summary.parent / "f"
    capsys.readouterr()
    assert main(["figures", "--summary", str(summary), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    # the fake moons runs have no model.pt: that figure is skipped with a note, the others drawn
    assert "skipped moons_boundaries" in out
    for name in ("slack_vs_k", "cra_vs_p"):
        for suffix in ("png", "pdf"):
            assert (out_dir / f"{name}.{suffix}").stat().st_size > 0
    assert not list(out_dir.glob("moons_boundaries.*"))


def test_missing_summary_is_a_one_line_error(tmp_path, capsys):
    capsys.readouterr()
    assert main(["figures", "--summary", str(tmp_path / "nope" / "summary.csv")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "nope").exists()


def test_matplotlib_is_not_imported_by_the_cli_module():
    code = "import sys, cll.cli, cll.render, cll.summary; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_figures_from_two_tiny_moons_models(tmp_path, capsys):
    grid = {
        "experiment": "tiny",
        "results": str(tmp_path / "res"),
        "tables": [
            {
                "name": "moons",
                "rows": [
                    {
                        "method": "CLL",
                        "dataset": "moons",
                        "arch": "moons-mlp",
                        "loss": "cll",
                        "eps": 0.15,
                        "p": [0.75, 0.01],
                        "set": {
                            "epochs": 2,
                            "max_train": 200,
                            "max_test": 500,
                            "batch_size": 100,
                            "certify_eps": [0.15],
                            "device": "cpu",
                        },
                    }
                ],
            }
        ],
    }
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    for cell in load_grid(grid_path).cells:
        train(cell.run_config(), cell.path(tmp_path / "res"), log=lambda line: None)
        assert main(["certify", "--run", str(cell.path(tmp_path / "res"))]) == 0
    assert main(["aggregate", "--grid", str(grid_path)]) == 0
    summary = tmp_path / "res" / "summary.csv"
    written = figures.make_figures(summary, log=lambda line: pytest.fail(f"unexpected skip: {line}"))
    assert sorted(p.name for p in written) == sorted(f"{n}.{s}" for n in figures.FIGURES for s in ("png", "pdf"))
    for path in written:
        assert path.parent == tmp_path / "res" / "figures" and path.stat().st_size > 1000
        assert path.read_bytes()[:4] in (b"\x89PNG", b"%PDF")
