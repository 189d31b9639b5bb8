"""The Slurm path for real: the project's profile (profiles/slurm) against a one-node Slurm cluster
that scripts/slurm-local.sh brings up on this machine (munge, slurmctld, slurmd from Debian's
packages, two fake GPUs).

1. The CI grid (.test/config.yaml) through the literal `snakemake --profile slurm all_tables`
   (the profile found through scripts/slurm-profile.sh's link): every output exists, every train
   and certify job (and any other per-cell job) went through Slurm (a Slurm log per job, each job
   id COMPLETED in squeue's history, with the partition from CLL_SLURM_PARTITION) and the local
   rules (aggregate, tables, figures) did not.
2. A train job cancelled mid-training (scancel, as a preemption or time limit would) is
   resubmitted by Snakemake (the profile's retries) and resumes from its model.pt checkpoint.

Needs root (the script installs the packages with apt-get and writes /etc/slurm); without it
the tests skip and say why. CI runs as root, so there they run. The cluster is left running for
later tests. Every Snakemake call has a hard timeout that kills its whole process group (the
Slurm plugin ignores SIGTERM while it waits for jobs) and cancels its Slurm jobs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import check_pipeline_outputs

from cll.grid import load_grid

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CI_GRID = ROOT / ".test" / "config.yaml"
SLURM_LOCAL = ROOT / "scripts" / "slurm-local.sh"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node cluster (started once; xdist workers serialise on a lock file)."""
    if sys.platform != "linux":
        pytest.skip("the local Slurm cluster needs Linux")
    lock = Path("/tmp/cll-slurm-local.lock")
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        run = subprocess.run([str(SLURM_LOCAL), "up"], capture_output=True, text=True, timeout=600)
    if run.returncode == 3:  # the script's "cannot run here" (not root, no apt-get, a real cluster)
        pytest.skip(f"no local Slurm: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stdout + run.stderr


def squeue_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld remembers (MinJobAge keeps finished ones): id -> state, partition,
    comment (rule_<rule>_wildcards_<...>, set by the Snakemake plugin), work dir."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "-o", "%i|%T|%P|%k|%Z"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, partition, comment, workdir = line.strip().split("|", 4)
        jobs[job_id] = {"state": state, "partition": partition, "comment": comment, "workdir": workdir}
    return jobs


def cancel_jobs_of(workdir: Path) -> None:
    for job_id, job in squeue_jobs().items():
        if job["workdir"] == str(workdir) and job["state"] in ("PENDING", "RUNNING", "CONFIGURING"):
            subprocess.run(["scancel", job_id], timeout=30)


def start_snakemake(workdir: Path, *args: str, env: dict) -> subprocess.Popen:
    """The literal user command, `snakemake --profile slurm ...`, run from the repository with
    results, logs and .snakemake/ in ``workdir``. The first status check after 2 s, not the
    profile's 40 s (a real cluster's scheduler is slower than this one)."""
    return subprocess.Popen(
        [
            str(SNAKEMAKE),
            "--profile",
            "slurm",
            *args,
            "--directory",
            str(workdir),
            "--slurm-init-seconds-before-status-checks",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(workdir / "snakemake.out", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, workdir: Path, timeout: float) -> str:
    """Wait for Snakemake; past ``timeout`` kill its process group and cancel its jobs."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        cancel_jobs_of(workdir)
        pytest.fail(
            f"snakemake --profile slurm did not finish in {timeout} s:\n"
            + (workdir / "snakemake.out").read_text()[-3000:]
        )
    output = (workdir / "snakemake.out").read_text()
    assert proc.returncode == 0, output[-4000:]
    return output


def user_env(tmp_path: Path) -> dict:
    """A user who ran the README's one-line profile step (the link goes into a private config
    dir), with the site's partition in the environment and MLflow in a sqlite file here."""
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "CLL_SLURM_PARTITION": "debug",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    env.pop("SNAKEMAKE_PROFILE", None)
    link = subprocess.run(
        [str(ROOT / "scripts" / "slurm-profile.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert link.returncode == 0, link.stderr
    assert (tmp_path / "xdg" / "snakemake" / "slurm").resolve() == ROOT / "profiles" / "slurm"
    return env


def submitted(output: str) -> dict[str, list[str]]:
    """Slurm job ids by rule, from Snakemake's 'Job N has been submitted with SLURM jobid M
    (log: .../rule_<rule>/...)' lines."""
    jobs: dict[str, list[str]] = {}
    for job_id, rule in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", output):
        jobs.setdefault(rule, []).append(job_id)
    return jobs


def test_ci_grid_through_slurm(slurm, tmp_path):
    env = user_env(tmp_path)
    t0 = time.time()
    proc = start_snakemake(tmp_path, "all_tables", "--configfile", str(CI_GRID), env=env)
    output = finish(proc, tmp_path, timeout=900)  # a hang guard: about 2-4 minutes on 2 idle cores
    print(f"CI grid through Slurm: {time.time() - t0:.0f} s")

    grid = load_grid(CI_GRID)
    results = tmp_path / grid.results
    cells = grid.runnable()
    check_pipeline_outputs(results, cells)

    # every train and certify job was a Slurm job that completed, on the partition from the
    # environment, with its log where the profile puts it; the local rules never went to Slurm
    jobs = submitted(output)
    assert len(jobs["train"]) == len(jobs["certify"]) == len(cells), jobs
    assert not {"aggregate", "tables", "figures", "all_tables"} & set(jobs), jobs
    history = squeue_jobs()
    for rule, ids in jobs.items():
        for job_id in ids:
            job = history[job_id]
            assert job["state"] == "COMPLETED" and job["partition"] == "debug", (job_id, job)
            assert job["comment"].startswith(f"rule_{rule}_wildcards_") and job["workdir"] == str(tmp_path)
            (log,) = (tmp_path / "logs" / "slurm" / f"rule_{rule}").glob(f"*/{job_id}.log")
            assert f"rule {rule}:" in log.read_text() or f"localrule {rule}:" in log.read_text()
    assert sorted(p.name for p in (tmp_path / "logs" / "slurm").iterdir()) == sorted(f"rule_{r}" for r in jobs)

    # the jobs logged into MLflow from the nodes: one run per cell, certified
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(grid.experiment).experiment_id])
    runs = [r for r in runs if r.info.run_name != "summary"]
    assert sorted(r.data.tags["cll.run_dir"] for r in runs) == sorted(str(c.path(results).resolve()) for c in cells)
    assert all(r.data.tags["cll.stage"] in ("certify", "audit") for r in runs)


def test_cancelled_train_job_is_resubmitted_and_resumes(slurm, tmp_path):
    """scancel of a running train job, after its first checkpoint: Snakemake sees the job fail,
    resubmits it (retries in the profile) and `cll train` continues from model.pt."""
    epochs = 8
    grid = yaml.safe_load(CI_GRID.read_text())
    row = grid["tables"][0]["rows"][0]
    row.update(p=0.25, set={**row["set"], "epochs": epochs, "checkpoint_every": 1})
    grid["tables"] = grid["tables"][:1]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    (cell,) = load_grid(grid_file).runnable()
    run_dir = tmp_path / cell.path(grid["results"])
    target = str(cell.path(grid["results"]) / "train.json")

    proc = start_snakemake(tmp_path, target, "--configfile", str(grid_file), env=user_env(tmp_path))
    deadline, cancelled = time.time() + 600, None
    while cancelled is None and time.time() < deadline and proc.poll() is None:
        running = [i for i, j in squeue_jobs().items() if j["workdir"] == str(tmp_path) and j["state"] == "RUNNING"]
        if running and (run_dir / "model.pt").is_file():
            (cancelled,) = running
            subprocess.run(["scancel", cancelled], check=True, timeout=30)
        time.sleep(0.1)
    assert cancelled is not None, "the train job never wrote its first checkpoint"
    output = finish(proc, tmp_path, timeout=max(deadline - time.time(), 60))

    (first, second) = submitted(output)["train"]
    assert first == cancelled
    history = squeue_jobs()
    assert history[first]["state"] == "CANCELLED" and history[second]["state"] == "COMPLETED"
    log = (tmp_path / "logs" / "train" / cell.path("x").relative_to("x/runs")).with_suffix(".log").read_text()
    resumed = re.search(rf"resuming \S+ at epoch (\d+)/{epochs}", log)
    assert resumed and 1 <= int(resumed[1]) < epochs, log  # the retry started from the checkpoint
    assert re.search(rf"^epoch {int(resumed[1]) + 1}/{epochs} ", log, re.M)
    assert not re.search(r"^epoch 1/", log, re.M)  # nothing trained twice
    train = json.loads((run_dir / "train.json").read_text())
    assert [e["epoch"] for e in train["epochs"]] == list(range(1, epochs + 1))


def test_profile_dry_run_plans_gpu_jobs(tmp_path):
    """`snakemake --profile slurm all_tables --configfile config/paper.yaml -n` (no cluster
    needed): every runnable poster cell is planned, its train and certify jobs with the row's GPU,
    and a row asking for 2 GPUs trains under torchrun with 2 processes (certify keeps one GPU)."""
    env = user_env(tmp_path)
    paper = subprocess.run(
        [
            str(SNAKEMAKE),
            "--profile",
            "slurm",
            "all_tables",
            "--configfile",
            str(ROOT / "config" / "paper.yaml"),
            "-n",
            "--directory",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert paper.returncode == 0, paper.stderr[-3000:]
    grid = load_grid(ROOT / "config" / "paper.yaml")
    jobs = planned(paper.stdout)
    for rule in ("train", "certify"):
        assert sorted(jobs[rule]) == sorted(str(c.path(grid.results)) for c in grid.runnable())
        for cell in grid.runnable():
            assert jobs[rule][str(cell.path(grid.results))]["gpu"] == str(cell.resources.get("gpus", 0))
            assert jobs[rule][str(cell.path(grid.results))]["slurm_partition"] == "debug"
    assert any(c.resources.get("gpus") for c in grid.runnable())  # the poster's image cells
    assert not {"aggregate", "tables", "figures"} & set(jobs)  # local rules print no resources

    two = yaml.safe_load(CI_GRID.read_text())
    two["tables"][1]["rows"][1]["resources"] = {"gpus": 2, "cpus": 2}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    run = subprocess.run(
        [
            str(SNAKEMAKE),
            "--profile",
            "slurm",
            "all_tables",
            "--configfile",
            str(tmp_path / "two.yaml"),
            "-n",
            "-p",
            "--directory",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (cell,) = [c for c in load_grid(tmp_path / "two.yaml").runnable() if c.resources]
    jobs = planned(run.stdout)
    assert jobs["train"][str(cell.path("results"))]["gpu"] == "2"
    assert jobs["certify"][str(cell.path("results"))]["gpu"] == "1"
    commands = [line for line in run.stdout.splitlines() if f"--out {cell.path('results')} " in line]
    assert commands and commands[0].startswith(
        "Shell command: torchrun --standalone --nproc-per-node 2 -m cll.cli train --out"
    ), commands


def planned(output: str) -> dict[str, dict[str, dict[str, str]]]:
    """rule -> run directory -> resources, from the job blocks a dry run prints."""
    jobs: dict[str, dict[str, dict[str, str]]] = {}
    for block in output.split("\n\n"):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        out = re.search(r"^\s+output: (\S+)/\w+\.json", block, re.M)
        res = re.search(r"^\s+resources: (.+)$", block, re.M)
        if rule and out and res:
            jobs.setdefault(rule[1], {})[out[1]] = dict(kv.split("=", 1) for kv in res[1].split(", "))
    return jobs
