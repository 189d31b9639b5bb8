"""Reliability: the attack audit, resume after kill -9, atomic files, a table of malformed inputs
over every user-facing entry, divergence of K, and parallel jobs logging into one MLflow store.

Everything trains tiny moons runs on the CPU (seconds each). The subprocess tests run the
installed ``cll`` console script with one thread, like a Snakemake job.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cli, moons_grid

from cll import results
from cll.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "moons.yaml")
CLL = Path(sys.executable).with_name("cll")
# A moons run that certifies most points at 0.15 after a few seconds of training.
QUICK = ["batch_size=250", "lr=0.01", "epochs=12", "max_test=400", "eval_batch_size=400"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cll(*argv: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    if not CLL.is_file():
        pytest.fail(f"console script {CLL} is not installed (pip install -e .)")
    return subprocess.run([str(CLL), *argv], capture_output=True, text=True, timeout=timeout, env=ENV, **kwargs)


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of every file under ``root``."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory) -> Path:
    """One trained and certified moons run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("moons") / "run"
    assert main(["train", "--config", EXAMPLE, "--out", str(run), "--set", *QUICK]) == 0
    assert main(["certify", "--run", str(run)]) == 0
    return run


@pytest.fixture
def results_tree(moons_run, tmp_path) -> Path:
    """A results/ tree holding a finished run (model.pt, train.json, certify.json)."""
    root = tmp_path / "results"
    shutil.copytree(moons_run, root / "runs" / "moons" / "seed0")
    return root


def run_of(root: Path) -> Path:
    return root / "runs" / "moons" / "seed0"


# ------------------------------------------------------------------------------- the audit
def test_audit_attacks_every_certified_point_and_breaks_none(capsys, results_tree):
    run = run_of(results_tree)
    rc, out, err = cli(
        capsys, "audit", "--run", str(run), "--n", "150", "--steps", "20", "--restarts", "1", "--eps", "0.15", "0.6"
    )
    assert rc == 0, err
    audit = json.loads((run / results.AUDIT).read_text())
    assert audit["n_samples"] == 150 and audit["broken"] == 0
    assert len(audit["attacks"]) == 5 and audit["attacks"][1].startswith("apgd-l2-dlr")
    assert audit["attacks"][3].startswith("fmn-l2") and audit["attacks"][4].startswith("pair ascent")
    # every correct point with a radius, attacked at its own radius: none broken, none nearer than it
    own, tight = audit["own_radius"], audit["tightness"]
    assert own["attacked"] > 100 and own["broken"] == 0
    assert tight["points"] + tight["no_adversarial_found"] == own["attacked"]
    assert tight["quantiles"]["min"] >= 1 and tight["quantiles"]["median"] < 10
    assert 0 < audit["lipschitz_lower"] <= audit["lipschitz_upper"] and not audit["bound_broken"]
    small, large = audit["per_eps"]["0.15"], audit["per_eps"]["0.6"]
    for counts in (small, large):
        assert counts["sampled"] == 150
        assert counts["attacked"] == counts["certified"]  # every certified point is attacked
        assert counts["broken"] == counts["broken_float32"] == counts["broken_float64"] == 0
        assert counts["certified"] + counts["uncertified_attacked"] >= counts["correct"]
    assert small["certified"] > 100  # something to attack
    # the same attack does break correct points where no certificate protects them
    assert large["uncertified_attacked"] > 50 and large["uncertified_broken"] > 0.5 * large["uncertified_attacked"]
    assert "eps 0.15:" in out and "0 broken" in out


