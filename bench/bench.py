#!/usr/bin/env python
"""Hand-run benchmark of cll: training step, certifier, sound bound, snakemake dry run.

    python bench/bench.py --quick                      # every registered arch, CPU, ~1 min on 2 cores
    python bench/bench.py --device cuda                # full run on a GPU (recipe batch sizes)
    python bench/bench.py --arch 8C2F --arch 6C2F --only train      # the pi_share targets
    python bench/bench.py --device cuda --arch 8C2F --amp --compile --only train

Prints one JSON line per measurement on stdout (progress goes to stderr). Not run by CI.
Every architecture of the registry (cll.models) is measured, with the recipe of its first row in
config/paper.yaml (data set shape, loss, batch size), or a fallback recipe. See bench/README.md for
the meaning of every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from cll import certify, data, lipschitz, losses, models, train
from cll.config import RunConfig, build_config
from cll.errors import CllError
from cll.layers.basic import EvalCache

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "paper.yaml"

# archs with no row in config/paper.yaml: the data set they are trained on in the GloRo/CLL
# recipes (batch: the RunConfig default, 128, as the GloRo CIFAR/MNIST recipes)
FALLBACK_DATASET = {"4C3F": "cifar10", "6C2F": "cifar10", "2C2F": "mnist", "moons-mlp": "moons"}
# keys of a paper row's `set` that do not matter to a benchmark on random inputs
IGNORED_KEYS = {"data_root", "num_workers", "epochs", "milestones", "max_train", "max_test"}

# --quick on CPU: a train batch this small for models with more parameters than QUICK_BIG_PARAMS
# (and a narrower model where the builder takes ``width``); bound and certify skipped above
# QUICK_BOUND_PARAMS (8C2F, 4.3 M: its sound bound is tens of seconds on 2 loaded cores)
QUICK_BATCH = 16
QUICK_BIG_PARAMS = 3_000_000
QUICK_WIDTH = 0.25
QUICK_BOUND_PARAMS = 3_000_000
TARGETS = {"pi_share": 0.10, "certify_ratio": 1.2, "dryrun_seconds": 3.0}
POOL = 4  # random training batches, stepped through in turn


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


def base(what: str, arch: str | None, device: torch.device, batch: int | None) -> dict:
    """The keys every line has (filled in by the measurement)."""
    return {
        "what": what,
        "arch": arch,
        "device": str(device),
        "batch": batch,
        "images_per_s": None,
        "seconds": None,
        "peak_mem_mb": None,
    }


def guarded(what: str, arch: str | None, device: torch.device, fn, *args, **kwargs) -> dict | None:
    """Run one measurement; a failure becomes a line with an ``error`` key and the run goes on."""
    try:
        rec = fn(*args, **kwargs)
    except Exception as err:
        rec = base(what, arch, device, None)
        rec["error"] = f"{type(err).__name__}: {err}"[:300]
    emit(rec)
    return rec


# ---------------------------------------------------------------- recipes
def paper_recipes() -> dict[str, dict]:
    """arch -> run-config values of its first row in config/paper.yaml (pending rows included:
    their ``set`` records the reference recipe)."""
    grid = yaml.safe_load(PAPER.read_text()) if PAPER.is_file() else {}
    defaults = grid.get("defaults") or {}
    out: dict[str, dict] = {}
    for table in grid.get("tables") or []:
        for row in table.get("rows") or []:
            if row.get("arch") in out:
                continue
            first = lambda v: v[0] if isinstance(v, list) else v
            values = {
                **defaults,
                **(row.get("set") or {}),
                "dataset": row["dataset"],
                "arch": row["arch"],
                "loss": row["loss"],
                "eps": first(row["eps"]),
            }
            if "p" in row:
                values["p"] = first(row["p"])
            out[row["arch"]] = {k: v for k, v in values.items() if k not in IGNORED_KEYS}
    return out


def recipe(arch: str, paper: dict[str, dict]) -> tuple[RunConfig, str]:
    """The run config of ``arch`` for the benchmark and where it came from. A paper row whose loss
    is not registered yet falls back to CLL with that row's other settings."""
    if arch in paper:
        values, source = dict(paper[arch]), "config/paper.yaml"
        if values["loss"] not in losses.names():
            source += f" (loss {values['loss']} not registered: cll)"
            values["loss"] = "cll"
    else:
        values = {"dataset": FALLBACK_DATASET.get(arch, "cifar10"), "arch": arch, "loss": "cll"}
        source = "fallback"
    values["device"] = "cpu"  # the benchmark places the model itself
    return build_config(values), source


