import fcntl
import json
import os
import subprocess
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Tests run on two processes (pytest -n 2) of one thread each: the models here are tiny, and
# two threads per process would only contend for the two cores.
torch.set_num_threads(1)

from cll.config import build_config  # noqa: E402
from cll.train import load_run, train  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Train a small run once per session (cached by its overrides) and return (cfg, model, dir)."""
    cache = {}

    def make(**values):
        key = tuple(sorted(values.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("run")
            train(build_config(values), out, log=lambda line: None)
            cfg, model = load_run(out)
            cache[key] = (cfg, model, out)
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Session fixtures that several tests read and whose tests should therefore run back to back on one
# worker (pytest-xdist builds a session fixture once per worker; ci_run builds once per pytest run).
SHARED = ("ci_run",)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: -n 2 --dist worksteal, which gives worker k the k-th equal
    block of the collection and lets an idle worker steal from the end of another's queue), start
    the minute-long tests at once, on different workers: a lane marker may carry a test's expected
    `seconds` (on two idle cores); those tests go, longest first, to the front of the block of the
    worker with the least such time so far. The tests of one SHARED fixture stay together, in
    collection order, as one unit whose seconds add up. The other tests keep their order, so a
    module's tests mostly run on one worker and its module fixtures are built once."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers < 2:
        return

    def seconds(unit) -> float:
        return sum(max((m.kwargs.get("seconds", 0) for m in item.iter_markers()), default=0) for item in unit)

    units, shared = [], {}
    for item in items:
        name = next((f for f in SHARED if f in item.fixturenames), None)
        if name is None:
            units.append([item])
        elif name in shared:
            shared[name].append(item)
        else:
            shared[name] = [item]
            units.append(shared[name])
    long = sorted((unit for unit in units if seconds(unit)), key=seconds, reverse=True)
    rest = [item for unit in units if not seconds(unit) for item in unit]
    fronts, load = [[] for _ in range(workers)], [0.0] * workers
    for unit in long:
        k = load.index(min(load))
        fronts[k].extend(unit)
        load[k] += seconds(unit)
    blocks, left = [], len(items)
    for k, front in enumerate(fronts):
        size = left // (workers - k)  # the block worksteal sends worker k first
        left -= size
        take = max(size - len(front), 0)
        blocks.append(front + rest[:take])
        rest = rest[take:]
    items[:] = [item for block in blocks for item in block] + rest


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` across processes (the xdist workers)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class CIRun:
    """The CI grid's `snakemake --cores 2 all_tables` in ``workdir``: its exit status and output."""

    workdir: Path
    env: dict  # what the run had on top of the environment: MLflow in workdir/mlflow.db
    returncode: int | None  # None: it did not finish in time
    output: str  # stdout + stderr

    @property
    def grid(self):
        from helpers import CI_GRID

        from cll.grid import load_grid

        return load_grid(CI_GRID)

    @property
    def results(self) -> Path:
        return self.workdir / self.grid.results

    def check(self) -> None:
        assert self.returncode == 0, self.output[-3000:]


@pytest.fixture(scope="session")
def _ci_run_once(tmp_path_factory) -> tuple[CIRun, Path]:
    """Run the CI grid end to end once per pytest run: the first worker to get here runs it into a
    folder every worker sees (the run's base temp, above the workers' own), the others wait for it
    and read what it left (the exit status and output in ci-run.json beside it; a failed run is not
    retried)."""
    from helpers import CI_GRID, snakemake

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run
    workdir, lock, record = base / "ci-run", base / "ci-run.lock", base / "ci-run.json"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    with _locked(lock):
        if not record.is_file():
            workdir.mkdir(exist_ok=True)
            args = ("--cores", "2", "all_tables", "--configfile", str(CI_GRID))
            try:
                run = snakemake(workdir, *args, env=env, timeout=600)
                done = {"returncode": run.returncode, "output": run.stdout + run.stderr}
            except subprocess.TimeoutExpired as err:  # a hang guard: about 2 minutes on 2 idle cores
                done = {"returncode": None, "output": str(err)}
            record.write_text(json.dumps(done))
    done = json.loads(record.read_text())
    return CIRun(workdir, env, done["returncode"], done["output"]), lock


@pytest.fixture
def ci_run(_ci_run_once):
    """The CI grid (.test/config.yaml) run end to end once per session (see _ci_run_once); the tests
    that use it run one at a time, across workers too, since some change its files and put them back."""
    run, lock = _ci_run_once
    with _locked(lock):
        yield run


def _shared_data_dir() -> Path:
    env = os.environ.get("CLL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def unpack(tmp_path_factory):
    """Unpack a shared tarball once per session and return the directory it was unpacked into."""
    cache: dict[str, Path] = {}

    def get(tarball: str) -> Path:
        path = _shared_data_dir() / tarball
        if not path.is_file():
            pytest.skip(f"real data not available: {path} is missing (set CLL_SHARED_DATA to the shared data folder)")
        if tarball not in cache:
            dest = tmp_path_factory.mktemp(tarball.split(".")[0])
            with tarfile.open(path) as tf:
                # The "data" filter refuses absolute paths and links out of dest (Python >= 3.11.4).
                tf.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            cache[tarball] = dest
        return cache[tarball]

    return get
