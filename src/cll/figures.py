"""The figures of a grid, drawn from summary.csv (and the moons models): ``cll figures``.

- ``slack_vs_k``: for CLL cells whose slack p varies, K^(h∘f) = log((2-p)/p)/eps (analytic) and the
  certified Lipschitz bound of the model, against p: "slack determines the constant of the model".
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
    """The slack determines the constant of the model: analytic K^(h∘f) and the certified
    Lipschitz bound of the trained model against p. None if no slack sweep has run."""
    sweeps = slack_sweeps(rows)
    if not sweeps:
        return None
    fig, (ax,) = _new_figure(1, width=6.0, height=4.2)
    colours = [f"C{i}" for i in range(10)]
    for i, ((dataset, arch, eps), cells) in enumerate(sweeps.items()):
        name = f"{dataset} {arch}, ε={results.fmt_number(eps)}"
        colour = colours[i % len(colours)]
        ax.plot(
            *_mean_by(cells, "p", "k_hf"),
            "o--",
            color=colour,
            label=rf"{name}: $K^{{h\circ f}}=\log((2-p)/p)/\varepsilon$",
        )
        ax.plot(
            *_mean_by(cells, "p", "lipschitz_constant"),
            "s-",
            color=colour,
            label=f"{name}: measured K (certified bound)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("slack p")
    ax.set_ylabel("Lipschitz constant")
    ax.set_title("The slack determines the constant of the model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


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
