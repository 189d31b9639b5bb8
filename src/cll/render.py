"""The tables as files: CSV for machines (fractions), Markdown and LaTeX for people (percents).

    cll tables --summary results/summary.csv      -> results/tables/{name}.csv, .md, .tex

Rendering only: every number comes from the table model of ``cll.tables`` (built from
``summary.csv``), and each file is written atomically, so a rebuild from the same summary gives
byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import results
from .errors import CllError
from .summary import csv_text, read_summary
from .tables import (
    VERDICTS,
    Stat,
    Table,
    TableRow,
    build_tables,
    eps_label,
    reproduction_counts,
    reproduction_line,
)

NO_VALUE = "—"  # what a table shows where there is no number
K_HEADER = "K^(h∘f)"  # the Lipschitz column, as Markdown writes it (LaTeX: $K^{h\circ f}$)
STAT_PARTS = ("mean", "std", "diff", "published", "vs_published")  # a Stat's columns in the CSV


def _percent(stat: Stat, diff: float | None) -> str:
    """``39.8``, ``39.8 ± 0.4``, ``39.8 ± 0.4 (+0.3)``; the difference in percentage points."""
    if stat.mean is None:
        return NO_VALUE
    text = f"{100 * stat.mean:.1f}"
    if stat.std is not None:
        text += f" ± {100 * stat.std:.1f}"
    if diff is not None:
        diff = round(100 * diff, 1) or 0.0  # never "-0.0"
        text += f" ({diff:+.1f})"
    return text


def _number(value: float | None, scale: float = 100) -> str:
    return NO_VALUE if value is None else f"{scale * value:.1f}"


def _has_published(table: Table) -> bool:
    return any(r.published is not None for r in table.rows)


def _verdict_text(row: TableRow) -> str:
    """The Reproduced column: ``within std``, ``within 1 pt``, ``off by 2.3``, ``not run``."""
    if row.verdict == "off":
        return f"off by {100 * row.deviation:.2f}"  # 2 decimals: 1.0 could be either side of 1 point
    if row.status == "pending" and row.verdict is not None:
        return "pending"
    short = {"within_std": "within std", "within_1pt": "within 1 pt", "not_run": "not run", "no_match": "no common"}
    return short.get(row.verdict, "")


def _header(table: Table) -> tuple[list[str], list[str]]:
    """Column names and alignments (l, r) of the people's table. With published numbers, each
    number column comes twice (pub., ours) and a Reproduced column follows."""
    numbers = ["Clean (%)"] + [f"CRA {eps_label(key)}" for key in table.eps_keys] + [K_HEADER]
    texts = ["Note"] if any(r.note for r in table.rows) else []
    if _has_published(table):
        numbers = [f"{name} {which}" for name in numbers for which in ("pub.", "ours")]
        texts = ["Reproduced"] + texts
    return ["Method", "Model"] + numbers + texts, ["l", "l"] + ["r"] * len(numbers) + ["l"] * len(texts)


def _row_values(table: Table, row: TableRow) -> list[str]:
    """A row as people read it, in the order of ``_header``. In a table with published numbers the
    parenthesised difference is ours minus the published number, else ours minus the baseline's."""
    stats = [row.clean] + list(row.cra.values())
    k = _number(row.k, scale=1)
    if _has_published(table):
        pub_k = None if row.published is None else row.published.k_hf
        numbers = []
        for stat in stats:
            numbers += [_number(stat.published), _percent(stat, stat.vs_published)]
        numbers += [_number(pub_k, scale=1), k, _verdict_text(row)]
    else:
        numbers = [_percent(stat, stat.diff) for stat in stats] + [k]
    notes = [row.note or ""] if any(r.note for r in table.rows) else []
    return [_label_text(row), row.arch] + numbers + notes


