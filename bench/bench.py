#!/usr/bin/env python
"""Hand-run benchmark of cll: training step, certifier, sound bound, snakemake dry run.

    python bench/bench.py --quick                      # all archs, CPU, < 1 min on 2 cores
    python bench/bench.py --device cuda                # full run on a GPU
    python bench/bench.py --arch 4C3F --arch 8C2F --batch 64 --only train

Prints one JSON line per measurement on stdout (progress goes to stderr). Not run by CI.
See bench/README.md for the meaning of every key.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from cll import certify, lipschitz, losses, models

REPO = Path(__file__).resolve().parent.parent

# arch -> (data set it is trained on in the recipes, num_classes, in_shape, recipe batch size)
# Batch sizes: config/paper.yaml (8C2F 256, moons 100), the GloRo CIFAR nets 128, 2C2F the
# RunConfig default 128.
SPECS = {
    "8C2F": ("tinyimagenet", 200, (3, 64, 64), 256),
    "4C3F": ("cifar10", 10, (3, 32, 32), 128),
    "6C2F": ("cifar10", 10, (3, 32, 32), 128),
    "2C2F": ("mnist", 10, (1, 28, 28), 128),
    "moons-mlp": ("moons", 2, (2,), 100),
}
# --quick on CPU: 8C2F at 256 takes several seconds per step on 2 cores; use a smaller batch
QUICK_CPU_BATCH = {"8C2F": 16}
# --quick on CPU: 8C2F's sound bound (float64 FFT + eigvalsh) took ~75 s here; certify needs it too
QUICK_CPU_SKIP_BOUND = {"8C2F": "upper_bound_body of 8C2F takes ~75 s on a 2-core CPU (over the "
                                "20 s quick budget); run without --quick or on cuda"}

PI_ITERS = 5        # recipe: 5 power iterations per step
LIP_PENALTY = 1e-3  # lambda of lambda * K^2 (8C2F CLL recipe)
CLL_EPS, CLL_P = 1.0, 0.025


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    """Wall clock with device synchronisation on cuda (so queued kernels are counted)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_mb(device: torch.device) -> float:
    """cuda: torch.cuda.max_memory_allocated since the last reset_peak (tensor memory only).
    cpu: the process's max resident set size so far (getrusage ru_maxrss; monotonic over the run)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    return round(rss_mb, 1)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def guarded(what: str, arch: str | None, device: torch.device, fn, *args, **kwargs) -> None:
    """Run one measurement; a failure becomes a line with an ``error`` key and the run goes on
    (e.g. a src/ function that does not support the device)."""
    try:
        emit(fn(*args, **kwargs))
    except Exception as err:  # noqa: BLE001 - a benchmark reports, it does not stop
        emit({"what": what, "arch": arch, "device": str(device), "batch": None, "images_per_s": None,
              "seconds": None, "peak_mem_mb": None, "error": f"{type(err).__name__}: {err}"[:300]})


def build(arch: str, device: torch.device) -> torch.nn.Module:
    _, num_classes, in_shape, _ = SPECS[arch]
    return models.create(arch, num_classes, in_shape).to(device)


def random_batch(arch: str, n: int, device: torch.device, gen: torch.Generator):
    _, num_classes, in_shape, _ = SPECS[arch]
    x = torch.rand(n, *in_shape, generator=gen).to(device)
    y = torch.randint(0, num_classes, (n,), generator=gen).to(device)
    return x, y


def base(what: str, arch: str, device: torch.device, batch: int | None) -> dict:
    return {"what": what, "arch": arch, "device": str(device), "batch": batch}


# ---------------------------------------------------------------- train
def bench_train(arch: str, device: torch.device, batch: int, warmup: int, steps: int,
                pi_reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    model = build(arch, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.0)
    x, y = random_batch(arch, batch, device, gen)
    timer = Timer(device)

    def step() -> tuple[float, float]:
        t0 = timer.now()
        k_body = lipschitz.estimate_body(model, PI_ITERS)
        t1 = timer.now()
        logits = model(x)
        loss = losses.cll_loss(logits, y, model.head.weight, k_body, CLL_EPS, CLL_P)
        loss = loss + losses.lipschitz_penalty(k_body, model.head.weight, LIP_PENALTY, 2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = timer.now()
        return t1 - t0, t2 - t0

    for _ in range(warmup):
        step()
    reset_peak(device)
    pi_total = step_total = 0.0
    for _ in range(steps):
        pi, full = step()
        pi_total += pi
        step_total += full

    # the PI graph is also differentiated in backward(): time PI forward + its backward alone
    pi_fb = 0.0
    for _ in range(pi_reps):
        t0 = timer.now()
        k = lipschitz.estimate_body(model, PI_ITERS)
        (k * lipschitz.head_factor(model.head.weight)).backward()
        pi_fb += timer.now() - t0
    opt.zero_grad(set_to_none=True)

    rec = base("train", arch, device, batch)
    rec.update({
        "images_per_s": round(batch * steps / step_total, 1),
        "seconds": round(step_total, 4),
        "steps": steps,
        "step_ms": round(1e3 * step_total / steps, 2),
        "pi_ms": round(1e3 * pi_total / steps, 2),
        "pi_share": round(pi_total / step_total, 4),
        "pi_fwd_bwd_ms": round(1e3 * pi_fb / pi_reps, 2),
        "pi_fwd_bwd_share": round(pi_fb / pi_reps / (step_total / steps), 4),
        "peak_mem_mb": peak_mem_mb(device),
    })
    return rec


# ---------------------------------------------------------------- bound
def bench_bound(arch: str, device: torch.device, model: torch.nn.Module, skip: str | None,
                warm: bool = True) -> dict:
    rec = base("bound", arch, device, None)
    if skip:
        rec.update({"images_per_s": None, "seconds": None, "skipped": skip,
                    "peak_mem_mb": peak_mem_mb(device)})
        return rec
    timer = Timer(device)
    reset_peak(device)
    t0 = timer.now()
    bound = lipschitz.upper_bound_body(model)
    t1 = timer.now()
    est = lipschitz.converged_body(model)  # cold start: fresh random iterates
    t2 = timer.now()
    if warm:
        t3 = timer.now()
        lipschitz.converged_body(model)    # warm start: the iterates just converged
        t4 = timer.now()
    rec.update({
        "images_per_s": None,
        "seconds": round(t1 - t0, 4),  # = upper_bound_seconds
        "upper_bound_seconds": round(t1 - t0, 4),
        "converged_seconds": round(t2 - t1, 4),
        "upper_bound_body": bound,
        "converged_body": est,
        "peak_mem_mb": peak_mem_mb(device),
    })
    if warm:
        rec["converged_warm_seconds"] = round(t4 - t3, 4)
    return rec


# ---------------------------------------------------------------- certify
def bench_certify(arch: str, device: torch.device, model: torch.nn.Module, n: int, batch: int,
                  skip: str | None) -> dict:
    rec = base("certify", arch, device, batch)
    rec["n_images"] = n
    if skip:
        rec.update({"images_per_s": None, "seconds": None, "skipped": skip,
                    "peak_mem_mb": peak_mem_mb(device)})
        return rec
    gen = torch.Generator().manual_seed(1)
    # batches on the host, as a DataLoader would hand them to certify (which moves them)
    data = [random_batch(arch, min(batch, n - s), torch.device("cpu"), gen) for s in range(0, n, batch)]
    timer = Timer(device)
    model.eval()
    # untimed warm-up: kernels/allocator, and warm power-iteration iterates (a trained model's
    # iterates are warm: training converges them at every epoch end)
    lipschitz.converged_body(model)
    with torch.no_grad():
        model(data[0][0].to(device))
    reset_peak(device)

    t0 = timer.now()
    certify.certify(model, data, device=device)
    t1 = timer.now()
    with torch.no_grad():
        for x, _ in data:
            model(x.to(device))
    t2 = timer.now()
    lipschitz.upper_bound_body(model)
    t3 = timer.now()
    cert, inf, bound = t1 - t0, t2 - t1, t3 - t2
    rec.update({
        "images_per_s": round(n / cert, 1),
        "seconds": round(cert, 4),
        "inference_seconds": round(inf, 4),
        "inference_images_per_s": round(n / inf, 1),
        "bound_seconds": round(bound, 4),
        "ratio_to_inference_plus_bound": round(cert / (inf + bound), 3),
        "target_ratio": 1.2,
        "peak_mem_mb": peak_mem_mb(device),
    })
    return rec


# ---------------------------------------------------------------- snakemake dry run
def bench_dryrun() -> dict:
    exe = REPO / ".venv" / "bin" / "snakemake"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]
    cmd += ["-n", "all_tables", "--configfile", "config/paper.yaml"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    rec = {"what": "dryrun", "arch": None, "device": "cpu", "batch": None, "images_per_s": None,
           "seconds": round(dt, 3), "returncode": proc.returncode,
           "command": " ".join(cmd[-5:]),
           # children's max RSS (snakemake's own process)
           "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-500:]
    return rec


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=sorted(SPECS),
                    help="architecture (repeatable; default: all of %s)" % ", ".join(SPECS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--quick", action="store_true", help="few steps / images; smaller 8C2F batch on CPU")
    ap.add_argument("--batch", type=int, help="training batch size for every arch (default: recipe)")
    ap.add_argument("--only", action="append", choices=["train", "certify", "bound", "dryrun"],
                    help="run only these measurements (repeatable; default all)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    archs = args.arch or list(SPECS)
    only = set(args.only or ["train", "certify", "bound", "dryrun"])
    quick_cpu = args.quick and device.type == "cpu"
    warmup, steps, pi_reps = (1, 2, 1) if args.quick else (5, 20, 5)
    n_cert, cert_batch = (500, 500) if args.quick else (10000, 1000)
    log(f"# torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cpus, "
        f"threads {torch.get_num_threads()}, device {device}, quick={args.quick}")

    t_start = time.perf_counter()
    for arch in archs:
        if "train" in only:
            batch = args.batch or SPECS[arch][3]
            if quick_cpu and args.batch is None:
                batch = QUICK_CPU_BATCH.get(arch, batch)
            log(f"train {arch} batch {batch}")
            guarded("train", arch, device, bench_train, arch, device, batch, warmup, steps, pi_reps)
        skip = QUICK_CPU_SKIP_BOUND.get(arch) if quick_cpu else None
        if only & {"bound", "certify"}:
            torch.manual_seed(0)
            model = build(arch, device)  # fresh model: the bound line's converged time is cold
            if "bound" in only:
                log(f"bound {arch}")
                guarded("bound", arch, device, bench_bound, arch, device, model, skip, warm=not args.quick)
            if "certify" in only:
                log(f"certify {arch}")
                guarded("certify", arch, device, bench_certify, arch, device, model, n_cert, cert_batch, skip)
    if "dryrun" in only:
        log("snakemake dry run")
        guarded("dryrun", None, device, bench_dryrun)
    log(f"# total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
