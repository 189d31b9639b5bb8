"""Tests for ``cll aggregate``, ``cll tables`` and ``cll figures`` (src/cll/aggregate.py).

Most tests build a fake results tree: a small grid whose run directories get hand-written
train.json/certify.json files with known numbers, so every rendered table cell can be checked
exactly (means, ± std over two seeds, signed differences to the baseline, pending and not-run
rows, K^(h∘f) from k_hf for CLL and from the certified bound otherwise). One test trains two tiny
moons models to draw the decision-boundary figure.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cll import aggregate, figures, results
from cll.certify import eps_key
from cll.cli import main
from cll.grid import load_grid
from cll.losses import k_hf
from cll.train import train

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

DIGITS_MD = """\
**Digits, 4C3F**

| Method | Model | Clean (%) | CRA 36/255 | CRA 72/255 | CRA 108/255 | K^(h∘f) | Note |
|:---|:---|---:|---:|---:|---:|---:|:---|
| GloRo | 2C2F | 30.0 | 20.0 | 10.0 | 5.0 | 2.0 |  |
| GloRo | 4C3F | 39.5 ± 0.4 | 25.3 ± 0.3 | 14.8 ± 0.3 | 9.2 ± 0.3 | 3.9 |  |
| CLL | 4C3F | 39.8 ± 0.3 (+0.3) | 26.3 ± 0.3 (+1.0) | 16.8 ± 0.3 (+2.0) | 8.7 ± 0.3 (-0.5) | 11.6 |  |
| CLL | 2C2F | 31.0 (+1.0) | 21.5 (+1.5) | 12.0 (+2.0) | 4.0 (-1.0) | 11.6 | 1 of 2 seeds run |
| CE | 4C3F | — | — | — | — | — | not run |
| SOC | LipConv-20 | — | — | — | — | — | pending: LipConv is not implemented |
"""


def write_fake_run(run: Path, cell, clean: float, cra: list[float], lipschitz: float) -> None:
    """train.json and certify.json as cll train / cll certify write them, with chosen numbers."""
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
            "cra_estimate": by_eps,
            "lipschitz_constant": lipschitz,
            "lipschitz_estimate": 0.9 * lipschitz,
            "lipschitz_body": 1.0,
            "k_hf": khf,
            "n_samples": 360,
            "eps": cfg.certify_eps,
            "seconds": 0.1,
        },
    )


@pytest.fixture
def fake_tree(tmp_path) -> tuple[Path, Path]:
    """(grid file, results root) of the fake tree: runs of FAKE written, the rest absent."""
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(GRID, sort_keys=False))
    root = tmp_path / "res"
    for cell in load_grid(grid_path).cells:
        key = (cell.arch, cell.loss, cell.p, cell.seed)
        if cell.pending is None and key in FAKE:
            write_fake_run(cell.path(root), cell, *FAKE[key])
    return grid_path, root


@pytest.fixture
def summary(fake_tree) -> Path:
    grid_path, root = fake_tree
    path, _ = aggregate.aggregate_grid(grid_path, root)
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ summary.csv
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
    assert header[:14] == aggregate.CELL_COLUMNS + ["clean_accuracy"]
    assert header[14:22] == [f"cra_{k}" for k in ("0.1412", "0.15", "0.2824", "0.4235")] + [
        f"cra_estimate_{k}" for k in ("0.1412", "0.15", "0.2824", "0.4235")
    ]
    assert header[22:29] == aggregate.MODEL_COLUMNS
    assert header[29:32] == ["cfg_dataset", "cfg_arch", "cfg_loss"]
    rows = aggregate.read_summary(summary)
    cll = rows[3]  # CLL 4C3F seed 0
    assert (cll["clean_accuracy"], cll[f"cra_{E36}"], cll["lipschitz_constant"]) == (0.396, 0.261, 12.0)
    assert cll["k_hf"] == pytest.approx(math.log(1.7 / 0.3) / 0.15)
    assert (cll["train_loss"], cll["train_accuracy"], cll["wall_time"], cll["n_samples"]) == (0.7, 0.6, 2.5, 360)
    assert rows[1]["k_hf"] is None and rows[1]["baseline"] is None and rows[3]["baseline"] == "GloRo"
    assert json.loads(cll["cfg_certify_eps"]) == [36 / 255, 72 / 255, 108 / 255]  # exact floats
    assert rows[6]["clean_accuracy"] is None and rows[6]["cfg_arch"] == "2C2F"  # missing: planned config


def test_summary_is_rewritten_identically(fake_tree, summary):
    before = summary.read_bytes()
    summary.unlink()
    aggregate.aggregate_grid(*fake_tree)
    assert summary.read_bytes() == before


# ------------------------------------------------------------------------------------ tables
def test_digits_markdown_table_exact(summary, tmp_path):
    aggregate.make_tables(summary, tmp_path / "tables")
    md = (tmp_path / "tables" / "digits.md").read_text()
    assert md.startswith(DIGITS_MD)
    assert "difference to the baseline" in md  # the legend


def test_estimate_table_beside_the_sound_one(summary, tmp_path):
    """Below the poster table: sound CRA / estimate CRA per row, and the constants' ratio."""
    (digits,) = [t for t in aggregate.build_tables(aggregate.read_summary(summary)) if t.name == "digits"]
    md = aggregate.render_markdown(digits)
    estimate = md.split("sound certificate vs power-iteration estimate**\n\n", 1)[1].splitlines()
    assert estimate[0] == (
        "| Method | Model | CRA 36/255 sound / est. | CRA 72/255 sound / est. | "
        "CRA 108/255 sound / est. | K bound / est. |"
    )
    gloro = next(line for line in estimate if line.startswith("| GloRo | 4C3F | "))
    sound_row = next(line for line in md.splitlines() if line.startswith("| GloRo | 4C3F"))
    # the fake runs report the same CRA both ways and an estimate 0.9 x the bound
    sound = sound_row.split(" | ")[3].split(" ")[0]
    assert gloro.split(" | ")[2] == f"{sound} / {sound}"
    assert gloro.endswith(" | 1.1111 |")
    assert "power iteration approaches the norm from below" in md
    aggregate.make_tables(summary, tmp_path)
    rows = read_csv(tmp_path / "digits.csv")
    assert float(rows[1][f"cra_{E108}_estimate_mean"]) == pytest.approx(float(rows[1][f"cra_{E108}_mean"]))
    assert float(rows[1]["k_bound_over_estimate"]) == pytest.approx(1 / 0.9)
    assert rows[5]["k_bound_over_estimate"] == ""  # pending: nothing to compare


