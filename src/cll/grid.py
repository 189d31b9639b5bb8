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

One JSON schema (``grid_schema``) checks a grid's structure, names and ranges; its run-config part
comes from the declarations in ``cll.config``. Then every runnable cell's run config (``defaults``
+ the row's ``set`` + its dataset/arch/loss/eps/p/seed) is built by ``cll.config`` exactly as
``cll train`` would, for what a schema cannot say (increasing milestones, a fraction's range, a
published block's eps and cra of one length).
Either way a bad grid fails in one line naming the field, e.g. ``tables[1].rows[0].p: ...``,
before any job starts. A cell's directory is ``cll.results.run_dir`` of its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .config import (
    KEYS,
    NAMES,
    POSITIVE,
    RunConfig,
    build_config,
    default,
    format_override,
    registered_names,
    rule,
    run_config_schema,
)
from .errors import ConfigError
from .results import fmt_number, run_dir
from .values import NUMBER_TEXT, parse_number

# Per-job resources a row may ask for: name -> (default, meaning). cll.workflow maps them onto
# Snakemake's resources.
RESOURCES = {
    "gpus": (
        0,
        "GPUs per train job (Slurm --gpus; certify and audit use at most one). More than 1: the train job "
        "runs data-parallel, one torchrun process per GPU (cll.distributed).",
    ),
    "runtime": (60, "Wall-time limit per job in minutes."),
    "mem_mb": (4000, "Memory per job in MB."),
    "cpus": (1, "CPU cores per job (threads, Slurm --cpus-per-task)."),
}
# The `cll audit` budget of a row's audit jobs (its `audit` setting): name -> (default, meaning). The
# defaults are small enough for the demo grid on a CPU (seconds per cell).
AUDIT = {
    "n": (100, "Test points sampled per cell (the whole test set where it is smaller)."),
    "steps": (30, "Iterations per attack (PGD, APGD-DLR, APGD-CE)."),
    "restarts": (2, "PGD restarts."),
}
AUDIT_DEFAULTS = {name: value for name, (value, _) in AUDIT.items()}
# run-config keys a row gives itself, so not in its `set` (nor in the grid's `defaults`)
ROW_KEYS = ("dataset", "arch", "loss", "eps", "seed")


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
        gpus = given["gpus"] if rule == "train" else min(given["gpus"], 1)
        return {"gpu": gpus, "runtime": given["runtime"], "mem_mb": given["mem_mb"], "cpus_per_task": given["cpus"]}


@dataclass
class Grid:
    experiment: str
    results: str
    tables: list[dict]
    cells: list[Cell]

    def runnable(self) -> list[Cell]:
        return [c for c in self.cells if c.pending is None]


# ------------------------------------------------------------------------------ the schema
FRACTION = {"type": "number", "minimum": 0, "maximum": 1, "description": "A fraction in [0, 1] (39.8 % is 0.398)."}


def _one_or_more(schema: dict, description: str) -> dict:
    return {"description": description, "anyOf": [schema, {"type": "array", "minItems": 1, "items": schema}]}


