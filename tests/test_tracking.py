"""Tests for ``cll.tracking``: one MLflow run per run directory (train and certify log into the
same run, reruns add nothing twice), and a tracking failure is one warning line, never an error.

The run directories here are written by hand (train.json, certify.json): tracking only reads
those files, so no model is trained. MLflow logs into a sqlite file under tmp_path. The last test
is the cluster case end to end: a real `mlflow server` on 127.0.0.1 that is down while two tiny
moons runs train and certify, then up for `cll aggregate --track`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import moons_grid

from cll import tracking, tracking_ui
from cll.cli import main
from cll.grid import load_grid

CONFIG = {
    "dataset": "moons",
    "arch": "moons-mlp",
    "loss": "cll",
    "eps": 0.15,
    "p": 0.01,
    "seed": 0,
    "epochs": 3,
    "certify_eps": [0.15, 0.1411764705882353],
    "milestones": None,
}


def write_run(run, epochs=3, config=CONFIG):
    run.mkdir(parents=True, exist_ok=True)
    history = [
        {
            "epoch": e,
            "loss": 1.0 / e,
            "accuracy": 0.5 + 0.05 * e,
            "lipschitz_estimate": 10.0 + e,
            "lr": 1e-3,
            "seconds": 0.1,
        }
        for e in range(1, epochs + 1)
    ]
    (run / "train.json").write_text(
        json.dumps({"config": config, "epochs": history, "wall_time": 0.3, "lipschitz_bound": 13.5, "k_hf": 35.29})
    )


def write_certify(run, clean=0.9):
    (run / "certify.json").write_text(
        json.dumps(
            {
                "clean_accuracy": clean,
                "cra": {"0.15": 0.8, "0.1412": 0.81},
                "cra_estimate": {"0.15": 0.8},
                "lipschitz_constant": 13.5,
                "lipschitz_estimate": 13.4,
                "lipschitz_body": 6.0,
                "n_samples": 500,
                "k_hf": 35.29,
                "eps": [0.15, 0.1412],
                "seconds": 0.01,
            }
        )
    )


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A fresh sqlite store, created once: MLflow's schema migration takes seconds per file."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store):
    """An MLflow client on a fresh sqlite file (a copy of ``empty_store``); the cwd is tmp_path
    (artifacts go to ./mlruns)."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_train_then_certify_log_into_one_run(tmp_path, store, capsys):
    run = tmp_path / "runs" / "a"
    write_run(run)
    first = tracking.track(run, "exp")
    assert first is not None
    write_certify(run)
    assert tracking.track(run, "exp") == first
    assert tracking.track(run, "exp") == first  # a rerun: still the same run
    assert "warning" not in capsys.readouterr().err

    (logged,) = runs_of(store, "exp")
    assert logged.data.tags["cll.run_dir"] == str(run.resolve())
    assert logged.data.tags["cll.stage"] == "certify"
    assert logged.data.tags["mlflow.runName"] == "cll moons-mlp moons eps0.15 p0.01 seed0"  # no --method
    assert logged.data.params["p"] == "0.01" and logged.data.params["milestones"] == "null"
    assert logged.data.metrics["clean_accuracy"] == 0.9 and logged.data.metrics["cra_36_255"] == 0.81
    assert logged.data.metrics["cra_0.15"] == 0.8 and logged.data.metrics["k_hf"] == 35.29
    assert logged.data.metrics["lipschitz_bound"] == 13.5
    history = store.get_metric_history(first, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]  # not logged twice
    assert len(store.get_metric_history(first, "clean_accuracy")) == 1
    assert sorted(a.path for a in store.list_artifacts(first)) == ["certify.json", "train.json"]