def test_moons_table_labels_p_and_shows_its_own_eps(summary):
    (moons,) = [t for t in aggregate.build_tables(aggregate.read_summary(summary)) if t.name == "moons"]
    md = aggregate.render_markdown(moons).splitlines()
    assert md[2] == "| Method | Model | Clean (%) | CRA 0.15 | K^(h∘f) |"
    assert md[4] == "| CLL p=0.75 | moons-mlp | 97.0 | 90.2 | 3.4 |"
    assert md[5] == "| CLL p=0.25 | moons-mlp | 100.0 | 98.8 | 13.0 |"


def test_table_csv_holds_plain_fractions(summary, tmp_path):
    aggregate.make_tables(summary, tmp_path)
    rows = read_csv(tmp_path / "digits.csv")
    assert [r["status"] for r in rows] == ["done", "done", "done", "partial", "missing", "pending"]
    gloro, cll = rows[1], rows[2]
    assert float(gloro["clean_mean"]) == pytest.approx(0.395)
    assert float(gloro["clean_std"]) == pytest.approx(math.sqrt(2 * 0.003**2))
    assert gloro["clean_diff"] == "" and gloro["k_source"] == "measured"
    assert float(gloro["k_hf"]) == pytest.approx(3.9)
    assert float(cll["clean_diff"]) == pytest.approx(0.003)
    assert float(cll[f"cra_{E108}_diff"]) == pytest.approx(-0.005)
    assert (cll["k_source"], float(cll["k_hf"])) == ("analytic", pytest.approx(k_hf(0.15, 0.3)))
    assert (rows[3]["n_seeds"], rows[3]["n_cells"]) == ("1", "2")
    assert rows[5]["clean_mean"] == "" and rows[5]["note"] == "pending: LipConv is not implemented"


