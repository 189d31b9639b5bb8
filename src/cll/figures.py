"""The figures of a grid, drawn from summary.csv (and the moons models): ``cll figures``.

- ``slack_vs_k``: for CLL cells whose slack p varies, against p, in two panels of one unit each:
  the calibrated model h∘f's constant, K^(h∘f) = log((2-p)/p)/eps (its certified bound) above the
  audit's pair-ascent lower bound in the same units, "the slack determines the constant of the
  model"; and the network f's own certified bound K and pair-ascent lower bound, which the
  calibration divides out.
- ``cra_vs_p``: certified robust accuracy at each eps against p.
- ``moons_boundaries``: one panel per p of the two-moons cells: the decision boundary, and the test
  points that are misclassified or not certified at the training eps in red, as on the poster.

Matplotlib is imported inside the functions, so ``cll train`` never pays for it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

from . import results
from .errors import CllError
from .render import NO_VALUE
from .summary import eps_columns, read_summary
from .tables import eps_label

MOONS_POINTS = 3000  # test points drawn per moons panel
MESH = 250  # mesh resolution of a decision-boundary panel


def _unique_runs(rows: list[dict]) -> list[dict]:
    """Done cells, each run once (a cell listed in two tables is one run)."""
    seen, out = set(), []
    for row in rows:
        if row["status"] == "done" and row["run_dir"] not in seen:
            seen.add(row["run_dir"])
            out.append(row)
    return out


def _mean_by(rows: list[dict], key: str, column: str) -> tuple[list[float], list[float]]:
    """(sorted values of ``key``, mean of ``column`` at each) over the rows that have a value."""
    values: dict[float, list[float]] = {}
    for row in rows:
        if row.get(column) is not None:
            values.setdefault(row[key], []).append(row[column])
    xs = sorted(values)
    return xs, [math.fsum(values[x]) / len(values[x]) for x in xs]


def slack_sweeps(rows: list[dict]) -> dict[tuple[str, str, float], list[dict]]:
    """The done CLL cells whose p varies, by (dataset, arch, eps): the cells of the slack figures."""
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for row in _unique_runs(rows):
        if row["loss"] == "cll":
            groups.setdefault((row["dataset"], row["arch"], row["eps"]), []).append(row)
    return {key: cells for key, cells in groups.items() if len({c["p"] for c in cells}) > 1}


def _new_figure(n_panels: int, width: float = 4.2, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def figure_slack_vs_k(rows: list[dict]):
    """The slack determines the constant of the calibrated model: two panels, each in one unit.
    None if no slack sweep has run.

    Left, the calibrated model h∘f: the margins of the network f over their certified bound K (each
    sample's distances to the decision boundaries, 1-Lipschitz functions) times 1/sigma, what CLL's
    cross-entropy is taken of. So h∘f is K^(h∘f) = 1/sigma = log((2-p)/p)/eps-Lipschitz whatever K
    is: K^(h∘f) is its certified bound, drawn annotated per p as on the poster. Below it, the
    audit's pair-ascent lower bound of f over f's certified bound (``audit_lipschitz_tightness``)
    times K^(h∘f): a lower bound on h∘f's constant (with more than two classes a conservative one:
    K is that of f's worst pair), which so lies in the shaded band. Right, in f's own units: its
    certified bound K and pair-ascent lower bound, which the calibration divides out (CLL leaves K
    free: on the demo it rises as K^(h∘f) falls). Cells without audit.json get no lower bound.

    Where the loss's own calibration differs (not drawn): it divides by the power-iteration
    estimate of K_F, not by the sound bound (a factor ``lipschitz_constant / lipschitz_estimate``,
    under 0.2 % on the demo), and its per_logit form (the two-moons recipe) divides each logit z_i
    by K_F ||W_i|| rather than each margin by K_F ||W_t - W_j||: each calibrated logit is then
    K^(h∘f)-Lipschitz, but a calibrated margin up to ||W_t/||W_t|| - W_j/||W_j|||| K^(h∘f) (at most
    2 K^(h∘f); that factor is 1.13 to 1.23 on the demo's heads)."""
    sweeps = slack_sweeps(rows)
    if not sweeps:
        return None
    fig, (calibrated, network) = _new_figure(2, width=5.0, height=4.8)
    one = len(sweeps) == 1
    for i, ((dataset, arch, eps), cells) in enumerate(sweeps.items()):
        name = f"{dataset} {arch}, ε={results.fmt_number(eps)}"
        prefix = "" if one else f"{name}: "
        colour = f"C{i % 10}"
        ps, khf = _mean_by(cells, "p", "k_hf")
        (line,) = calibrated.plot(
            ps, khf, "o-", color=colour, label=rf"{prefix}$K^{{h\circ f}}=\log((2-p)/p)/\varepsilon$ (certified bound)"
        )
        line.set_gid(f"k_hf {name}")
        for p, k in zip(ps, khf):
            calibrated.annotate(f"{k:.1f}", (p, k), textcoords="offset points", xytext=(5, 5), fontsize="small")
        audited = [
            {"p": c["p"], "lower": c["k_hf"] * c["audit_lipschitz_tightness"]}
            for c in cells
            if c.get("k_hf") is not None and c.get("audit_lipschitz_tightness") is not None
        ]
        if audited:
            pl, lower = _mean_by(audited, "p", "lower")
            (line,) = calibrated.plot(
                pl, lower, "v--", color=colour,
                label=rf"{prefix}pair-ascent lower bound: $K^{{h\circ f}}\times$ ($f$'s lower / certified bound)",
            )  # fmt: skip
            line.set_gid(f"h∘f lower {name}")
            calibrated.fill_between(pl, lower, [khf[ps.index(p)] for p in pl], color=colour, alpha=0.15, lw=0)
        (line,) = network.plot(
            *_mean_by(cells, "p", "lipschitz_constant"), "s-", color=colour, label=f"{prefix}certified bound K"
        )
        line.set_gid(f"f upper {name}")
        pf, f_lower = _mean_by(cells, "p", "audit_lipschitz_lower")
        if pf:
            (line,) = network.plot(pf, f_lower, "v--", color=colour, label=f"{prefix}pair-ascent lower bound")
            line.set_gid(f"f lower {name}")
    calibrated.set_title(r"calibrated model $h\circ f$: margins of $f$ / K, $\times\,1/\sigma$")
    calibrated.set_ylabel(r"Lipschitz constant of $h\circ f$")
    calibrated.margins(y=0.12)  # room for the annotations
    network.set_title(r"network $f$ before calibration (its K is divided out)")
    network.set_ylabel(r"Lipschitz constant of $f$'s logit differences")
    _log_axes(calibrated, network, legend_title=name if one else None)
    fig.suptitle(r"The slack p sets the Lipschitz constant $K^{h\circ f}$ of the calibrated model $h\circ f$")
    return fig


def _log_axes(*axes, legend_title: str | None = None) -> None:
    """Log-log axes against p, plain numbers on the ticks, the legend below the panel."""
    from matplotlib.ticker import LogFormatter

    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())  # 60 and 200, not 6 x 10^1 and 2 x 10^2
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xlabel("slack p")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small", title=legend_title, title_fontsize="x-small", loc="upper center",
                  bbox_to_anchor=(0.5, -0.16))  # fmt: skip


