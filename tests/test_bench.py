"""bench/: the GPU script's code path on the CPU, in its quick mode. It measures nothing here; it
has to work the first time it meets a GPU. The side-by-side script's recipes are valid run configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cll.config import build_config
from cll.models import gloro_net

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import vs_hosts  # noqa: E402
import vs_local_lip  # noqa: E402
import vs_reference  # noqa: E402
from vs_reference import COMMON, REFERENCE_RECIPES  # noqa: E402


def test_reference_recipes_are_run_configs():
    for arch, values in REFERENCE_RECIPES.items():
        cfg = build_config({**COMMON, **values, "arch": arch})
        assert cfg.loss == "cll" and cfg.pi_iters == 5


def test_side_by_side_summary_takes_medians_and_says_who_is_faster(monkeypatch, capsys):
    """compare(): both sides alternate, medians, ratio > 1 when cll is faster (img/s up, seconds down)."""
    fake = {
        ("reference", "train"): iter([{"img_per_s": v, "peak_rss_mb": 9.0} for v in (100, 300, 200)]),
        ("cll", "train"): iter([{"img_per_s": v, "peak_rss_mb": 5.0} for v in (500, 400, 450)]),
        ("reference", "certify"): iter(
            [{"total_s": t, "converge_s": t - 20, "eval_s": 20, "peak_rss_mb": 9.0} for t in (80, 90, 70)]
        ),
        ("cll", "certify"): iter(
            [{"total_s": t + 5, "converge_s": 5, "certify_s": t, "peak_rss_mb": 5.0} for t in (10, 16, 11)]
        ),
    }
    monkeypatch.setattr(vs_reference, "reference", lambda args, what, arch: next(fake["reference", what]))
    monkeypatch.setattr(vs_reference, "ours", lambda args, what, arch: next(fake["cll", what]))
    args = type("Args", (), {"runs": 3, "threads": 2})()
    train = vs_reference.compare(args, "train", "4C3F")
    assert (train["reference_img_per_s"], train["cll_img_per_s"], train["speedup"]) == (200, 450, 2.25)
    cert = vs_reference.compare(args, "certify", "8C2F")
    assert (cert["reference_total_s"], cert["cll_total_s"], cert["speedup"]) == (80, 16, 5.0)
    assert (cert["cll_certify_s"], cert["speedup_vs_cll_certify"]) == (11, round(80 / 11, 3))
    assert cert["reference_peak_rss_mb"] == 9.0 and cert["cll_peak_rss_mb"] == 5.0
    assert len(capsys.readouterr().out.splitlines()) == 2 * (6 + 1)  # a line per measurement + summary


class ClampGroupSort(nn.Module):
    """The Local-Lip-B authors' clipped MaxMin as their code describes it (written here, not
    imported): channel c paired with c + C/2, output [min(max, max_t), max(min, min_t)], one
    threshold per neuron of shape (1, C/2, ...)."""

    def __init__(self, half_shape):
        super().__init__()
        self.max = nn.Parameter(torch.zeros(1, *half_shape))
        self.min = nn.Parameter(torch.zeros(1, *half_shape))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat(
            [torch.minimum(torch.maximum(a, b), self.max), torch.maximum(torch.minimum(a, b), self.min)], 1
        )


def test_local_lip_parameter_map_gives_the_authors_net_cll_s_function():
    """vs_local_lip's map: cll's clipped-MaxMin weights in a net paired as the authors pair theirs
    compute cll's function (float64, to rounding), and map back exactly."""
    torch.manual_seed(0)
    ours = gloro_net([(4, 3, 1, 1)], [6], 3, (2, 5, 5), activation="clipped_maxmin").double()
    with torch.no_grad():
        for act in (ours.body[1], ours.body[4]):  # thresholds where the inputs reach them
            act.theta_max.uniform_(0.0, 0.5)
            act.theta_min.uniform_(-0.5, 0.0)
    conv, dense = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(100, 6)
    theirs = nn.Sequential(conv, ClampGroupSort((2, 5, 5)), nn.Flatten(), dense, ClampGroupSort((3,)), nn.Linear(6, 3))
    theirs = theirs.double()
    vs_local_lip.to_theirs(ours, theirs)
    x = torch.randn(16, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), rtol=1e-13, atol=1e-13)
        again = gloro_net([(4, 3, 1, 1)], [6], 3, (2, 5, 5), activation="clipped_maxmin").double()
        vs_local_lip.to_cll(theirs, again)
    mapped = dict(again.named_parameters())
    for name, value in ours.named_parameters():
        assert torch.equal(mapped[name], value), name


