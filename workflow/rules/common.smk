# Supporting code of the workflow (no rules here): the grid and its cells, the path patterns, and
# the pieces of the rules' `cll` command lines.
#
# The grid (Snakemake's `config`) is checked twice before any job starts:
#   1. the JSON schema (workflow/schemas/config.schema.yaml) through Snakemake's validate():
#      structure, registered names, ranges;
#   2. cll.grid.parse_grid, which builds each runnable cell's run config with cll.config exactly as
#      `cll train` would.
# Either failure stops Snakemake with ONE line naming the field, e.g.
#   cll: error: config: tables[1].rows[0].p: 1.5 is greater than or equal to the maximum of 1
# and a non-zero exit; nothing is written to results/.
import functools
import os
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from cll import results as cll_results
from cll.errors import ConfigError
from cll.grid import parse_grid


def stop(message):
    """Leave before any job with one line on stderr (sys.exit: Snakemake prints no traceback)."""
    sys.exit(f"cll: error: config: {' '.join(str(message).split())}")


def field_name(path):
    """['tables', 1, 'rows', 0, 'p'] -> 'tables[1].rows[0].p' (cll.grid's spelling)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "grid"


try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as err:
    # validate() wraps the first jsonschema error; best_match descends into it (anyOf branches)
    # to the error that names the field, e.g. "1.5 is greater than or equal to the maximum of 1"
    if not isinstance(err.__context__, jsonschema.ValidationError):
        raise
    cause = jsonschema.exceptions.best_match([err.__context__])
    stop(f"{field_name(cause.absolute_path)}: {cause.message}")
try:
    # the schema has checked dataset/arch/loss against the registries' names (a test keeps the two
    # equal), so parse_grid skips the registry look-up, which would import torch: `snakemake -n`
    # then imports only light modules (cll.grid, cll.config, cll.results)
    GRID = parse_grid(config, check_names=False)
except ConfigError as err:
    stop(err)


def grid_file():
    """The file the grid came from: `cll aggregate --grid` reads it. The last --configfile wins
    over config/config.yaml (Snakemake merges them key by key), so refuse a grid that is a blend
    of several files or of --config keys, except `results` and `experiment`, which the rules pass
    on explicitly."""
    given = list(workflow.overwrite_configfiles)
    path = str(given[-1]) if given else "config/config.yaml"
    with open(path, encoding="utf-8") as f:
        on_disk = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # libyaml: 10x faster
    free = ("results", "experiment")
    if {k: v for k, v in config.items() if k not in free} != {k: v for k, v in on_disk.items() if k not in free}:
        stop(
            f"the grid is not the content of {path}: give the whole grid in one file "
            f"(snakemake all_tables --configfile GRID.yaml); --config may only set results or experiment"
        )
    return path


GRID_FILE = grid_file()
RESULTS = os.path.normpath(GRID.results)
EXPERIMENT = GRID.experiment


class _Placeholder:
    """Formats as '{name}' whatever the format spec, so cll.results.run_dir, the one place that
    knows the results layout, also writes the rules' wildcard pattern."""

    def __init__(self, name):
        self.name = name

    def __format__(self, spec):
        return f"{{{self.name}}}"


def run_pattern(root):
    return str(
        cll_results.run_dir(
            root, "{dataset}", "{arch}", "{loss}", _Placeholder("eps"), _Placeholder("p"), _Placeholder("seed")
        )
    )


# results/runs/{dataset}/{arch}/{loss}/eps{eps}_p{p}/seed{seed} and its cell part (for logs)
RUN_DIR = run_pattern(RESULTS)
CELL_PATH = os.path.relpath(run_pattern("."), "runs")


wildcard_constraints:
    dataset="[^/]+",
    arch="[^/]+",
    loss="[^/]+",
    eps="[^/_]+",
    p="[^/_]+",
    seed="[0-9]+",


# every runnable cell by its run directory (a cell listed in two tables runs once)
CELLS = {str(cell.path(RESULTS)): cell for cell in GRID.runnable()}
for _path, _cell in CELLS.items():
    _keys = dict(
        dataset=_cell.dataset,
        arch=_cell.arch,
        loss=_cell.loss,
        seed=_cell.seed,
        eps=cll_results.fmt_number(_cell.eps),
        p=cll_results.fmt_number(_cell.p),
    )
    assert RUN_DIR.format(**_keys) == _path, (RUN_DIR, _path)  # the pattern matches run_dir

