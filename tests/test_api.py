"""Tests for cll as a library (src/cll/api.py) and its example, examples/certify_checkpoint.py:
a model of one's own built from supported layers, a checkpoint of a `cll train` run, and the
one-line errors for what cll cannot certify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cll import api, lipschitz, results
from cll.cli import main
from cll.errors import ConfigError
from cll.layers import MaxMin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "certify_checkpoint.py"


def small_layers(middle: nn.Module | None = None) -> list[nn.Module]:
    """conv -> MaxMin -> flatten -> linear -> MaxMin -> (middle) -> linear head, on 1x8x8 inputs."""
    layers = [nn.Conv2d(1, 8, 3, padding=1), MaxMin(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32), MaxMin()]
    return layers + ([middle] if middle is not None else []) + [nn.Linear(32, 10)]


def test_own_model_bound_certificate_and_audit_agree():
    model = api.lipschitz_net(nn.Sequential(*small_layers()), in_shape=(1, 8, 8))
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10 and len(model.body) == 5
    bound = api.upper_bound(model)
    assert bound == lipschitz.upper_bound(model)
    # the bound is an upper bound: no pair of inputs changes a logit difference by more
    x = torch.rand(256, 1, 8, 8)
    with torch.no_grad():
        z = model(x).double()
    dx = (x[:128] - x[128:]).double().flatten(1).norm(dim=1)
    gap = ((z[:128, :, None] - z[:128, None, :]) - (z[128:, :, None] - z[128:, None, :])).abs().amax((1, 2))
    assert 0 < (gap / dx).max().item() <= bound

    y = z.argmax(1)  # labels the model gets right, so that small radii certify some points
    loader = [(x[:128], y[:128]), (x[128:], y[128:])]
    out = api.certify(model, loader, eps=[0.01, "36/255"])
    assert out["n_samples"] == 256 and out["clean_accuracy"] == 1.0
    assert set(out["cra"]) == {"0.01", "0.1412"} and out["cra"]["0.01"] >= out["cra"]["0.1412"]
    assert out["lipschitz_constant"] == pytest.approx(bound, rel=1e-12)
    audit = api.audit(model, loader, eps=[0.01], n=100, steps=5, restarts=1)
    counts = audit["per_eps"]["0.01"]
    assert (audit["n_samples"], counts["sampled"], audit["broken"]) == (100, 100, 0)
    assert counts["attacked"] == counts["certified"] > 0  # the certified points were attacked, none broke


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: api.lipschitz_net(small_layers(nn.Tanh()), (1, 8, 8)),
            "cannot bound body[5] (Tanh): no Lipschitz bound for layer type Tanh",
        ),
        (
            lambda: api.lipschitz_net([nn.Conv2d(1, 4, 3, dilation=2), nn.Flatten(), nn.Linear(64, 10)], (1, 8, 8)),
            "cannot bound body[0] (Conv2d): conv layer",
        ),
        (
            lambda: api.lipschitz_net([nn.Flatten(), nn.Linear(64, 10), nn.ReLU()], (1, 8, 8)),
            "the last layer must be the nn.Linear classifier (or pass head=...); got ReLU",
        ),
        (
            lambda: api.lipschitz_net(small_layers(), (3, 32, 32)),
            "the layers do not run on inputs of shape (3, 32, 32)",
        ),
        (
            lambda: api.upper_bound(nn.Sequential(*small_layers())),
            "cll certifies a LipschitzNet (a sequential body, a linear head, in_shape); got Sequential",
        ),
        (
            lambda: api.certify(api.lipschitz_net(small_layers(), (1, 8, 8)), [], eps=[0.1]),
            "certify: the loader yielded no batches",
        ),
        (lambda: api.certify(api.lipschitz_net(small_layers(), (1, 8, 8)), [], eps=[-1]), "eps: [-1] must be"),
    ],
    ids=["tanh", "dilated-conv", "no-head", "wrong-shape", "not-a-lipschitz-net", "empty-loader", "eps"],
)
def test_what_cll_cannot_certify_is_one_line(build, message):
    with pytest.raises((api.UnsupportedModel, ConfigError)) as err:
        build()
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text, text


def test_a_layer_swapped_in_after_building_is_named_too():
    model = api.lipschitz_net(small_layers(), (1, 8, 8))
    model.body[4] = nn.GELU()  # not 1-Lipschitz-certified by cll: never assumed to be
    with pytest.raises(api.UnsupportedModel, match=r"^cannot bound body\[4\] \(GELU\)"):
        api.upper_bound(model)


def test_cll_api_is_reachable_lazily():
    import cll

    assert cll.api.certify is api.certify and "api" in cll.__all__


@pytest.mark.slow
def test_example_certifies_and_audits_a_trained_checkpoint(tmp_path, capsys):
    """examples/certify_checkpoint.py on a tiny digits run trained here: its numbers are those of
    `cll certify` on the same run (one certifier), and no certificate breaks."""
    run = tmp_path / "run"
    sets = ["dataset=digits", "arch=2C2F", "loss=cll", "epochs=2", "max_train=300", "max_test=150"]
    assert main(["train", "--out", str(run), "--set", *sets, "batch_size=50", "lip_penalty=1.0e-6"]) == 0
    assert main(["certify", "--run", str(run)]) == 0
    reference = json.loads((run / results.CERTIFY).read_text())
    out = tmp_path / "example.json"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), str(run), "--n", "60", "--steps", "5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["certify"]["cra"] == reference["cra"] and got["certify"]["n_samples"] == 150
    assert got["certify"]["clean_accuracy"] == reference["clean_accuracy"]
    assert got["upper_bound"] == pytest.approx(reference["lipschitz_constant"], rel=1e-12)
    assert got["audit"]["broken"] == 0 and all(c["sampled"] == 60 for c in got["audit"]["per_eps"].values())
    lines = proc.stdout.splitlines()
    assert lines[0] == "2C2F on digits (cll), 150 test points" and lines[-1] == "no certificate broken"
    assert f"sound Lipschitz bound of the logit differences: {got['upper_bound']:.6g}" in lines


@pytest.mark.slow
def test_example_on_a_missing_run_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("certify_checkpoint: error: no trained model at")
