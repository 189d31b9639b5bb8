"""The grid format: what a row may ask for (resources, audit budget) and the JSON schema that
checks a grid before any job starts (``grid_schema``, ``validate``). ``cll.grid`` expands a checked
grid into cells; ``make schema`` writes this schema to workflow/schemas/config.schema.yaml."""

from __future__ import annotations

from typing import Any

from .config import KEYS, NAMES, POSITIVE, default, registered_names, rule, run_config_schema
from .errors import ConfigError
from .values import NUMBER_TEXT

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
# each of those under the name Snakemake (and its Slurm executor) reads in a rule's `resources:`
SNAKEMAKE_RESOURCES = {"gpus": "gpu", "runtime": "runtime", "mem_mb": "mem_mb", "cpus": "cpus_per_task"}
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


FRACTION = {"type": "number", "minimum": 0, "maximum": 1, "description": "A fraction in [0, 1] (39.8 % is 0.398)."}


def _one_or_more(schema: dict, description: str) -> dict:
    return {"description": description, "anyOf": [schema, {"type": "array", "minItems": 1, "items": schema}]}


def _settings_schema(declared: dict[str, tuple[int, str]], description: str) -> dict:
    """An object of whole-number settings declared as name -> (default, meaning): a row's audit
    budget or its jobs' resources (all >= 1, but a job may take no GPU)."""
    properties = {
        name: {"type": "integer", "minimum": 0 if name == "gpus" else 1, "default": value, "description": doc}
        for name, (value, doc) in declared.items()
    }
    return {"type": "object", "additionalProperties": False, "description": description, "properties": properties}


def _published_schema() -> dict:
    """A row's ``published`` block (``_published`` in cll.grid checks what a schema cannot)."""
    return {
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
    }


def _row_schema(names: dict[str, list[str]]) -> dict:
    """A table row: what it prints, the cells it expands into, and its jobs' budgets."""
    return {
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
            "published": _published_schema(),
            "audit": _settings_schema(
                AUDIT,
                "Budget of the row's audit jobs (`cll audit` attacks the certified points of a test sample); "
                "stronger costs more time.",
            ),
            "resources": _settings_schema(
                RESOURCES, "Per-job resources of this row's jobs (site-neutral; profiles map them)."
            ),
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


def _table_schema() -> dict:
    return {
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
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cll grid",
        "description": "A grid: tables of rows, each row expanding into cells (dataset, arch, loss, eps, p, seed), "
        "one train, certify and audit job per runnable cell. Generated from src/cll/schema.py and src/cll/config.py "
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
        "$defs": {
            "number_text": NUMBER_TEXT,
            "table": _table_schema(),
            "row": _row_schema(names),
            "run_config": run_config,
        },
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