def figure_cra_vs_p(rows: list[dict]):
    """Certified robust accuracy (each radius) and clean accuracy against p, one panel per slack
    sweep. None if no slack sweep has run."""
    sweeps = slack_sweeps(rows)
    if not sweeps:
        return None
    fig, axes = _new_figure(len(sweeps))
    for ax, ((dataset, arch, eps), cells) in zip(axes, sweeps.items()):
        xs, clean = _mean_by(cells, "p", "clean_accuracy")
        ax.plot(xs, [100 * v for v in clean], "k--", marker=".", label="clean")
        for key in eps_columns({c for row in cells for c in row if row[c] is not None}, "cra_"):
            xs, cra = _mean_by(cells, "p", f"cra_{key}")
            ax.plot(xs, [100 * v for v in cra], "o-", label=f"CRA at ε={eps_label(key)}")
        ax.set_xscale("log")
        ax.set_xlabel("slack p")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{dataset} {arch}, trained at ε={results.fmt_number(eps)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _moons_panels(rows: list[dict], root: Path) -> list[dict]:
    """One done moons cell (the first seed) per (eps, p) whose model.pt exists; p descending."""
    chosen: dict[tuple[float, float], dict] = {}
    for row in _unique_runs(rows):
        if row["dataset"] == "moons" and (root / row["run_dir"] / results.MODEL).is_file():
            chosen.setdefault((row["eps"], row["p"]), row)
    return [chosen[k] for k in sorted(chosen, key=lambda k: (k[0], -k[1]))]


def _draw_boundary(ax, row: dict, run_dir: Path, show_eps: bool) -> None:
    """One moons panel: predicted classes as background, the boundary (logit difference 0),
    test points by class, and in red those misclassified or not certified at the training eps."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from .certify import Certifier
    from .data import load_dataset
    from .train import load_run

    cfg, model = load_run(run_dir)
    model.eval()
    _, test, _ = load_dataset("moons", seed=cfg.seed, augment=False, max_test=MOONS_POINTS)
    x, y = next(iter(DataLoader(test, batch_size=len(test))))
    lo = x.min(0).values.numpy() - 0.4
    hi = x.max(0).values.numpy() + 0.4
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], MESH), np.linspace(lo[1], hi[1], MESH))
    mesh = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    with torch.no_grad():
        z = model(mesh).double()
    _, pred, radius = Certifier(model, eps=[cfg.eps])(x, y)  # the certifier's own, rounding included
    gap = (z[:, 1] - z[:, 0]).reshape(gx.shape).numpy()
    ax.contourf(gx, gy, (gap > 0).astype(float), levels=[-0.5, 0.5, 1.5], colors=["#dbe8f5", "#fde5cc"])
    if gap.min() < 0 < gap.max():
        ax.contour(gx, gy, gap, levels=[0.0], colors="k", linewidths=1.2)
    bad = ((pred != y) | ~(radius > cfg.eps)).numpy()
    x, y = x.numpy(), y.numpy()
    for cls, colour in ((0, "C0"), (1, "C1")):
        keep = (y == cls) & ~bad
        ax.scatter(x[keep, 0], x[keep, 1], s=3, color=colour, label=f"class {cls}")
    ax.scatter(
        x[bad, 0],
        x[bad, 1],
        s=6,
        color="red",
        label=f"misclassified or not certified at ε={results.fmt_number(cfg.eps)}",
    )
    k = row["k_hf"] if row.get("k_hf") is not None else row.get("lipschitz_constant")
    cra = row.get(f"cra_{results.fmt_number(row['eps'])}")
    cra = cra if cra is not None else float((~bad).mean())  # not certified at that eps: these points
    eps = f"ε={results.fmt_number(row['eps'])}, " if show_eps else ""
    k_text = f"{k:.1f}" if k is not None else NO_VALUE
    ax.set_title(rf"{eps}p={results.fmt_number(row['p'])}, $K^{{h\circ f}}$={k_text}, CRA={100 * cra:.1f}%")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


def figure_moons_boundaries(rows: list[dict], root: Path):
    """Decision boundaries of the moons models, one panel per p (descending). None if no moons
    cell has run."""
    panels = _moons_panels(rows, root)
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), width=3.8, height=3.2)
    show_eps = len({row["eps"] for row in panels}) > 1
    for ax, row in zip(axes, panels):
        _draw_boundary(ax, row, root / row["run_dir"], show_eps)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, markerscale=3, fontsize="small")
    return fig


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` atomically (no creation date, so reruns are comparable)."""
    written = []
    for fmt, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, metadata=metadata)
        path = out_dir / f"{name}.{fmt}"
        results.write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