def test_an_unsound_certificate_fails_the_audit_loudly(capsys, results_tree, monkeypatch):
    """Pretend K_F were 20x smaller (as a bound that under-estimates would): the audit finds
    certified points it can break, writes them down and exits 1 with one line. The certifier
    multiplies per-layer bounds, so the first layer's (the only one seeing the 2-d input) shrinks."""
    from cll.lipschitz import bound

    real = bound.upper_bound_layer
    monkeypatch.setattr(
        bound,
        "upper_bound_layer",
        lambda layer, shape, *a, **k: real(layer, shape, *a, **k) / (20 if tuple(shape) == (2,) else 1),
    )
    run = run_of(results_tree)
    rc, _out, err = cli(
        capsys, "audit", "--run", str(run), "--n", "100", "--steps", "20", "--restarts", "1", "--eps", "0.3"
    )
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("cll: error")]  # the rest: progress
    assert len(errors) == 1 and err.splitlines()[-1].startswith("cll: error: BROKEN CERTIFICATE in ")
    audit = json.loads((run / results.AUDIT).read_text())
    assert audit["per_eps"]["0.3"]["broken"] > 0 and audit["own_radius"]["broken"] > 0
    parts = audit["per_eps"]["0.3"]["broken"] + audit["own_radius"]["broken"] + audit["bound_broken"]
    assert audit["broken"] == parts


