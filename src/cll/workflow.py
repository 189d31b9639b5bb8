"""What the Snakefile computes beyond its rules, kept here so that it is unit-tested without
Snakemake; workflow/rules/common.smk only wraps it in input functions. This module never imports
snakemake or torch (``snakemake -n`` stays fast).

- ``load``: the grid Snakemake was given, checked against the generated schema and expanded into
  cells (one ConfigError line otherwise), and the one file it came from (``cll aggregate --grid``);
- ``train_launcher``, ``set_args``, ``site_resources``, ``put_python_on_path``, ``progress_note``,
  ``track_init_command``: pieces of the jobs' command lines, resources and messages (a cell's
  ``--set`` arguments, audit budget and resources are ``Cell.set_args``, ``Cell.audit_args`` and
  ``Cell.job_resources``);
- ``generated_files``: what ``make schema`` writes from the run-config declarations (the schema
  and the README's key table); a test keeps both current.

Run as ``python -m cll.workflow`` (``make schema``) to rewrite the generated files.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from .config import markdown_table
from .errors import ConfigError
from .grid import Cell, Grid, parse_grid
from .results import CELL_PATTERN
from .schema import grid_schema

SCHEMA = Path("workflow/schemas/config.schema.yaml")  # from the repository root
DEFAULT_GRID = "config/config.yaml"  # the Snakefile's configfile
# the README's table of run-config keys lies between these two lines
TABLE_START = "<!-- run-config keys: generated from src/cll/config.py by `make schema` -->"
TABLE_END = "<!-- end of run-config keys -->"

# libyaml's loader where it is installed: 10x faster on the paper grid
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: str | Path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def load(config: dict, configfiles: list, schema: str | Path) -> tuple[Grid, str]:
    """The grid Snakemake merged from ``configfiles`` (its ``config``), validated against the
    schema file and expanded, and the file it came from."""
    grid = parse_grid(config, schema=_read_yaml(schema))
    return grid, grid_file(config, configfiles)


def grid_file(config: dict, configfiles: list) -> str:
    """The file the grid came from: the last ``--configfile``, else the default. Snakemake merges
    the default, every --configfile and --config key by key, so refuse a grid that is not the
    content of that one file, except ``results`` and ``experiment``, which the rules pass on."""
    path = str(configfiles[-1]) if configfiles else DEFAULT_GRID
    on_disk = _read_yaml(path) or {}
    free = ("results", "experiment")
    if {k: v for k, v in config.items() if k not in free} != {k: v for k, v in on_disk.items() if k not in free}:
        raise ConfigError(
            f"the grid is not the content of {path}: give the whole grid in one file "
            f"(snakemake all_tables --configfile GRID.yaml); --config may only set results or experiment"
        )
    return path


def train_launcher(cell: Cell) -> str:
    """``cll train``, or for a cell whose row asks for N > 1 GPUs the same command under torchrun:
    N processes on the job's node, one GPU each, data-parallel (cll.distributed)."""
    gpus = cell.job_resources("train")["gpu"]
    return f"torchrun --standalone --nproc-per-node {gpus} -m cll.cli train" if gpus > 1 else "cll train"


def site_resources(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Slurm site settings, from the user's environment, never from files in the repository:
    CLL_SLURM_PARTITION and CLL_SLURM_ACCOUNT become the plugin's slurm_partition / slurm_account
    of the per-cell jobs. Unset, the plugin takes the cluster's default partition and guesses the
    account. Local runs ignore them."""
    names = (("slurm_partition", "CLL_SLURM_PARTITION"), ("slurm_account", "CLL_SLURM_ACCOUNT"))
    return {resource: environ[variable] for resource, variable in names if environ.get(variable)}


def put_python_on_path(python: str = sys.executable) -> None:
    """Jobs call the ``cll`` of the Python that runs Snakemake, so ``.venv/bin/snakemake`` works
    without an activated venv (and Slurm jobs, which inherit this environment, find it too)."""
    folder = str(Path(python).parent)
    if folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([folder, os.environ.get("PATH", "")])


def progress_note() -> str:
    """The line the workflow prints as it starts: where each job's progress goes (its log file)."""
    return (
        f"cll: each job writes its progress (per epoch or batch: rate, ETA) to its log, "
        f"logs/<rule>/{CELL_PATTERN}.log, shown as `log:` in the job's block below; follow one with tail -f"
    )


def track_init_command(experiment: str) -> str:
    """``cll track init``: create the MLflow store and experiment before parallel jobs race to."""
    return f"cll track init --experiment {shlex.quote(experiment)}"


def set_args(cell: Cell) -> str:
    """The cell's ``cll train --set`` arguments as one shell-quoted string."""
    return " ".join(shlex.quote(arg) for arg in cell.set_args())


# ------------------------------------------------------------------------------ generated files
class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a schema file reads better without &id001 anchors
        return True


def schema_text() -> str:
    """workflow/schemas/config.schema.yaml: the grid schema with the registered names."""
    header = "# Generated from src/cll/schema.py and src/cll/config.py by `make schema`: edit those, not this file.\n"
    return header + yaml.dump(grid_schema(), Dumper=_NoAliases, sort_keys=False, width=100, allow_unicode=True)


def readme_text(readme: str) -> str:
    """The README with its table of run-config keys replaced by the current one."""
    if TABLE_START not in readme or TABLE_END not in readme:
        raise ConfigError(f"README.md lacks the lines {TABLE_START!r} and {TABLE_END!r}")
    head, rest = readme.split(TABLE_START, 1)
    return head + TABLE_START + "\n" + markdown_table() + TABLE_END + rest.split(TABLE_END, 1)[1]


def generated_files(root: str | Path) -> dict[Path, str]:
    """Path -> the content it must have: the grid schema and the README (imports the registries)."""
    root = Path(root)
    return {root / SCHEMA: schema_text(), root / "README.md": readme_text((root / "README.md").read_text())}


if __name__ == "__main__":
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for path, text in generated_files(repo).items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
