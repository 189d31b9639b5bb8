# The grid and the rules' input functions (no rules here). Everything they compute is in
# src/cll/workflow.py and src/cll/grid.py, unit-tested without Snakemake.
#
# The grid (Snakemake's `config`) is checked before any job starts, against the schema
# workflow/schemas/config.schema.yaml (generated from cll.config's declarations by `make schema`),
# then each runnable cell's run config is built by cll.config exactly as `cll train` would. Any
# failure stops Snakemake with ONE line naming the field, e.g.
#   cll: error: config: tables[1].rows[0].p: 1.5 is greater than or equal to the maximum of 1
# and a non-zero exit; nothing is written to results/.
import os
import sys
from pathlib import Path

from cll import grid as cll_grid
from cll import results as cll_results
from cll import workflow as cll_workflow
from cll.errors import ConfigError

try:
    GRID, GRID_FILE = cll_workflow.load(
        config, list(workflow.overwrite_configfiles), Path(workflow.basedir) / cll_workflow.SCHEMA
    )
except ConfigError as err:
    sys.exit(f"cll: error: config: {err}")  # sys.exit: Snakemake prints no traceback

RESULTS = os.path.normpath(GRID.results)
EXPERIMENT = GRID.experiment
# results/runs/{dataset}/{arch}/{loss}/eps{eps}_p{p}/seed{seed}, and its cell part for logs
RUN_DIR = cll_results.run_pattern(RESULTS)
CELL_PATH = cll_results.CELL_PATTERN
# every runnable cell by its run directory (a cell listed in two tables runs once)
CELLS = {str(cell.path(RESULTS)): cell for cell in GRID.runnable()}
SITE_RESOURCES = cll_workflow.site_resources()
cll_workflow.put_python_on_path()


wildcard_constraints:
    dataset="[^/]+",
    arch="[^/]+",
    loss="[^/]+",
    eps="[^/_]+",
    p="[^/_]+",
    seed="[0-9]+",


def cell_of(wildcards):
    """The grid cell of a job, looked up by its run directory."""
    return CELLS[RUN_DIR.format(**dict(wildcards.items()))]


def run_dir_of(wildcards):
    return str(cell_of(wildcards).path(RESULTS))


def method_of(wildcards):
    """The cell's method (its grid row's), which names its MLflow run."""
    return cell_of(wildcards).method


def set_args(wildcards):
    return cll_workflow.set_args(cell_of(wildcards))


def audit_args(wildcards):
    """`--n N --steps S --restarts R` of a cell's audit job: its row's `audit` setting."""
    return cell_of(wildcards).audit_args()


def train_launcher(wildcards):
    return cll_workflow.train_launcher(cell_of(wildcards))


def threads_of(wildcards):
    return cell_of(wildcards).job_resources("train")["cpus_per_task"]


def resources_of(rule):
    """The `resources:` of a per-cell rule: the site's partition and account, and one input
    function per resource of the cell's job (cll.grid.Cell.job_resources)."""

    def pick(name):
        return lambda wildcards: cell_of(wildcards).job_resources(rule)[name]

    return {**SITE_RESOURCES, **{name: pick(name) for name in cll_grid.SNAKEMAKE_RESOURCES.values()}}


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
