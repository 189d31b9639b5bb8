#!/usr/bin/env python
"""cll against the CLL reference implementation, side by side on this machine.

    python bench/vs_reference.py REF_DIR                       # 4C3F, 6C2F, 8C2F: train + certify
    python bench/vs_reference.py REF_DIR --arch 4C3F --only train --runs 5 --threads 1

REF_DIR is the reference's ``unconstrained/`` folder made runnable by ``shared/bench-ref/prepare.sh``;
the reference side runs that folder's harness, ``shared/bench-ref/ref_cll_bench.py`` (``--harness``),
which imports the reference's own model, loss and optimizer code and contains none of it. Every
measurement is a fresh process (its own peak RSS), the two sides alternating (reference first in
even runs, cll first in odd ones), ``--runs`` times each.

train: one training step of the reference recipe of each arch (the seed-1 config of the reference's
experiment folder; cll: the same run config, ``REFERENCE_RECIPES``), random inputs, median step time
of ``--steps`` after ``--warmup``; images/s = batch / median step.
certify: 1000 random test images of an 8C2F after a few training steps (batch 64): the reference's
epoch-end convergence (``post_training_hook``) + its eval pass with RobustAccuracy at 36/255, against
cll's epoch-end convergence (``estimate_converged_body``) + ``certify.certify`` of the run's weights
loaded as `cll certify` loads them (the sound bound, the float32 screening and the float64 pass);
``certify_s`` is the second part alone.

stdout: one JSON line per measurement and one ``summary`` line per arch and measurement (medians,
their ratio ``speedup``, peak RSS of both sides, load average; for certify also each phase's median
and ``speedup_vs_cll_certify``, the reference's convergence + eval against ``certify_s`` alone);
stderr: progress and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO.parent / "shared" / "bench-ref" / "ref_cll_bench.py"

# arch -> the reference's seed-1 config of that experiment folder, in cll's run-config keys
REFERENCE_RECIPES = {
    "4C3F": {"dataset": "cifar10", "loss": "cll", "cll_form": "pairwise", "eps": 0.15, "p": 0.3,
             "lip_penalty": 1e-4, "lr": 1e-3, "batch_size": 128},
    "6C2F": {"dataset": "cifar10", "loss": "cll", "cll_form": "per_logit", "eps": 0.15, "p": 0.3,
             "lip_penalty": 1e-6, "lr": 1e-3, "batch_size": 128},
    "8C2F": {"dataset": "tinyimagenet", "loss": "cll", "cll_form": "per_logit", "eps": 1.0, "p": 0.025,
             "k_scale_start": 0.01, "k_scale_power": 10.0, "lip_penalty": 1e-3, "lr": 2.5e-4,
             "batch_size": 256},
}  # fmt: skip
COMMON = {"optimizer": "adamw", "weight_decay": 0.0, "pi_iters": 5, "device": "cpu"}
STEPS = {"4C3F": (3, 20), "6C2F": (3, 20), "8C2F": (2, 5)}  # (warmup, timed steps) per run
CERT_ARCH, CERT_N, CERT_BATCH, CERT_TRAIN_BATCH, CERT_TRAIN_STEPS = "8C2F", 1000, 1000, 64, 3
TARGETS = {"train": 1.5, "certify": 5.0}  # cll / reference


# bench.log and bench.emit again: the driver imports neither bench.py nor torch (it only starts the
# two sides' processes, so neither side's figures pay for the other's imports)
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


# ---------------------------------------------------------------- the cll side (a child process)
def cll_config(arch: str, **overrides):
    from cll.config import build_config

    return build_config({**COMMON, **REFERENCE_RECIPES[arch], "arch": arch, **overrides})


def cll_train(arch: str, warmup: int, steps: int) -> dict:
    import torch

    import bench  # bench/bench.py, beside this file
    from cll import train

    cfg = cll_config(arch)
    torch.manual_seed(1)
    rec = bench.bench_train(cfg, train.build_model(cfg), torch.device("cpu"), warmup, steps, pi_reps=0)
    return {"img_per_s": rec["images_per_s"], "step_ms": rec["step_ms"], "peak_rss_mb": peak_rss_mb()}


def cll_certify(arch: str) -> dict:
    """What `cll train` does at an epoch end (converge the iterates) and what `cll certify` does
    after it (load the run's weights into a fresh model, certify), after a few training steps."""
    import torch

    import bench
    from cll import certify, lipschitz, losses, train

    cfg = cll_config(arch, batch_size=CERT_TRAIN_BATCH)
    torch.manual_seed(1)
    device = torch.device("cpu")
    model = train.prepare_model(train.build_model(cfg), cfg, device)
    step = train.make_step(cfg, model, losses.create(cfg), train.make_optimizer(cfg, model), device)
    gen = torch.Generator().manual_seed(0)
    for _ in range(CERT_TRAIN_STEPS):  # a trained state: weights and iterates moved by training
        step(*train.to_device(*bench.random_batch(cfg, CERT_TRAIN_BATCH, gen), device), 0.5)
    batches = [bench.random_batch(cfg, CERT_BATCH, gen) for _ in range(CERT_N // CERT_BATCH)]
    t0 = time.perf_counter()
    lipschitz.estimate_converged_body(model, cfg.pi_tol)  # the epoch end of cll.train.train
    t1 = time.perf_counter()
    run = train.build_model(cfg)  # as cll.train.load_run builds the model `cll certify` certifies
    run.load_state_dict(model.state_dict())
    out = certify.certify(run, batches, device=device)
    t2 = time.perf_counter()
    return {
        "total_s": round(t2 - t0, 3),
        "converge_s": round(t1 - t0, 3),
        "certify_s": round(t2 - t1, 3),
        "float64_share": out["float64_share"],
        "cra36": out["cra"][min(out["cra"])],
        "peak_rss_mb": peak_rss_mb(),
    }


def cll_side(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    (arch,) = args.arch
    if args.cll_side == "train":
        emit(cll_train(arch, args.warmup or STEPS[arch][0], args.steps or STEPS[arch][1]))
    else:
        emit(cll_certify(arch))
    return 0


# ---------------------------------------------------------------- the driver
def run_json(cmd: list[str], env: dict) -> dict:
    """The last JSON line a child process prints (its stderr is kept for the error message)."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(lines[-1])


def reference(args, what: str, arch: str) -> dict:
    cmd = [sys.executable, str(args.harness), "--ref-dir", str(args.ref_dir), "--arch", arch]
    cmd += ["--threads", str(args.threads)]
    if what == "train":
        warmup, steps = args.warmup or STEPS[arch][0], args.steps or STEPS[arch][1]
        batch = REFERENCE_RECIPES[arch]["batch_size"]
        cmd += ["--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--no-cert"]
        rec = run_json(cmd, dict(os.environ))
        return {"img_per_s": rec["img_per_s"]["median"], "step_ms": round(1e3 * rec["step_s"]["median"], 2),
                "peak_rss_mb": rec["peak_rss_mb_after"]}  # fmt: skip
    cmd += ["--batch", str(CERT_TRAIN_BATCH), "--steps", str(CERT_TRAIN_STEPS), "--warmup", "0"]
    cmd += ["--cert-n", str(CERT_N), "--cert-batch", str(CERT_BATCH)]
    rec = run_json(cmd, dict(os.environ))
    return {"total_s": round(rec["total_s"], 3), "converge_s": round(rec["converge_s"], 3),
            "eval_s": round(rec["forward_s"] + rec["robustacc_metric_s"] + rec["accuracy_metric_s"], 3),
            "cra36": rec["cra36_pct"], "peak_rss_mb": rec["peak_rss_mb_after"]}  # fmt: skip


def ours(args, what: str, arch: str) -> dict:
    cmd = [sys.executable, __file__, str(args.ref_dir), "--cll-side", what, "--arch", arch]
    cmd += ["--threads", str(args.threads)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.warmup:
        cmd += ["--warmup", str(args.warmup)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return run_json(cmd, env)


def compare(args, what: str, arch: str) -> dict:
    """``args.runs`` alternating measurements of both sides; their medians and ratio."""
    key = "img_per_s" if what == "train" else "total_s"
    sides: dict[str, list[dict]] = {"reference": [], "cll": []}
    load = [os.getloadavg()[0]]
    for run in range(args.runs):
        order = ("reference", "cll") if run % 2 == 0 else ("cll", "reference")
        for side in order:
            log(f"{what} {arch} run {run + 1}/{args.runs}: {side}")
            rec = (reference if side == "reference" else ours)(args, what, arch)
            sides[side].append(rec)
            emit({"what": what, "arch": arch, "side": side, "run": run, **rec})
        load.append(os.getloadavg()[0])
    ref, cll = (statistics.median(r[key] for r in sides[s]) for s in ("reference", "cll"))
    ratio = cll / ref if what == "train" else ref / cll  # > 1: cll faster
    summary = {
        "what": what,
        "summary": True,
        "arch": arch,
        "threads": args.threads,
        "runs": args.runs,
        f"reference_{key}": round(ref, 3),
        f"cll_{key}": round(cll, 3),
        "speedup": round(ratio, 3),
        "target": TARGETS[what],
        "reference_peak_rss_mb": max(r["peak_rss_mb"] for r in sides["reference"]),
        "cll_peak_rss_mb": max(r["peak_rss_mb"] for r in sides["cll"]),
        "load_avg_1min": [round(x, 2) for x in load],
    }
    if what == "certify":  # the phases, and the issue's figure: the reference's epoch-end
        # convergence + eval pass against `cll certify` alone (its sound bound needs no converged
        # iterates; `speedup` above also counts cll's own epoch-end convergence)
        for side, phases in (("reference", ("converge_s", "eval_s")), ("cll", ("converge_s", "certify_s"))):
            for phase in phases:
                summary[f"{side}_{phase}"] = round(statistics.median(r[phase] for r in sides[side]), 3)
        summary["speedup_vs_cll_certify"] = round(ref / summary["cll_certify_s"], 3)
    emit(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref_dir", type=Path, help="the reference's unconstrained/ folder, prepared by prepare.sh")
    ap.add_argument("--arch", action="append", choices=sorted(REFERENCE_RECIPES), help="repeatable; default all")
    ap.add_argument("--only", action="append", choices=["train", "certify"], help="repeatable; default both")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs of each side (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of both sides (default 2)")
    ap.add_argument("--steps", type=int, help="timed training steps per run (default 20; 8C2F 5)")
    ap.add_argument("--warmup", type=int, help="untimed training steps first (default 3; 8C2F 2)")
    ap.add_argument("--harness", type=Path, default=HARNESS, help=f"the reference harness (default {HARNESS})")
    ap.add_argument("--cll-side", choices=["train", "certify"], help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.cll_side:
        return cll_side(args)
    if not (args.ref_dir / "model" / "model_builder.py").is_file():
        ap.error(f"{args.ref_dir} is not the reference's unconstrained/ folder (no model/model_builder.py)")
    if not args.harness.is_file():
        ap.error(f"no reference harness at {args.harness}; pass --harness PATH")
    archs = args.arch or list(REFERENCE_RECIPES)
    only = args.only or ["train", "certify"]
    log(f"# {os.cpu_count()} cpus, {args.threads} threads, {args.runs} runs, load {os.getloadavg()}")
    rows = []
    if "train" in only:
        rows += [compare(args, "train", arch) for arch in archs]
    if "certify" in only:
        rows.append(compare(args, "certify", CERT_ARCH))
    log("\n| what | arch | reference | cll | speedup (target) | peak RSS MB ref / cll | load |")
    log("|---|---|---|---|---|---|---|")
    for r in rows:
        unit, key = ("img/s", "img_per_s") if r["what"] == "train" else ("s", "total_s")
        log(
            f"| {r['what']} | {r['arch']} | {r['reference_' + key]} {unit} | {r['cll_' + key]} {unit} | "
            f"{r['speedup']}x ({r['target']}x) | {r['reference_peak_rss_mb']:.0f} / {r['cll_peak_rss_mb']:.0f} | "
            f"{min(r['load_avg_1min'])}-{max(r['load_avg_1min'])} |"
        )
        if r["what"] == "certify":
            log(
                f"| certify: `cll certify` alone | {r['arch']} | {r['reference_total_s']} s "
                f"(converge {r['reference_converge_s']} + eval {r['reference_eval_s']}) | "
                f"{r['cll_certify_s']} s (+ converge {r['cll_converge_s']}) | "
                f"{r['speedup_vs_cll_certify']}x ({r['target']}x) | | |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
