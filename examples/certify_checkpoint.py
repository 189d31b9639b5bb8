"""Certify and audit a trained checkpoint through cll's library API, training nothing.

    python examples/certify_checkpoint.py RUN_DIR [--eps 36/255 72/255] [--n 200] [--out result.json]

RUN_DIR is a `cll train` run directory (its model.pt and config); its data set's test split is
read as `cll certify` reads it (data_root, max_test of the run). The script prints the sound
Lipschitz bound, clean accuracy and certified robust accuracy at each radius, then attacks the
certified points of the first N test points (PGD-l2, APGD-l2) and says whether any certificate
broke (exit status 1 if one did). Everything goes through cll.api: swap `api.load_run(...)` for
`api.lipschitz_net(your_layers, in_shape)` to certify a model of your own.
"""

from __future__ import annotations

import argparse
import json
import sys

from torch.utils.data import DataLoader

from cll import api
from cll.data import load_dataset
from cll.errors import CllError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a `cll train` run directory")
    parser.add_argument("--eps", nargs="+", default=None, help="radii (default: the run's certify_eps)")
    parser.add_argument("--n", type=int, default=200, help="test points the audit attacks (default 200)")
    parser.add_argument("--steps", type=int, default=30, help="iterations per attack (default 30)")
    parser.add_argument("--restarts", type=int, default=2, help="PGD restarts (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    try:
        cfg, model = api.load_run(args.run, args.device)
        eps = args.eps or cfg.certify_eps
        _, test_set, _ = load_dataset(
            cfg.dataset, root=cfg.data_root, augment=False, seed=cfg.seed, max_test=cfg.max_test
        )
        loader = DataLoader(test_set, batch_size=cfg.eval_batch_size)

        bound = api.upper_bound(model)
        result = api.certify(model, loader, eps)
        audit = api.audit(model, loader, eps, n=args.n, steps=args.steps, restarts=args.restarts, seed=cfg.seed)
    except CllError as err:
        print(f"certify_checkpoint: error: {err}", file=sys.stderr)
        return 2

    print(f"{cfg.arch} on {cfg.dataset} ({cfg.loss}), {result['n_samples']} test points")
    print(f"sound Lipschitz bound of the logit differences: {bound:.6g}")
    print(f"clean accuracy: {100 * result['clean_accuracy']:.1f}%")
    for key, cra in result["cra"].items():
        c = audit["per_eps"][key]
        print(
            f"eps {key}: CRA {100 * cra:.1f}%; audit of {c['sampled']} points: {c['certified']} certified, "
            f"{c['attacked']} attacked, {c['broken']} broken"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"upper_bound": bound, "certify": result, "audit": audit}, f, indent=1)
    if audit["broken"]:
        print(f"BROKEN CERTIFICATE: {audit['broken']} certified points misclassified inside their radius")
        return 1
    print("no certificate broken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
