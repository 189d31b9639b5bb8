"""Tests for the ``cll`` command: ``cll list``, one-line errors that write nothing, a tiny train +
certify end to end, refusing to overwrite a run with another config, and resuming a finished run.

Most tests call ``cll.cli.main`` in-process; three run the installed console script to prove the
real entry point prints one line on stderr, no traceback, and exits with 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli

from cll.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "moons.yaml")
TINY = ["--set", "epochs=2", "max_train=200", "max_test=500", "batch_size=100"]
CLL_SCRIPT = Path(sys.executable).with_name("cll")


def assert_one_line_error(rc: int, out: str, err: str) -> str:
    """Exit code 2, nothing on stdout, exactly one line on stderr and no traceback."""
    assert rc == 2, (rc, out, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err
    assert "error" in err
    return err.strip()


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of every file of a run directory."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny CLL moons run, trained once for the module (copy it before changing it)."""
    run = tmp_path_factory.mktemp("shared") / "run"
    assert main(["train", "--config", EXAMPLE, "--out", str(run), *TINY]) == 0
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ----------------------------------------------------------------------------- cll list
def test_list_prints_registered_names(capsys):
    rc, out, err = cli(capsys, "list")
    assert rc == 0 and err == ""
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in out.splitlines()}
    archs = [a.strip() for a in lines["architectures"].split(",")]
    assert {"2C2F", "4C3F", "6C2F", "8C2F", "moons-mlp"} <= set(archs)
    assert {"cll", "gloro", "ce"} <= {a.strip() for a in lines["losses"].split(",")}
    assert {"moons", "digits", "mnist", "cifar10", "cifar100", "tinyimagenet"} <= {
        a.strip() for a in lines["datasets"].split(",")
    }
    assert "certify_eps" in lines["config keys"] and "lip_penalty" in lines["config keys"]


# ------------------------------------------------------------ bad input: one line, no files
def test_train_missing_config_writes_nothing(capsys, tmp_path):
    out_dir = tmp_path / "out"
    missing = tmp_path / "missing.yaml"
    msg = assert_one_line_error(*cli(capsys, "train", "--config", str(missing), "--out", str(out_dir)))
    assert str(missing) in msg
    assert not out_dir.exists()


def test_train_bad_value_writes_nothing(capsys, tmp_path):
    out_dir = tmp_path / "out"
    msg = assert_one_line_error(*cli(capsys, "train", "--config", EXAMPLE, "--out", str(out_dir), "--set", "p=2"))
    assert "p: 2" in msg and "(0, 1)" in msg
    assert not out_dir.exists()
    out_dir.mkdir()  # an existing empty directory stays empty
    assert_one_line_error(*cli(capsys, "train", "--config", EXAMPLE, "--out", str(out_dir), "--set", "lr_rate=0.1"))
    assert list(out_dir.iterdir()) == []


def test_train_bad_override_syntax(capsys, tmp_path):
    msg = assert_one_line_error(
        *cli(capsys, "train", "--config", EXAMPLE, "--out", str(tmp_path / "o"), "--set", "novalue")
    )
    assert "novalue" in msg
    assert not (tmp_path / "o").exists()


