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