def table_blocks(md: str) -> list[list[str]]:
    """The Markdown tables of a file, each as its lines."""
    blocks, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def table_lines(md: str) -> list[str]:
    """The lines of the poster table (the first of the file)."""
    return table_blocks(md)[0]


def test_markdown_and_latex_are_well_formed(summary, tmp_path):
    aggregate.make_tables(summary, tmp_path)
    for name in ("digits", "moons"):
        blocks = table_blocks((tmp_path / f"{name}.md").read_text())
        assert len(blocks) == 2  # the poster table, then sound vs estimate
        for block in blocks:
            widths = {len(re.split(r"(?<!\\)\|", line)) for line in block}
            assert len(block) >= 3 and len(widths) == 1, block
        lines = blocks[0]

        tex = (tmp_path / f"{name}.tex").read_text()
        for env in ("table", "tabular"):
            assert tex.count(f"\\begin{{{env}}}") == tex.count(f"\\end{{{env}}}") == 1
        spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1)
        body = tex.split("\\toprule\n")[1].split("\\bottomrule")[0]
        rows = [line for line in body.splitlines() if line.endswith("\\\\")]
        assert len(rows) == len(lines) - 1  # header + data rows
        assert {len(re.split(r"(?<!\\)&", row)) for row in rows} == {len(spec)}
        assert "±" not in tex and "—" not in tex and "ε" not in tex
    assert "$K^{h\\circ f}$" in tex and "Clean (\\%)" in tex


def test_rebuilt_tables_are_byte_identical(summary):
    written = aggregate.make_tables(summary)
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{s}" for n in ("digits", "moons") for s in ("csv", "md", "tex")
    )
    before = {p.name: p.read_bytes() for p in written}
    for p in written:
        p.unlink()
    (summary.parent / "tables").rmdir()
    assert {p.name: p.read_bytes() for p in aggregate.make_tables(summary)} == before


# ------------------------------------------------------------------------------------ the CLI
def test_cli_aggregate_tables_figures(fake_tree, capsys):
    grid_path, root = fake_tree
    assert main(["aggregate", "--grid", str(grid_path), "--results", str(root)]) == 0
    assert "11 cells (8 done, 2 missing, 1 pending)" in capsys.readouterr().out
    summary = root / "summary.csv"
    assert main(["tables", "--summary", str(summary), "--out", str(root / "t")]) == 0
    assert (root / "t" / "digits.md").read_text().startswith(DIGITS_MD)
    assert main(["figures", "--summary", str(summary), "--out", str(root / "f")]) == 0
    out = capsys.readouterr().out
    # the fake moons runs have no model.pt: that figure is skipped with a note, the others drawn
    assert "skipped moons_boundaries" in out
    for name in ("slack_vs_k", "cra_vs_p"):
        for suffix in ("png", "pdf"):
            assert (root / "f" / f"{name}.{suffix}").stat().st_size > 0
    assert not list((root / "f").glob("moons_boundaries.*"))


@pytest.mark.parametrize("command", ["tables", "figures"])
def test_missing_summary_is_a_one_line_error(tmp_path, capsys, command):
    capsys.readouterr()
    assert main([command, "--summary", str(tmp_path / "nope" / "summary.csv")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "nope").exists()


def test_missing_grid_is_a_one_line_error(tmp_path, capsys):
    capsys.readouterr()
    assert main(["aggregate", "--grid", str(tmp_path / "grid.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_matplotlib_is_not_imported_by_the_cli_module():
    code = "import sys, cll.cli, cll.aggregate; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------- figures with real models
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
