#!/usr/bin/env python
"""Local-Lip-B certification: cll's sound local bound against the Local-Lip-B authors' own code.

    git --git-dir=GIT_DIR archive HEAD Local_bound.py utils.py | tar -x -C REF
    python bench/vs_local_lip.py --ref REF --cifar DATA/cifar-10-batches-py --train-steps 150 --weights W.pt

GIT_DIR: a clone of github.com/yjhuangcd/local-lipschitz (written against its commit 483069d; a
mirror without the checkpoints' blobs complains about them, and extracts the two files). DATA: the
CIFAR-10 subset of ../shared/data (cifar10-subset.tgz). The first call trains and writes W.pt,
later calls load it.

Huang, Zhang, Shi, Kolter, Anandkumar, "Training Certifiably Robust Neural Networks with Efficient
Local Lipschitz Bounds", NeurIPS 2021, arXiv 2111.01395. Run by hand, never in CI; the figures are
in bench/README.md. One model, the same weights on both sides: the authors' CIFAR-10 6C2F with
clipped MaxMin (``utils.c6f2_clmaxmin``, their smallest clipped-MaxMin net; their Tiny-ImageNet
8C2F is the same construction with ~17x its multiply-adds per image) and cll's ``6C2F`` with
``activation: clipped_maxmin``. Its parameters (their initialisation) are mapped into cll
(``parameter_pairs``), optionally trained there for ``--train-steps`` steps of cll's
``local_lip_b`` loss on CIFAR-10 training images (only to get a model whose certificates are not
all trivial; cached in ``--weights``), and mapped back, and the two forwards are checked to agree
(float64 and float32: to rounding; the map only permutes rows, so they agree bitwise in
practice). Then, alternating, on the same N test images (``--runs`` times each, medians):

(a) the authors' certification, as their ``evaluate.py`` runs it (``Local_bound.robust_loss``:
    per-sample masked norms by power iteration from random vectors, up to ``--sniter`` iterations
    per layer with their early stop, the ball radius from power-iteration estimates of the global
    norms, then their BCP worst-case logits with up to ``--opt-iter`` refinement steps; certified
    where the worst-case logits still pick the label). An estimate: it may over-claim.
(b) cll's local certification: ``certify.Certifier`` (sound global K_F, float32 margins less their
    rounding bound, float64 where needed), then ``certify.LocalCertifier`` for the samples that
    are classified right but not certified at eps (sound local bound ``LocalBound``, float64
    margins less their rounding). Both certifiers are built inside the timing (cll's sound global
    bound is computed per model; the authors' code re-estimates its global norms per batch).
(c) cll's global certification alone (``Certifier``), for reference.

Printed: one JSON line per side and run, then a summary line (medians; ``ratio_local_to_authors``
= (b) / (a) in seconds, target <= 2; ``local_share`` = the samples (b) sends to the local bound;
the CRA of each side, and how their decisions overlap) and a Markdown table on stderr.

Running the authors' code here (nothing of it is in this file: it is imported at run time from a
copy of REF that the script prepares in a temporary folder):

* edits to the copy (``EDITS``, each must match exactly once):
  - ``Local_bound.py``: ``torch.randn((*self.in_size[i]), `` -> ``torch.randn(tuple(self.in_size[i]), ``
    (in ``local_linear``: a parenthesised starred expression is a syntax error since Python 3.9);
  - ``Local_bound.py``: ``.type(torch.cuda.FloatTensor)`` -> ``.type(torch.FloatTensor)`` (the
    off-diagonal mask of ``BCP_translation``, on the CPU);
* shims while it runs (``bench/vs_forks.py``: ``forks_on_cpu``, ``imported_from``): ``.cuda()`` of
  tensors and modules is a no-op, and ``setproctitle`` and ``advertorch`` (imported, unused here)
  are empty stand-ins where not installed.

Parameter map (authors -> cll): ``model[i]`` -> ``body[i]`` for i < 15, ``model[15]`` -> ``head``.
Their ClampGroupSort pairs channel c with c + C/2, cll's ClippedMaxMin channels 2c and 2c + 1, and
both output [maxes, mins]: the output channels (rows and biases) of the conv/dense layer before each
activation are interleaved, ``cll[2c] = theirs[c]``, ``cll[2c + 1] = theirs[c + C/2]``; their
thresholds ``max``/``min`` (1, C/2, H, W) are cll's ``theta_max``/``theta_min`` (C/2, H, W).

Known differences, by construction (not fixed here): the authors mask only the input columns of a
MaxMin net's layers (their output mask is for ReLU nets), cll both sides (E_l W_l D_{l-1}), so
the exact masked norm cll bounds is never the larger; cll masks only the layers whose explicit matrix is small (here
the dense 4096 -> 512 layer) and uses its sound global bound for the convolutions; the authors'
BCP head also clips the last layer's worst case by the interval box, cll's certificate is the
ball-only margin rule; every cll number is a proved upper bound with rounding terms.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import cll.config
import cll.losses
import cll.models
from cll import train
from cll.certify import Certifier, LocalCertifier
from cll.local_lipschitz import LocalBound

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_forks import forks_on_cpu, imported_from, rel

from bench import emit, log  # bench/ is not a package

EPS = 36 / 255  # the authors' CIFAR-10 evaluation eps (run_job.sh: --epsilon 0.141)
SNITER = 2000  # run_job.sh's --test_sniter
OPT_ITER = 1000  # their argparser's --test_opt_iter default (evaluate.py keeps it)
TARGET = 2.0  # (b) / (a), issue 22
STUBS = ("setproctitle", "advertorch", "advertorch.attacks", "advertorch.context")
EDITS = (  # (file, old, new): see the module docstring
    ("Local_bound.py", "torch.randn((*self.in_size[i]), ", "torch.randn(tuple(self.in_size[i]), "),
    ("Local_bound.py", ".type(torch.cuda.FloatTensor)", ".type(torch.FloatTensor)"),
)


# ---------------------------------------------------------------- the authors' code, prepared
@contextlib.contextmanager
def authors_code(ref: Path):
    """The modules ``utils`` and ``Local_bound`` of a copy of ``ref`` with ``EDITS`` applied,
    importable (and on the CPU) inside the context; the copy is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ll-prep-") as tmp:
        for src in ref.glob("*.py"):
            shutil.copy(src, tmp)
        for name, old, new in EDITS:
            path = Path(tmp) / name
            text = path.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"{name}: {old!r} occurs {text.count(old)} times, not once: another version of REF?")
            path.write_text(text.replace(old, new))
        with imported_from(Path(tmp), stubs=STUBS), forks_on_cpu():
            import Local_bound
            import utils

            yield utils, Local_bound


