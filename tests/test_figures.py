"""Tests for ``cll figures`` (src/cll/figures.py): from the fake results tree of
tests/fake_results.py (no models: the moons panel is skipped), and from two tiny moons models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from fake_results import FAKE, write_fake_summary, write_fake_tree
from helpers import moons_grid

from cll import figures, results
from cll.cli import main
from cll.grid import load_grid
from cll.losses import k_hf
from cll.summary import aggregate_grid, read_summary
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


def _lines(ax) -> dict:
    """The curves of a panel by their gid (what each one is), as {gid: (x, y)}."""
    return {line.get_gid(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_slack_vs_k_draws_the_calibrated_models_constant_apart_from_the_networks(tmp_path):
    # the fake moons sweep at eps 0.15: certified bounds K = 300 (p 0.75) and 250 (p 0.25), rising
    # with p, while K^(h∘f) falls; without audits only the bounds are drawn
    name = "moons moons-mlp, ε=0.15"
    khf = [k_hf(0.15, 0.25), k_hf(0.15, 0.75)]  # 12.97, 3.41
    (tmp_path / "a").mkdir()
    fig = figures.figure_slack_vs_k(read_summary(write_fake_summary(tmp_path / "a")))
    calibrated, network = fig.axes
    assert _lines(calibrated) == {f"k_hf {name}": ([0.25, 0.75], pytest.approx(khf))}
    assert _lines(network) == {f"f upper {name}": ([0.25, 0.75], [250.0, 300.0])}

    # audits: pair-ascent lower bounds at 0.95 (p 0.25) and 0.9 (p 0.75) of the certified bound
    (tmp_path / "b").mkdir()
    grid_path, root = write_fake_tree(tmp_path / "b")
    tightness = {0.25: 0.95, 0.75: 0.9}
    for cell in load_grid(grid_path).cells:
        if cell.dataset == "moons":
            bound, ratio = FAKE[(cell.arch, cell.loss, cell.p, cell.seed)][2], tightness[cell.p]
            audit = {"lipschitz_lower": ratio * bound, "lipschitz_upper": bound, "lipschitz_tightness": ratio}
            results.write_json(cell.path(root) / results.AUDIT, {**audit, "broken": 0})
    summary, _ = aggregate_grid(grid_path, root)
    fig = figures.figure_slack_vs_k(read_summary(summary))
    calibrated, network = fig.axes
    # left, in the units of K^(h∘f): the analytic constant and the audit's lower bound of h∘f, below it
    assert _lines(calibrated) == {
        f"k_hf {name}": ([0.25, 0.75], pytest.approx(khf)),
        f"h∘f lower {name}": ([0.25, 0.75], pytest.approx([0.95 * khf[0], 0.9 * khf[1]])),
    }
    # right, in f's units: its certified bound and pair-ascent lower bound, never beside K^(h∘f)
    assert _lines(network) == {
        f"f upper {name}": ([0.25, 0.75], [250.0, 300.0]),
        f"f lower {name}": ([0.25, 0.75], pytest.approx([237.5, 270.0])),
    }
    # each curve says what it is, each panel what its unit is, the title what the figure shows
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "certified bound" in labels[0] and "pair-ascent lower bound" in labels[1]
    assert labels[2:] == ["certified bound K", "pair-ascent lower bound"]
    assert calibrated.get_ylabel() == r"Lipschitz constant of $h\circ f$"
    assert network.get_ylabel() == r"Lipschitz constant of $f$'s logit differences"
    assert "calibrated model" in fig.get_suptitle() and "K^{h\\circ f}" in fig.get_suptitle()


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
    grid = moons_grid(
        "tiny",
        tmp_path / "res",
        "moons",
        p=[0.75, 0.01],
        set={"epochs": 2, "max_train": 200, "max_test": 500, "batch_size": 100, "certify_eps": [0.15], "device": "cpu"},
    )
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
