"""From ``summary.csv`` to the table model: one row per (method, model, eps, p), summarised over seeds.

    cll tables --summary results/summary.csv      -> results/tables/{name}.csv, .md, .tex (cll.render)

A table row is one (method, model, eps, p) group of cells over seeds: the mean, with the sample
standard deviation when there are several seeds, and the signed difference to the baseline
method's mean where the grid row names a ``baseline``. The K^(h∘f) column is the analytic
constant log((2-p)/p)/eps of the calibrated model for CLL, and the certified (sound) Lipschitz
bound of the model for every other loss, as on the poster (Losch et al., GCPR 2023: every K^(h∘f)
it prints for CLL is 1/sigma of its eps and p).
Every CRA is the sound one (``cra`` of certify.json); ``cra_estimate`` (what the converged
power-iteration estimate of K would give) is carried beside it for comparison.

Everything here reads the rows of ``summary.csv`` and nothing else; numbers stay fractions
(``cll.render`` turns them into percents for people).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from . import results
from .config import parse_number
from .errors import ConfigError
from .summary import eps_columns
from .values import PAPER_EPS

# The poster's radii (36/255, 72/255, 108/255), by their eps key, with the label their column gets.
STANDARD_EPS = {results.fmt_number(e): f"{round(e * 255)}/255" for e in PAPER_EPS}


# A row's reproduction verdict: the worst over the published numbers we have (clean, CRA at each
# published radius; not K^(h∘f), which is a setting for CLL and a bound for the others), in order.
VERDICTS = {
    "within_std": "within one seed-std",
    "within_1pt": "within 1 point",
    "off": "off by more",
    "not_run": "not run yet",
    "no_match": "no common number",  # run, but not certified at any published radius
}
ONE_POINT = 0.01


@dataclass
class Stat:
    """One table cell: mean over seeds, sample std (several seeds only), difference to the
    baseline row's mean, the published number and our mean's difference to it; fractions, None
    where there is nothing."""

    mean: float | None = None
    std: float | None = None
    diff: float | None = None
    published: float | None = None
    vs_published: float | None = None


@dataclass
class Published:
    """What a row's paper reports (the grid row's ``published`` block, via summary.csv)."""

    source: str
    clean: float | None
    cra: dict[str, float]  # by eps key
    k_hf: float | None


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
    audit: Audit | None  # what cll audit found over the seeds audited
    k: float | None  # the K^(h∘f) column
    k_source: str | None  # analytic (CLL) | measured (sound bound)
    published: Published | None = None
    verdict: str | None = None  # a key of VERDICTS where published numbers exist
    deviation: float | None = None  # largest |ours - published| over the numbers compared


@dataclass
class Audit:
    """cll audit over a row's audited seeds: broken certificates and points attacked at their own
    radius (sums), median nearest adversarial distance / radius and Lipschitz lower / certified bound
    (means; 1 = tight)."""

    broken: int
    attacked: int
    tightness: float | None
    lipschitz_tightness: float | None


def _audit(done: list[dict]) -> Audit | None:
    audited = [c for c in done if c.get("audit_broken") is not None]
    if not audited:
        return None
    return Audit(
        broken=sum(int(c["audit_broken"]) for c in audited),
        attacked=sum(int(c.get("audit_own_attacked") or 0) for c in audited),
        tightness=_stat([c.get("audit_tightness_median") for c in audited]).mean,
        lipschitz_tightness=_stat([c.get("audit_lipschitz_tightness") for c in audited]).mean,
    )


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
    published = {
        k for row in cells for k in eps_columns(row, "published_cra_") if row[f"published_cra_{k}"] is not None
    }
    return sorted(set(chosen or found) | published, key=float)


def _published(cell: dict) -> Published | None:
    """The published numbers a summary row carries (the same on every cell of a grid row)."""
    if cell.get("published_source") is None:
        return None
    cra = {k: cell[f"published_cra_{k}"] for k in eps_columns(cell, "published_cra_")}
    return Published(
        cell["published_source"],
        cell.get("published_clean"),
        {k: v for k, v in cra.items() if v is not None},
        cell.get("published_k_hf"),
    )


def _compare_to_published(row: TableRow) -> None:
    """Set each Stat's published number and our difference to it, and the row's verdict: within
    one seed-std (every published number within our sample std of the mean; needs two seeds),
    within 1 point (every one within 0.01), or off by more; compared on the unrounded means."""
    pub = row.published
    if pub is None:
        return
    pairs = [(row.clean, pub.clean)] + [(row.cra[k], pub.cra.get(k)) for k in row.cra]
    compared = []
    for stat, number in pairs:
        stat.published = number
        if number is not None and stat.mean is not None:
            stat.vs_published = stat.mean - number
            compared.append(stat)
    if not compared:
        row.verdict = "not_run" if row.n_done == 0 else "no_match"
        return
    row.deviation = max(abs(s.vs_published) for s in compared)
    if all(s.std is not None and abs(s.vs_published) <= s.std for s in compared):
        row.verdict = "within_std"
    elif row.deviation <= ONE_POINT + 1e-12:  # 1e-12: 0.01 itself is not lost to float rounding
        row.verdict = "within_1pt"
    else:
        row.verdict = "off"


def reproduction_counts(rows: list[TableRow]) -> dict[str, int]:
    """How many of ``rows`` with published numbers got each verdict (VERDICTS order, zeros kept)."""
    return {v: sum(r.verdict == v for r in rows) for v in VERDICTS}


def reproduction_line(rows: list[TableRow]) -> str | None:
    """``Reproduction of 9 published rows: 2 within one seed-std, 1 within 1 point, 0 off by
    more, 6 not run yet``; None when no row has published numbers."""
    counts = reproduction_counts(rows)
    total = sum(counts.values())
    if not total:
        return None
    parts = [f"{n} {VERDICTS[v]}" for v, n in counts.items() if n or v in ("within_std", "within_1pt", "off")]
    return f"Reproduction of {total} published row{'s' * (total != 1)}: {', '.join(parts)}"


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
        audit=_audit(done),
        k=k,
        k_source=source if k is not None else None,
        published=_published(first),
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
        for row in table.rows:
            _compare_to_published(row)
        _add_labels(table.rows)
        tables.append(table)
    return tables


def eps_label(key: str) -> str:
    """How a radius is written in headers and legends: 36/255 for the poster's, else the number."""
    return STANDARD_EPS.get(key, key)
