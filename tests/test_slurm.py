"""The Slurm path for real: the project's profile (profiles/slurm) against a one-node Slurm cluster
that scripts/slurm-local.sh brings up on this machine (munge, slurmctld, slurmd from Debian's
packages, two fake GPUs).

One run of the smallest grid (one moons cell of the CI grid, eight epochs with a checkpoint each,
its row asking for a GPU, memory and a time limit) through the literal `snakemake --profile slurm
all_tables` (the profile found through scripts/slurm-profile.sh's link), what only Slurm can show:
every train, certify and audit job went through Slurm (a Slurm log per job, each job id in
squeue's history, with the partition from CLL_SLURM_PARTITION and the row's resources) and the
local rules (aggregate, tables, figures) did not; the jobs logged into MLflow from the node; and
the train job, cancelled mid-training (scancel, as a preemption or time limit would), is
resubmitted by Snakemake (the profile's retries) and resumes from its model.pt checkpoint. The
CI grid's outputs themselves are checked on its local run (tests/test_workflow.py).

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
from helpers import CI_GRID, ROOT, SNAKEMAKE, check_pipeline_outputs

from cll.grid import load_grid

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
    profile's 40 s, and then every 2 s, not 10 s (a real cluster's scheduler is slower than this
    one; here each wave of jobs would wait for the next check)."""
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
            "--seconds-between-status-checks",
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


def job_details(job_id: str) -> dict[str, str]:
    """`scontrol show job` of a job slurmctld still remembers (MinJobAge): its Key=Value fields."""
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


# the smallest grid: the CI grid's first moons cell, trained long enough to be cancelled after
# its first checkpoint, its row asking Slurm for what no default gives
EPOCHS = 8
RESOURCES = {"gpus": 1, "mem_mb": 1500, "runtime": 15, "cpus": 1}


@pytest.mark.slurm(seconds=70)
@pytest.mark.timeout(1800)
def test_grid_through_slurm_resumes_a_cancelled_train_job(slurm, tmp_path):
    """scancel of the running train job, after its first checkpoint: Snakemake sees the job fail,
    resubmits it (retries in the profile) and `cll train` continues from model.pt; then certify,
    audit and the local rules finish the grid."""
    grid = yaml.safe_load(CI_GRID.read_text())
    row = grid["tables"][0]["rows"][0]
    row.update(p=0.25, set={**row["set"], "epochs": EPOCHS, "checkpoint_every": 1}, resources=RESOURCES)
    grid["tables"] = grid["tables"][:1]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    loaded = load_grid(grid_file)
    (cell,) = loaded.runnable()
    results = tmp_path / loaded.results
    run_dir = cell.path(results)

    env = user_env(tmp_path)
    t0 = time.time()
    proc = start_snakemake(tmp_path, "all_tables", "--configfile", str(grid_file), env=env)
    deadline, cancelled = time.time() + 600, None
    while cancelled is None and time.time() < deadline and proc.poll() is None:
        running = [
            i
            for i, j in squeue_jobs().items()
            if j["workdir"] == str(tmp_path) and j["state"] == "RUNNING" and j["comment"].startswith("rule_train_")
        ]
        if running and (run_dir / "model.pt").is_file():
            (cancelled,) = running
            subprocess.run(["scancel", cancelled], check=True, timeout=30)
        time.sleep(0.1)
    assert cancelled is not None, "the train job never wrote its first checkpoint"
    output = finish(proc, tmp_path, timeout=max(deadline - time.time(), 60))  # a hang guard
    print(f"grid through Slurm: {time.time() - t0:.0f} s")
    check_pipeline_outputs(results, loaded, figures=("moons_boundaries",))  # one p: no slack figures

    # the cancelled train job was resubmitted and resumed from its checkpoint
    jobs = submitted(output)
    (first, second) = jobs["train"]
    assert first == cancelled
    history = squeue_jobs()
    assert history[first]["state"] == "CANCELLED" and history[second]["state"] == "COMPLETED"
    log = (tmp_path / "logs" / "train" / cell.path("x").relative_to("x/runs")).with_suffix(".log").read_text()
    resumed = re.search(rf"resuming \S+ at epoch (\d+)/{EPOCHS}", log)
    assert resumed and 1 <= int(resumed[1]) < EPOCHS, log  # the retry started from the checkpoint
    assert re.search(rf"^epoch {int(resumed[1]) + 1}/{EPOCHS} ", log, re.M)
    assert not re.search(r"^epoch 1/", log, re.M)  # nothing trained twice
    train = json.loads((run_dir / "train.json").read_text())
    assert [e["epoch"] for e in train["epochs"]] == list(range(1, EPOCHS + 1))

    # every train, certify and audit job was a Slurm job that completed (but the cancelled one), on
    # the partition from the environment, with the row's resources and its log where the profile
    # puts it; the local rules never went to Slurm
    assert len(jobs["certify"]) == len(jobs["audit"]) == 1 and set(jobs) == {"train", "certify", "audit"}, jobs
    assert not {"aggregate", "tables", "figures", "all_tables"} & set(jobs), jobs
    for rule, ids in jobs.items():
        for job_id in ids:
            job = history[job_id]
            assert job["state"] == ("CANCELLED" if job_id == cancelled else "COMPLETED"), (job_id, job)
            assert job["partition"] == "debug", (job_id, job)
            assert job["comment"].startswith(f"rule_{rule}_wildcards_") and job["workdir"] == str(tmp_path)
            details = job_details(job_id)
            assert details["TimeLimit"] == "00:15:00" and details["NumCPUs"] == "1", details
            assert details["MinMemoryNode"] == "1500M" and details["TresPerJob"] == "gres:gpu:1", details
            (slurm_log,) = (tmp_path / "logs" / "slurm" / f"rule_{rule}").glob(f"*/{job_id}.log")
            assert f"rule {rule}:" in slurm_log.read_text() or f"localrule {rule}:" in slurm_log.read_text()
    assert sorted(p.name for p in (tmp_path / "logs" / "slurm").iterdir()) == sorted(f"rule_{r}" for r in jobs)

    # the jobs logged into MLflow from the node: one run per cell, certified
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(loaded.experiment).experiment_id])
    runs = [r for r in runs if r.info.run_name != "summary"]
    assert sorted(r.data.tags["cll.run_dir"] for r in runs) == [str(run_dir.resolve())]
    assert all(r.data.tags["cll.stage"] in ("certify", "audit") for r in runs)


@pytest.mark.workflow
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
            gpus = cell.resources.get("gpus", 0)  # certify runs on one GPU of a multi-GPU row (hosts)
            assert jobs[rule][str(cell.path(grid.results))]["gpu"] == str(gpus if rule == "train" else min(gpus, 1))
            assert jobs[rule][str(cell.path(grid.results))]["slurm_partition"] == "debug"
    assert any(c.resources.get("gpus") for c in grid.runnable())  # the poster's image cells
    assert any(c.resources.get("gpus", 0) > 1 for c in grid.runnable())  # the hosts' rows
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
