"""The tables as files: CSV for machines (fractions), Markdown and LaTeX for people (percents).

    cll tables --summary results/summary.csv      -> results/tables/{name}.csv, .md, .tex

Rendering only: every number comes from the table model of ``cll.tables`` (built from
``summary.csv``), and each file is written atomically, so a rebuild from the same summary gives
byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

from . import results
from .summary import csv_text, read_summary
from .tables import Stat, Table, TableRow, build_tables, eps_label

NO_VALUE = "—"  # what a table shows where there is no number


def _percent(stat: Stat) -> str:
    """``39.8``, ``39.8 ± 0.4``, ``39.8 ± 0.4 (+0.3)``; the difference in percentage points."""
    if stat.mean is None:
        return NO_VALUE
    text = f"{100 * stat.mean:.1f}"
    if stat.std is not None:
        text += f" ± {100 * stat.std:.1f}"
    if stat.diff is not None:
        diff = round(100 * stat.diff, 1) or 0.0  # never "-0.0"
        text += f" ({diff:+.1f})"
    return text


def _cells(row: TableRow) -> list[str]:
    """The number columns of a row as people read them (Clean, CRA..., K^(h∘f))."""
    numbers = [_percent(row.clean)] + [_percent(s) for s in row.cra.values()]
    return numbers + [f"{row.k:.1f}" if row.k is not None else NO_VALUE]


def _label_text(row: TableRow) -> str:
    """The Method column: ``CLL``, or ``CLL p=0.75`` where the method has several p in the table."""
    names = {"eps": "ε", "p": "p"}
    return " ".join([row.method] + [f"{names[n]}={results.fmt_number(v)}" for n, v in row.label])


def render_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with a caption and a legend."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    has_note = any(r.note for r in table.rows)
    header = (
        ["Method", "Model", "Clean (%)"]
        + [f"CRA {eps_label(k)}" for k in table.eps_keys]
        + ["K^(h∘f)"]
        + (["Note"] if has_note else [])
    )
    align = [":---", ":---"] + ["---:"] * (len(header) - 2 - has_note) + ([":---"] if has_note else [])
    lines = [
        f"**{cell(table.title or table.name)}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(align) + "|",
    ]
    for row in table.rows:
        values = [_label_text(row), row.arch] + _cells(row) + ([row.note or ""] if has_note else [])
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    lines += ["", _LEGEND, ""]
    return "\n".join(lines + _estimate_markdown(table, cell))


def _estimate_markdown(table: Table, cell) -> list[str]:
    """The second, smaller table of a Markdown file: each row's sound CRA beside the CRA that the
    converged power-iteration estimate of K would give (what the sound bound costs)."""
    rows = [r for r in table.rows if any(s.mean is not None for s in r.cra_estimate.values())]
    if not rows:
        return []
    header = ["Method", "Model"] + [f"CRA {eps_label(k)} sound / est." for k in table.eps_keys] + ["K bound / est."]
    lines = [
        f"**{cell(table.title or table.name)}: sound certificate vs power-iteration estimate**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in rows:
        values = [_label_text(row), row.arch]
        for k in table.eps_keys:
            sound, est = row.cra[k].mean, row.cra_estimate[k].mean
            values.append(NO_VALUE if sound is None or est is None else f"{100 * sound:.1f} / {100 * est:.1f}")
        values.append(f"{row.k_ratio:.4f}" if row.k_ratio is not None else NO_VALUE)
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return lines + ["", _ESTIMATE_LEGEND, ""]


_ESTIMATE_LEGEND = (
    "sound: the certified CRA of the table above (sound Lipschitz bound, float64 margins "
    "less their rounding bound). est.: the same test points with the converged "
    "power-iteration estimate of K and plain float32 margins; not a certificate, "
    "since power iteration approaches the norm from below. K bound / est.: the ratio "
    "of the two constants of the model (mean over seeds)."
)


_LEGEND = (
    "Percent of the test set; mean over seeds, ± sample standard deviation when there are "
    "several; (±x.x): difference to the baseline method in percentage points. "
    "CRA r: certified robust accuracy at L2 radius r. K^(h∘f): log((2-p)/p)/ε for CLL, "
    "the certified Lipschitz bound of the model otherwise."
)

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "ε": r"$\varepsilon$",
    "±": r"$\pm$",
    "—": "---",
    "∘": r"$\circ$",
}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(table: Table) -> str:
    """A booktabs ``table`` environment, ready for ``\\input``."""
    has_note = any(r.note for r in table.rows)
    header = (
        ["Method", "Model", r"Clean (\%)"]
        + [f"CRA {eps_label(k)}" for k in table.eps_keys]
        + [r"$K^{h\circ f}$"]
        + (["Note"] if has_note else [])
    )
    spec = "ll" + "r" * (len(header) - 2 - has_note) + ("l" if has_note else "")
    lines = [
        f"% {table.name}: written by `cll tables` from summary.csv; needs \\usepackage{{booktabs}}",
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{_tex(table.title or table.name)}}}",
        f"\\label{{tab:{_tex(table.name)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        values = (
            [_tex(_label_text(row)), _tex(row.arch)]
            + [_tex(v) for v in _cells(row)]
            + ([_tex(row.note or "")] if has_note else [])
        )
        lines.append(" & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def render_csv(table: Table) -> str:
    """The table for machines: one line per row, plain fractions (means, stds and differences
    to the baseline in separate columns), empty where there is no value."""
    columns = [
        "method",
        "method_name",
        "baseline",
        "dataset",
        "arch",
        "loss",
        "eps",
        "p",
        "status",
        "note",
        "n_seeds",
        "n_cells",
        "clean_mean",
        "clean_std",
        "clean_diff",
    ]
    for k in table.eps_keys:
        columns += [f"cra_{k}_mean", f"cra_{k}_std", f"cra_{k}_diff"]
    columns += ["k_hf", "k_source"]
    columns += [f"cra_{k}_estimate_mean" for k in table.eps_keys] + ["k_bound_over_estimate"]
    rows = []
    for r in table.rows:
        values = {
            "method": _label_text(r),
            "method_name": r.method,
            "baseline": r.baseline,
            "dataset": r.dataset,
            "arch": r.arch,
            "loss": r.loss,
            "eps": r.eps,
            "p": r.p,
            "status": r.status,
            "note": r.note,
            "n_seeds": r.n_done,
            "n_cells": r.n_cells,
            "clean_mean": r.clean.mean,
            "clean_std": r.clean.std,
            "clean_diff": r.clean.diff,
            "k_hf": r.k,
            "k_source": r.k_source,
            "k_bound_over_estimate": r.k_ratio,
        }
        for k, s in r.cra.items():
            values.update(
                {
                    f"cra_{k}_mean": s.mean,
                    f"cra_{k}_std": s.std,
                    f"cra_{k}_diff": s.diff,
                    f"cra_{k}_estimate_mean": r.cra_estimate[k].mean,
                }
            )
        rows.append(values)
    return csv_text(columns, rows)


def write_tables(tables: list[Table], out_dir: str | Path) -> list[Path]:
    """``{name}.csv``, ``{name}.md`` and ``{name}.tex`` per table, each written atomically."""
    out_dir = Path(out_dir)
    written = []
    for table in tables:
        for suffix, render in ((".csv", render_csv), (".md", render_markdown), (".tex", render_latex)):
            path = out_dir / f"{table.name}{suffix}"
            results.write_text(path, render(table))
            written.append(path)
    return written


def make_tables(summary: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """``cll tables``: the tables of a summary.csv into ``out_dir`` (default: ``tables/`` beside it)."""
    summary = Path(summary)
    tables = build_tables(read_summary(summary))
    return write_tables(tables, out_dir if out_dir is not None else summary.parent / "tables")