def build(cfg: RunConfig, width: float | None = None) -> tuple[torch.nn.Module, float | None]:
    """The run's model (train.build_model); ``width``: a narrower one (every family scales its
    widths by ``width``), else the run's own. Returns (model, width used)."""
    if width is None:
        return train.build_model(cfg), None
    return train.build_model(dataclasses.replace(cfg, width=width)), width


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_batch(cfg: RunConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    info = data.dataset_info(cfg.dataset)
    return torch.rand(n, *info.in_shape, generator=gen), torch.randint(0, info.num_classes, (n,), generator=gen)


# ---------------------------------------------------------------- train
def bench_train(
    cfg: RunConfig, model: torch.nn.Module, device: torch.device, warmup: int, steps: int, pi_reps: int
) -> dict:
    """The training step of cll.train (train.make_step: PI with gradient, forward, loss, backward,
    optimizer step) on a pool of random batches, and the power iterations alone (forward +
    backward). The figure is the median step, as the reference harness reports it."""
    gen = torch.Generator().manual_seed(0)
    model = train.prepare_model(model, cfg, device)
    model.train()
    criterion = losses.create(cfg)
    optimizer = train.make_optimizer(cfg, model)
    step = train.make_step(cfg, model, criterion, optimizer, device)
    # a pool of POOL batches, stepped through in turn (as shared/bench-ref/ref_cll_bench.py does)
    pool = [train.to_device(*random_batch(cfg, cfg.batch_size, gen), device) for _ in range(POOL)]
    timer = Timer(device)

    for i in range(warmup):
        step(*pool[i % POOL], 0.5)
    reset_peak(device)
    times = []
    for i in range(steps):
        t0 = timer.now()
        step(*pool[i % POOL], 0.5)
        times.append(timer.now() - t0)

    # the power iterations' share: their forward (estimate_body) and the backward through them
    # (the K penalty differentiates them; inside the step it is part of loss.backward())
    fwd_times, fb_times = [], []  # pi_reps 0: not measured
    for _ in range(pi_reps):
        t0 = timer.now()
        k = lipschitz.estimate_body(model, cfg.pi_iters)
        t1 = timer.now()
        (k * lipschitz.max_row_distance(model.head.weight)).backward()
        t2 = timer.now()
        fwd_times.append(t1 - t0)
        fb_times.append(t2 - t0)
    # the median: on a CPU a batch-1 kernel's time swings with the allocator's state
    pi_fwd, pi_fb = (statistics.median(t) if t else math.nan for t in (fwd_times, fb_times))
    optimizer.zero_grad(set_to_none=True)
    step_s = statistics.median(times)

    rec = base("train", cfg.arch, device, cfg.batch_size)
    rec.update(
        {
            "images_per_s": round(cfg.batch_size / step_s, 1),
            "seconds": round(sum(times), 4),
            "steps": steps,
            "step_ms": round(1e3 * step_s, 2),
            "step_ms_min": round(1e3 * min(times), 2),
            "step_ms_max": round(1e3 * max(times), 2),
            "pi_share": None if math.isnan(pi_fb) else round(pi_fb / step_s, 4),
            "pi_ms": None if math.isnan(pi_fb) else round(1e3 * pi_fb, 2),
            "pi_fwd_ms": None if math.isnan(pi_fwd) else round(1e3 * pi_fwd, 2),
            "pi_iters": cfg.pi_iters,
            "loss": cfg.loss,
            "amp": cfg.amp,
            "compile": cfg.compile,
            "peak_mem_mb": peak_mem_mb(device),
        }
    )
    return rec


# ---------------------------------------------------------------- bound
def bench_bound(cfg: RunConfig, model: torch.nn.Module, device: torch.device, warm: bool) -> dict:
    timer = Timer(device)
    reset_peak(device)
    t0 = timer.now()
    bound = lipschitz.upper_bound_body(model)
    t1 = timer.now()
    est = lipschitz.estimate_converged_body(model)  # cold start: fresh random iterates
    t2 = timer.now()
    rec = base("bound", cfg.arch, device, None)
    rec.update(
        {
            "seconds": round(t1 - t0, 4),  # = upper_bound_seconds
            "upper_bound_seconds": round(t1 - t0, 4),
            "converged_seconds": round(t2 - t1, 4),
            "upper_bound_body": bound,
            "converged_body": est,
            "peak_mem_mb": peak_mem_mb(device),
        }
    )
    if warm:
        t3 = timer.now()
        lipschitz.estimate_converged_body(model)  # warm start: the iterates just converged
        rec["converged_warm_seconds"] = round(timer.now() - t3, 4)
    return rec


# ---------------------------------------------------------------- certify
def forget_derived(model: torch.nn.Module) -> None:
    """Drop what layers derived from their weights (cached bounds and factors), so that a timing
    includes computing them."""
    for module in model.modules():
        if isinstance(module, EvalCache):
            module.clear_cache()


def bench_certify(
    cfg: RunConfig,
    model: torch.nn.Module,
    device: torch.device,
    n: int,
    batch: int,
    batches: list | None = None,
    repeats: int = 1,
) -> dict:
    """certify.certify of ``n`` images against inference of the same images plus one bound of the
    body from scratch, medians of ``repeats``. ``batches``: the images (a trained run's test set),
    else random ones."""
    if batches is None:
        gen = torch.Generator().manual_seed(1)
        # batches on the host, as a DataLoader would hand them to certify (which moves them)
        batches = [random_batch(cfg, min(batch, n - s), gen) for s in range(0, n, batch)]
    timer = Timer(device)
    model.eval()
    # untimed warm-up: kernels/allocator, and warm power-iteration iterates (a trained model's
    # iterates are warm: training converges them at every epoch end)
    lipschitz.estimate_converged_body(model)
    with torch.no_grad():
        model(batches[0][0].to(device))
    reset_peak(device)

    times = []
    for _ in range(repeats):  # alternating, each from scratch: the medians are compared
        forget_derived(model)
        t0 = timer.now()
        out = certify.certify(model, batches, device=device)
        t1 = timer.now()
        with torch.no_grad():
            for x, _ in batches:
                model(x.to(device))
        forget_derived(model)  # the bound once more, from scratch (certify computed and cached it)
        t2 = timer.now()
        lipschitz.upper_bound_body(model)
        t3 = timer.now()
        times.append((t1 - t0, t2 - t1, t3 - t2))
    cert, inf, bound = (statistics.median(t) for t in zip(*times))
    rec = base("certify", cfg.arch, device, batch)
    rec.update(
        {
            "n_images": n,
            "images_per_s": round(n / cert, 1),
            "seconds": round(cert, 4),
            "repeats": repeats,
            "inference_seconds": round(inf, 4),
            "inference_images_per_s": round(n / inf, 1),
            "bound_seconds": round(bound, 4),
            "ratio_to_inference_plus_bound": round(cert / (inf + bound), 3),
            "float64_share": out["float64_share"],  # samples the certifier recomputed in float64
            "float64_resumed_share": out["float64_resumed_share"],  # ... from its restart layer on
            "target_ratio": TARGETS["certify_ratio"],
            "peak_mem_mb": peak_mem_mb(device),
        }
    )
    return rec


# ---------------------------------------------------------------- snakemake dry run
def bench_dryrun() -> dict:
    exe = REPO / ".venv" / "bin" / "snakemake"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]
    cmd += ["-n", "all_tables", "--configfile", "config/paper.yaml"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    rec = base("dryrun", None, torch.device("cpu"), None)
    rec.update(
        {
            "seconds": round(dt, 3),
            "returncode": proc.returncode,
            "command": " ".join(cmd[-5:]),
            "target_seconds": TARGETS["dryrun_seconds"],
            # children's max RSS (snakemake's own process)
            "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        }
    )
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-500:]
    return rec


def bench_run(run_dir: str, device: torch.device, n: int, batch: int) -> dict:
    """``bench_certify`` of a trained run (``cll train``) on the first ``n`` images of its own test
    set, medians of 5: random weights and inputs hide the float64 share a trained model's near-ties
    cost."""
    cfg, model = train.load_run(run_dir, device)
    _, test, _ = data.load_dataset(cfg.dataset, root=cfg.data_root, augment=False, seed=cfg.seed, max_test=n)
    batches = list(torch.utils.data.DataLoader(test, batch_size=batch))
    rec = bench_certify(cfg, model, device, len(test), batch, batches, repeats=5)
    return {**rec, "arch": cfg.arch, "run": str(run_dir), "epochs": cfg.epochs}


def one_per_family(names: list[str]) -> list[str]:
    """The first registered arch of each family (the name before its size suffix: LipConv-5 for
    LipConv-*, CPL-S for CPL-*), in registry order: what --quick measures by default."""
    seen: set[str] = set()
    return [n for n in names if not (n.split("-")[0] in seen or seen.add(n.split("-")[0]))]


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = models.names()
    ap.add_argument(
        "--arch",
        action="append",
        metavar="NAME",
        help="architecture (repeatable; default: every registered one: {})".format(", ".join(names)),
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one arch per family unless --arch, few steps and images; on CPU big models at "
        "batch 16 / narrower, no big bounds",
    )
    ap.add_argument("--batch", type=int, help="training batch size for every arch (default: recipe)")
    ap.add_argument(
        "--only",
        action="append",
        choices=["train", "certify", "bound", "dryrun"],
        help="run only these measurements (repeatable; default all)",
    )
    ap.add_argument("--amp", action="store_true", help="train with amp: true (bf16 autocast; cuda only)")
    ap.add_argument("--compile", action="store_true", help="train with compile: true (torch.compile)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument(
        "--cert-images", type=int, help="images certified per arch, in batches of up to 1000 (default 10000; quick 100)"
    )
    ap.add_argument(
        "--run",
        action="append",
        metavar="DIR",
        help="certify this trained run on its test set instead of the archs (repeatable; see bench/README.md)",
    )
    args = ap.parse_args(argv)
    unknown = [a for a in args.arch or [] if a not in names]
    if unknown:
        ap.error(f"--arch {unknown[0]!r} is not registered; allowed: {', '.join(names)}")
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch {args.batch}: expected an integer >= 1")
    if args.cert_images is not None and args.cert_images < 1:
        ap.error(f"--cert-images {args.cert_images}: expected an integer >= 1")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.arch or (one_per_family(names) if args.quick else names)
    only = set(args.only or ["train", "certify", "bound", "dryrun"])
    quick_cpu = args.quick and device.type == "cpu"
    warmup, steps, pi_reps = (1, 2, 1) if args.quick else (3, 10, 11)
    n_cert = args.cert_images or (100 if args.quick else 10000)
    cert_batch = min(n_cert, 1000)
    log(
        f"# torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cpus, "
        f"threads {torch.get_num_threads()}, device {device}, quick={args.quick}"
    )
    t_start = time.perf_counter()
    if args.run:
        for run_dir in args.run:
            log(f"certify the trained run {run_dir}")
            guarded("certify", None, device, lambda: bench_run(run_dir, device, n_cert, cert_batch))
        log(f"# total {time.perf_counter() - t_start:.1f} s")
        return 0
    paper = paper_recipes()
    for arch in archs:
        try:
            cfg, source = recipe(arch, paper)
            overrides = {"amp": args.amp, "compile": args.compile}
            if args.batch:
                overrides["batch_size"] = args.batch
            cfg = build_config({**cfg.to_dict(), **overrides})
        except CllError as err:
            emit({**base("train", arch, device, None), "error": f"recipe: {err}"})
            continue
        with torch.device("meta"):  # the full size's parameter count, without building it (minutes)
            big = n_params(build(cfg)[0]) > QUICK_BIG_PARAMS
        torch.manual_seed(0)
        if quick_cpu and big:
            model, width = build(cfg, QUICK_WIDTH)
            if args.batch is None:
                cfg = build_config({**cfg.to_dict(), "batch_size": min(cfg.batch_size, QUICK_BATCH)})
        else:
            model, width = build(cfg)
        scaled = {"recipe": source, "params": n_params(model), "width": width}
        if "train" in only:
            log(f"train {arch} batch {cfg.batch_size} ({scaled})")
            guarded(
                "train", arch, device, lambda: {**bench_train(cfg, model, device, warmup, steps, pi_reps), **scaled}
            )
        if only & {"bound", "certify"}:
            torch.manual_seed(0)
            fresh, _ = build(cfg, width)  # fresh model: the bound line's converged time is cold
            fresh = fresh.to(device)
            skip = None
            if quick_cpu and n_params(fresh) > QUICK_BOUND_PARAMS:
                skip = (
                    f"--quick on CPU: {n_params(fresh)} parameters > {QUICK_BOUND_PARAMS}; run "
                    f"`bench.py --arch {arch} --only bound --only certify` for it"
                )
            for what, fn in (
                ("bound", lambda: bench_bound(cfg, fresh, device, warm=not args.quick)),
                ("certify", lambda: bench_certify(cfg, fresh, device, n_cert, cert_batch)),
            ):
                if what not in only:
                    continue
                if skip:
                    emit({**base(what, arch, device, None), "skipped": skip, **scaled})
                    continue
                log(f"{what} {arch}")
                guarded(what, arch, device, lambda: {**fn(), **scaled})
    if "dryrun" in only:
        log("snakemake dry run")
        guarded("dryrun", None, device, bench_dryrun)
    log(f"# total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
