"""Grids: the tables of an experiment, expanded into cells (one train + certify job each).

A grid (``config/config.yaml``, ``config/paper.yaml``) is a YAML mapping::

    experiment: cll-demo          # MLflow experiment name
    results: results              # results root: runs/, summary.csv, tables/, figures/
    defaults: {epochs: 20}        # run-config keys for every cell (optional)
    tables:
      - name: digits              # file name of the table: results/tables/digits.{csv,md,tex}
        title: Digits, 4C3F       # caption (optional)
        rows:
          - method: GloRo         # what the Method column prints
            dataset: digits
            arch: 4C3F
            loss: gloro
            eps: 0.15             # a list expands into one row per value
            seeds: [0, 1]         # mean +- std over seeds
            set: {lr: 1.0e-3}     # further run-config keys of this row (optional)
          - method: CLL
            ...
            p: 0.3                # a list expands into one row per value
            baseline: GloRo       # the row's table cells show the difference to that method
            pending: "..."        # optional: the row is listed but not run (e.g. a missing arch)
            resources: {gpus: 1, runtime: 600, mem_mb: 16000}   # optional, per job (Slurm);
                                  # gpus > 1: data-parallel training under torchrun (cll.distributed)
            published:            # optional: what the row's paper reports (fractions), shown
              source: "Losch et al., GCPR 2023, poster, Tiny-ImageNet table"   # beside ours
              clean: 0.398
              eps: [36/255, 72/255, 108/255]
              cra: [0.259, 0.165, 0.107]
              k_hf: 10.6
            audit: {n: 500, steps: 100, restarts: 5}   # optional: the row's audit jobs (`cll audit`
                                  # flags; default AUDIT_DEFAULTS): more points and steps, longer jobs

Every cell's run config is ``defaults`` + the row's ``set`` + its dataset/arch/loss/eps/p/seed,
validated by ``cll.config`` exactly as ``cll train`` would, so a bad grid fails in one line before
any job starts. A cell's directory is ``cll.results.run_dir`` of its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, build_config, parse_number
from .errors import ConfigError
from .results import fmt_number, run_dir

GRID_KEYS = {"experiment", "results", "defaults", "tables"}
TABLE_KEYS = {"name", "title", "rows"}
ROW_KEYS = {
    "method",
    "dataset",
    "arch",
    "loss",
    "eps",
    "p",
    "seeds",
    "set",
    "baseline",
    "pending",
    "resources",
    "published",
    "audit",
}
RESOURCE_KEYS = {"gpus", "runtime", "mem_mb", "cpus"}
PUBLISHED_KEYS = {"source", "clean", "eps", "cra", "k_hf"}
# `cll audit` budget per cell unless a row's `audit` says otherwise: small enough for the demo grid
# on a CPU (seconds per cell); the test points sampled, iterations per attack, PGD restarts.
AUDIT_DEFAULTS = {"n": 100, "steps": 30, "restarts": 2}


@dataclass(frozen=True)
class Cell:
    """One (dataset, arch, loss, eps, p, seed) of a table row."""

    table: str
    method: str
    dataset: str
    arch: str
    loss: str
    eps: float
    p: float
    seed: int
    baseline: str | None
    pending: str | None
    resources: dict = field(default_factory=dict, hash=False, compare=False)
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    published: dict | None = field(default=None, hash=False, compare=False)  # see parse_published
    audit: dict = field(default_factory=lambda: dict(AUDIT_DEFAULTS), hash=False, compare=False)

    def audit_args(self) -> str:
        """The `cll audit` flags of the cell's audit job: ``--n 100 --steps 30 --restarts 2``."""
        return " ".join(f"--{key} {self.audit[key]}" for key in AUDIT_DEFAULTS)

    def path(self, results: str | Path) -> Path:
        return run_dir(results, self.dataset, self.arch, self.loss, self.eps, self.p, self.seed)

    def config_values(self) -> dict:
        """The cell's run-config keys as the grid gives them (not validated)."""
        return {
            **self.overrides,
            "dataset": self.dataset,
            "arch": self.arch,
            "loss": self.loss,
            "eps": self.eps,
            "p": self.p,
            "seed": self.seed,
        }

    def run_config(self, check_names: bool = True) -> RunConfig:
        return build_config(self.config_values(), check_names)


@dataclass
class Grid:
    experiment: str
    results: str
    tables: list[dict]
    cells: list[Cell]

    def runnable(self) -> list[Cell]:
        return [c for c in self.cells if c.pending is None]