# ---------------------------------------------------------------- one model, both code bases
def cll_model() -> nn.Module:
    return cll.models.create("6C2F", 10, (3, 32, 32), activation="clipped_maxmin")


def parameter_pairs(theirs: nn.Sequential, ours: nn.Module):
    """(their tensor, cll's tensor, row order): cll's tensor is ``their_tensor[order]`` (order None:
    the same). See the module docstring."""
    layers = list(ours.body) + [ours.head]
    if len(layers) != len(theirs):
        raise SystemExit(f"{len(theirs)} layers in the authors' model, {len(layers)} in cll's")
    for i, (a, b) in enumerate(zip(theirs, layers)):
        if isinstance(a, (nn.Conv2d, nn.Linear)):
            order = None
            if i + 1 < len(theirs) and type(theirs[i + 1]).__name__ == "ClampGroupSort":
                half = a.weight.shape[0] // 2
                order = torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()
            yield a.weight, b.weight, order
            yield a.bias, b.bias, order
        elif type(a).__name__ == "ClampGroupSort":
            yield a.max, b.theta_max, None
            yield a.min, b.theta_min, None


@torch.no_grad()
def to_cll(theirs: nn.Sequential, ours: nn.Module) -> None:
    for a, b, order in parameter_pairs(theirs, ours):
        b.copy_((a if order is None else a[order]).reshape(b.shape))


