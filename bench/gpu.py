#!/usr/bin/env python
"""One GPU, under ten minutes: the whole GPU path once, and what cll's training gets out of the card.

    python bench/gpu.py --out gpu-report            # on a machine with one GPU
    python bench/gpu.py --device cpu --quick --out /tmp/gpu-check   # the same code on the CPU, tiny

1. The card: name, memory, nominal peaks (``PEAKS``) and a measured dense GEMM (fp32, bf16).
2. The GPU path end to end, as a user runs it (first, so that the budget cannot squeeze it out):
   ``cll train`` (2 epochs of 8C2F on the Tiny-ImageNet subset, shared/data/tinyimagenet-subset.tgz),
   ``cll certify`` (sound bound, float32 screening without cuDNN, float64 pass) and ``cll audit``,
   each a subprocess; wall times and results.
3. Training throughput of 8C2F (the reference's CLL recipe, batch 256), LipConv-20 and SLL-XL (their
   config/paper.yaml recipes and batch sizes; the hosts LiResNet-L12W512, BRONet-L12W512 and
   BRONet-L6W512 with ``--arch``, to size the paper grid's runtime: bookings): ``train.make_step``
   eager fp32, with ``amp`` and with
   ``compile`` (bench.bench_train: median step over a pool of random batches); FLOPs per step counted
   once (torch.utils.flop_counter: convolutions and matmuls of the forward, the backward and the power
   iterations), hence achieved TFLOP/s and its share of the card's peaks; peak memory; the top
   kernels of three eager steps (torch.profiler).

Every measurement is one JSON line on stdout (also written to OUT/gpu.jsonl); OUT/gpu.md is the
summary. A measurement that raises becomes a line with ``error``; one that would start after
``--budget`` seconds is ``skipped``. ``--quick``: width 1/16, batch 4, 1 + 1 steps, compile through
dynamo's ``eager`` backend (the graph capture, not inductor's code generation: minutes on a CPU), and
train/certify/audit on 64 training and 32 test images (tests/test_bench.py runs it on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from vs_reference import COMMON, REFERENCE_RECIPES

import bench  # bench/bench.py, beside this file
from cll import losses, train
from cll.config import RunConfig, build_config

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CLL_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyimagenet-subset.tgz"
ARCHS = ("8C2F", "LipConv-20", "SLL-XL")
# today's hosts (config/paper.yaml, table hosts), by --arch only: their step times size the grid's
# runtime: bookings, which were estimated from FLOP counts while no GPU was lent
HOSTS = ("LiResNet-L12W512", "BRONet-L12W512", "BRONet-L6W512")
MODES = {"eager": {}, "amp": {"amp": True}, "compile": {"compile": True}}
# dense TFLOP/s (no sparsity) from the vendors' data sheets: fp32 (CUDA cores), tf32 and bf16 (tensor cores)
PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM; the PCIe card is ~20 % lower
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0},
}
TOP_KERNELS = 10
QUICK_WIDTH = 1 / 16  # --quick: every layer this much narrower


class Report:
    """JSON lines on stdout and in OUT/gpu.jsonl; a time budget for the measurements."""

    def __init__(self, out: Path, budget: float):
        self.out, self.budget, self.start = out, budget, time.perf_counter()
        self.lines: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "gpu.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (closed in main)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def emit(self, rec: dict) -> dict:
        rec = {**rec, "elapsed_s": round(time.perf_counter() - self.start, 1)}
        self.lines.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()
        return rec

    def run(self, what: str, fn, **keys) -> dict:
        """``fn()``'s record, or an ``error`` / ``skipped`` line: the script goes on."""
        if self.left() <= 0:
            return self.emit({"what": what, **keys, "skipped": f"over the {self.budget:.0f} s budget"})
        bench.log(f"{what} {keys}")
        try:
            return self.emit({"what": what, **keys, **fn()})
        except Exception as err:
            return self.emit({"what": what, **keys, "error": f"{type(err).__name__}: {err}"[:500]})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- 1. the card
def card(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        return {"name": "cpu", "threads": torch.get_num_threads(), "peaks_tflops": None, **gemm(device, quick)}
    props = torch.cuda.get_device_properties(device)
    peaks = next((v for k, v in PEAKS.items() if k in props.name), None)
    return {
        "name": props.name,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "peaks_tflops": peaks,
        **gemm(device, quick),
    }


def gemm(device: torch.device, quick: bool) -> dict:
    """Measured dense GEMM TFLOP/s: fp32 (at the process's matmul precision) and bf16."""
    n = 512 if quick else 8192
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b
        sync(device)
        t0, reps = time.perf_counter(), 3 if quick else 20
        for _ in range(reps):
            a @ b
        sync(device)
        out[f"gemm_{name}_tflops"] = round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, 2)
    return out


