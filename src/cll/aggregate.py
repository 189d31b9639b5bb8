"""From a grid's run directories to what people read: summary.csv, the poster tables, the figures.

    cll aggregate --grid config/config.yaml       -> results/summary.csv
    cll tables  --summary results/summary.csv     -> results/tables/{name}.csv, .md, .tex
    cll figures --summary results/summary.csv     -> results/figures/ (cll.figures)

``summary.csv`` is the single hand-over between the runs and the reports. ``collect`` reads every
cell's ``train.json`` and ``certify.json`` once, with one row per cell of the grid (also for cells
that are pending or not run yet, so a report can say so). Tables and figures read nothing but the
summary, apart from the moons models whose decision boundaries are drawn. Every number in the
summary and in the tables' CSV is a fraction; percents appear only in the Markdown and LaTeX
tables, which are meant for people.

A table row is one (method, model, eps, p) group of cells over seeds: the mean, with ``± std``
(sample standard deviation) when there are several seeds, and the signed difference to the
baseline method's mean where the grid row names a ``baseline``. The K^(h∘f) column is the analytic
constant log((2-p)/p)/eps of the calibrated model for CLL, and the certified (sound) Lipschitz
bound of the model for every other loss, as on the poster (shared/spec/cll.md sections 3 and 6).

Every CRA in the tables is the sound one (``cra`` of certify.json). Below the poster table, each
Markdown file has a second table with the CRA the converged power-iteration estimate of K would
give beside it (``cra_estimate``), and the ratio of the two constants; the table CSV has the same
numbers as ``cra_<eps>_estimate_mean`` and ``k_bound_over_estimate`` (the LaTeX table stays the
poster's).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import results
from .config import KEYS, parse_number
from .errors import CllError, ConfigError
from .grid import Cell, Grid, load_grid

SUMMARY = "summary.csv"

# The poster's radii (36/255, 72/255, 108/255), by their eps key, with the label their column gets.
STANDARD_EPS = {results.fmt_number(n / 255): f"{n}/255" for n in (36, 72, 108)}

# Columns of summary.csv that describe the cell; metric and config columns follow (summary_columns).
CELL_COLUMNS = [
    "table",
    "title",
    "method",
    "baseline",
    "status",
    "pending",
    "dataset",
    "arch",
    "loss",
    "eps",
    "p",
    "seed",
    "run_dir",
]
MODEL_COLUMNS = [
    "lipschitz_constant",
    "lipschitz_estimate",
    "k_hf",
    "n_samples",
    "wall_time",
    "train_loss",
    "train_accuracy",
]
INTEGER_COLUMNS = {"seed", "n_samples"}
FLOAT_COLUMNS = {"eps", "p", "clean_accuracy", *MODEL_COLUMNS} - INTEGER_COLUMNS

NO_VALUE = "—"  # what a table shows where there is no number


class SummaryError(CllError):
    """A summary.csv (or a file it is built from) that is missing or malformed."""


# ------------------------------------------------------------------------------ summary.csv
def _planned_config(cell: Cell) -> dict:
    """The run config a cell will be trained with (known before it runs). A pending row may name
    an architecture that does not exist yet, so its config is not validated; then the grid's raw
    values are returned as they stand."""
    try:
        return cell.run_config().to_dict()
    except ConfigError:
        return cell.config_values()


def collect(grid: Grid, results_root: str | Path) -> list[dict]:
    """One row per cell of ``grid`` (grid order), with the metrics of its run directory under
    ``results_root``. ``status`` is ``pending`` (the grid row says why in ``pending``), ``done``
    (train.json and certify.json exist) or ``missing`` (not trained or not certified yet)."""
    root = Path(results_root)
    titles = {t["name"]: t.get("title") for t in grid.tables}
    rows = []
    for cell in grid.cells:
        run = cell.path(root)
        row: dict[str, Any] = {
            "table": cell.table,
            "title": titles.get(cell.table),
            "method": cell.method,
            "baseline": cell.baseline,
            "status": "pending",
            "pending": cell.pending,
            "dataset": cell.dataset,
            "arch": cell.arch,
            "loss": cell.loss,
            "eps": cell.eps,
            "p": cell.p,
            "seed": cell.seed,
            "run_dir": run.relative_to(root).as_posix(),
        }
        train = cert = None
        if cell.pending is None:
            train = results.read_json(run / results.TRAIN)
            cert = results.read_json(run / results.CERTIFY)
            row["status"] = "done" if train is not None and cert is not None else "missing"
        if cert is not None:
            row["clean_accuracy"] = cert.get("clean_accuracy")
            for key, value in (cert.get("cra") or {}).items():
                row[f"cra_{key}"] = value
            for key, value in (cert.get("cra_estimate") or {}).items():
                row[f"cra_estimate_{key}"] = value
            for key in ("lipschitz_constant", "lipschitz_estimate", "k_hf", "n_samples"):
                row[key] = cert.get(key)
        if train is not None:
            if row.get("k_hf") is None:
                row["k_hf"] = train.get("k_hf")
            row["wall_time"] = train.get("wall_time")
            last = (train.get("epochs") or [{}])[-1]
            row["train_loss"] = last.get("loss")
            row["train_accuracy"] = last.get("accuracy")
        config = (
            train["config"] if train is not None and isinstance(train.get("config"), dict) else _planned_config(cell)
        )
        for key, value in config.items():
            row[f"cfg_{key}"] = value
        rows.append(row)
    return rows


def eps_columns(columns: Any, prefix: str) -> list[str]:
    """The eps keys of the ``{prefix}<eps_key>`` columns, in increasing eps."""
    keys = set()
    for column in columns:
        rest = column[len(prefix) :]
        if column.startswith(prefix) and not (prefix == "cra_" and rest.startswith("estimate_")):
            keys.add(rest)
    return sorted(keys, key=float)


def summary_columns(rows: list[dict]) -> list[str]:
    """The column order of summary.csv: cell, clean, CRA by increasing eps, CRA with the estimate,
    model and training numbers, then the run config in its definition order."""
    present = {column for row in rows for column in row}
    cra = eps_columns(present, "cra_")
    cra_estimate = eps_columns(present, "cra_estimate_")
    config = [f"cfg_{k}" for k in KEYS if f"cfg_{k}" in present]
    config += sorted(c for c in present if c.startswith("cfg_") and c not in config)
    return (
        CELL_COLUMNS
        + ["clean_accuracy"]
        + [f"cra_{k}" for k in cra]
        + [f"cra_estimate_{k}" for k in cra_estimate]
        + MODEL_COLUMNS
        + config
    )


def _encode(value: Any) -> str:
    """A value as summary.csv writes it: empty for none, floats exact (repr), lists as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_encode(row.get(c)) for c in columns])
    return buffer.getvalue()


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` (from ``collect``) as summary.csv, atomically."""
    path = Path(path)
    results.write_text(path, _csv_text(summary_columns(rows), rows))
    return path


def _decode(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in INTEGER_COLUMNS:
        return int(text)
    if column in FLOAT_COLUMNS or column.startswith("cra_"):
        return float(text)
    return text  # cfg_* stay as written (lists as JSON)


def read_summary(path: str | Path) -> list[dict]:
    """The rows of a summary.csv, numbers as numbers and empty fields as None."""
    path = Path(path)
    if not path.is_file():
        raise SummaryError(f"summary file {str(path)!r} does not exist; run `cll aggregate --grid GRID.yaml` first")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in CELL_COLUMNS if c not in (reader.fieldnames or [])]
            if lacking:
                raise SummaryError(f"{str(path)!r} is not a cll summary (it lacks the columns {', '.join(lacking)})")
            return [{c: _decode(c, v or "") for c, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as err:
        raise SummaryError(f"{str(path)!r} cannot be read as a cll summary ({type(err).__name__}: {err})") from None


def aggregate_grid(grid_path: str | Path, results_root: str | Path | None = None) -> tuple[Path, list[dict]]:
    """``cll aggregate``: collect a grid's results into ``<results>/summary.csv`` (``results_root``
    defaults to the grid's ``results``). Returns the path written and the rows."""
    grid = load_grid(grid_path)
    root = Path(results_root if results_root is not None else grid.results)
    rows = collect(grid, root)
    return write_summary(rows, root / SUMMARY), rows


# ------------------------------------------------------------------------------------ tables
@dataclass
class Stat:
    """One table cell: mean over seeds, sample std (several seeds only), difference to the
    baseline row's mean; fractions, None where there is nothing."""

    mean: float | None = None
    std: float | None = None
    diff: float | None = None


@dataclass
class TableRow:
    """One (method, model, eps, p) group of cells, summarised over its seeds."""

    method: str
    label: list[tuple[str, float]]  # (eps or p, value) that tell this row from others of its method
    baseline: str | None
    dataset: str
    arch: str
    loss: str
    eps: float
    p: float
    status: str  # done | partial (some seeds run) | missing | pending
    note: str | None
    n_done: int
    n_cells: int
    clean: Stat
    cra: dict[str, Stat]  # by eps key
    cra_estimate: dict[str, Stat]  # the same with the power-iteration estimate (not sound)
    k_ratio: float | None  # mean sound bound / estimate of the model's constant
    k: float | None  # the K^(h∘f) column
    k_source: str | None  # analytic (CLL) | measured (sound bound)


@dataclass
class Table:
    name: str
    title: str | None
    eps_keys: list[str]  # the CRA columns, in increasing eps
    rows: list[TableRow] = field(default_factory=list)


def _stat(values: list[float | None]) -> Stat:
    values = [v for v in values if v is not None]
    if not values:
        return Stat()
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return Stat(mean)
    return Stat(mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)))


def _certify_eps(row: dict) -> list[str]:
    """The eps keys a cell is configured to certify at (from cfg_certify_eps), for a table none
    of whose cells has run yet."""
    values = row.get("cfg_certify_eps") or "[]"
    try:
        values = json.loads(values) if isinstance(values, str) else values  # JSON in summary.csv
        return [results.fmt_number(parse_number("certify_eps", v)) for v in values]
    except (ValueError, TypeError, ConfigError):
        return []


def _table_eps(cells: list[dict]) -> list[str]:
    """The CRA columns of a table: the poster's radii 36/255, 72/255, 108/255 and the cells'
    training eps, among the radii the cells were certified at; if none of these, every radius
    the cells have (e.g. only 0.2 for a run trained at 0.15)."""
    found = {
        k for row in cells if row["status"] == "done" for k in eps_columns(row, "cra_") if row[f"cra_{k}"] is not None
    }
    if not found:  # nothing has run yet: the radii the cells will be certified at
        found = {k for row in cells for k in _certify_eps(row)} or set(STANDARD_EPS)
    training = {results.fmt_number(row["eps"]) for row in cells}
    chosen = [k for k in found if k in STANDARD_EPS or k in training]
    return sorted(chosen or found, key=float)


def _summarise(cells: list[dict], eps_keys: list[str]) -> TableRow:
    """A table row from the cells of one group (same method, model, eps, p; several seeds)."""
    first = cells[0]
    done = [c for c in cells if c["status"] == "done"]
    pending = next((c["pending"] for c in cells if c["status"] == "pending"), None)
    if pending is not None:
        status, note, done = "pending", f"pending: {pending}", []
    elif not done:
        status, note = "missing", "not run"
    elif len(done) < len(cells):
        status, note = "partial", f"{len(done)} of {len(cells)} seeds run"
    else:
        status, note = "done", None
    analytic = [c["k_hf"] for c in done if c.get("k_hf") is not None]
    if analytic:
        k, source = _stat(analytic).mean, "analytic"
    else:
        k, source = _stat([c.get("lipschitz_constant") for c in done]).mean, "measured"
    return TableRow(
        method=first["method"],
        label=[],
        baseline=first["baseline"],
        dataset=first["dataset"],
        arch=first["arch"],
        loss=first["loss"],
        eps=first["eps"],
        p=first["p"],
        status=status,
        note=note,
        n_done=len(done),
        n_cells=len(cells),
        clean=_stat([c.get("clean_accuracy") for c in done]),
        cra={k_: _stat([c.get(f"cra_{k_}") for c in done]) for k_ in eps_keys},
        cra_estimate={k_: _stat([c.get(f"cra_estimate_{k_}") for c in done]) for k_ in eps_keys},
        k_ratio=_stat(
            [
                c["lipschitz_constant"] / c["lipschitz_estimate"]
                for c in done
                if c.get("lipschitz_constant") and c.get("lipschitz_estimate")
            ]
        ).mean,
        k=k,
        k_source=source if k is not None else None,
    )


def _add_baseline_differences(rows: list[TableRow]) -> None:
    """Signed difference of each row's means to its baseline row's means (same table, method ==
    baseline, the same model preferred)."""
    for row in rows:
        if row.baseline is None or row.clean.mean is None:
            continue
        candidates = [b for b in rows if b.method == row.baseline and b.clean.mean is not None]
        candidates.sort(key=lambda b: b.arch != row.arch)  # stable: same model first, else grid order
        if not candidates:
            continue
        base = candidates[0]
        pairs = [(row.clean, base.clean)] + [(row.cra[k], base.cra[k]) for k in row.cra]
        for stat, base_stat in pairs:
            if stat.mean is not None and base_stat.mean is not None:
                stat.diff = stat.mean - base_stat.mean


def _add_labels(rows: list[TableRow]) -> None:
    """A method that appears with several eps or p in one table is labelled with the one that
    varies (``CLL p=0.75``), or both (``CLL ε=0.5 p=0.01``)."""
    for method in {r.method for r in rows}:
        same = [r for r in rows if r.method == method]
        vary_eps = len({r.eps for r in same}) > 1
        vary_p = len({r.p for r in same}) > 1
        for r in same:
            r.label = ([("eps", r.eps)] if vary_eps else []) + ([("p", r.p)] if vary_p else [])


def build_tables(rows: list[dict]) -> list[Table]:
    """The tables of a summary (rows from ``read_summary``), in the grid's order: one row per
    (method, model, eps, p) in the order the grid lists them."""
    by_table: dict[str, list[dict]] = {}
    for row in rows:
        by_table.setdefault(row["table"], []).append(row)
    tables = []
    for name, cells in by_table.items():
        groups: dict[tuple, list[dict]] = {}
        for c in cells:
            key = (c["method"], c["dataset"], c["arch"], c["loss"], c["eps"], c["p"])
            groups.setdefault(key, []).append(c)
        table = Table(name, cells[0].get("title"), _table_eps(cells))
        table.rows = [_summarise(group, table.eps_keys) for group in groups.values()]
        _add_baseline_differences(table.rows)
        _add_labels(table.rows)
        tables.append(table)
    return tables


def eps_label(key: str) -> str:
    """How a radius is written in headers and legends: 36/255 for the poster's, else the number."""
    return STANDARD_EPS.get(key, key)


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
    return _csv_text(columns, rows)


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
