"""Tests for ``cll.tracking``: one MLflow run per run directory (train and certify log into the
same run, reruns add nothing twice), and a tracking failure is one warning line, never an error.

The run directories here are written by hand (train.json, certify.json): tracking only reads
those files, so no model is trained. MLflow logs into a sqlite file under tmp_path.
"""
from __future__ import annotations

import json
import sys

import pytest

from cll import tracking
from cll.cli import main

CONFIG = {"dataset": "moons", "arch": "moons-mlp", "loss": "cll", "eps": 0.15, "p": 0.01, "seed": 0,
          "epochs": 3, "certify_eps": [0.15, 0.1411764705882353], "milestones": None}


def write_run(run, epochs=3, config=CONFIG):
    run.mkdir(parents=True, exist_ok=True)
    history = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5 + 0.1 * e, "lipschitz_estimate": 10.0 + e,
                "lr": 1e-3, "seconds": 0.1} for e in range(1, epochs + 1)]
    (run / "train.json").write_text(json.dumps({"config": config, "epochs": history, "wall_time": 0.3,
                                                "lipschitz_bound": 13.5, "k_hf": 35.29}))


def write_certify(run, clean=0.9):
    (run / "certify.json").write_text(json.dumps({
        "clean_accuracy": clean, "cra": {"0.15": 0.8, "0.1412": 0.81}, "cra_estimate": {"0.15": 0.8},
        "lipschitz_constant": 13.5, "lipschitz_estimate": 13.4, "lipschitz_body": 6.0, "n_samples": 500,
        "k_hf": 35.29, "eps": [0.15, 0.1412], "seconds": 0.01}))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An MLflow client on a fresh sqlite file; the cwd is tmp_path (artifacts go to ./mlruns)."""
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
    assert logged.data.tags["mlflow.runName"] == "moons/moons-mlp/cll/eps0.15_p0.01/seed0"
    assert logged.data.params["p"] == "0.01" and logged.data.params["milestones"] == "null"
    assert logged.data.metrics["clean_accuracy"] == 0.9 and logged.data.metrics["cra_0.1412"] == 0.81
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
    assert store.get_experiment_by_name("grid") is not None


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