# Jobs call the `cll` of the Python that runs Snakemake, so `.venv/bin/snakemake` works without an
# activated venv (and Slurm jobs, which inherit this environment, find it too).
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = os.pathsep.join([_bin, os.environ.get("PATH", "")])


def cell_of(wildcards):
    """The grid cell of a job, looked up by its run directory."""
    return CELLS[RUN_DIR.format(**dict(wildcards.items()))]


def run_dir_of(wildcards):
    return str(cell_of(wildcards).path(RESULTS))


def method_of(wildcards):
    """The cell's method (its grid row's), which names its MLflow run."""
    return cell_of(wildcards).method


def yaml_value(value):
    """A value as `cll train --set` parses it back (YAML flow style: 1.0e-06, [400, 600], per_logit)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return _yaml_scalar(value)  # the grid repeats few values over ~1000 calls: dump each once
    return _yaml_dump(value)


@functools.lru_cache(maxsize=None, typed=True)  # typed: 1, 1.0 and True are three values
def _yaml_scalar(value):
    return _yaml_dump(value)


def _yaml_dump(value):
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def set_args(wildcards):
    """`key=value ...` of a cell for `cll train --set`, each shell-quoted: the cell's keys, then
    its run-config overrides (grid defaults + the row's set)."""
    cell = cell_of(wildcards)
    values = dict(
        dataset=cell.dataset, arch=cell.arch, loss=cell.loss, eps=cell.eps, p=cell.p, seed=cell.seed, **cell.overrides
    )
    return " ".join(shlex.quote(f"{key}={yaml_value(value)}") for key, value in values.items())


def audit_args(wildcards):
    """`--n N --steps S --restarts R` of a cell's audit job: its row's `audit` setting."""
    return cell_of(wildcards).audit_args()


def train_launcher(wildcards):
    """`cll train`, or for a cell whose row asks for N > 1 GPUs the same command under torchrun:
    N processes on the job's node, one GPU each, data-parallel (cll.distributed)."""
    gpus = cell_of(wildcards).resources.get("gpus", 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc-per-node {gpus} -m cll.cli train"
    return "cll train"


def resource(name, default, most=None):
    """A per-job value from the cell's `resources` (gpus, runtime, mem_mb, cpus), else `default`;
    at most `most` if given (certify uses one GPU whatever the cell trains on)."""

    def pick(wildcards):
        value = cell_of(wildcards).resources.get(name, default)
        return value if most is None else min(value, most)

    return pick


# Slurm site settings come from the user's environment, never from files in the repository:
# CLL_SLURM_PARTITION and CLL_SLURM_ACCOUNT become the plugin's slurm_partition / slurm_account of
# the train and certify jobs. Unset, the plugin takes the cluster's default partition and guesses
# the account. Local runs ignore them.
SITE_RESOURCES = {
    resource_name: os.environ[variable]
    for resource_name, variable in (("slurm_partition", "CLL_SLURM_PARTITION"), ("slurm_account", "CLL_SLURM_ACCOUNT"))
    if os.environ.get(variable)
}


def output_dir(wildcards, output):
    """The folder of a job's first output (the results root for summary.csv, tables/ for tables)."""
    return os.path.dirname(output[0])


def certify_files():
    return [str(Path(path) / cll_results.CERTIFY) for path in CELLS]


def audit_files():
    return [str(Path(path) / cll_results.AUDIT) for path in CELLS]


def table_files():
    """results/tables/<name>.{csv,md,tex} per table of the grid, and reproduction.{csv,md} (our
    numbers against the published ones, over all tables); the CSVs go into the report."""
    files = []
    for table in GRID.tables:
        stem = f"{RESULTS}/tables/{table['name']}"
        files.append(report(f"{stem}.csv", caption="../report/tables.rst", category="Tables"))
        files += [f"{stem}.md", f"{stem}.tex"]
    stem = f"{RESULTS}/tables/reproduction"
    files.append(report(f"{stem}.csv", caption="../report/reproduction.rst", category="Reproduction"))
    return files + [f"{stem}.md"]


def progress_note():
    """The line the workflow prints as it starts: where each job's progress goes (its log file)."""
    return (
        f"cll: each job writes its progress (per epoch or batch: rate, ETA) to its log, "
        f"logs/<rule>/{CELL_PATH}.log, shown as `log:` in the job's block below; follow one with tail -f"
    )


def track_init_command():
    """`cll track init`: create the MLflow store and experiment before parallel jobs race to."""
    return f"cll track init --experiment {shlex.quote(EXPERIMENT)}"