def grid_schema() -> dict:
    """The JSON schema of a grid, with the registered names (which imports torch). The workflow
    reads the copy ``make schema`` writes to workflow/schemas/config.schema.yaml, which a test keeps
    equal to this, so that ``snakemake -n`` imports no torch."""
    names = registered_names()
    run_config = {
        **run_config_schema(exclude=set(ROW_KEYS)),
        "description": f"Run-config keys (cll list), except {', '.join(ROW_KEYS)}, which a row sets.",
    }
    for key in set(NAMES) - set(ROW_KEYS):  # registered names a `set` may give (activation)
        run_config["properties"][key] = {**run_config["properties"][key], "enum": names[key]}
    row = {
        "type": "object",
        "additionalProperties": False,
        "required": ["method", "dataset", "arch", "loss", "eps"],
        "properties": {
            "method": {
                "type": "string",
                "minLength": 1,
                "description": "What the Method column prints (e.g. GloRo, CLL); a baseline refers to it.",
            },
            "dataset": {"enum": names["dataset"], "description": "A registered data set (cll list)."},
            "arch": {
                "type": "string",
                "minLength": 1,
                "description": "A registered architecture (cll list); a pending row may name one that does not "
                "exist yet.",
            },
            "loss": {
                "type": "string",
                "minLength": 1,
                "description": "A registered loss (cll list); a pending row may name a future one.",
            },
            "eps": _one_or_more(rule("eps").schema(), "Training eps; a list expands into one row per value."),
            "p": _one_or_more(
                rule("p").schema(),
                f"CLL slack (default {default('p')}, or that of set/defaults); a list expands into one row per value.",
            ),
            "seeds": _one_or_more(
                rule("seed").schema(), "Seeds of the row (default [0]); tables show mean +- std over them."
            ),
            "set": {"$ref": "#/$defs/run_config", "description": "Further run-config keys of this row."},
            "baseline": {
                "type": "string",
                "description": "A method of the same table; this row's cells also show the difference to it.",
            },
            "pending": {
                "type": "string",
                "minLength": 1,
                "description": "Why the row is listed but not run (e.g. its architecture does not exist yet).",
            },
            "published": {
                "type": "object",
                "additionalProperties": False,
                "required": ["source"],
                "dependentRequired": {"eps": ["cra"], "cra": ["eps"]},
                "anyOf": [{"required": ["clean"]}, {"required": ["cra"]}, {"required": ["k_hf"]}],
                "description": "What the row's paper reports, shown beside our numbers with the difference, and "
                "the row's reproduction verdict. Fractions, like every number in cll's files. Only for a row with "
                "one eps and one p.",
                "properties": {
                    "source": {
                        "type": "string",
                        "minLength": 1,
                        "description": "Where the numbers come from (paper, table).",
                    },
                    "clean": {**FRACTION, "description": "Published clean accuracy, a fraction."},
                    "eps": {
                        "type": "array",
                        "minItems": 1,
                        "items": rule("eps").schema(),
                        "description": "Radii of the published CRA (36/255 allowed); cra[i] is the CRA at eps[i].",
                    },
                    "cra": {
                        "type": "array",
                        "minItems": 1,
                        "items": FRACTION,
                        "description": "Published certified robust accuracy at each radius of eps, fractions.",
                    },
                    "k_hf": {**POSITIVE.schema(), "description": "Published K^(h∘f) (the table's Lipschitz column)."},
                },
            },
            "audit": {
                "type": "object",
                "additionalProperties": False,
                "description": "Budget of the row's audit jobs (`cll audit` attacks the certified points of a test "
                "sample); stronger costs more time.",
                "properties": {
                    name: {"type": "integer", "minimum": 1, "default": value, "description": doc}
                    for name, (value, doc) in AUDIT.items()
                },
            },
            "resources": {
                "type": "object",
                "additionalProperties": False,
                "description": "Per-job resources of this row's jobs (site-neutral; profiles map them).",
                "properties": {
                    name: {
                        "type": "integer",
                        "minimum": 0 if name == "gpus" else 1,
                        "default": value,
                        "description": doc,
                    }
                    for name, (value, doc) in RESOURCES.items()
                },
            },
        },
        # arch and loss: registered names, except in a pending row
        "if": {"required": ["pending"]},
        "else": {
            "properties": {
                "arch": {"enum": names["arch"], "description": "Architectures that exist (cll list)."},
                "loss": {"enum": names["loss"], "description": "Losses that exist (cll list)."},
            }
        },
    }
    table = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "rows"],
        "properties": {
            "name": {
                "type": "string",
                "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                "description": "File name of the table (results/tables/<name>.csv, .md, .tex); letters, digits, _ . -",
            },
            "title": {"type": "string", "description": "Caption of the table (Markdown heading, LaTeX caption)."},
            "rows": {
                "type": "array",
                "minItems": 1,
                "description": "The table's rows, in print order.",
                "items": {"$ref": "#/$defs/row"},
            },
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cll grid",
        "description": "A grid: tables of rows, each row expanding into cells (dataset, arch, loss, eps, p, seed), "
        "one train, certify and audit job per runnable cell. Generated from src/cll/grid.py and src/cll/config.py "
        "by `make schema`; do not edit.",
        "type": "object",
        "additionalProperties": False,
        "required": ["experiment", "tables"],
        "properties": {
            "experiment": {
                "type": "string",
                "minLength": 1,
                "description": "MLflow experiment the jobs log into (the workflow creates it once at the start).",
            },
            "results": {
                "type": "string",
                "minLength": 1,
                "default": "results",
                "description": "Results root: runs/<cell>/, summary.csv, tables/, figures/ (relative to the "
                "working directory).",
            },
            "defaults": {"$ref": "#/$defs/run_config", "description": "Run-config keys of every cell (set wins)."},
            "tables": {
                "type": "array",
                "minItems": 1,
                "description": "The tables of the experiment; each becomes results/tables/<name>.{csv,md,tex}.",
                "items": {"$ref": "#/$defs/table"},
            },
        },
        "$defs": {"number_text": NUMBER_TEXT, "table": table, "row": row, "run_config": run_config},
    }