@torch.no_grad()
def to_theirs(ours: nn.Module, theirs: nn.Sequential) -> None:
    for a, b, order in parameter_pairs(theirs, ours):
        if order is None:
            a.copy_(b.reshape(a.shape))
        else:
            a[order] = b


# ---------------------------------------------------------------- data
def cifar(folder: Path | None, name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of a CIFAR-10 batch file in [0, 1] with their labels, or random ones
    where ``folder`` is None."""
    if folder is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    with open(folder / name, "rb") as f:
        raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in pickle.load(f, encoding="bytes").items()}
    if len(raw["labels"]) < n:
        raise SystemExit(f"{folder / name} holds {len(raw['labels'])} images, fewer than {n}")
    return torch.tensor(raw["data"][:n]).reshape(-1, 3, 32, 32).float() / 255, torch.tensor(raw["labels"][:n])


def train_cll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> None:
    """``args.train_steps`` steps of cll's training step with the local_lip_b loss, the authors'
    sparsity weight, training power iterations and learning rate. They ramp kappa 1 -> 0 and eps
    over 400 of 800 epochs after 20 of cross-entropy; a run of a few hundred steps ramps over all
    of them (at full eps from the start it learns a near-constant classifier)."""
    cfg = cll.config.build_config(
        {
            "dataset": "cifar10",
            "device": "cpu",
            "arch": "6C2F",
            "activation": "clipped_maxmin",
            "loss": "local_lip_b",
            "eps": args.eps_train,
            "eps_warmup": 1.0,
            "sparsity": 0.01,
            "pi_iters": 2,  # run_job.sh: --sniter 2
            "optimizer": "adam",
            "lr": 1e-3,  # their argparser's default
            "lip_penalty": 0.0,
            "batch_size": args.train_batch,
        }
    )
    model.train()
    optimizer = train.make_optimizer(cfg, model)
    step = train.make_step(cfg, model, cll.losses.create(cfg), optimizer, torch.device("cpu"))
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for i in range(args.train_steps):
        idx = torch.randint(0, len(x), (args.train_batch,), generator=gen)
        loss, _ = step(x[idx], y[idx], i / args.train_steps)
        if (i + 1) % 20 == 0 or i + 1 == args.train_steps:
            log(f"train step {i + 1}/{args.train_steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()


# ---------------------------------------------------------------- the three certifications
def certify_theirs(lb, model: nn.Module, batches, args, seed: int) -> dict:
    """(a): ``Local_bound.robust_loss`` per batch, as their ``evaluate`` calls it at test time (no
    stored singular vectors: random starts). Per sample, the decision is read from the worst-case
    logits it forms (``translation``; checked against its own robust error) and the local K from
    the ball radius it hands to ``BCP_translation`` (eps K)."""
    net = lb.net_Local_Lip(model, argparse.Namespace(model="c6f2_clmaxmin"))
    seen: dict[str, list[torch.Tensor]] = {"translation": [], "BCP_translation": []}
    originals = {name: getattr(lb, name) for name in seen}

    def recording(name):
        def call(*a):
            out = originals[name](*a)
            seen[name].append(out if name == "translation" else a[1] / args.eps)
            return out

        return call

    torch.manual_seed(seed)
    certified, errors = [], 0.0
    for name in seen:  # robust_loss looks both up in its module at every call
        setattr(lb, name, recording(name))
    try:
        start = time.perf_counter()
        with torch.no_grad():
            for x, y in batches:
                _, err, _, _ = lb.robust_loss(net, args.eps, x, y, None, [], args.sniter, args.opt_iter)
                certified.append(seen["translation"][-1].max(1)[1] == y)
                errors += err.item() * len(y)
        seconds = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(lb, name, fn)
    certified = torch.cat(certified)
    if round(errors) != (~certified).sum().item():
        raise SystemExit(f"authors' robust error {errors} != {(~certified).sum().item()} read from their logits")
    return {"seconds": seconds, "certified": certified, "lip": torch.cat(seen["BCP_translation"])}


def certify_ours(model: nn.Module, batches, eps: float, local: bool) -> dict:
    """(b) with ``local``, else (c); the certifiers are built inside the timing."""
    start = time.perf_counter()
    certifier = Certifier(model, eps=[eps])
    local_certifier = LocalCertifier(certifier) if local else None
    setup = time.perf_counter() - start
    certified = []
    for x, y in batches:
        _, pred, radius = certifier(x, y)
        if local_certifier is None:
            certified.append((pred == y) & (radius > eps))
        else:
            certified.append(local_certifier(x, y, pred, radius, eps)[0])
    rec = {"seconds": time.perf_counter() - start, "setup_seconds": setup, "certified": torch.cat(certified)}
    rec["lip_body"] = certifier.lip_body
    if local_certifier is not None:
        rec["local_share"] = local_certifier.computed / len(rec["certified"])
    return rec


def quantiles(name: str, values: torch.Tensor) -> dict:
    q = torch.quantile(values.double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).tolist()
    return {f"{name}_{k}": round(v, 6) for k, v in zip(("min", "median", "max"), q)}


SIDES = {
    "authors": "(a) authors' local estimate + BCP",
    "cll_local": "(b) cll sound local",
    "cll_global": "(c) cll global",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, required=True, help="the authors' repository (its top-level *.py)")
    ap.add_argument("--cifar", type=Path, help="cifar-10-batches-py (test_batch, data_batch_1); random images without")
    ap.add_argument("--n", type=int, default=200, help="test images certified (default 200)")
    ap.add_argument("--batch", type=int, default=256, help="certification batch, both sides (their evaluate.py: 256)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs of each side (default 3)")
    ap.add_argument("--eps", type=float, default=EPS, help="certified radius (default 36/255)")
    ap.add_argument("--sniter", type=int, default=SNITER, help="their power iterations per layer, at most")
    ap.add_argument("--opt-iter", type=int, default=OPT_ITER, help="their BCP refinement steps, at most")
    ap.add_argument(
        "--train-steps", type=int, default=0, help="cll local_lip_b steps before certifying (needs --cifar)"
    )
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=4000, help="from data_batch_1 (default 4000)")
    ap.add_argument("--eps-train", type=float, default=0.1551, help="their argparser's epsilon_train")
    ap.add_argument("--weights", type=Path, help="cll state dict: loaded if it exists, else written after training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.train_steps and args.cifar is None:
        ap.error("--train-steps needs --cifar")
    torch.set_num_threads(args.threads)

    with authors_code(args.ref) as (utils, lb):
        torch.manual_seed(args.seed)
        theirs = utils.c6f2_clmaxmin().eval()
        ours = cll_model()
        to_cll(theirs, ours)
        if args.weights is not None and args.weights.is_file():
            ours.load_state_dict(torch.load(args.weights, map_location="cpu"))
            log(f"weights from {args.weights}")
        elif args.train_steps:
            train_cll(ours, *cifar(args.cifar, "data_batch_1", args.train_images), args)
            if args.weights is not None:
                torch.save(ours.state_dict(), args.weights)
        ours.eval()
        to_theirs(ours, theirs)

        x, y = cifar(args.cifar, "test_batch", args.n, args.seed)
        batches = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, args.n, args.batch)]
        with torch.no_grad():
            theirs64, ours64 = copy.deepcopy(theirs).double(), copy.deepcopy(ours).double()
            forward = {
                "rel_logits_float32": rel(theirs(x), ours(x)),
                "rel_logits_float64": rel(theirs64(x.double()), ours64(x.double())),
                "clean_accuracy": round((ours(x).argmax(1) == y).float().mean().item(), 4),
            }
        emit({"what": "forward", **forward})
        if forward["rel_logits_float64"] > 1e-12 or forward["rel_logits_float32"] > 1e-5:
            raise SystemExit("the two forwards differ beyond rounding: the parameter map is wrong")

        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        load = [os.getloadavg()[0]]
        for run in range(args.runs):
            order = list(SIDES) if run % 2 == 0 else list(reversed(SIDES))
            for side in order:
                log(f"run {run + 1}/{args.runs}: {SIDES[side]}")
                if side == "authors":
                    rec = certify_theirs(lb, theirs, batches, args, seed=args.seed + run)
                else:
                    rec = certify_ours(ours, batches, args.eps, local=side == "cll_local")
                runs[side].append(rec)
                emit(
                    {
                        "what": "certify",
                        "side": side,
                        "run": run,
                        "n": args.n,
                        "images_per_s": round(args.n / rec["seconds"], 3),
                        "cra": round(rec["certified"].float().mean().item(), 4),
                        **{k: round(v, 4) for k, v in rec.items() if not torch.is_tensor(v)},
                    }
                )
            load.append(os.getloadavg()[0])
        log("untimed: cll's sound local K of every sample")
        bound = LocalBound(ours)
        lip_local = torch.cat([bound(xb, args.eps) for xb, _ in batches])

    med = {side: statistics.median(r["seconds"] for r in recs) for side, recs in runs.items()}
    cra = {side: [round(r["certified"].float().mean().item(), 4) for r in recs] for side, recs in runs.items()}
    ours_local, theirs_first = runs["cll_local"][0]["certified"], runs["authors"][0]["certified"]
    summary = {
        "what": "summary",
        "n": args.n,
        "eps": args.eps,
        "runs": args.runs,
        "threads": args.threads,
        "sniter": args.sniter,
        "opt_iter": args.opt_iter,
        "train_steps": args.train_steps,
        "weights": None if args.weights is None else str(args.weights),
        **forward,
        **{f"{side}_seconds": round(s, 3) for side, s in med.items()},
        **{f"{side}_images_per_s": round(args.n / s, 3) for side, s in med.items()},
        "ratio_local_to_authors": round(med["cll_local"] / med["authors"], 3),
        "ratio_local_to_global": round(med["cll_local"] / med["cll_global"], 3),
        "target": TARGET,
        "local_share": runs["cll_local"][0]["local_share"],
        # the body's local constants over cll's sound global K_F, quantiles over the N samples: the
        # authors' estimate (the ball radius their BCP head gets, over eps) and cll's sound bound
        "lip_body_cll": round(runs["cll_global"][0]["lip_body"], 4),
        **quantiles("authors_local_over_global", runs["authors"][0]["lip"] / runs["cll_global"][0]["lip_body"]),
        **quantiles("cll_local_over_global", lip_local / runs["cll_global"][0]["lip_body"]),
        "cll_setup_seconds": round(statistics.median(r["setup_seconds"] for r in runs["cll_local"]), 3),
        **{f"{side}_cra": values[0] if len(set(values)) == 1 else values for side, values in cra.items()},
        "both_certify": (ours_local & theirs_first).sum().item(),
        "only_authors_certify": (theirs_first & ~ours_local).sum().item(),
        "only_cll_certifies": (ours_local & ~theirs_first).sum().item(),
        "load_avg_1min": [round(v, 2) for v in load],
    }
    emit(summary)
    log("| | seconds (median) | img/s | CRA |")
    log("|---|---|---|---|")
    for side, name in SIDES.items():
        log(f"| {name} | {med[side]:.2f} | {args.n / med[side]:.2f} | {summary[f'{side}_cra']} |")
    log(f"(b)/(a) = {summary['ratio_local_to_authors']} (target <= {TARGET}); local share {summary['local_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