FIGURES = ("slack_vs_k", "cra_vs_p", "moons_boundaries")
_SKIP_REASONS = {
    "slack_vs_k": "no done CLL cells whose p varies",
    "cra_vs_p": "no done CLL cells whose p varies",
    "moons_boundaries": "no done moons cells with a model.pt",
}


def make_figures(
    summary: str | Path, out_dir: str | Path | None = None, log: Callable[[str], None] = print
) -> list[Path]:
    """``cll figures``: every figure of a summary.csv into ``out_dir`` (default: ``figures/``
    beside it). A figure without cells is skipped with one line to ``log``."""
    summary = Path(summary)
    rows = read_summary(summary)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CllError("cll figures needs matplotlib: pip install matplotlib==3.11.2") from None
    out_dir = Path(out_dir if out_dir is not None else summary.parent / "figures")
    root = summary.parent  # run_dir in the summary is relative to it
    builders = {
        "slack_vs_k": lambda: figure_slack_vs_k(rows),
        "cra_vs_p": lambda: figure_cra_vs_p(rows),
        "moons_boundaries": lambda: figure_moons_boundaries(rows, root),
    }
    out_dir.mkdir(parents=True, exist_ok=True)  # the workflow's output even when all are skipped
    written = []
    for name in FIGURES:
        fig = builders[name]()
        if fig is None:
            log(f"skipped {name}: {_SKIP_REASONS[name]} in {summary}")
            continue
        written += save_figure(fig, out_dir, name)
    return written