def test_resumed_training_adds_only_new_epochs_and_new_values(tmp_path, store):
    run = tmp_path / "run"
    write_run(run, epochs=2)
    run_id = tracking.track(run, "exp")
    write_run(run, epochs=3)
    write_certify(run, clean=0.9)
    tracking.track(run, "exp")
    write_certify(run, clean=0.95)  # certify rerun with another result
    assert tracking.track(run, "exp") == run_id
    assert [m.step for m in store.get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    assert [m.value for m in store.get_metric_history(run_id, "clean_accuracy")] == [0.9, 0.95]


def test_another_directory_or_config_is_another_run(tmp_path, store):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b")
    a, b = tracking.track(tmp_path / "a", "exp"), tracking.track(tmp_path / "b", "exp")
    write_run(tmp_path / "a", config={**CONFIG, "epochs": 5}, epochs=5)  # retrained afresh
    c = tracking.track(tmp_path / "a", "exp")
    assert len({a, b, c}) == 3 and len(runs_of(store, "exp")) == 3


def test_track_init_creates_the_experiment_once(store, capsys):
    assert main(["track", "init", "--experiment", "grid"]) == 0
    assert main(["track", "init", "--experiment", "grid"]) == 0
    out, err = capsys.readouterr()
    assert out.count("MLflow experiment 'grid'") == 2 and err == ""
    exp_id = store.get_experiment_by_name("grid").experiment_id
    # where `mlflow ui` shows a sqlite store's runs table
    url = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=cll"
    assert out.count(f"runs table: {url}") == 2


def view_columns(experiment) -> list[str]:
    """The columns of the experiment's saved view ``cll``."""
    view = json.loads(experiment.tags["mlflow.sharedViewState.cll"])
    assert view["name"] == "cll: certified accuracy"
    return json.loads(view["state"])["selectedColumns"]


def test_experiment_is_model_training_and_each_run_logs_its_data_set_once(tmp_path, store):
    """cll's experiment has MLflow's model-training kind and the view ``cll``: clean accuracy, CRA
    at the tables' radii and at a run's own radius, K^(h∘f), the bound, the audit. A run logs its data
    set's train and test splits as dataset inputs once: certify, a rerun and the back-fill add none,
    even when the data set's files changed meanwhile (another digest)."""
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch.parent.mkdir(parents=True)
    batch.write_bytes(b"x" * 10)
    run = tmp_path / "run"
    write_run(run, config={**CONFIG, "dataset": "cifar10", "data_root": str(tmp_path / "data")})
    run_id = tracking.track(run, "exp")
    batch.write_bytes(b"x" * 11)
    write_certify(run)
    assert tracking.track(run, "exp") == run_id
    write_certify(run, clean=0.95)
    assert tracking.backfill([run], "exp") == (1, 0)

    experiment = store.get_experiment_by_name("exp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    metrics = ["clean_accuracy", "cra_36_255", "cra_72_255", "cra_108_255", "k_hf", "lipschitz_constant"]
    assert view_columns(experiment) == [f"metrics.`{m}`" for m in [*metrics, "audit_broken", "cra_0.15"]]
    inputs = store.get_run(run_id).inputs.dataset_inputs
    assert sorted((i.dataset.name, [(t.key, t.value) for t in i.tags]) for i in inputs) == [
        ("cifar10", [("mlflow.data.context", "eval")]),
        ("cifar10", [("mlflow.data.context", "training")]),
    ]
    assert len({i.dataset.digest for i in inputs}) == 2  # the splits differ


def test_an_existing_experiment_gets_the_tags_it_lacks_and_keeps_those_it_has(tmp_path, store):
    """An experiment made before (or by hand) gets the kind and the view; a kind a person chose and
    a view saved over in the UI (compressed there, so not cll's JSON) stay as they are."""
    store.create_experiment("old")
    mine = store.create_experiment(
        "mine", tags={"mlflow.experimentKind": "genai_development", "mlflow.sharedViewState.cll": "deflate;abc"}
    )
    write_run(tmp_path / "run")
    write_certify(tmp_path / "run")  # a radius (0.15) the view lacks
    tracking.track(tmp_path / "run", "old")
    tracking.track(tmp_path / "run", "mine")
    old = store.get_experiment_by_name("old")
    assert old.tags["mlflow.experimentKind"] == "custom_model_development" and "metrics.`cra_0.15`" in view_columns(old)
    tags = store.get_experiment(mine).tags
    assert (tags["mlflow.experimentKind"], tags["mlflow.sharedViewState.cll"]) == ("genai_development", "deflate;abc")


def test_a_file_based_data_set_is_its_folder_with_a_digest_of_its_files(tmp_path):
    """The source of a data set read from files is its folder; the digest follows the files there
    and one level down (sizes, no file is read) and ignores what lies deeper (images). Moons and
    digits, made in memory, come from code."""
    assert {i.dataset.source_type for i in tracking_ui.dataset_inputs(CONFIG)} == {"code"}
    folder = tmp_path / "data" / "cifar-10-batches-py"
    (folder / "images" / "class0").mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"x" * 10)
    config = {**CONFIG, "dataset": "cifar10", "data_root": str(tmp_path / "data")}

    def training():
        (dataset,) = [i.dataset for i in tracking_ui.dataset_inputs(config) if i.tags[0].value == "training"]
        return dataset

    first = training()
    assert (first.name, first.source_type, json.loads(first.source)) == ("cifar10", "local", {"uri": str(folder)})
    (folder / "images" / "class0" / "0.png").write_bytes(b"png")
    assert training().digest == first.digest
    (folder / "data_batch_1").write_bytes(b"x" * 11)
    assert training().digest != first.digest


def one_warning(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("cll: warning: MLflow tracking skipped"), err
    return err


def test_unreachable_store_is_one_warning(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/no/such/dir/mlflow.db")
    assert tracking.track(tmp_path / "run", "exp") is None
    one_warning(capsys.readouterr().err)
    assert main(["track", "init", "--experiment", "exp"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and one_warning(err)


def test_missing_mlflow_is_one_warning(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    assert tracking.track(tmp_path / "run", "exp") is None
    assert "ModuleNotFoundError" in one_warning(capsys.readouterr().err)


def test_run_dir_without_train_json_is_one_warning(tmp_path, store, capsys):
    assert tracking.track(tmp_path / "empty", "exp") is None
    assert "train.json" in one_warning(capsys.readouterr().err)


def test_backfill_logs_what_jobs_could_not_and_nothing_twice(tmp_path, store):
    """A run whose certify job could not log (only train reached MLflow) and a run no job could
    log are both completed by the back-fill, into one run each; a second back-fill does nothing."""
    partly, never = tmp_path / "partly", tmp_path / "never"
    write_run(partly)
    partly_id = tracking.track(partly, "exp")  # the train job logged, then the tracker went away
    write_certify(partly)
    write_run(never)
    write_certify(never, clean=0.7)
    assert tracking.backfill([partly, never, tmp_path / "not-trained"], "exp") == (2, 0)
    assert tracking.backfill([partly, never], "exp") == (0, 2)

    runs = {r.data.tags["cll.run_dir"]: r for r in runs_of(store, "exp")}
    assert sorted(runs) == sorted([str(partly.resolve()), str(never.resolve())])
    assert runs[str(partly.resolve())].info.run_id == partly_id
    for run in runs.values():
        assert run.data.tags["cll.stage"] == "certify"
        assert [m.step for m in store.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
        assert len(store.get_metric_history(run.info.run_id, "clean_accuracy")) == 1
    assert runs[str(never.resolve())].data.metrics["clean_accuracy"] == 0.7

    write_certify(never, clean=0.75)  # certify rerun: the new value is logged, once
    assert tracking.backfill([partly, never], "exp") == (1, 1)
    never_id = runs[str(never.resolve())].info.run_id
    assert [m.value for m in store.get_metric_history(never_id, "clean_accuracy")] == [0.7, 0.75]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path, port):
    """`mlflow server` on 127.0.0.1 (as on a login node), with one worker and no job runner so
    that it starts in a few seconds; returns the process once /health answers."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (the server process keeps writing to it)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")


def _stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it has not ended 20 s later."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.slow(seconds=30)
def test_tracking_server_down_during_jobs_then_backfilled_by_aggregate(tmp_path, monkeypatch, capsys):
    """The cluster case: train and certify jobs (with the grid row's --method, as the workflow
    runs them) find no tracking server (each succeeds with one warning), one certify job finds it
    up, and `cll aggregate --track` (the workflow's aggregate step) logs the rest: one MLflow run
    per cell, none lost, none twice."""
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    grid = moons_grid(
        "cluster",
        tmp_path / "results",
        "moons",
        p=[0.25, 0.01],
        set={"epochs": 2, "batch_size": 100, "max_test": 200, "cll_form": "per_logit", "lr": 5.0e-3},
    )
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    first, second = (str(c.path(grid["results"])) for c in load_grid(grid_file).runnable())
    sets = [
        "--set",
        "dataset=moons",
        "arch=moons-mlp",
        "loss=cll",
        "eps=0.15",
        "epochs=2",
        "batch_size=100",
        "max_test=200",
        "cll_form=per_logit",
        "lr=5.0e-3",
    ]

    assert main(["train", "--out", first, "--track", "cluster", "--method", "CLL", *sets, "p=0.25"]) == 0
    assert main(["certify", "--run", first, "--track", "cluster", "--method", "CLL"]) == 0
    assert main(["train", "--out", second, "--track", "cluster", "--method", "CLL", *sets, "p=0.01"]) == 0
    err = capsys.readouterr().err
    assert err.count("cll: warning: MLflow tracking skipped") == 3, err

    server = _start_server(tmp_path, port)
    try:
        assert main(["certify", "--run", second, "--track", "cluster", "--method", "CLL"]) == 0
        assert "warning" not in capsys.readouterr().err
        assert main(["aggregate", "--grid", str(grid_file), "--track", "cluster"]) == 0
        out, err = capsys.readouterr()
        assert "MLflow: 1 runs logged now, 1 already up to date" in out and "warning" not in err, out + err
        assert main(["aggregate", "--grid", str(grid_file), "--track", "cluster"]) == 0
        assert "MLflow: 0 runs logged now, 2 already up to date" in capsys.readouterr().out

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
        (summary_run,) = [r for r in runs if r.info.run_name == "summary"]  # aggregate's summary.csv
        assert [a.path for a in client.list_artifacts(summary_run.info.run_id)] == ["summary.csv"]
        runs = [r for r in runs if r != summary_run]
        assert sorted(r.data.tags["cll.run_dir"] for r in runs) == sorted(
            str(Path(d).resolve()) for d in (first, second)
        )
        for run in runs:
            assert run.data.tags["cll.stage"] == "certify"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
            assert len(client.get_metric_history(run.info.run_id, "clean_accuracy")) == 1
            # the moons checkpoint is far below the 20 MB default: logged, for download from the UI
            artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
            assert artifacts == ["certify.json", "model.pt", "train.json"]
    finally:
        _stop_server(server)


# ----------------------------------------------------------- names people read, audit, artifacts
def write_audit(run, broken=0):
    """audit.json as cll audit writes it (the fields tracking reads), with chosen numbers."""
    per_eps = {
        "0.15": {"sampled": 100, "correct": 95, "certified": 80, "attacked": 80, "broken": broken},
        "0.1412": {"sampled": 100, "correct": 95, "certified": 81, "attacked": 81, "broken": 0},
    }
    audit = {
        "per_eps": per_eps,
        "own_radius": {"attacked": 90, "broken": 0},
        "tightness": {"quantiles": {"min": 1.1, "median": 1.8, "max": 4.0}, "points": 90},
        "lipschitz_tightness": 0.42,
        "broken": broken,
        "attacks": ["pgd"],
    }
    (run / "audit.json").write_text(json.dumps(audit))


def test_metric_names_say_the_radius_as_the_tables_do():
    assert tracking.metric_name("cra", "0.1412") == "cra_36_255"
    assert tracking.metric_name("cra_estimate", "0.4235") == "cra_estimate_108_255"
    assert tracking.metric_name("cra", "0.15") == "cra_0.15"
    assert tracking.metric_name("cra", "0.2") == "cra_0.2"  # 51/255 too, but not one of the tables' radii


def test_grid_jobs_name_the_run_by_method_and_cell_and_log_the_audit(tmp_path, store):
    run = tmp_path / "run"
    write_run(run)
    run_id = tracking.track(run, "exp", "CLL")
    write_certify(run)
    write_audit(run)
    assert tracking.track(run, "exp", "CLL") == run_id
    logged = store.get_run(run_id)
    assert logged.info.run_name == "CLL moons-mlp moons eps0.15 p0.01 seed0"
    assert (logged.data.tags["cll.method"], logged.data.tags["cll.stage"]) == ("CLL", "audit")
    metrics = logged.data.metrics
    assert (metrics["audit_broken"], metrics["audit_broken_0.15"], metrics["audit_attacked_36_255"]) == (0, 0, 81)
    assert (metrics["audit_own_radius_broken"], metrics["audit_tightness_median"]) == (0, 1.8)
    assert metrics["audit_lipschitz_tightness"] == 0.42
    assert "audit.json" in {a.path for a in store.list_artifacts(run_id)}
    # a hand rerun without --method keeps the name the grid gave
    write_certify(run, clean=0.95)
    tracking.track(run, "exp")
    assert store.get_run(run_id).info.run_name == "CLL moons-mlp moons eps0.15 p0.01 seed0"


@pytest.mark.parametrize("limit, logged", [(None, True), ("0.001", False), ("0", False)])
def test_checkpoint_is_logged_when_small(tmp_path, store, monkeypatch, limit, logged):
    run = tmp_path / "run"
    write_run(run)
    (run / "model.pt").write_bytes(b"x" * 5000)  # 5 kB: under the default 20 MB, over 0.001 MB (1 kB)
    if limit is not None:
        monkeypatch.setenv("CLL_TRACK_CHECKPOINT_MB", limit)
    run_id = tracking.track(run, "exp")
    artifacts = {a.path: a.file_size for a in store.list_artifacts(run_id)}
    assert ("model.pt" in artifacts) == logged
    if logged:
        assert artifacts["model.pt"] == 5000


def test_bad_checkpoint_limit_is_one_warning(tmp_path, store, monkeypatch, capsys):
    write_run(tmp_path / "run")
    monkeypatch.setenv("CLL_TRACK_CHECKPOINT_MB", "twenty")
    assert tracking.track(tmp_path / "run", "exp") is None
    assert "CLL_TRACK_CHECKPOINT_MB='twenty' is not a number" in one_warning(capsys.readouterr().err)


def test_tables_and_figures_go_into_the_summary_run(tmp_path, store, capsys):
    """`cll aggregate/tables/figures --track` put summary.csv, the tables with the reproduction
    counts as metrics, and the figures into one run named summary."""
    from fake_results import GRID, with_published, write_fake_tree

    grid_path, root = write_fake_tree(tmp_path, with_published(GRID))
    assert main(["aggregate", "--grid", str(grid_path), "--results", str(root), "--track", "exp"]) == 0
    summary = str(root / "summary.csv")
    assert main(["tables", "--summary", summary, "--track", "exp"]) == 0
    assert main(["figures", "--summary", summary, "--track", "exp"]) == 0
    assert main(["tables", "--summary", summary, "--track", "exp"]) == 0  # a rebuild: the same run
    assert "warning" not in capsys.readouterr().err
    runs = runs_of(store, "exp")
    (summary_run,) = [r for r in runs if r.info.run_name == "summary"]
    assert len(runs) == 1 + 8  # the summary run and the fake tree's done cells, named by method
    assert {r.info.run_name for r in runs} >= {"GloRo 4C3F digits eps0.15 p0.3 seed1", "summary"}
    paths = {a.path for a in store.list_artifacts(summary_run.info.run_id)}
    assert {"summary.csv", "tables", "figures"} <= paths
    tables = {a.path for a in store.list_artifacts(summary_run.info.run_id, "tables")}
    assert {"tables/digits.md", "tables/reproduction.md", "tables/moons.tex"} <= tables
    figures = {a.path for a in store.list_artifacts(summary_run.info.run_id, "figures")}
    assert "figures/slack_vs_k.png" in figures
    metrics = summary_run.data.metrics
    assert (metrics["reproduction_within_std"], metrics["reproduction_off"], metrics["reproduction_not_run"]) == (
        1,
        1,
        2,
    )


# ------------------------------------------------------------------- the UI, in a real browser
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _browse(url: str, profile: Path, screenshot: Path) -> str:
    """The DOM of ``url`` after headless Chromium has rendered it (20 s of virtual time), and a
    screenshot of the same page into ``screenshot``."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1800,1000",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=30000",
    ]
    shot = subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={profile}-shot", f"--screenshot={screenshot}", url],
        capture_output=True,
        timeout=180,
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={profile}-dom", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


@pytest.mark.slow(seconds=20)
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)")
def test_mlflow_ui_shows_metric_columns_and_a_run_chart(tmp_path, monkeypatch):
    """Two grid-style runs (named by method, with certify and audit results) in a real `mlflow
    server`, looked at in headless Chromium: the experiment's address in the Model-training mode
    opens the runs table (not the GenAI overview) with the run names and the data set in the
    Dataset column; the address tracking gives (``ui_url``) adds its view ``cll``, with the metric
    columns clean_accuracy, cra_36_255, cra_0.15, k_hf, lipschitz_constant, audit_broken; and one
    run's chart of train_loss over epochs. Screenshots go to $CLL_SCREENSHOTS (default: the test's
    tmp dir)."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    shots = Path(os.environ.get("CLL_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    server = _start_server(tmp_path, port)
    try:
        ids = []
        for p, clean in ((0.01, 0.97), (0.25, 0.9)):
            run = tmp_path / f"run{p}"
            write_run(run, epochs=8, config={**CONFIG, "p": p})
            write_certify(run, clean=clean)
            write_audit(run)
            ids.append(tracking.log_run_dir(run, "ui", "CLL"))
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp_id = client.get_experiment_by_name("ui").experiment_id
        names = ["CLL moons-mlp moons eps0.15 p0.01 seed0", "CLL moons-mlp moons eps0.15 p0.25 seed0"]
        (training,) = [i.dataset for i in client.get_run(ids[0]).inputs.dataset_inputs if i.tags[0].value == "training"]

        # MLflow 3.17 opens an experiment as its sidebar switch says (GenAI until a browser picks
        # Model training): the experiment's plain address in the Model-training mode
        landing_dom = _browse(
            f"{uri}/#/experiments/{exp_id}?workflowType=machine_learning",
            tmp_path / "chrome",
            shots / "mlflow_experiment.png",
        )
        for text in names:
            assert text in landing_dom, text
        assert "No data available" not in landing_dom  # the GenAI overview's empty trace charts
        assert f'title="moons ({training.digest})"' in landing_dom  # the Dataset column: name (digest)

        runs_dom = _browse(tracking_ui.ui_url(exp_id, uri), tmp_path / "chrome", shots / "mlflow_runs.png")
        for text in names + ["cll: certified accuracy"]:  # the view's name on the Views button
            assert text in runs_dom, text
        for metric in ("clean_accuracy", "cra_36_255", "cra_0.15", "k_hf", "lipschitz_constant", "audit_broken"):
            assert f'col-id="metrics.`{metric}`"' in runs_dom, metric  # a header cell
        query = {  # the state the UI's metric page keeps in its URL, JSON-encoded values
            "runs": [ids[0]],
            "metric": "train_loss",
            "experiments": [exp_id],
            "plot_metric_keys": ["train_loss", "train_accuracy"],
            "plot_layout": {},
            "x_axis": "step",
            "y_axis_scale": "linear",
            "line_smoothness": 1,
            "show_point": True,
            "deselected_curves": [],
            "last_linear_y_axis_range": [],
        }
        chart = f"{uri}/#/metric/train_loss?" + urllib.parse.urlencode(
            {
                k: v if isinstance(v, str) and k in ("x_axis", "y_axis_scale") else json.dumps(v)
                for k, v in query.items()
            }
        )
        chart_dom = _browse(chart, tmp_path / "chrome", shots / "mlflow_run_chart.png")
        assert "train_loss" in chart_dom and "CLL moons-mlp moons eps0.15 p0.01 seed0" in chart_dom
        assert "(step=8)" in chart_dom  # the metric table below the chart: the last epoch's value
    finally:
        _stop_server(server)
