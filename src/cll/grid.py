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
                                  # flags; default cll.schema.AUDIT): more points and steps, longer jobs

One JSON schema (``grid_schema``) checks a grid's structure, names and ranges; its run-config part
comes from the declarations in ``cll.config``. Then every runnable cell's run config (``defaults``
+ the row's ``set`` + its dataset/arch/loss/eps/p/seed) is built by ``cll.config`` exactly as
``cll train`` would, for what a schema cannot say (increasing milestones, a fraction's range, a
published block's eps and cra of one length).
Either way a bad grid fails in one line naming the field, e.g. ``tables[1].rows[0].p: ...``,
before any job starts. A cell's directory is ``cll.results.run_dir`` of its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import POSITIVE, RunConfig, build_config, default, format_override, rule
from .errors import ConfigError
from .results import fmt_number, run_dir
from .schema import AUDIT_DEFAULTS, RESOURCES, SNAKEMAKE_RESOURCES, grid_schema, validate
from .values import parse_number


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
    published: dict | None = field(default=None, hash=False, compare=False)  # see _published
    audit: dict = field(default_factory=lambda: dict(AUDIT_DEFAULTS), hash=False, compare=False)

    def path(self, results: str | Path) -> Path:
        return run_dir(results, self.dataset, self.arch, self.loss, self.eps, self.p, self.seed)

    def config_values(self) -> dict:
        """The cell's run-config keys as the grid gives them (not validated): its own keys, then
        its overrides (grid defaults + the row's set)."""
        keys = dict(dataset=self.dataset, arch=self.arch, loss=self.loss, eps=self.eps, p=self.p, seed=self.seed)
        return {**keys, **self.overrides}

    def run_config(self, check_names: bool = True) -> RunConfig:
        return build_config(self.config_values(), check_names)

    def set_args(self) -> list[str]:
        """``key=value`` arguments of ``cll train --set`` that give this cell's run config
        (``cll.config.parse_overrides`` reads them back)."""
        return [format_override(key, value) for key, value in self.config_values().items()]

    def audit_args(self) -> str:
        """The `cll audit` flags of the cell's audit job: ``--n 100 --steps 30 --restarts 2``."""
        return " ".join(f"--{key} {self.audit[key]}" for key in AUDIT_DEFAULTS)

    def job_resources(self, rule: str) -> dict[str, int]:
        """Resources of the cell's ``rule`` job under Snakemake's (and its Slurm plugin's) names:
        the row's resources, else the defaults; only a train job takes more than one GPU."""
        given = {name: self.resources.get(name, value) for name, (value, _) in RESOURCES.items()}
        if rule != "train":
            given["gpus"] = min(given["gpus"], 1)
        return {SNAKEMAKE_RESOURCES[name]: value for name, value in given.items()}


@dataclass
class Grid:
    experiment: str
    results: str
    tables: list[dict]
    cells: list[Cell]

    def runnable(self) -> list[Cell]:
        return [c for c in self.cells if c.pending is None]


# ------------------------------------------------------------------------------ cells
def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def parse_grid(values: Any, schema: dict | None = None) -> Grid:
    """Validate a grid mapping and expand it into cells (one-line ConfigError on any problem).
    ``schema``: the grid schema to check against; None builds it from the registries (which
    imports torch). The workflow passes workflow/schemas/config.schema.yaml, whose names a test
    keeps equal to the registries', so that ``snakemake -n`` stays fast."""
    validate(values, grid_schema() if schema is None else schema)
    defaults = values.get("defaults") or {}
    cells: list[Cell] = []
    seen: dict[tuple, str] = {}
    for t, table in enumerate(values["tables"]):
        methods = {r["method"] for r in table["rows"]}
        for r, row in enumerate(table["rows"]):
            where = f"tables[{t}].rows[{r}]"
            if row.get("baseline") is not None and row["baseline"] not in methods:
                raise ConfigError(f"{where}.baseline: {row['baseline']!r} is not a method of table {table['name']!r}")
            published = _published(f"{where}.published", row) if "published" in row else None
            audit = {**AUDIT_DEFAULTS, **row.get("audit", {})}
            overrides = {**defaults, **(row.get("set") or {})}
            for eps in _as_list(row["eps"]):
                for p in _as_list(row.get("p", overrides.get("p", default("p")))):
                    for seed in _as_list(row.get("seeds", [0])):
                        cell = _cell(
                            table["name"], row, eps, p, seed, overrides, where, published=published, audit=audit
                        )
                        key = (cell.dataset, cell.arch, cell.loss, cell.eps, cell.p, cell.seed)
                        if key in seen and seen[key] != repr(sorted(overrides.items())):
                            raise ConfigError(f"{where}: cell {key} appears twice with different settings")
                        seen[key] = repr(sorted(overrides.items()))
                        cells.append(cell)
    return Grid(str(values["experiment"]), str(values.get("results", "results")), values["tables"], cells)


def _published(where: str, row: dict) -> dict:
    """A row's ``published`` block (the schema has checked its shape) as the tables use it:
    ``{"source", "clean", "cra": {eps key: fraction}, "k_hf"}``, CRA keyed like certify.json. What
    no schema says: eps and cra are lists of one length, a radius or constant written as text is
    > 0, and the row is one eps and one p."""
    block = row["published"]
    if len(_as_list(row["eps"])) > 1 or len(_as_list(row.get("p", []))) > 1:
        raise ConfigError(
            f"{where}: the row expands into several eps or p; give one row per eps and p, each with its own "
            "published numbers"
        )
    eps, cra = block.get("eps", []), block.get("cra", [])
    if len(eps) != len(cra):
        raise ConfigError(f"{where}: eps {eps!r} and cra {cra!r} must be lists of the same length")
    by_eps = {fmt_number(POSITIVE.check(f"{where}.eps[{i}]", e)): float(c) for i, (e, c) in enumerate(zip(eps, cra))}
    k_hf = None if block.get("k_hf") is None else POSITIVE.check(f"{where}.k_hf", block["k_hf"])
    clean = None if block.get("clean") is None else float(block["clean"])
    return {"source": block["source"].strip(), "clean": clean, "cra": by_eps, "k_hf": k_hf}


def _cell(table: str, row: dict, eps: Any, p: Any, seed: Any, overrides: dict, where: str, **extra) -> Cell:
    """One cell of a row (``extra``: the row's published numbers and audit budget); a runnable
    one's run config is built exactly as `cll train` would (the schema has checked its names; a
    pending row's arch may not exist yet)."""
    try:
        cell = Cell(
            table=table,
            method=str(row["method"]),
            dataset=row["dataset"],
            arch=row["arch"],
            loss=row["loss"],
            eps=parse_number("eps", eps),  # eps and p may be fractions (36/255)
            p=parse_number("p", p),
            seed=rule("seed").check("seed", seed),
            baseline=row.get("baseline"),
            pending=row.get("pending"),
            resources=row.get("resources") or {},
            overrides={k: v for k, v in overrides.items() if k != "p"},
            **extra,
        )
        if cell.pending is None:
            cell.run_config(check_names=False)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cell


def load_grid(path: str | Path, schema: dict | None = None) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"grid file {str(path)!r} is not valid YAML") from None
    return parse_grid(values, schema)