def test_train_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep me\n")
    msg = assert_one_line_error(*cli(capsys, "train", "--config", EXAMPLE, "--out", str(target), *TINY))
    assert str(target) in msg
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize(
    "argv, names",
    [
        (["bogus"], "bogus"),
        ([], "command"),
        (["train", "--config", EXAMPLE], "--out"),
        (["certify"], "--run"),
        (["certify", "--run", "x", "--device", "tpu"], "tpu"),
        (["certify", "--run", "x", "--batch-size", "0"], "--batch-size"),
        (["certify", "--run", "x", "--batch-size", "-3"], "--batch-size"),
        (["certify", "--run", "x", "--batch-size", "ten"], "--batch-size"),
        (["train", "--out", "x", "--set"], "--set"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_argparse_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, names):
    monkeypatch.chdir(tmp_path)  # relative paths such as "x" must not be created anywhere
    msg = assert_one_line_error(*cli(capsys, *argv))
    assert names in msg
    assert list(tmp_path.iterdir()) == []


def test_certify_without_model(capsys, tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    msg = assert_one_line_error(*cli(capsys, "certify", "--run", str(run)))
    assert "model.pt" in msg
    assert list(run.iterdir()) == []
    assert_one_line_error(*cli(capsys, "certify", "--run", str(tmp_path / "absent")))
    assert not (tmp_path / "absent").exists()


def test_corrupt_checkpoint_is_one_line_and_kept(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    model = run / "model.pt"
    model.write_bytes(os.urandom(37))
    before = snapshot(run)
    msg = assert_one_line_error(*cli(capsys, "certify", "--run", str(run)))
    assert "model.pt" in msg
    assert snapshot(run) == before  # not deleted, not changed, no certify.json
    # training into it does not overwrite it either
    msg = assert_one_line_error(*cli(capsys, "train", "--config", EXAMPLE, "--out", str(run), *TINY))
    assert "model.pt" in msg
    assert snapshot(run) == before


def test_truncated_checkpoint_is_one_line_and_kept(capsys, run_copy):
    model = run_copy / "model.pt"
    model.write_bytes(model.read_bytes()[:200])
    (run_copy / "certify.json").unlink(missing_ok=True)
    before = snapshot(run_copy)
    assert_one_line_error(*cli(capsys, "certify", "--run", str(run_copy)))
    assert snapshot(run_copy) == before


def test_foreign_checkpoint_is_one_line(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"weights": torch.zeros(3)}, run / "model.pt")
    before = snapshot(run)
    assert_one_line_error(*cli(capsys, "certify", "--run", str(run)))
    assert snapshot(run) == before


# ------------------------------------------------------------------------- end to end
def test_train_and_certify_end_to_end(capsys, tmp_path):
    run = tmp_path / "tmp"
    rc, out, err = cli(capsys, "train", "--config", EXAMPLE, "--out", str(run), *TINY)
    assert rc == 0, err
    assert out.count("\n") == 1 and out.startswith("trained moons-mlp on moons (cll)")
    assert "epoch 2/2" in err
    assert (run / "model.pt").is_file() and (run / "train.json").is_file()
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries

    train = json.loads((run / "train.json").read_text())
    cfg = train["config"]
    assert cfg["p"] == 0.01 and cfg["eps"] == 0.15 and cfg["cll_form"] == "per_logit"
    assert cfg["epochs"] == 2 and cfg["max_train"] == 200 and cfg["max_test"] == 500
    assert cfg["batch_size"] == 100
    assert cfg["optimizer"] == "adamw" and cfg["pi_iters"] == 5  # defaults are resolved, not omitted
    assert len(train["epochs"]) == 2
    for i, epoch in enumerate(train["epochs"]):
        assert epoch["epoch"] == i + 1
        assert math.isfinite(epoch["loss"])
        assert 0 <= epoch["accuracy"] <= 1
        assert epoch["lipschitz_estimate"] > 0
    assert train["wall_time"] >= 0

    rc, out, err = cli(capsys, "certify", "--run", str(run))
    assert rc == 0, err
    assert out.count("\n") == 1 and "CRA@0.15" in out
    cert = json.loads((run / "certify.json").read_text())
    assert {"clean_accuracy", "cra", "lipschitz_constant", "k_hf", "n_samples"} <= set(cert)
    assert 0 <= cert["clean_accuracy"] <= 1
    assert list(cert["cra"]) == ["0.15"]
    assert 0 <= cert["cra"]["0.15"] <= cert["clean_accuracy"]
    assert cert["lipschitz_constant"] > 0
    assert cert["k_hf"] == pytest.approx(math.log((2 - 0.01) / 0.01) / 0.15)
    assert cert["n_samples"] == 500


def test_gloro_has_no_k_hf(capsys, tmp_path):
    run = tmp_path / "gloro"
    rc, _, err = cli(capsys, "train", "--config", EXAMPLE, "--out", str(run), *TINY, "loss=gloro")
    assert rc == 0, err
    assert json.loads((run / "train.json").read_text())["config"]["loss"] == "gloro"
    rc, _, err = cli(capsys, "certify", "--run", str(run))
    assert rc == 0, err
    cert = json.loads((run / "certify.json").read_text())
    assert "k_hf" in cert and cert["k_hf"] is None
    assert cert["n_samples"] == 500


def test_certify_eps_arguments(capsys, run_copy):
    rc, out, err = cli(capsys, "certify", "--run", str(run_copy), "--eps", "36/255", "0.5")
    assert rc == 0, err
    cert = json.loads((run_copy / "certify.json").read_text())
    assert list(cert["cra"]) == ["0.1412", "0.5"]
    assert cert["eps"] == pytest.approx([36 / 255, 0.5])
    assert all(0 <= v <= 1 for v in cert["cra"].values())
    assert cert["cra"]["0.5"] <= cert["cra"]["0.1412"]  # a larger radius certifies no more
    assert "CRA@0.1412" in out and "CRA@0.5" in out


def test_certify_batch_size_does_not_change_results(capsys, run_copy):
    assert cli(capsys, "certify", "--run", str(run_copy))[0] == 0
    default = json.loads((run_copy / "certify.json").read_text())
    assert cli(capsys, "certify", "--run", str(run_copy), "--batch-size", "7")[0] == 0
    small = json.loads((run_copy / "certify.json").read_text())
    assert small["n_samples"] == default["n_samples"] == 500
    assert small["clean_accuracy"] == default["clean_accuracy"]
    assert small["cra"] == default["cra"]


@pytest.mark.parametrize("eps", [["0"], ["-0.1"], ["abc"], ["1/0"], ["0.1", "nan"]])
def test_certify_bad_eps_writes_nothing(capsys, run_copy, eps):
    before = snapshot(run_copy)
    msg = assert_one_line_error(*cli(capsys, "certify", "--run", str(run_copy), "--eps", *eps))
    assert "--eps" in msg
    assert snapshot(run_copy) == before


# ------------------------------------------------------------- existing runs are kept
@pytest.mark.parametrize("change, key", [("p=0.25", "p"), ("epochs=3", "epochs")])
def test_other_config_into_existing_run_is_refused(capsys, run_copy, change, key):
    before = snapshot(run_copy)
    msg = assert_one_line_error(*cli(capsys, "train", "--config", EXAMPLE, "--out", str(run_copy), *TINY, change))
    assert f"differs in {key}" in msg
    assert str(run_copy) in msg
    assert snapshot(run_copy) == before  # model.pt and train.json untouched


def test_identical_rerun_does_not_retrain(capsys, run_copy):
    model_before = (run_copy / "model.pt").read_bytes()
    train_before = json.loads((run_copy / "train.json").read_text())
    rc, _out, err = cli(capsys, "train", "--config", EXAMPLE, "--out", str(run_copy), *TINY)
    assert rc == 0, err
    assert "already trained" in err
    assert "loss" not in err  # no epoch was run again (each epoch logs its loss)
    assert (run_copy / "model.pt").read_bytes() == model_before
    train_after = json.loads((run_copy / "train.json").read_text())
    assert train_after["epochs"] == train_before["epochs"]
    assert train_after["config"] == train_before["config"]


# ---------------------------------------------------------- the installed console script
def script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    if not CLL_SCRIPT.is_file():
        pytest.skip(f"console script {CLL_SCRIPT} is not installed")
    return subprocess.run([str(CLL_SCRIPT), *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_script_one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), repr(proc.stderr)
    return proc.stderr


@pytest.mark.slow
def test_script_missing_config(tmp_path):
    err = assert_script_one_line(script("train", "--config", "missing.yaml", "--out", "DIR", cwd=tmp_path))
    assert err.startswith("cll: error:") and "missing.yaml" in err
    assert list(tmp_path.iterdir()) == []


def test_script_unknown_subcommand(tmp_path):
    err = assert_script_one_line(script("bogus", cwd=tmp_path))
    assert "bogus" in err


@pytest.mark.slow
def test_script_corrupt_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02not a checkpoint")
    before = snapshot(tmp_path)
    err = assert_script_one_line(script("certify", "--run", ".", cwd=tmp_path))
    assert err.startswith("cll: error:") and "model.pt" in err
    assert snapshot(tmp_path) == before