# ---------------------------------------------------------------- 2. training throughput
def recipe(arch: str, quick: bool) -> RunConfig:
    """8C2F: the reference's CLL recipe (bench/vs_reference.py); the others: their first row of
    config/paper.yaml (bench.recipe). ``quick``: batch 4."""
    if arch in REFERENCE_RECIPES:
        cfg = build_config({**COMMON, **REFERENCE_RECIPES[arch], "arch": arch})
    else:
        cfg, _ = bench.recipe(arch, bench.paper_recipes())
    return build_config({**cfg.to_dict(), "batch_size": 4}) if quick else cfg


def model_for(cfg: RunConfig, device: torch.device, quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = bench.build(cfg, QUICK_WIDTH if quick else None)
    return train.prepare_model(model, cfg, device)


def step_flops(cfg: RunConfig, device: torch.device, quick: bool) -> dict:
    """FLOPs of one training step (forward, backward, power iterations), counted eagerly in fp32."""
    model = model_for(cfg, device, quick)
    model.train()
    step = train.make_step(cfg, model, losses.create(cfg), train.make_optimizer(cfg, model), device)
    x, y = train.to_device(*bench.random_batch(cfg, cfg.batch_size, torch.Generator().manual_seed(0)), device)
    with FlopCounterMode(display=False) as counter:
        step(x, y, 0.5)
    return {"flops": counter.get_total_flops()}


def throughput(cfg: RunConfig, mode: str, device: torch.device, quick: bool, flops: int, peaks: dict | None) -> dict:
    cfg = build_config({**cfg.to_dict(), **MODES[mode]})
    warmup, steps = (1, 1) if quick else (3, 10)
    t0 = time.perf_counter()
    rec = bench.bench_train(cfg, model_for(cfg, device, quick), device, warmup, steps, pi_reps=0)
    tflops = flops * rec["images_per_s"] / cfg.batch_size / 1e12
    out = {
        "batch": cfg.batch_size,
        "images_per_s": rec["images_per_s"],
        "step_ms": rec["step_ms"],
        "setup_s": round(time.perf_counter() - t0 - rec["seconds"], 1),  # build + warm-up (+ compile)
        "gflop_per_step": round(flops / 1e9, 1),
        "tflops": round(tflops, 3),
        "peak_mem_mb": rec["peak_mem_mb"],
    }
    if peaks:
        tensor = peaks["bf16"] if mode == "amp" else peaks["tf32"]  # cuDNN convolutions run TF32 by default
        out.update(share_of_fp32_peak=round(tflops / peaks["fp32"], 3), share_of_tensor_peak=round(tflops / tensor, 3))
    return out


def top_kernels(cfg: RunConfig, device: torch.device, quick: bool) -> dict:
    """The kernels (CPU: operators) that take most of a few eager steps."""
    model = model_for(cfg, device, quick)
    model.train()
    step = train.make_step(cfg, model, losses.create(cfg), train.make_optimizer(cfg, model), device)
    x, y = train.to_device(*bench.random_batch(cfg, cfg.batch_size, torch.Generator().manual_seed(0)), device)
    step(x, y, 0.5)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    n = 1 if quick else 3
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            step(x, y, 0.5)
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    if cuda:  # kernels only: the device-side events
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return {
        "top": [
            {
                "name": e.key[:100],
                "ms_per_step": round(getattr(e, key) / 3e3, 2),
                "share": round(getattr(e, key) / total, 3),
            }
            for e in events[:TOP_KERNELS]
        ]
    }


# ---------------------------------------------------------------- 3. cll train + certify + audit
def unpack(tarball: Path, dest: Path) -> Path:
    if not (dest / "tiny-imagenet-200").is_dir():
        if not tarball.is_file():
            raise FileNotFoundError(f"{tarball} is missing (pass --data or set CLL_SHARED_DATA)")
        with tarfile.open(tarball) as tf:
            tf.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest


def cll(args: list[str], timeout: float) -> dict:
    """One `cll ...` command in a subprocess (this checkout's src first on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cll.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    rec = {"returncode": proc.returncode, "command_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode not in (0, 1):  # audit exits 1 when a certified point breaks: a result, not a crash
        raise RuntimeError(f"cll {args[0]} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return rec


def end_to_end(report: Report, device: torch.device, data_root: Path, quick: bool) -> None:
    run = report.out / "run-8c2f"
    sets = {**COMMON, **REFERENCE_RECIPES["8C2F"], "arch": "8C2F", "epochs": 2, "data_root": str(data_root)}
    sets.update(device=device.type, num_workers=0 if quick else min(8, os.cpu_count() or 1), checkpoint_every=1)
    if quick:
        sets.update(width=QUICK_WIDTH, batch_size=16, max_train=64, max_test=32, eval_batch_size=32)
    overrides = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in sets.items()]
    audit = (
        ["--n", "8", "--steps", "2", "--restarts", "1"] if quick else ["--n", "500", "--steps", "50", "--restarts", "2"]
    )

    def step(name: str, argv: list[str], result: str | None):
        def go() -> dict:
            rec = cll(argv, timeout=max(report.left(), 1))
            if result:
                rec.update(json.loads((run / result).read_text()))
            return rec

        return report.run(f"cll {name}", go, arch="8C2F", device=str(device))

    train_rec = step("train", ["train", "--out", str(run), "--set", *overrides], "train.json")
    if "error" in train_rec or "skipped" in train_rec:
        return
    step("certify", ["certify", "--run", str(run), "--device", device.type], "certify.json")
    step("audit", ["audit", "--run", str(run), "--device", device.type, *audit], None)


# ---------------------------------------------------------------- summary
def summary(report: Report) -> str:
    rows = ["| arch | mode | batch | img/s | TFLOP/s | share fp32 / tensor peak | peak MB | setup s |", "|---|" * 8]
    rows[1] = "|---" * 8 + "|"
    for r in report.lines:
        if r["what"] == "train" and "images_per_s" in r:
            share = f"{r.get('share_of_fp32_peak', '-')} / {r.get('share_of_tensor_peak', '-')}"
            rows.append(
                f"| {r['arch']} | {r['mode']} | {r['batch']} | {r['images_per_s']} | {r['tflops']} | {share} | "
                f"{r['peak_mem_mb']} | {r['setup_s']} |"
            )
        elif r["what"] == "train":
            rows.append(f"| {r['arch']} | {r['mode']} | | {r.get('error') or r.get('skipped')} | | | | |")
    lines = ["# bench/gpu.py", "", *rows, ""]
    for r in report.lines:
        if r["what"] == "card":
            lines.insert(1, f"card: {r}")
        if r["what"] == "profile" and "top" in r:
            lines += [f"top kernels, {r['arch']} eager ({r['device']}):"]
            lines += [f"  {k['ms_per_step']:9.2f} ms/step {100 * k['share']:5.1f} %  {k['name']}" for k in r["top"]]
        if r["what"].startswith("cll "):
            keys = ("returncode", "command_s", "wall_time", "cra", "float64_share", "error")
            keep = {k: r[k] for k in keys if k in r}
            lines.append(f"{r['what']}: {keep}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu-report"), help="report folder (default gpu-report)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="default cuda")
    ap.add_argument("--quick", action="store_true", help="tiny models and data: checks the script, measures nothing")
    ap.add_argument("--data", type=Path, default=DATA, help=f"Tiny-ImageNet subset tarball (default {DATA})")
    ap.add_argument("--data-root", type=Path, help="a folder holding tiny-imagenet-200/ already (instead of --data)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds after which nothing new starts (540)")
    ap.add_argument("--arch", action="append", choices=ARCHS + HOSTS, help=f"repeatable; default {', '.join(ARCHS)}")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible (use --device cpu --quick to check the script)")
    if args.quick and device.type == "cpu":
        compile_ = torch.compile  # dynamo captures the graphs; inductor would take minutes per model here
        torch.compile = lambda model, **kw: compile_(model, **{**kw, "backend": "eager"})
    report = Report(args.out, args.budget)
    info = report.run("card", partial(card, device, args.quick), device=str(device), torch=torch.__version__)
    # the whole GPU path first: it is the check that must not be squeezed out by the budget
    if args.data_root:
        data_root = {"root": str(args.data_root)}
    else:
        data_root = report.run("data", lambda: {"root": str(unpack(args.data, args.out / "data"))})
    if "root" in data_root:
        end_to_end(report, device, Path(data_root["root"]), args.quick)
    recipes = {}
    for arch in args.arch or ARCHS:
        try:
            recipes[arch] = recipe(arch, args.quick)
        except Exception as err:
            report.emit({"what": "train", "arch": arch, "error": f"recipe: {err}"})
    flops = {}
    for mode in MODES:  # compile last: its compile time is the least predictable part of the budget
        for arch, cfg in recipes.items():
            if arch not in flops:
                counted = report.run("flops", partial(step_flops, cfg, device, args.quick), arch=arch)
                flops[arch] = counted.get("flops", 0)
            run = partial(throughput, cfg, mode, device, args.quick, flops[arch], info.get("peaks_tflops"))
            report.run("train", run, arch=arch, mode=mode)
            if mode == "eager":
                report.run("profile", partial(top_kernels, cfg, device, args.quick), arch=arch, device=str(device))
    text = summary(report)
    (args.out / "gpu.md").write_text(text)
    bench.log(text)
    report.file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