@pytest.mark.workflow
def test_audit_rule_is_in_the_workflow(tmp_path):
    """One audit job per runnable cell, required by all_tables (dry run of the CI grid)."""
    snakemake = Path(sys.executable).with_name("snakemake")
    proc = subprocess.run(
        [
            str(snakemake),
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--directory",
            str(tmp_path),
            "-n",
            "-p",
            "all_tables",
            "--configfile",
            str(ROOT / ".test" / "config.yaml"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = [line.removeprefix("Shell command: ") for line in proc.stdout.splitlines()]
    lines = [line for line in commands if line.startswith("cll audit --run ")]
    certify = [line for line in commands if line.startswith("cll certify --run ")]
    assert len(lines) == len(certify) == 5
    # Each row's audit budget reaches its command (moons rows n=100, digits rows n=50).
    for line in lines:
        budget = "--n 100 --steps 10" if "/moons/" in line else "--n 50 --steps 10"
        assert budget in line and "audit" in line.split(" > ")[1], line


# ----------------------------------------------------------------------- resume after kill -9
def _history(run: Path) -> list[dict]:
    """train.json's per-epoch numbers without the wall-clock ones."""
    epochs = json.loads((run / results.TRAIN).read_text())["epochs"]
    return [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]


@pytest.mark.slow(seconds=35)
def test_kill_9_at_random_moments_then_rerun_ends_like_an_uninterrupted_run(tmp_path):
    argv = [
        "train",
        "--config",
        EXAMPLE,
        "--set",
        "epochs=6",
        "batch_size=100",
        "lr=0.01",
        "max_test=200",
        "checkpoint_every=1",
        "deterministic=true",
    ]
    whole = tmp_path / "whole"
    assert run_cll(*argv, "--out", str(whole)).returncode == 0

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    cut = tmp_path / "cut"
    kills = []
    for _ in range(2):  # killed twice, each time at a random moment after some epoch started
        after_epoch = rng.randint(1, 4)
        delay = rng.uniform(0.0, 0.5)
        proc = subprocess.Popen([str(CLL), *argv, "--out", str(cut)], stderr=subprocess.PIPE, text=True, env=ENV)
        for line in proc.stderr:
            if line.startswith(f"epoch {after_epoch}/") or line.startswith("trained") or "already" in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        kills.append((after_epoch, round(delay, 3), proc.returncode))
        if (cut / results.MODEL).exists():  # whatever is on disk is a whole checkpoint
            state = torch.load(cut / results.MODEL, weights_only=False)
            assert 1 <= state["epoch"] <= 6, kills
        if (cut / results.TRAIN).exists():  # train.json is written last: only a finished run has it
            assert json.loads((cut / results.TRAIN).read_text())["epochs"][-1]["epoch"] == 6, kills
    assert kills[0][2] == -signal.SIGKILL, kills  # the first kill at least hit a running job
    rerun = run_cll(*argv, "--out", str(cut))
    assert rerun.returncode == 0, (seed, kills, rerun.stderr[-2000:])
    assert _history(cut) == _history(whole), (seed, kills)
    a = torch.load(whole / results.MODEL, weights_only=False)["model"]
    b = torch.load(cut / results.MODEL, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), (seed, kills)
    assert (
        json.loads((cut / results.TRAIN).read_text())["lipschitz_bound"]
        == json.loads((whole / results.TRAIN).read_text())["lipschitz_bound"]
    )


def test_kill_9_while_a_file_is_written_leaves_the_old_file(tmp_path):
    """results._atomic writes a temporary file and renames it: a process killed half-way through
    the write leaves the previous content under the real name, never a partial file (which a
    workflow would take for a finished output)."""
    target = tmp_path / "certify.json"
    results.write_json(target, {"good": 1})
    code = (
        "import os, sys; from cll import results\n"
        "def half(f):\n"
        "    f.write(b'{\"partial')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), 9)\n"
        "results._atomic(sys.argv[1], half)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"good": 1}
    fresh = tmp_path / "train.json"  # a file written for the first time does not appear at all
    proc = subprocess.run([sys.executable, "-c", code, str(fresh)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and not fresh.exists()


# ------------------------------------------------------------------------------- divergence
def test_k_going_to_infinity_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from cll import lipschitz
    from cll.config import load_config
    from cll.train import TrainingDiverged, train

    real, calls = lipschitz.estimate_converged_body, []

    def inf_from_epoch_3(*args, **kwargs):  # the loss stays finite; only K blows up
        calls.append(1)
        return float("inf") if len(calls) >= 3 else real(*args, **kwargs)

    monkeypatch.setattr(lipschitz, "estimate_converged_body", inf_from_epoch_3)
    cfg = load_config(EXAMPLE, ["epochs=4", "batch_size=500"])
    with pytest.raises(TrainingDiverged, match=r"epoch 3: loss [0-9.]+, K inf; the last good checkpoint"):
        train(cfg, tmp_path, log=lambda line: None)
    state = torch.load(tmp_path / results.MODEL, weights_only=False)
    assert state["epoch"] == 2 and not (tmp_path / results.TRAIN).exists()


# --------------------------------------------------------------------------- malformed inputs
def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: int | None = None) -> None:
    body = bytes(payload if payload is not None else int(np.prod(dims)))
    path.write_bytes(struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + body)


def fake_mnist(root: Path, image_hw=(28, 28), n_test=20, n_test_labels=20) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, n_labels in (("train", 40, 40), ("t10k", n_test, n_test_labels)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", 2051, (n, *image_hw))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", 2049, (n_labels,))
    return root


def fake_cifar10(root: Path, shape=(10, 3072)) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {b"data": np.zeros(shape, dtype=np.uint8), b"labels": [0] * shape[0]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c"] * 10}))
    return root


def _truncate_model(run: Path) -> None:
    model = run / results.MODEL
    model.write_bytes(model.read_bytes()[:300])


def _foreign_weights(run: Path) -> None:
    """A checkpoint whose config is fine but whose weights belong to another architecture."""
    state = torch.load(run / results.MODEL, weights_only=False)
    state["model"] = {k: torch.zeros(3, 3) for k in state["model"]}
    torch.save(state, run / results.MODEL)


def _bad_config_in_checkpoint(run: Path) -> None:
    state = torch.load(run / results.MODEL, weights_only=False)
    state["config"]["p"] = 2.0
    torch.save(state, run / results.MODEL)


def _text(name: str, text: str):
    def make(tmp: Path) -> str:
        (tmp / name).write_text(text)
        return str(tmp / name)

    return make


GRID_ONE_CELL = yaml.safe_dump(moons_grid("e", method="M"))  # moons, moons-mlp, cll, eps 0.15, p 0.01


def _corrupt_cell_train_json(run: Path) -> None:
    """A truncated train.json in the results tree, where GRID_ONE_CELL's cell lives."""
    cell = results.run_dir(run.parents[2], "moons", "moons-mlp", "cll", 0.15, 0.01, 0)
    cell.mkdir(parents=True)
    (cell / results.TRAIN).write_text('{"config": {"trunc')


# Each case: (id, how to build argv from (tmp, results root, run dir), a change to make to the
# run first or None, words the one line must contain). Every case must exit 2 with one line and
# leave every file under results/ as it was (content and mtime), apart from the change itself.
CASES = [
    # run configs and CLI flags of train
    (
        "train-unknown-key",
        lambda t, r, d: [
            "train",
            "--config",
            _text("a.yaml", "dataset: moons\narch: moons-mlp\nloss: cll\nlearning_rate: 1\n")(t),
            "--out",
            str(r / "runs" / "new"),
        ],
        None,
        ["learning_rate"],
    ),
    (
        "train-yaml-syntax",
        lambda t, r, d: [
            "train",
            "--config",
            _text("b.yaml", "dataset: [moons\n")(t),
            "--out",
            str(r / "runs" / "new"),
        ],
        None,
        ["line"],
    ),
    (
        "train-bad-value-into-finished-run",
        lambda t, r, d: ["train", "--config", EXAMPLE, "--out", str(d), "--set", "eps=-1"],
        None,
        ["eps"],
    ),
    (
        "train-other-config-into-finished-run",
        lambda t, r, d: ["train", "--config", EXAMPLE, "--out", str(d), "--set", *QUICK, "lr=0.02"],
        None,
        ["lr"],
    ),
    (
        "train-checkpoint-every-0",
        lambda t, r, d: ["train", "--config", EXAMPLE, "--out", str(r / "runs" / "new"), "--set", "checkpoint_every=0"],
        None,
        ["checkpoint_every"],
    ),
    (
        "train-out-is-results-file",
        lambda t, r, d: ["train", "--config", EXAMPLE, "--out", str(d / results.CERTIFY)],
        None,
        ["is a file"],
    ),
    # data roots and data files
    (
        "data-root-missing",
        lambda t, r, d: [
            "train",
            "--config",
            EXAMPLE,
            "--out",
            str(r / "runs" / "new"),
            "--set",
            "dataset=mnist",
            "arch=2C2F",
            f"data_root={t / 'nowhere'}",
        ],
        None,
        ["mnist", "nowhere"],
    ),
    (
        "data-root-is-a-file",
        lambda t, r, d: [
            "train",
            "--config",
            EXAMPLE,
            "--out",
            str(r / "runs" / "new"),
            "--set",
            "dataset=cifar10",
            "arch=4C3F",
            f"data_root={_text('root.txt', 'x')(t)}",
        ],
        None,
        ["cifar10"],
    ),
    (
        "mnist-images-wrong-shape",
        lambda t, r, d: [
            "train",
            "--config",
            EXAMPLE,
            "--out",
            str(r / "runs" / "new"),
            "--set",
            "dataset=mnist",
            "arch=2C2F",
            f"data_root={fake_mnist(t / 'm1', image_hw=(27, 28))}",
        ],
        None,
        ["mnist", "shape"],
    ),
    (
        "mnist-labels-count",
        lambda t, r, d: [
            "train",
            "--config",
            EXAMPLE,
            "--out",
            str(r / "runs" / "new"),
            "--set",
            "dataset=mnist",
            "arch=2C2F",
            f"data_root={fake_mnist(t / 'm2', n_test_labels=19)}",
        ],
        None,
        ["mnist", "labels"],
    ),
    (
        "cifar-batch-wrong-shape",
        lambda t, r, d: [
            "train",
            "--config",
            EXAMPLE,
            "--out",
            str(r / "runs" / "new"),
            "--set",
            "dataset=cifar10",
            "arch=4C3F",
            f"data_root={fake_cifar10(t / 'c1', shape=(10, 100))}",
        ],
        None,
        ["cifar10"],
    ),
    # checkpoints: certify and audit never touch certify.json (or write audit.json) on failure
    ("certify-truncated-checkpoint", lambda t, r, d: ["certify", "--run", str(d)], _truncate_model, ["model.pt"]),
    ("audit-truncated-checkpoint", lambda t, r, d: ["audit", "--run", str(d)], _truncate_model, ["model.pt"]),
    ("audit-foreign-weights", lambda t, r, d: ["audit", "--run", str(d)], _foreign_weights, ["weights"]),
    ("certify-foreign-weights", lambda t, r, d: ["certify", "--run", str(d)], _foreign_weights, ["weights"]),
    (
        "certify-bad-config-in-checkpoint",
        lambda t, r, d: ["certify", "--run", str(d)],
        _bad_config_in_checkpoint,
        ["p: 2"],
    ),
    ("audit-no-run", lambda t, r, d: ["audit", "--run", str(r / "runs" / "absent")], None, ["model.pt"]),
    # flags of certify and audit
    ("certify-eps-zero", lambda t, r, d: ["certify", "--run", str(d), "--eps", "0"], None, ["--eps"]),
    ("audit-eps-fraction", lambda t, r, d: ["audit", "--run", str(d), "--eps", "1/0"], None, ["--eps"]),
    ("audit-eps-negative", lambda t, r, d: ["audit", "--run", str(d), "--eps", "-0.1"], None, ["--eps"]),
    ("audit-eps-nan", lambda t, r, d: ["audit", "--run", str(d), "--eps", "nan"], None, ["--eps"]),
    ("audit-n-zero", lambda t, r, d: ["audit", "--run", str(d), "--n", "0"], None, ["--n"]),
    ("audit-n-text", lambda t, r, d: ["audit", "--run", str(d), "--n", "many"], None, ["--n"]),
    ("audit-steps-negative", lambda t, r, d: ["audit", "--run", str(d), "--steps", "-5"], None, ["--steps"]),
    ("audit-restarts-zero", lambda t, r, d: ["audit", "--run", str(d), "--restarts", "0"], None, ["--restarts"]),
    ("audit-device", lambda t, r, d: ["audit", "--run", str(d), "--device", "tpu"], None, ["tpu"]),
    # grids, summaries
    (
        "grid-unknown-arch",
        lambda t, r, d: [
            "aggregate",
            "--results",
            str(r),
            "--grid",
            _text("g.yaml", yaml.safe_dump(moons_grid("e", method="M", arch="9C9F")))(t),
        ],
        None,
        ["9C9F"],
    ),
    (
        "grid-not-a-mapping",
        lambda t, r, d: ["aggregate", "--results", str(r), "--grid", _text("h.yaml", "- 1\n")(t)],
        None,
        ["grid"],
    ),
    (
        "summary-not-a-summary",
        lambda t, r, d: ["tables", "--summary", _text("s.csv", "a,b\n1,2\n")(t), "--out", str(r / "tables")],
        None,
        ["summary"],
    ),
    (
        "figures-summary-not-a-summary",
        lambda t, r, d: ["figures", "--summary", _text("f.csv", "a,b\n1,2\n")(t), "--out", str(r / "figures")],
        None,
        ["summary"],
    ),
    (
        "corrupt-train-json-in-results",
        lambda t, r, d: ["aggregate", "--results", str(r), "--grid", _text("k.yaml", GRID_ONE_CELL)(t)],
        _corrupt_cell_train_json,
        ["train.json"],
    ),
]


@pytest.mark.parametrize("make_argv, change, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_and_results_stay(capsys, tmp_path, results_tree, make_argv, change, words):
    run = run_of(results_tree)
    if change is not None:
        change(run)
    before = tree(results_tree)
    argv = make_argv(tmp_path, results_tree, run)
    rc, out, err = cli(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, repr(err)
    assert "error" in err
    for word in words:
        assert word in err, (word, err)
    assert tree(results_tree) == before  # nothing in results/ written, changed or deleted


# commands that read no user input that could be malformed: `list` takes none; `track init` takes
# an experiment name, and a tracking failure is by design one warning and exit 0 (test_tracking.py)
NO_MALFORMED_INPUT = {"list", "track"}


def test_every_command_that_reads_input_has_a_malformed_case(tmp_path):
    """CASES reaches every subcommand of `cll` but those of NO_MALFORMED_INPUT: a new command comes
    with its one-line failure. Case names are unique (they are the test ids)."""
    from cll.cli import build_parser

    (commands,) = [a.choices for a in build_parser()._actions if isinstance(a.choices, dict)]
    results_root = tmp_path / "results"
    argv = [make(tmp_path, results_root, run_of(results_root)) for _, make, _, _ in CASES]
    assert set(commands) >= NO_MALFORMED_INPUT
    assert sorted(set(commands) - NO_MALFORMED_INPUT) == sorted({a[0] for a in argv})
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.slow
def test_real_entry_point_one_line_for_a_truncated_checkpoint(results_tree):
    run = run_of(results_tree)
    _truncate_model(run)
    before = tree(results_tree)
    proc = run_cll("audit", "--run", str(run), timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc
    assert proc.stderr.startswith("cll: error: checkpoint") and "model.pt" in proc.stderr
    assert tree(results_tree) == before


# ---------------------------------------------------------------- parallel MLflow logging
JOBS = 8


@pytest.mark.slow(seconds=20)
def test_parallel_jobs_logging_into_one_sqlite_store_lose_no_run(tmp_path):
    """8 processes mirror 8 run directories into one fresh sqlite store at once (as 8 Snakemake
    jobs would after `cll track init`): 8 runs, each with all its metrics and files."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**ENV, "MLFLOW_TRACKING_URI": uri}
    runs = []
    for i in range(JOBS):
        run = tmp_path / "runs" / f"cell{i}"
        run.mkdir(parents=True)
        config = {"dataset": "moons", "arch": "moons-mlp", "loss": "cll", "eps": 0.15, "p": 0.01, "seed": i}
        history = [
            {"epoch": e, "loss": 1.0 / e + i, "accuracy": 0.9, "lipschitz_estimate": 10.0, "lr": 1e-3, "seconds": 0.1}
            for e in range(1, 6)
        ]
        (run / results.TRAIN).write_text(
            json.dumps({"config": config, "epochs": history, "wall_time": 1.0, "lipschitz_bound": 11.0, "k_hf": 35.3})
        )
        (run / results.CERTIFY).write_text(
            json.dumps(
                {"clean_accuracy": 0.9, "cra": {"0.15": 0.8 + i / 100}, "lipschitz_constant": 11.0, "n_samples": 100}
            )
        )
        runs.append(run)
    init = subprocess.run(
        [str(CLL), "track", "init", "--experiment", "par"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert init.returncode == 0 and init.stderr == "", init.stderr
    code = "import sys; from cll import tracking; sys.exit(0 if tracking.track(sys.argv[1], 'par') else 3)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(run)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in runs
    ]
    outcomes = [(p.communicate(timeout=600)[1], p.returncode) for p in procs]
    assert all(rc == 0 and "warning" not in err for err, rc in outcomes), outcomes
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    logged = client.search_runs([client.get_experiment_by_name("par").experiment_id])
    assert sorted(r.data.tags["cll.run_dir"] for r in logged) == sorted(str(r.resolve()) for r in runs)
    for r in logged:
        seed = int(r.data.params["seed"])
        assert r.data.metrics["cra_0.15"] == pytest.approx(0.8 + seed / 100)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")] == [1, 2, 3, 4, 5]
        assert {a.path for a in client.list_artifacts(r.info.run_id)} == {"train.json", "certify.json"}