def _label_text(row: TableRow) -> str:
    """The Method column: ``CLL``, or ``CLL p=0.75`` where the method has several p in the table."""
    names = {"eps": "ε", "p": "p"}
    return " ".join([row.method] + [f"{names[n]}={results.fmt_number(v)}" for n, v in row.label])


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_line(values: list[str]) -> str:
    return "| " + " | ".join(_md(v) for v in values) + " |"


def _md_rule(align: list[str]) -> str:
    return "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"


def render_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with a caption, the reproduction line where the table has
    published numbers, and a legend."""
    header, align = _header(table)
    reproduction = reproduction_line(table.rows)
    lines = [f"**{_md(table.title or table.name)}**", ""] + ([reproduction, ""] if reproduction else [])
    lines += [_md_line(header), _md_rule(align)] + [_md_line(_row_values(table, row)) for row in table.rows]
    lines += ["", _PUBLISHED_LEGEND + _sources(table) if _has_published(table) else _LEGEND, ""]
    return "\n".join(lines + _estimate_markdown(table))


def _sources(table: Table) -> str:
    """`` Published: <source>.``, or with several sources `` Published: <source> (GloRo 8C2F, CLL
    8C2F); <source> (...).`` for the legend."""
    by_source: dict[str, list[str]] = {}
    for row in table.rows:
        if row.published is not None:
            by_source.setdefault(row.published.source, []).append(f"{_label_text(row)} {row.arch}")
    if len(by_source) == 1:
        return f" Published: {next(iter(by_source))}."
    return " Published: " + "; ".join(f"{src} ({', '.join(rows)})" for src, rows in by_source.items()) + "."


def _estimate_markdown(table: Table) -> list[str]:
    """The second, smaller table of a Markdown file, for every row that ran: its sound CRA beside the
    CRA that the converged power-iteration estimate of K would give (what the sound bound costs;
    n/a where no estimate exists), and what the audit found."""
    rows = [r for r in table.rows if r.clean.mean is not None]
    if not rows:
        return []
    header = ["Method", "Model"] + [f"CRA {eps_label(k)} sound / est." for k in table.eps_keys]
    header += ["K bound / est.", "Audit broken / attacked", "Nearest adv. / radius", "K lower / bound"]
    lines = [
        f"**{_md(table.title or table.name)}: sound certificate vs power-iteration estimate, and the audit**",
        "",
        _md_line(header),
        _md_rule(["l", "l"] + ["r"] * (len(header) - 2)),
    ]
    for row in rows:
        values = [_label_text(row), row.arch]
        for k in table.eps_keys:
            sound, est = row.cra[k].mean, row.cra_estimate[k].mean
            if sound is None:
                values.append(NO_VALUE)
            else:
                values.append(f"{100 * sound:.1f} / {'n/a' if est is None else f'{100 * est:.1f}'}")
        values.append(f"{row.k_ratio:.4f}" if row.k_ratio is not None else "n/a")
        audit = row.audit
        values.append(NO_VALUE if audit is None else f"{audit.broken} / {audit.attacked}")
        for value in (None, None) if audit is None else (audit.tightness, audit.lipschitz_tightness):
            values.append(NO_VALUE if value is None else f"{value:.3g}")
        lines.append(_md_line(values))
    return lines + ["", _ESTIMATE_LEGEND, ""]


_ESTIMATE_LEGEND = (
    "sound: the certified CRA of the table above (sound Lipschitz bound, margins less their "
    "rounding bound). est.: the same test points with the converged power-iteration estimate of K "
    "and plain float32 margins; not a certificate, since power iteration approaches the norm from "
    "below; n/a where power iteration does not follow the model's layers (the peers' families). "
    "K bound / est.: the ratio of the two constants of the model (mean over seeds). Audit (cll "
    "audit, a test sample): certificates broken by an attack / correct points attacked at their own "
    "radius; nearest adversarial point found / certified radius (median; 1 = tight); the Lipschitz "
    "lower bound found by pair ascent / the certified bound (1 = tight)."
)


_LEGEND = (
    "Percent of the test set; mean over seeds, ± sample standard deviation when there are "
    "several; (±x.x): difference to the baseline method in percentage points. "
    "CRA r: certified robust accuracy at L2 radius r. K^(h∘f): log((2-p)/p)/ε for CLL, "
    "the certified Lipschitz bound of the model otherwise."
)

_PUBLISHED_LEGEND = (
    "Percent of the test set. pub.: the number the row's source reports; ours: mean over seeds, "
    "± sample standard deviation when there are several, (±x.x): ours minus pub. in percentage "
    "points (the CSV also has the difference to the baseline method). Reproduced: every "
    "published clean and CRA number within one seed-std of our mean (needs two seeds), within "
    "1 point, or else off by the largest difference in points. CRA r: certified robust "
    "accuracy at L2 radius r. K^(h∘f): log((2-p)/p)/ε for CLL, the certified Lipschitz bound "
    "of the model otherwise."
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
    """A booktabs ``table`` environment, ready for ``\\input`` (the columns of the Markdown table)."""
    header, align = _header(table)
    header = [_tex(h).replace(_tex(K_HEADER), r"$K^{h\circ f}$") for h in header]
    lines = [
        f"% {table.name}: written by `cll tables` from summary.csv; needs \\usepackage{{booktabs}}",
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{_tex(table.title or table.name)}}}",
        f"\\label{{tab:{_tex(table.name)}}}",
        f"\\begin{{tabular}}{{{''.join(align)}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex(v) for v in _row_values(table, row)) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def render_csv(table: Table) -> str:
    """The table for machines: one line per row, plain fractions (means, stds, differences to the
    baseline, published numbers and our differences to them in separate columns), empty where
    there is no value."""
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
    ]
    columns += [f"clean_{part}" for part in STAT_PARTS]
    for k in table.eps_keys:
        columns += [f"cra_{k}_{part}" for part in STAT_PARTS]
    columns += ["k_hf", "k_source", "k_hf_published", "reproduction", "max_deviation", "published_source"]
    columns += [f"cra_{k}_estimate_mean" for k in table.eps_keys] + ["k_bound_over_estimate"]
    columns += ["audit_broken", "audit_own_attacked", "audit_tightness_median", "audit_lipschitz_tightness"]
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
            **{f"clean_{part}": getattr(r.clean, part) for part in STAT_PARTS},
            "k_hf": r.k,
            "k_source": r.k_source,
            "k_hf_published": None if r.published is None else r.published.k_hf,
            "reproduction": r.verdict,
            "max_deviation": r.deviation,
            "published_source": None if r.published is None else r.published.source,
            "k_bound_over_estimate": r.k_ratio,
            "audit_broken": None if r.audit is None else r.audit.broken,
            "audit_own_attacked": None if r.audit is None else r.audit.attacked,
            "audit_tightness_median": None if r.audit is None else r.audit.tightness,
            "audit_lipschitz_tightness": None if r.audit is None else r.audit.lipschitz_tightness,
        }
        for k, stat in r.cra.items():
            values.update({f"cra_{k}_{part}": getattr(stat, part) for part in STAT_PARTS})
            values[f"cra_{k}_estimate_mean"] = r.cra_estimate[k].mean
        rows.append(values)
    return csv_text(columns, rows)


REPRODUCTION = "reproduction"  # file stem of the reproduction summary over every table


def _published_rows(tables: list[Table]) -> list[tuple[Table, TableRow]]:
    return [(t, r) for t in tables for r in t.rows if r.published is not None]


def render_reproduction_markdown(tables: list[Table]) -> str:
    """Did the grid reproduce its published numbers? The count line, then one line per row with
    published numbers: its verdict, largest difference, seeds run and source."""
    published = _published_rows(tables)
    lines = ["**Reproduction: our numbers against the published ones**", ""]
    if not published:
        return "\n".join(lines + ["No row of this grid carries published numbers (a row's `published` block).", ""])
    header = ["Table", "Method", "Model", "Verdict", "Largest difference (points)", "Seeds run", "Source"]
    lines += [
        reproduction_line([r for _, r in published]),
        "",
        _md_line(header),
        _md_rule(["l"] * 4 + ["r"] * 2 + ["l"]),
    ]
    for table, row in published:
        deviation = NO_VALUE if row.deviation is None else f"{100 * row.deviation:.2f}"
        values = [table.name, _label_text(row), row.arch, VERDICTS[row.verdict], deviation]
        lines.append(_md_line(values + [f"{row.n_done} of {row.n_cells}", row.published.source]))
    return "\n".join(lines + ["", _REPRODUCTION_LEGEND, ""])


def render_reproduction_csv(tables: list[Table]) -> str:
    """The reproduction summary for machines: one line per row with published numbers."""
    columns = ["table", "method", "method_name", "dataset", "arch", "loss", "eps", "p", "reproduction"]
    columns += ["max_deviation", "n_seeds", "n_cells", "published_source"]
    rows = [
        {
            "table": t.name,
            "method": _label_text(r),
            "method_name": r.method,
            "dataset": r.dataset,
            "arch": r.arch,
            "loss": r.loss,
            "eps": r.eps,
            "p": r.p,
            "reproduction": r.verdict,
            "max_deviation": r.deviation,
            "n_seeds": r.n_done,
            "n_cells": r.n_cells,
            "published_source": r.published.source,
        }
        for t, r in _published_rows(tables)
    ]
    return csv_text(columns, rows)


_REPRODUCTION_LEGEND = (
    "Verdict over a row's published clean and CRA numbers (not K^(h∘f)), compared with our "
    "unrounded means: within one seed-std (every number within our sample standard deviation "
    "over seeds; needs two seeds run), within 1 point (every number within 1 percentage point), "
    "off by more; not run yet. Largest difference: the largest |ours - published| in points."
)


def write_tables(tables: list[Table], out_dir: str | Path) -> list[Path]:
    """``{name}.csv``, ``{name}.md`` and ``{name}.tex`` per table and the reproduction summary
    ``reproduction.csv``, ``reproduction.md`` over all of them, each written atomically."""
    out_dir = Path(out_dir)
    if any(t.name == REPRODUCTION for t in tables):
        raise CllError(f"a table may not be named {REPRODUCTION!r}: reproduction.csv/.md summarise all tables")
    written = []
    for table in tables:
        for suffix, render in ((".csv", render_csv), (".md", render_markdown), (".tex", render_latex)):
            path = out_dir / f"{table.name}{suffix}"
            results.write_text(path, render(table))
            written.append(path)
    for suffix, render_all in ((".csv", render_reproduction_csv), (".md", render_reproduction_markdown)):
        path = out_dir / f"{REPRODUCTION}{suffix}"
        results.write_text(path, render_all(tables))
        written.append(path)
    return written


def reproduction_metrics(summary: str | Path) -> dict[str, int]:
    """The reproduction counts of a summary.csv as MLflow metrics: ``reproduction_within_std``,
    ``reproduction_within_1pt``, ``reproduction_off``, ``reproduction_not_run``, ... (all zero
    when no row has published numbers)."""
    tables = build_tables(read_summary(summary))
    counts = reproduction_counts([r for _, r in _published_rows(tables)])
    return {f"reproduction_{verdict}": n for verdict, n in counts.items()}


def make_tables(
    summary: str | Path, out_dir: str | Path | None = None, log: Callable[[str], None] = print
) -> list[Path]:
    """``cll tables``: the tables of a summary.csv into ``out_dir`` (default: ``tables/`` beside it);
    the reproduction line (if any row has published numbers) goes to ``log``."""
    summary = Path(summary)
    tables = build_tables(read_summary(summary))
    written = write_tables(tables, out_dir if out_dir is not None else summary.parent / "tables")
    line = reproduction_line([r for _, r in _published_rows(tables)])
    if line:
        log(f"{line} (see {written[-1]})")
    return written
