"""Tests for the Snakemake workflow (Snakefile, workflow/, config/, .test/, envs/) and cll.workflow.

The end-to-end tests read the CI grid's run (.test/config.yaml: two moons cells, a digits
GloRo/CLL pair, a Local-Lip-B digits cell), made once per session by conftest's ``ci_run``
(train -> certify -> audit -> aggregate -> tables/figures in a temporary working directory, MLflow
logging into a temporary sqlite file): every output, the logs and MLflow's runs; then that a
second run has nothing to do, that deleted tables and figures are rebuilt without retraining and
that a run stopped before its train.json resumes. tests/test_local_lipschitz.py reads the same run.
The other tests dry-run the paper grid, feed malformed grids (one line naming the field, nothing
written), and check that the schema, the conda envs and the lint agree with the package. Every
Snakemake call is a subprocess with a timeout (the `workflow` lane: about 3 minutes on two cores,
most of it the CI grid's run). The last tests check cll.workflow, what the Snakefile calls,
without Snakemake.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from helpers import CI_GRID, ROOT, check_pipeline_outputs, job_counts, snakemake

from cll import data, layers, losses, models, workflow
from cll.config import KEYS, load_config, rule
from cll.errors import ConfigError
from cll.grid import AUDIT_DEFAULTS, load_grid, parse_grid
from cll.values import Choice

PAPER_GRID = ROOT / "config" / "paper.yaml"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


@pytest.mark.workflow(seconds=90)  # most of it the CI grid's run (conftest.ci_run), for all its tests
@pytest.mark.timeout(900)
def test_ci_grid_end_to_end(ci_run):
    ci_run.check()
    grid, results, env = ci_run.grid, ci_run.results, ci_run.env
    cells = grid.runnable()
    assert len(cells) == 5
    check_pipeline_outputs(results, grid)
    logs = "".join(p.read_text() for p in (ci_run.workdir / "logs").rglob("*.log"))
    assert "warning" not in logs  # MLflow tracking worked in every job
    assert "cll: each job writes its progress" in ci_run.output
    assert (results / "tables" / "reproduction.md").is_file()

    # MLflow: one run per cell (train and certify logged into the same run), with metrics
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(grid.experiment)
    runs = client.search_runs([experiment.experiment_id])
    summary_runs = [r for r in runs if r.info.run_name == "summary"]
    runs = [r for r in runs if r.info.run_name != "summary"]
    assert sorted(r.data.tags["cll.run_dir"] for r in runs) == sorted(str(c.path(results).resolve()) for c in cells)
    assert sorted(r.info.run_name for r in runs) == sorted(
        f"{c.method} {c.arch} {c.dataset} eps{c.eps:g} p{c.p:g} seed{c.seed}" for c in cells
    )
    assert len(summary_runs) == 1  # the grid's summary.csv, tables and figures, as artifacts of one run
    logged = {
        f.path for folder in ("tables", "figures") for f in client.list_artifacts(summary_runs[0].info.run_id, folder)
    }
    assert {"figures/moons_boundaries.png", "figures/slack_vs_k.pdf", "tables/digits.md"} <= logged
    cell_of = {str(c.path(results).resolve()): c for c in cells}
    for r in runs:
        cell = cell_of[r.data.tags["cll.run_dir"]]
        # the audit job logs last, unless the aggregate step's back-fill raced it
        assert r.data.tags["cll.stage"] in ("certify", "audit")
        # the CRA at 36/255; the Local-Lip-B cell certifies at 0.005 and 0.01 only
        cra = "cra_0.01" if cell.loss == "local_lip_b" else "cra_36_255"
        assert {"clean_accuracy", cra, "lipschitz_constant", "train_loss"} <= set(r.data.metrics), r.info.run_name
        assert r.data.params["epochs"] == str(cell.run_config().epochs)  # 1 or 2 (Local-Lip-B: 10)
        history = client.get_metric_history(r.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, int(r.data.params["epochs"]) + 1))


@pytest.mark.workflow(seconds=25)
@pytest.mark.timeout(900)
def test_ci_grid_reruns_nothing_rebuilds_tables_and_resumes_a_run(ci_run):
    """On the CI grid's run (conftest.ci_run), which this test changes and puts back."""
    ci_run.check()
    grid, results, env, workdir = ci_run.grid, ci_run.results, ci_run.env, ci_run.workdir
    cells = grid.runnable()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(grid.experiment)

    # nothing to do the second time
    again = snakemake(workdir, "--cores", "2", "all_tables", "--configfile", str(CI_GRID), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr

    # tables and figures come back from summary.csv alone: no train or certify job
    models_before = {c: c.path(results).joinpath("model.pt").stat().st_mtime_ns for c in cells}
    for folder in ("tables", "figures"):
        for path in (results / folder).iterdir():
            path.unlink()
        (results / folder).rmdir()
    rebuild = snakemake(workdir, "--cores", "2", "all_tables", "--configfile", str(CI_GRID), env=env)
    assert rebuild.returncode == 0, rebuild.stderr[-3000:]
    assert job_counts(rebuild.stdout + rebuild.stderr) == {"figures": 1, "tables": 1, "all_tables": 1, "total": 3}
    assert (results / "tables" / "digits.md").is_file() and (results / "figures" / "cra_vs_p.png").is_file()
    assert {c: c.path(results).joinpath("model.pt").stat().st_mtime_ns for c in cells} == models_before

    # a run without train.json (as if stopped before the end) is resumed from its model.pt, which
    # Snakemake leaves alone, and logs into the same MLflow run
    cell = cells[0]
    cell.path(results).joinpath("train.json").unlink()
    target = str(cell.path(grid.results) / "train.json")  # relative to the working directory
    resume = snakemake(workdir, "--cores", "2", target, "--configfile", str(CI_GRID), env=env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert job_counts(resume.stdout + resume.stderr) == {"train": 1, "total": 1}
    assert cell.path(results).joinpath("model.pt").stat().st_mtime_ns == models_before[cell]
    train_log = (workdir / "logs" / "train" / cell.path("x").relative_to("x/runs")).with_suffix(".log")
    assert "is already trained" in train_log.read_text()
    assert len(client.search_runs([experiment.experiment_id])) == len(cells) + 1  # + the summary run

    report = snakemake(workdir, "--report", "report.html", "--configfile", str(CI_GRID), env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (workdir / "report.html").stat().st_size > 10_000


@pytest.mark.workflow
def test_paper_grid_dry_run_lists_every_runnable_cell(tmp_path):
    run = snakemake(tmp_path, "-n", "-p", "all_tables", "--configfile", str(PAPER_GRID))
    assert run.returncode == 0, run.stderr[-3000:]
    grid = load_grid(PAPER_GRID)
    cells = {str(c.path(grid.results)): c for c in grid.runnable()}
    # Tiny-ImageNet: GloRo, Local-Lip-B, CLL eps 0.5, SOC LipConv-10/20, CLL LipConv-20, SLL, LBDN
    # 3 seeds each, CLL eps 1.0 9 seeds; CIFAR-100: SOC, CLL LipConv-20, CPL, CLL CPL-XL, SLL 3 seeds
    # each, CLL SLL-XL 9 seeds; moons 4 slacks; hosts: LiResNet (EMMA) and BRONet (Logit Annealing),
    # each also with CLL, on CIFAR-100 and Tiny-ImageNet, 3 seeds each
    assert len(cells) == 33 + 24 + 4 + 24
    assert len(grid.runnable()) == len(grid.cells)  # no row is pending
    counts = job_counts(run.stdout)
    assert counts["train"] == counts["certify"] == len(cells)
    assert not (tmp_path / "results").exists()  # a dry run writes nothing

    # each printed command is one line a person can paste, and reproduces its cell's run config
    # (a cell with several GPUs trains under torchrun, one process per GPU)
    commands = [
        line.removeprefix("Shell command: ")
        for line in run.stdout.splitlines()
        if line.removeprefix("Shell command: ").startswith(("cll train ", "torchrun "))
    ]
    assert len(commands) == len(cells)
    for line in commands:
        argv = shlex.split(line.split(" > ", 1)[0])
        out = argv[argv.index("--out") + 1]
        assert argv[argv.index("--track") + 1] == grid.experiment
        cfg = load_config(None, argv[argv.index("--set") + 1 :])
        assert cfg == cells[out].run_config(), out
        gpus = cells[out].resources.get("gpus", 0)
        assert (argv[0] == "torchrun") == (gpus > 1), out
        if gpus > 1:
            assert argv[argv.index("--nproc-per-node") + 1] == str(gpus)

    # each audit job runs with its row's budget (GPU rows 1000 points, 100 steps, 5 restarts; moons
    # the defaults)
    audits = [line for line in run.stdout.splitlines() if line.startswith("Shell command: cll audit ")]
    assert len(audits) == len(cells)
    for line in audits:
        argv = shlex.split(line.split(" > ", 1)[0])
        cell = cells[argv[argv.index("--run") + 1]]
        budget = {key: int(argv[argv.index(f"--{key}") + 1]) for key in ("n", "steps", "restarts")}
        assert budget == ({"n": 1000, "steps": 100, "restarts": 5} if cell.dataset != "moons" else AUDIT_DEFAULTS)


HOSTS_GRID = ROOT / "config" / "hosts-cpu.yaml"


@pytest.mark.data
@pytest.mark.workflow(seconds=60)
@pytest.mark.timeout(900)
def test_hosts_cpu_grid_runs_end_to_end_on_its_smallest_cells(tmp_path, unpack):
    """config/hosts-cpu.yaml through the whole workflow on the real CIFAR-10 JPEGs, each row at one
    seed and toy size (its own 30-minute run is measured in docs/recipes.md): every host's own loss
    and CLL at both slacks are trained, certified soundly, audited, tabulated side by side, and the
    slack sweep gives the slack-vs-K figure."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "cifar10-jpg").symlink_to(unpack("cifar10-jpg-full.tgz"))
    grid = yaml.safe_load(HOSTS_GRID.read_text())
    grid["defaults"].update(max_train=256, max_test=100, epochs=1, batch_size=64)
    for table in grid["tables"]:
        for row in table["rows"]:
            row["seeds"] = row["seeds"][:1]
            row["audit"] = {"n": 20, "steps": 5, "restarts": 1}
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump(grid))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CLL_DATA": str(data_root)}
    run = snakemake(tmp_path, "--cores", "2", "all_tables", "--configfile", str(path), env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = load_grid(path)
    cells, results = loaded.runnable(), tmp_path / loaded.results
    assert {(c.arch, c.loss) for c in cells} >= {("LiResNet-L2W32", "emma"), ("LiResNet-L2W32", "cll")}
    check_pipeline_outputs(results, loaded, figures=("slack_vs_k", "cra_vs_p"))  # no moons: no boundaries
    for table in grid["tables"]:
        text = (results / "tables" / f"{table['name']}.md").read_text()
        own, cll = (row["method"] for row in table["rows"])
        assert f"| {own} |" in text and f"| {cll} p=0.01 |" in text and f"| {cll} p=0.3 |" in text
    for cell in cells:
        certified = json.loads((cell.path(results) / "certify.json").read_text())
        assert certified["rounding"] == "rigorous" and certified["float32_rounding"] == "rigorous"
        audit = json.loads((cell.path(results) / "audit.json").read_text())
        assert audit["broken"] == 0


def _bad(mutate):
    def make(grid: dict) -> None:
        mutate(grid["tables"][1]["rows"][1])

    return make


@pytest.mark.parametrize(
    "mutate, field",
    [
        (_bad(lambda row: row.update(arch="9C9F")), "tables[1].rows[1].arch: '9C9F' is not one of"),
        (_bad(lambda row: row.update(p=1.5)), "tables[1].rows[1].p: 1.5 is greater than"),
        (_bad(lambda row: row.update(eps=-0.1)), "tables[1].rows[1].eps: -0.1 is less than"),
        (_bad(lambda row: row.pop("loss")), "tables[1].rows[1]: 'loss' is a required property"),
        (_bad(lambda row: row["set"].update(milestones=[3, 2])), "tables[1].rows[1]: milestones: [3, 2]"),
        # a row's published numbers: fractions, a source, eps and cra together and of one length
        (
            _bad(lambda row: row.update(published={"source": "P", "clean": 39.8})),
            "tables[1].rows[1].published.clean: 39.8 is greater than the maximum of 1",
        ),
        (
            _bad(lambda row: row.update(published={"clean": 0.398})),
            "tables[1].rows[1].published: 'source' is a required property",
        ),
        (
            _bad(lambda row: row.update(published={"source": "P", "eps": ["36/255"]})),
            "tables[1].rows[1].published: 'cra' is a dependency of 'eps'",
        ),
        (
            _bad(lambda row: row.update(published={"source": "P", "eps": ["36/255"], "cra": [0.2, 0.1]})),
            "tables[1].rows[1].published: eps ['36/255'] and cra [0.2, 0.1] must be lists of the same length",
        ),
        (_bad(lambda row: row.update(audit={"n": 0})), "tables[1].rows[1].audit.n: 0 is less than the minimum of 1"),
    ],
    ids=[
        "unknown-arch",
        "p-1.5",
        "eps-negative",
        "missing-loss",
        "run-config-check",
        "published-percent",
        "published-no-source",
        "published-eps-alone",
        "published-lengths",
        "audit-n-0",
    ],
)
@pytest.mark.workflow
def test_bad_grid_stops_before_any_job(tmp_path, mutate, field):
    grid = yaml.safe_load(CI_GRID.read_text())
    mutate(grid)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(grid))
    run = snakemake(tmp_path, "--cores", "2", "all_tables", "--configfile", str(path))
    assert run.returncode != 0
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("cll: error: config: " + field), run.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


@pytest.mark.workflow
def test_grid_must_come_from_one_file(tmp_path):
    """--config may set results/experiment; anything else would not reach `cll aggregate --grid`."""
    ok = snakemake(tmp_path, "-n", "all_tables", "--configfile", str(CI_GRID), "--config", f"results={tmp_path / 'r'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"{tmp_path / 'r'}/runs/moons" in ok.stdout
    # two files merge key by key: the paper grid's defaults would leak into the CI grid's cells
    mixed = snakemake(tmp_path, "-n", "all_tables", "--configfile", str(PAPER_GRID), str(CI_GRID))
    assert mixed.returncode != 0 and mixed.stderr.count("\n") == 1
    assert "give the whole grid in one file" in mixed.stderr


def _walk(schema, where="schema"):
    """Every (location, subschema) of a JSON schema."""
    yield where, schema
    for key in ("properties", "$defs"):
        for name, sub in schema.get(key, {}).items():
            yield from _walk(sub, f"{where}.{key}.{name}")
    for key in ("items", "else", "then", "if"):
        if isinstance(schema.get(key), dict):
            yield from _walk(schema[key], f"{where}.{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            yield from _walk(sub, f"{where}.{key}[{i}]")


def test_generated_files_are_current():
    """The schema and the README's key table are what `make schema` writes from the declarations."""
    for path, text in workflow.generated_files(ROOT).items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make schema`"


def test_schema_agrees_with_the_package():
    schema = yaml.safe_load(SCHEMA.read_text())
    row = schema["$defs"]["row"]
    assert row["properties"]["dataset"]["enum"] == data.dataset_names()
    # arch and loss: registered names for runnable rows; a pending row may name a future one
    assert row["if"] == {"required": ["pending"]}
    assert row["else"]["properties"]["arch"]["enum"] == models.names()
    assert row["else"]["properties"]["loss"]["enum"] == losses.names()
    assert "enum" not in row["properties"]["arch"] and "enum" not in row["properties"]["loss"]
    # run-config keys: all of cll.config's but those a row sets itself
    run_config = schema["$defs"]["run_config"]["properties"]
    assert set(run_config) == set(KEYS) - {"dataset", "arch", "loss", "eps", "seed"}
    choices = {key: rule(key).choices for key in KEYS if isinstance(rule(key), Choice)}
    assert choices
    for key, allowed in choices.items():
        assert run_config[key]["enum"] == list(allowed), key
    assert run_config["activation"]["enum"] == layers.ACTIVATIONS.names()
    for where, sub in _walk(schema):
        if sub.get("type") == "object":
            assert sub.get("additionalProperties") is False, where
        for name, prop in sub.get("properties", {}).items():
            assert prop.get("description"), f"{where}.properties.{name} has no description"


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*={1,2}\s*([^\s#]+)\s*(#.*)?", str(line))
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def test_conda_envs_pin_what_requirements_pin():
    required = _pins((ROOT / "requirements.txt").read_text().splitlines())
    for env_file in sorted((ROOT / "envs").glob("*.yaml")):
        env = yaml.safe_load(env_file.read_text())
        assert env["channels"] == ["conda-forge", "nodefaults"], env_file
        deps = [d for d in env["dependencies"] if isinstance(d, str)]
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        pins = {**_pins(deps), **_pins(pip)}
        pins.pop("python")
        assert pins, env_file
        for name, version in pins.items():
            assert required.get(name) == version, f"{env_file.name}: {name} {version} vs requirements.txt"
        assert {"torch", "torchvision"} <= set(_pins(pip)), env_file  # CUDA wheels come from pip
    assert "mlflow" in _pins(
        next(
            d["pip"]
            for d in yaml.safe_load((ROOT / "envs" / "train.yaml").read_text())["dependencies"]
            if isinstance(d, dict)
        )
    )


@pytest.mark.workflow
def test_lint(tmp_path):
    run = snakemake(tmp_path, "--lint", "--configfile", str(ROOT / "config" / "config.yaml"))
    lints = re.findall(r"^    \* (.+)$", run.stdout + run.stderr, flags=re.M)
    assert run.returncode == 0 and lints == [], lints
    assert "your workflow is in a good condition" in run.stdout + run.stderr


def test_workflow_parse_path_imports_no_torch_and_expands_the_same_cells():
    # snakemake -n stays fast: common.smk's imports (cll.workflow) pull in no torch, and skipping the
    # registry look-up (the schema checked the names) changes no cell
    code = (
        f"import sys, yaml, cll.workflow; grid = yaml.safe_load(open({str(PAPER_GRID)!r})); "
        f"cll.workflow.load(grid, [{str(PAPER_GRID)!r}], {str(SCHEMA)!r}); "
        "sys.exit(1 if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

    grid = yaml.safe_load(PAPER_GRID.read_text())
    fast, full = parse_grid(grid, schema=yaml.safe_load(SCHEMA.read_text())), parse_grid(grid)
    assert fast.cells == full.cells and [c.run_config(False) for c in fast.runnable()] == [
        c.run_config() for c in full.runnable()
    ]


# ------------------------------------------------------------------ cll.workflow, without Snakemake
def test_grid_file_is_the_last_configfile_and_must_hold_the_whole_grid(tmp_path):
    grid = yaml.safe_load(CI_GRID.read_text())
    assert workflow.grid_file(grid, [PAPER_GRID, CI_GRID]) == str(CI_GRID)
    assert workflow.grid_file({**grid, "results": "elsewhere", "experiment": "x"}, [CI_GRID]) == str(CI_GRID)
    for blend in ({**grid, "defaults": {"epochs": 3}}, {k: v for k, v in grid.items() if k != "tables"}):
        with pytest.raises(ConfigError, match=f"the grid is not the content of {CI_GRID}: give the whole grid"):
            workflow.grid_file(blend, [CI_GRID])


def test_load_checks_the_grid_against_the_schema_file(tmp_path):
    grid = yaml.safe_load(CI_GRID.read_text())
    loaded, path = workflow.load(grid, [CI_GRID], SCHEMA)
    assert path == str(CI_GRID) and loaded.cells == load_grid(CI_GRID).cells
    schema = yaml.safe_load(SCHEMA.read_text())
    schema["$defs"]["row"]["else"]["properties"]["arch"]["enum"].remove("4C3F")  # the file, not the registry
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    with pytest.raises(ConfigError, match=r"^tables\[[12]\]\.rows\[[01]\]\.arch: '4C3F' is not one of"):
        workflow.load(grid, [CI_GRID], tmp_path / "schema.yaml")


def test_train_launcher_runs_torchrun_for_more_than_one_gpu():
    grid = yaml.safe_load(CI_GRID.read_text())
    grid["tables"][1]["rows"][1]["resources"] = {"gpus": 4}
    one, four = (c for c in parse_grid(grid).runnable() if c.table == "digits")
    assert workflow.train_launcher(one) == "cll train"
    assert workflow.train_launcher(four) == "torchrun --standalone --nproc-per-node 4 -m cll.cli train"


def test_site_resources_come_from_the_environment_only():
    assert workflow.site_resources({}) == {}
    env = {"CLL_SLURM_PARTITION": "gpu", "CLL_SLURM_ACCOUNT": "", "HOME": "/x"}
    assert workflow.site_resources(env) == {"slurm_partition": "gpu"}


def test_put_python_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin")
    workflow.put_python_on_path(str(tmp_path / "venv" / "bin" / "python"))
    workflow.put_python_on_path(str(tmp_path / "venv" / "bin" / "python"))  # once only
    assert os.environ["PATH"] == f"{tmp_path / 'venv' / 'bin'}{os.pathsep}/usr/bin"


def test_track_init_command_quotes_the_experiment():
    assert shlex.split(workflow.track_init_command("my exp; rm -rf x")) == [
        "cll", "track", "init", "--experiment", "my exp; rm -rf x"
    ]  # fmt: skip


def test_readme_without_the_table_markers_is_one_line():
    with pytest.raises(ConfigError, match=r"README\.md lacks the lines"):
        workflow.readme_text("# a README\n")
