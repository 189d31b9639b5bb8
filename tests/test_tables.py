"""Tests for ``cll tables`` (src/cll/tables.py: the table model; src/cll/render.py: CSV, Markdown,
LaTeX), on the fake results tree of tests/fake_results.py: every rendered cell is checked exactly."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from fake_results import E36, E108, GRID, read_csv, with_published, write_fake_summary

from cll.cli import main
from cll.losses import k_hf
from cll.render import make_tables, render_markdown
from cll.summary import read_summary
from cll.tables import build_tables

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


@pytest.fixture
def summary(tmp_path) -> Path:
    return write_fake_summary(tmp_path)


def test_digits_markdown_table_exact(summary, tmp_path):
    make_tables(summary, tmp_path / "tables")
    md = (tmp_path / "tables" / "digits.md").read_text()
    assert md.startswith(DIGITS_MD)
    assert "difference to the baseline" in md  # the legend


def test_estimate_table_beside_the_sound_one(summary, tmp_path):
    """Below the poster table: sound CRA / estimate CRA per row (n/a without an estimate), the
    constants' ratio, and what the audit found."""
    (digits,) = [t for t in build_tables(read_summary(summary)) if t.name == "digits"]
    md = render_markdown(digits)
    estimate = md.split("power-iteration estimate, and the audit**\n\n", 1)[1].splitlines()
    assert estimate[0] == (
        "| Method | Model | CRA 36/255 sound / est. | CRA 72/255 sound / est. | "
        "CRA 108/255 sound / est. | K bound / est. | Audit broken / attacked | Nearest adv. / radius | "
        "K lower / bound |"
    )
    gloro = next(line for line in estimate if line.startswith("| GloRo | 4C3F | "))
    sound_row = next(line for line in md.splitlines() if line.startswith("| GloRo | 4C3F"))
    # the fake runs report the same CRA both ways and an estimate 0.9 x the bound; two audits
    sound = sound_row.split(" | ")[3].split(" ")[0]
    assert gloro.split(" | ")[2] == f"{sound} / {sound}"
    assert gloro.endswith(" | 1.1111 | 0 / 170 | 2.2 | 0.55 |")
    # a run without an estimate (a peer's) says n/a; a row never audited shows no audit figures
    cll_2c2f = next(line for line in estimate if line.startswith("| CLL | 2C2F | "))
    assert cll_2c2f.endswith(" / n/a | n/a | — | — | — |")
    assert "power iteration approaches the norm from below" in md
    make_tables(summary, tmp_path)
    rows = read_csv(tmp_path / "digits.csv")
    assert float(rows[1][f"cra_{E108}_estimate_mean"]) == pytest.approx(float(rows[1][f"cra_{E108}_mean"]))
    assert float(rows[1]["k_bound_over_estimate"]) == pytest.approx(1 / 0.9)
    assert rows[5]["k_bound_over_estimate"] == ""  # pending: nothing to compare
    assert rows[1]["audit_own_attacked"] == "170" and float(rows[1]["audit_tightness_median"]) == pytest.approx(2.2)


def test_moons_table_labels_p_and_shows_its_own_eps(summary):
    (moons,) = [t for t in build_tables(read_summary(summary)) if t.name == "moons"]
    md = render_markdown(moons).splitlines()
    assert md[2] == "| Method | Model | Clean (%) | CRA 0.15 | K^(h∘f) |"
    assert md[4] == "| CLL p=0.75 | moons-mlp | 97.0 | 90.2 | 3.4 |"
    assert md[5] == "| CLL p=0.25 | moons-mlp | 100.0 | 98.8 | 13.0 |"


def test_table_csv_holds_plain_fractions(summary, tmp_path):
    make_tables(summary, tmp_path)
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
    make_tables(summary, tmp_path)
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
    written = make_tables(summary)
    assert sorted(p.name for p in written) == sorted(
        [f"{n}.{s}" for n in ("digits", "moons") for s in ("csv", "md", "tex")]
        + ["reproduction.csv", "reproduction.md"]
    )
    before = {p.name: p.read_bytes() for p in written}
    for p in written:
        p.unlink()
    (summary.parent / "tables").rmdir()
    assert {p.name: p.read_bytes() for p in make_tables(summary)} == before


def test_cli_tables(summary, capsys):
    assert main(["tables", "--summary", str(summary), "--out", str(summary.parent / "t")]) == 0
    assert (summary.parent / "t" / "digits.md").read_text().startswith(DIGITS_MD)
    assert "wrote 8 table files" in capsys.readouterr().out


