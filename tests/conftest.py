import os
import tarfile
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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: -n 2 --dist worksteal, which gives worker k the k-th equal
    block of the collection and lets an idle worker steal from the end of another's queue), start
    the minute-long tests at once, on different workers: a lane marker may carry a test's expected
    `seconds` (on two idle cores); those tests go, longest first, to the front of the block of the
    worker with the least such time so far. The other tests keep their order, so a module's tests
    mostly run on one worker and its module fixtures are built once."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers < 2:
        return

    def seconds(item) -> float:
        return max((m.kwargs.get("seconds", 0) for m in item.iter_markers()), default=0)

    long = sorted((item for item in items if seconds(item)), key=seconds, reverse=True)
    rest = [item for item in items if not seconds(item)]
    fronts, load = [[] for _ in range(workers)], [0.0] * workers
    for item in long:
        k = load.index(min(load))
        fronts[k].append(item)
        load[k] += seconds(item)
    blocks, left = [], len(items)
    for k, front in enumerate(fronts):
        size = left // (workers - k)  # the block worksteal sends worker k first
        left -= size
        take = max(size - len(front), 0)
        blocks.append(front + rest[:take])
        rest = rest[take:]
    items[:] = [item for block in blocks for item in block] + rest


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
