"""bench/: the GPU script's code path on the CPU, in its quick mode. It measures nothing here; it
has to work the first time it meets a GPU. The side-by-side script's recipes are valid run configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cll.config import build_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from vs_reference import COMMON, REFERENCE_RECIPES  # noqa: E402


def test_reference_recipes_are_run_configs():
    for arch, values in REFERENCE_RECIPES.items():
        cfg = build_config({**COMMON, **values, "arch": arch})
        assert cfg.loss == "cll" and cfg.pi_iters == 5


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_the_cpu(tmp_path, unpack):
    data = unpack("tinyimagenet-subset.tgz")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
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
