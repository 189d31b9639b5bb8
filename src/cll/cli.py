"""The ``cll`` command: parse arguments, call one function, turn user mistakes into one line.

cll train   --config run.yaml --out DIR [--set key=value ...]   -> DIR/model.pt, DIR/train.json
cll certify --run DIR [--eps 36/255 ...] [--device auto]        -> DIR/certify.json
cll audit   --run DIR [--eps ...] [--n 1000] [--track EXP]      -> DIR/audit.json (exit 1 if broken)
cll list                                                        registered names and config keys
cll track init --experiment NAME                                create the MLflow store + experiment
cll aggregate --grid GRID.yaml [--results DIR] [--track EXP]    -> DIR/summary.csv (+ MLflow back-fill)
cll tables  --summary DIR/summary.csv [--out DIR/tables]        -> {table}.csv, .md, .tex, reproduction.*
cll figures --summary DIR/summary.csv [--out DIR/figures]       -> slack_vs_k, cra_vs_p, moons_boundaries
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import CllError, ConfigError
from .values import AUDIT_POINTS, AUDIT_RESTARTS, AUDIT_STEPS, parse_number


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.set)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out!r} is a file, not a run directory")
    summary = train(cfg, args.out)
    from . import distributed

    if not distributed.is_main():  # under torchrun: rank 0 reports and tracks
        return
    last = summary["epochs"][-1] if summary["epochs"] else {}
    print(
        f"trained {cfg.arch} on {cfg.dataset} ({cfg.loss}) into {args.out}: "
        f"train accuracy {100 * last.get('accuracy', float('nan')):.1f}%, "
        f"K estimate {_number(summary['lipschitz_estimate'])}, bound {summary['lipschitz_bound']:.4g}, "
        f"{summary['wall_time']:.1f} s"
    )
    if args.track:  # after the files are written; a tracking failure is one warning line
        from . import tracking

        tracking.track(args.out, args.track, args.method)


def _progress_line(line: str) -> None:
    """Progress of long commands goes to stderr (stdout keeps the results), flushed at once."""
    print(line, file=sys.stderr, flush=True)


def _local(cfg) -> bool:
    """Whether the run's loss asks for sound local certificates as well (Local-Lip-B's)."""
    from . import losses

    return losses.create(cfg).local_certificate


def _number(value: float | None) -> str:
    """4 significant digits, or n/a where there is no such number (e.g. no power-iteration estimate)."""
    return "n/a" if value is None else f"{value:.4g}"


def _load(args: argparse.Namespace):
    """What cll certify and cll audit start from: (device, run config, model, radii, test set)."""
    from . import data
    from .train import load_run, resolve_device

    device = resolve_device(args.device)
    cfg, model = load_run(args.run, device)
    eps = [parse_number("--eps", e) for e in args.eps] if args.eps else cfg.certify_eps
    if any(not e > 0 for e in eps):
        raise ConfigError(f"--eps: {args.eps} must all be > 0")
    _, test_set, _ = data.load_dataset(
        cfg.dataset, root=cfg.data_root, augment=False, seed=cfg.seed, max_test=cfg.max_test
    )
    return device, cfg, model, eps, test_set


def cmd_certify(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from . import certify, losses, results

    device, cfg, model, eps, test_set = _load(args)
    loader = DataLoader(test_set, batch_size=args.batch_size or cfg.eval_batch_size, num_workers=cfg.num_workers)
    t0 = time.time()
    with torch.no_grad():
        out = certify.certify(
            model, loader, eps, device, log=_progress_line, local=_local(cfg),
            local_estimate_iters=cfg.local_estimate_iters,
        )  # fmt: skip
    out["k_hf"] = losses.run_k_hf(cfg)
    out["eps"] = list(eps)
    out["seconds"] = time.time() - t0
    results.write_json(Path(args.run) / results.CERTIFY, out)
    cra = "  ".join(f"CRA@{k} {100 * v:.1f}%" for k, v in out["cra"].items())
    print(
        f"{args.run}: clean {100 * out['clean_accuracy']:.1f}%  {cra}  K {out['lipschitz_constant']:.4g}"
        f" (n={out['n_samples']})"
    )
    if args.track:
        from . import tracking

        tracking.track(args.run, args.track, args.method)


class CertificateBroken(CllError):
    """An attack found a misclassified point inside a certified radius (exit status 1)."""


def cmd_audit(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader, Subset

    from . import audit, results

    device, cfg, model, eps, test_set = _load(args)
    # a fixed random sample of the test set (seeded by the run's seed), in test-set order
    order = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(cfg.seed))
    picked = sorted(order[: args.n].tolist())
    x, y = map(torch.cat, zip(*DataLoader(Subset(test_set, picked), batch_size=1000)))
    _progress_line(audit.audit_plan(len(picked), eps, args.steps, args.restarts))
    t0 = time.time()
    out = audit.audit(
        model, x.to(device), y.to(device), eps, steps=args.steps, restarts=args.restarts, seed=cfg.seed,
        log=_progress_line, local=_local(cfg),
    )  # fmt: skip
    out.update(n_samples=len(picked), eps=list(eps), seed=cfg.seed, seconds=time.time() - t0)
    results.write_json(Path(args.run) / results.AUDIT, out)
    if args.track:  # before a broken certificate fails the command: MLflow shows it too
        from . import tracking

        tracking.track(args.run, args.track, args.method)
    for key, c in out["per_eps"].items():
        print(
            f"{args.run}: eps {key}: {c['certified']} of {c['sampled']} certified, {c['attacked']} attacked, "
            f"{c['broken']} broken (attack strength: {c['uncertified_broken']} of "
            f"{c['uncertified_attacked']} uncertified broken)"
        )
    own, tight = out["own_radius"], out["tightness"]["quantiles"]
    median = f"{tight['median']:.3g}" if tight else "n/a"
    print(
        f"{args.run}: own radius: {own['attacked']} attacked, {own['broken']} broken; nearest adversarial / "
        f"radius: median {median}; Lipschitz lower / certified bound {_number(out['lipschitz_tightness'])}"
    )
    if out["broken"]:
        bad = [f"{c['broken']} at eps {k}" for k, c in out["per_eps"].items() if c["broken"]]
        bad += [f"{own['broken']} at their own radius"] if own["broken"] else []
        bad += ["a Lipschitz lower bound above the certified bound"] if out["bound_broken"] else []
        bad = ", ".join(bad)
        raise CertificateBroken(
            f"BROKEN CERTIFICATE in {args.run}: an attack misclassified certified points "
            f"inside their radius ({bad}); the certifier is unsound for this model, see "
            f"{Path(args.run) / results.AUDIT}"
        )


def cmd_track_init(args: argparse.Namespace) -> None:
    from . import tracking, tracking_ui

    exp_id = tracking.init(args.experiment)
    if exp_id is not None:
        print(f"MLflow experiment {args.experiment!r} (id {exp_id}) in {tracking.tracking_uri()}")
        print(f"  runs table: {tracking_ui.ui_url(exp_id, tracking.tracking_uri())}")


def cmd_list(args: argparse.Namespace) -> None:
    from . import data, layers, losses, models
    from .config import KEYS, describe

    print("architectures:", ", ".join(models.names()))
    print("activations:  ", ", ".join(layers.ACTIVATIONS.names()))
    print("losses:       ", ", ".join(losses.names()))
    print("datasets:     ", ", ".join(data.dataset_names()))
    print("config keys:  ", ", ".join(KEYS))
    for key, default, allowed, meaning in describe():  # key: default | allowed values | meaning
        print(f"  {key + ':':<17} {default} | {allowed} | {meaning}")


def cmd_aggregate(args: argparse.Namespace) -> None:
    from .summary import aggregate_grid

    path, rows = aggregate_grid(args.grid, args.results)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "missing", "pending")}
    print(
        f"wrote {path}: {len(rows)} cells ({counts['done']} done, {counts['missing']} missing, "
        f"{counts['pending']} pending)"
    )
    if args.track:  # log what jobs could not (tracker down or unreachable from the nodes)
        from . import tracking

        runs = {r["run_dir"]: r["method"] for r in rows if r["status"] != "pending"}  # a cell once
        done = tracking.track_backfill([path.parent / d for d in runs], args.track, list(runs.values()))
        if done is not None:
            print(f"MLflow: {done[0]} runs logged now, {done[1]} already up to date ({tracking.tracking_uri()})")
            tracking.track_summary([path], args.track, None)


def cmd_tables(args: argparse.Namespace) -> None:
    from .render import make_tables

    written = make_tables(args.summary, args.out)
    print(f"wrote {len(written)} table files to {written[0].parent if written else args.out}")
    if args.track:  # the tables, and the reproduction counts as metrics, on the summary run
        from . import tracking
        from .render import reproduction_metrics

        tracking.track_summary(written, args.track, "tables", reproduction_metrics(args.summary))


def cmd_figures(args: argparse.Namespace) -> None:
    from .figures import make_figures

    written = make_figures(args.summary, args.out)
    for path in written:
        print(f"wrote {path}")
    if args.track and written:  # a tracking failure is one warning line
        from . import tracking

        tracking.track_summary(written, args.track, "figures")


def _add_run(p: argparse.ArgumentParser) -> None:
    """The trained run a command reads (cll certify, cll audit), the radii and the device."""
    p.add_argument("--run", required=True, help="run directory written by cll train")
    p.add_argument("--eps", nargs="+", help="radii (default: the run's certify_eps); fractions like 36/255 work")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _add_tracking(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--track", metavar="EXPERIMENT", help=f"also log the {what} into this MLflow experiment")
    p.add_argument("--method", help="the grid row's method (e.g. CLL), for the MLflow run's name")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cll", description="Train and certify Lipschitz-margin classifiers (CLL).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one run (resumes if DIR holds a checkpoint)")
    p.add_argument("--config", help="YAML run config (keys: cll list)")
    p.add_argument("--out", required=True, help="run directory for model.pt and train.json")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set p=0.01 epochs=10",
    )
    _add_tracking(p, "run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("certify", help="certify a trained run on its test set")
    _add_run(p)
    p.add_argument("--batch-size", type=_positive_int, help="evaluation batch size (default: the run's)")
    _add_tracking(p, "result")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("audit", help="attack the certified points of a test sample (exit 1 if any breaks)")
    _add_run(p)
    p.add_argument("--n", type=_positive_int, default=AUDIT_POINTS, help="test points sampled (default %(default)s)")
    p.add_argument(
        "--steps", type=_positive_int, default=AUDIT_STEPS, help="iterations per attack (default %(default)s)"
    )
    p.add_argument("--restarts", type=_positive_int, default=AUDIT_RESTARTS, help="PGD restarts (default %(default)s)")
    _add_tracking(p, "result")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("track", help="MLflow tracking ($MLFLOW_TRACKING_URI, default sqlite:///mlflow.db)")
    track = p.add_subparsers(dest="track_command", required=True, parser_class=_Parser)
    p = track.add_parser("init", help="create the tracking store and the experiment (before parallel jobs)")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (a grid's experiment)")
    p.set_defaults(func=cmd_track_init)

    p = sub.add_parser("list", help="registered architectures, losses, data sets; config keys, defaults, values")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("aggregate", help="collect a grid's run directories into summary.csv")
    p.add_argument("--grid", required=True, help="grid YAML (e.g. config/config.yaml)")
    p.add_argument("--results", help="results root (default: the grid's results)")
    p.add_argument(
        "--track", metavar="EXPERIMENT", help="also log into this MLflow experiment every run the jobs could not log"
    )
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("tables", help="poster-style tables (csv, md, tex) from summary.csv")
    p.add_argument("--summary", required=True, help="summary.csv written by cll aggregate")
    p.add_argument("--out", help="output folder (default: tables/ beside the summary)")
    p.add_argument("--track", metavar="EXPERIMENT", help="also log the tables into this MLflow experiment")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("figures", help="slack and decision-boundary figures (png, pdf) from summary.csv")
    p.add_argument("--summary", required=True, help="summary.csv written by cll aggregate")
    p.add_argument("--out", help="output folder (default: figures/ beside the summary)")
    p.add_argument("--track", metavar="EXPERIMENT", help="also log the figures into this MLflow experiment")
    p.set_defaults(func=cmd_figures)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CertificateBroken as err:
        print(f"cll: error: {err}", file=sys.stderr)
        return 1
    except CllError as err:
        print(f"cll: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cll: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