def _unknown(where: str, keys: Any, allowed: set[str]) -> None:
    for key in keys:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _fraction(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: {value!r} is not a fraction in [0, 1] (write 39.8 % as 0.398)")
    return float(value)


def parse_published(where: str, value: Any) -> dict:
    """A row's ``published`` block: the numbers its paper reports, as fractions, and where they come
    from. Returns ``{"source": str, "clean": float | None, "cra": {eps_key: float}, "k_hf": float |
    None}``; ``eps`` and ``cra`` are parallel lists (CRA at each radius), keyed here like certify.json."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping with source and clean, eps + cra, k_hf")
    _unknown(where, value, PUBLISHED_KEYS)
    source = value.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}.source: missing; name the paper and table the numbers come from")
    eps, cra = value.get("eps"), value.get("cra")
    if (eps is None) != (cra is None):
        raise ConfigError(f"{where}: eps and cra go together (cra[i] is the CRA at radius eps[i])")
    if eps is not None and (not isinstance(eps, list) or not isinstance(cra, list) or not eps or len(eps) != len(cra)):
        raise ConfigError(f"{where}: eps {eps!r} and cra {cra!r} must be lists of the same length")
    if not {"clean", "cra", "k_hf"} & set(value):
        raise ConfigError(f"{where}: gives no number; give clean, eps + cra, or k_hf")
    by_eps = {}
    for i, (radius, fraction) in enumerate(zip(eps or [], cra or [])):
        radius = parse_number(f"{where}.eps[{i}]", radius)
        if radius <= 0:
            raise ConfigError(f"{where}.eps[{i}]: {radius!r} is not a radius > 0")
        by_eps[fmt_number(radius)] = _fraction(f"{where}.cra[{i}]", fraction)
    k = None if value.get("k_hf") is None else parse_number(f"{where}.k_hf", value["k_hf"])
    if k is not None and not k > 0:
        raise ConfigError(f"{where}.k_hf: {value['k_hf']!r} is not a constant > 0")
    clean = None if value.get("clean") is None else _fraction(f"{where}.clean", value["clean"])
    return {"source": source.strip(), "clean": clean, "cra": by_eps, "k_hf": k}


def parse_audit(where: str, value: Any) -> dict:
    """A row's ``audit`` setting over AUDIT_DEFAULTS: each of n, steps, restarts an integer >= 1."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping with n, steps and/or restarts")
    _unknown(where, value, set(AUDIT_DEFAULTS))
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(f"{where}.{key}: {number!r} is not an integer >= 1")
    return {**AUDIT_DEFAULTS, **value}


def parse_grid(values: Any, check_names: bool = True) -> Grid:
    """Validate a grid mapping and expand it into cells (one-line ConfigError on any problem).
    ``check_names=False``: dataset/arch/loss are not looked up in the registries (which import
    torch); the workflow passes it after its schema has checked those names (snakemake -n stays
    fast)."""
    if not isinstance(values, dict):
        raise ConfigError("a grid must be a mapping with experiment, results and tables")
    _unknown("grid", values, GRID_KEYS)
    for key in ("experiment", "tables"):
        if key not in values:
            raise ConfigError(f"grid: missing key {key!r}")
    defaults = values.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("grid.defaults: must be a mapping of run-config keys")
    tables = values["tables"]
    if not isinstance(tables, list) or not tables:
        raise ConfigError("grid.tables: must be a non-empty list of tables")
    cells: list[Cell] = []
    seen: dict[tuple, str] = {}
    for t, table in enumerate(tables):
        where = f"tables[{t}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a mapping with name and rows")
        _unknown(where, table, TABLE_KEYS)
        if not isinstance(table.get("name"), str) or not table["name"]:
            raise ConfigError(f"{where}.name: missing or not a string")
        if not isinstance(table.get("rows"), list) or not table["rows"]:
            raise ConfigError(f"{where}.rows: must be a non-empty list")
        methods = {r.get("method") for r in table["rows"] if isinstance(r, dict)}
        for r, row in enumerate(table["rows"]):
            rwhere = f"{where}.rows[{r}]"
            if not isinstance(row, dict):
                raise ConfigError(f"{rwhere}: must be a mapping")
            _unknown(rwhere, row, ROW_KEYS)
            for key in ("method", "dataset", "arch", "loss", "eps"):
                if key not in row:
                    raise ConfigError(f"{rwhere}: missing key {key!r}")
            if row.get("baseline") is not None and row["baseline"] not in methods:
                raise ConfigError(f"{rwhere}.baseline: {row['baseline']!r} is not a method of table {table['name']!r}")
            resources = row.get("resources") or {}
            if not isinstance(resources, dict):
                raise ConfigError(f"{rwhere}.resources: must be a mapping")
            _unknown(f"{rwhere}.resources", resources, RESOURCE_KEYS)
            overrides = {**defaults, **(row.get("set") or {})}
            seeds = _as_list(row.get("seeds", [0]))
            pending = row.get("pending")
            published = None
            if row.get("published") is not None:
                published = parse_published(f"{rwhere}.published", row["published"])
                if len(_as_list(row["eps"])) > 1 or len(_as_list(row.get("p", []))) > 1:
                    raise ConfigError(
                        f"{rwhere}.published: the row expands into several eps or p; give one row per "
                        "eps and p, each with its own published numbers"
                    )
            audit = parse_audit(f"{rwhere}.audit", row.get("audit", {}))
            for eps in _as_list(row["eps"]):
                for p in _as_list(row.get("p", overrides.get("p", RunConfig.p))):
                    for seed in seeds:
                        # eps/p may be fractions (36/255); a runnable cell is validated exactly as
                        # `cll train` would (a pending row's arch may not exist yet)
                        try:
                            cell = Cell(
                                table["name"],
                                str(row["method"]),
                                row["dataset"],
                                row["arch"],
                                row["loss"],
                                parse_number("eps", eps),
                                parse_number("p", p),
                                seed,
                                row.get("baseline"),
                                pending,
                                resources,
                                {k: v for k, v in overrides.items() if k != "p"},
                                published,
                                audit,
                            )
                            cfg = cell.run_config(check_names) if pending is None else None
                        except ConfigError as err:
                            raise ConfigError(f"{rwhere}: {err}") from None
                        cell = replace(cell, seed=cfg.seed if cfg else int(seed))
                        key = (cell.dataset, cell.arch, cell.loss, cell.eps, cell.p, cell.seed)
                        if key in seen and seen[key] != repr(sorted(overrides.items())):
                            raise ConfigError(f"{rwhere}: cell {key} appears twice with different settings")
                        seen[key] = repr(sorted(overrides.items()))
                        cells.append(cell)
    return Grid(str(values["experiment"]), str(values.get("results", "results")), tables, cells)


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"grid file {str(path)!r} is not valid YAML") from None
    return parse_grid(values)