def field_name(path) -> str:
    """['tables', 1, 'rows', 0, 'p'] -> 'tables[1].rows[0].p'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "grid"


def validate(values: Any, schema: dict) -> None:
    """Check a grid against its schema: the first problem as a one-line ConfigError naming the
    field, e.g. ``tables[1].rows[0].p: 1.5 is greater than or equal to the maximum of 1``."""
    import jsonschema  # late: only grids need it

    errors = jsonschema.Draft202012Validator(schema).iter_errors(values)
    # best_match descends into anyOf branches to the error that names the field
    error = jsonschema.exceptions.best_match(errors)
    if error is None:
        return
    path = list(error.absolute_path)
    # a bad run-config key in `set` or `defaults`: cll.config's message says what is allowed
    at = next((i for i, part in enumerate(path[:-1]) if part in ("set", "defaults")), None)
    if at is not None and path[at + 1] in KEYS:
        key, value = path[at + 1], values
        for part in path[: at + 2]:
            value = value[part]
        try:
            rule(key).check(key, value)
        except ConfigError as err:
            raise ConfigError(f"{field_name(path[: at + 1])}: {err}") from None
    raise ConfigError(f"{field_name(path)}: {_message(error)}")


def _message(error) -> str:
    """jsonschema's message, in words where its own would quote schema internals."""
    if error.validator == "pattern" and error.validator_value == NUMBER_TEXT["pattern"]:
        return f"{error.instance!r} is not a number or a fraction like 36/255"
    if error.validator == "anyOf" and error.context and all(e.validator == "required" for e in error.context):
        keys = ", ".join(dict.fromkeys(key for e in error.context for key in e.validator_value))
        return f"gives none of {keys}; give at least one"
    return " ".join(error.message.split())


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
                        cell = _cell(table["name"], row, eps, p, seed, overrides, where)
                        cell = replace(cell, published=published, audit=audit)
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


def _cell(table: str, row: dict, eps: Any, p: Any, seed: Any, overrides: dict, where: str) -> Cell:
    """One cell of a row; a runnable one's run config is built exactly as `cll train` would (the
    schema has checked its names; a pending row's arch may not exist yet)."""
    try:
        cell = Cell(
            table,
            str(row["method"]),
            row["dataset"],
            row["arch"],
            row["loss"],
            parse_number("eps", eps),  # eps and p may be fractions (36/255)
            parse_number("p", p),
            seed,
            row.get("baseline"),
            row.get("pending"),
            row.get("resources") or {},
            {k: v for k, v in overrides.items() if k != "p"},
        )
        cfg = cell.run_config(check_names=False) if cell.pending is None else None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return replace(cell, seed=cfg.seed if cfg else int(seed))


def load_grid(path: str | Path, schema: dict | None = None) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"grid file {str(path)!r} is not valid YAML") from None
    return parse_grid(values, schema)