@pytest.mark.parametrize("host", ["liresnet", "bronet"])
def test_host_parameter_map_covers_cll_s_model_and_round_trips(host):
    """vs_hosts' map: every parameter, running mean and power iterate of cll's L2W32 net has a place
    in the reference's stacked tensors (shapes as its builder makes them), and cll -> reference ->
    cll gives every tensor back exactly."""
    torch.manual_seed(0)
    ours = vs_hosts.build_cll(host)
    c, d, w, dd = vs_hosts.WIDTH, vs_hosts.DEPTH, vs_hosts.DENSE, vs_hosts.DENSE_DEPTH
    rank = c // 2 if host == "bronet" else c
    shapes = {
        "stem.0.weight": (c, 3, 5, 5),
        "stem.0.bias": (c,),
        "stem.0.init_x": (1, 3, 32, 32),
        "conv.weights": (d, c, rank, 3, 3),
        "conv.gamma": (d, c, 1, 1, 1),
        "conv.bias": (d, c),
        "conv.running_mean": (d, c),
        "conv.init_x": (1, d * c, 16, 16),
        "neck.kernel": (c, c * 16),
        "neck.weight": (w, c * 16),
        "neck.bias": (w,),
        "linear.weights": (dd, w, w),
        "linear.gamma": (dd, w, 1),
        "linear.bias": (dd, w),
        "head.weight": (vs_hosts.CLASSES, w),
        "head.bias": (vs_hosts.CLASSES,),
    }
    like = {k: torch.zeros(s) for k, s in shapes.items()}
    if host == "bronet":
        del like["conv.init_x"]  # its BRO layers have no power iterate, nor does cll's BROConv
    state = {k: torch.randn_like(v) for k, v in ours.state_dict().items()}  # distinct values everywhere
    pairs = vs_hosts.host_pairs(host)
    theirs = vs_hosts.cll_to_ref(state, like, pairs)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in like.items()}
    back = vs_hosts.ref_to_cll(theirs, pairs)
    assert set(back) == set(state) - {"body.0.mean"}  # the input shift is a constant on both sides
    for key, value in back.items():
        assert torch.equal(value.reshape(state[key].shape), state[key]), key


@pytest.mark.slow(seconds=60)
def test_gpu_script_runs_end_to_end_on_the_cpu(tmp_path, unpack):
    data = unpack("tinyimagenet-subset.tgz")
    # one thread, as the test process has (conftest): two threads beside the other worker's jobs
    # oversubscribe the two cores, and its steps then take seconds instead of a fraction of one
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "bench/gpu.py",
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(tmp_path),
        "--data-root",
        str(data),
    ]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [line for line in lines if "error" in line or "skipped" in line] == []
    done = {(line["what"], line.get("arch"), line.get("mode")) for line in lines}
    for arch in ("8C2F", "LipConv-20", "SLL-XL"):
        assert {("train", arch, mode) for mode in ("eager", "amp", "compile")} | {("profile", arch, None)} <= done
    assert {"cll train", "cll certify", "cll audit"} <= {line["what"] for line in lines}
    assert "| 8C2F | compile |" in (tmp_path / "gpu.md").read_text()
