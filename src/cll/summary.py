"""From a grid's run directories to ``summary.csv``: one row per cell, every number a run wrote.

    cll aggregate --grid config/config.yaml       -> results/summary.csv

``summary.csv`` is the single hand-over between the runs and the reports (``cll.tables``,
``cll.figures``). ``collect`` reads every cell's ``train.json`` and ``certify.json`` once, with one
row per cell of the grid, also for cells that are pending or not run yet, so a report can say so.
Every number in it is a fraction, written exactly (``repr``), and nothing is recomputed: clean
accuracy, CRA, the sound constant and the rest are copied from the files the runs wrote. The
numbers a grid row's paper reports (its ``published`` block) are copied onto each of its cells
(``published_*``), so that the tables can set them beside ours from the summary alone.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from . import results
from .config import KEYS
from .errors import CllError, ConfigError
from .grid import Cell, Grid, load_grid

SUMMARY = "summary.csv"

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
# What cll audit found (audit.json), where it ran: broken certificates in all, correct points
# attacked at their own radius, median nearest adversarial distance / radius, the float64 Lipschitz
# lower bound and its ratio to the certified bound.
AUDIT_COLUMNS = [
    "audit_broken",
    "audit_own_attacked",
    "audit_tightness_median",
    "audit_lipschitz_lower",
    "audit_lipschitz_tightness",
]
# What the grid row's paper reports (its `published` block), repeated on each cell of the row;
# published_cra_<eps key> columns follow them.
PUBLISHED_COLUMNS = ["published_source", "published_clean", "published_k_hf"]
INTEGER_COLUMNS = {"seed", "n_samples", "audit_broken", "audit_own_attacked"}
FLOAT_COLUMNS = {
    "eps", "p", "clean_accuracy", "published_clean", "published_k_hf", *MODEL_COLUMNS, *AUDIT_COLUMNS
} - INTEGER_COLUMNS  # fmt: skip


class SummaryError(CllError):
    """A summary.csv (or a file it is built from) that is missing or malformed."""


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
        if cell.published is not None:
            row["published_source"] = cell.published["source"]
            row["published_clean"] = cell.published["clean"]
            row["published_k_hf"] = cell.published["k_hf"]
            for key, value in cell.published["cra"].items():
                row[f"published_cra_{key}"] = value
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
        audit = results.read_json(run / results.AUDIT) if cert is not None else None
        if audit is not None:
            row.update(audit_values(audit))
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


def audit_values(audit: dict) -> dict:
    """The AUDIT_COLUMNS of one audit.json (older files without the own-radius part: what they have)."""
    own = audit.get("own_radius") or {}
    tight = (audit.get("tightness") or {}).get("quantiles") or {}
    return {
        "audit_broken": audit.get("broken"),
        "audit_own_attacked": own.get("attacked"),
        "audit_tightness_median": tight.get("median"),
        "audit_lipschitz_lower": audit.get("lipschitz_lower"),
        "audit_lipschitz_tightness": audit.get("lipschitz_tightness"),
    }


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
    model and training numbers, the published numbers, then the run config in its definition order."""
    present = {column for row in rows for column in row}
    cra = eps_columns(present, "cra_")
    cra_estimate = eps_columns(present, "cra_estimate_")
    published_cra = eps_columns(present, "published_cra_")
    config = [f"cfg_{k}" for k in KEYS if f"cfg_{k}" in present]
    config += sorted(c for c in present if c.startswith("cfg_") and c not in config)
    return (
        CELL_COLUMNS
        + ["clean_accuracy"]
        + [f"cra_{k}" for k in cra]
        + [f"cra_estimate_{k}" for k in cra_estimate]
        + MODEL_COLUMNS
        + [c for c in AUDIT_COLUMNS if c in present]
        + PUBLISHED_COLUMNS
        + [f"published_cra_{k}" for k in published_cra]
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


def csv_text(columns: list[str], rows: list[dict]) -> str:
    """CSV with a header line, values written by ``_encode`` (summary.csv, the tables' CSV)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_encode(row.get(c)) for c in columns])
    return buffer.getvalue()


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` (from ``collect``) as summary.csv, atomically."""
    path = Path(path)
    results.write_text(path, csv_text(summary_columns(rows), rows))
    return path


def _decode(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in INTEGER_COLUMNS:
        return int(text)
    if column in FLOAT_COLUMNS or column.startswith(("cra_", "published_cra_")):
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