def test_missing_summary_is_a_one_line_error(tmp_path, capsys):
    capsys.readouterr()
    assert main(["tables", "--summary", str(tmp_path / "nope" / "summary.csv")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "nope").exists()


# ------------------------------------------------------------------------ published numbers
PUBLISHED_MD = """\
**Digits, 4C3F**

Reproduction of 5 published rows: 1 within one seed-std, 1 within 1 point, 1 off by more, 2 not run yet

| Method | Model | Clean (%) pub. | Clean (%) ours | CRA 36/255 pub. | CRA 36/255 ours | CRA 0.15 pub. | \
CRA 0.15 ours | CRA 72/255 pub. | CRA 72/255 ours | CRA 108/255 pub. | CRA 108/255 ours | K^(h∘f) pub. | \
K^(h∘f) ours | Reproduced | Note |
|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|:---|
| GloRo | 2C2F | 31.5 | 30.0 (-1.5) | — | 20.0 | — | — | — | 10.0 | — | 5.0 | — | 2.0 | off by 1.50 |  |
| GloRo | 4C3F | 39.7 | 39.5 ± 0.4 (-0.2) | 25.5 | 25.3 ± 0.3 (-0.2) | — | — | 15.0 | 14.8 ± 0.3 (-0.2) | \
9.0 | 9.2 ± 0.3 (+0.2) | 3.9 | 3.9 | within std |  |
| CLL | 4C3F | 39.8 | 39.8 ± 0.3 (+0.0) | 25.5 | 26.3 ± 0.3 (+0.8) | — | — | — | 16.8 ± 0.3 | — | 8.7 ± 0.3 | \
— | 11.6 | within 1 pt |  |
| CLL | 2C2F | — | 31.0 | — | 21.5 | — | — | — | 12.0 | — | 4.0 | — | 11.6 |  | 1 of 2 seeds run |
| CE | 4C3F | 50.0 | — | — | — | — | — | — | — | — | — | — | — | not run | not run |
| SOC | LipConv-20 | 40.0 | — | — | — | 30.0 | — | — | — | — | — | 6.4 | — | pending | \
pending: LipConv is not implemented |
"""

REPRODUCTION_MD = """\
**Reproduction: our numbers against the published ones**

Reproduction of 5 published rows: 1 within one seed-std, 1 within 1 point, 1 off by more, 2 not run yet

| Table | Method | Model | Verdict | Largest difference (points) | Seeds run | Source |
|:---|:---|:---|:---|---:|---:|:---|
| digits | GloRo | 2C2F | off by more | 1.50 | 1 of 1 | Paper B, Table 3 |
| digits | GloRo | 4C3F | within one seed-std | 0.20 | 2 of 2 | Paper A, Table 1 |
| digits | CLL | 4C3F | within 1 point | 0.80 | 2 of 2 | Paper A, Table 1 |
| digits | CE | 4C3F | not run yet | — | 0 of 1 | Paper A, Table 1 |
| digits | SOC | LipConv-20 | not run yet | — | 0 of 1 | Paper A, Table 1 |
"""


def test_published_numbers_beside_ours_exact(tmp_path, capsys):
    """pub. beside ours with ours - pub. in points, the verdict per row and the count line on top;
    a published radius (0.15) that no cell was certified at gets its column; the moons table, which
    has no published numbers, keeps the plain layout."""
    summary = write_fake_summary(tmp_path, with_published(GRID))
    written = make_tables(summary)
    out = capsys.readouterr().out
    assert "Reproduction of 5 published rows: 1 within one seed-std, 1 within 1 point, 1 off by more" in out
    assert sorted(p.name for p in written) == sorted(
        [f"{n}.{s}" for n in ("digits", "moons") for s in ("csv", "md", "tex")]
        + ["reproduction.csv", "reproduction.md"]
    )
    tables = summary.parent / "tables"
    md = (tables / "digits.md").read_text()
    assert md.startswith(PUBLISHED_MD)
    assert "Published: Paper B, Table 3 (GloRo 2C2F); Paper A, Table 1 (GloRo 4C3F, CLL 4C3F, CE 4C3F, SOC" in md
    assert (tables / "reproduction.md").read_text().startswith(REPRODUCTION_MD)
    assert (tables / "moons.md").read_text().splitlines()[2] == "| Method | Model | Clean (%) | CRA 0.15 | K^(h∘f) |"

    rows = read_csv(tables / "digits.csv")
    gloro, cll = rows[1], rows[2]
    assert (gloro["reproduction"], cll["reproduction"], rows[0]["reproduction"]) == ("within_std", "within_1pt", "off")
    assert float(gloro["clean_published"]) == 0.397 and float(gloro["k_hf_published"]) == 3.9
    assert float(gloro["clean_vs_published"]) == pytest.approx(-0.002)
    assert float(cll[f"cra_{E36}_vs_published"]) == pytest.approx(0.008)
    assert float(cll[f"cra_{E36}_diff"]) == pytest.approx(0.010)  # to the baseline: still in the CSV
    assert float(cll["max_deviation"]) == pytest.approx(0.008)
    assert rows[3]["reproduction"] == "" and rows[4]["reproduction"] == "not_run"
    assert [r["reproduction"] for r in read_csv(tables / "reproduction.csv")] == [
        "off",
        "within_std",
        "within_1pt",
        "not_run",
        "not_run",
    ]

    tex = (tables / "digits.tex").read_text()
    assert r"$K^{h\circ f}$ pub. & $K^{h\circ f}$ ours & Reproduced & Note \\" in tex
    assert r"GloRo & 4C3F & 39.7 & 39.5 $\pm$ 0.4 (-0.2) & 25.5 &" in tex
    assert "\\begin{tabular}{ll" + "r" * 12 + "ll}" in tex


def test_a_grid_without_published_numbers_says_so(summary):
    make_tables(summary, log=lambda line: pytest.fail(f"unexpected: {line}"))
    text = (summary.parent / "tables" / "reproduction.md").read_text()
    assert "No row of this grid carries published numbers" in text
    assert read_csv(summary.parent / "tables" / "reproduction.csv") == []
