"""Files of a run directory, written atomically (a temporary name, then a rename), so a kill at
any moment leaves either the old file or the new one, never a partial one.

A run directory holds ``model.pt`` (weights, optimizer, schedule, RNG state, history),
``train.json`` (resolved config, per-epoch metrics, wall time) and ``certify.json``. In a results
tree, the directory of one cell is ``run_dir(root, dataset, arch, loss, eps, p, seed)``:
``<root>/runs/{dataset}/{arch}/{loss}/eps{eps}_p{p}/seed{seed}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CllError

MODEL = "model.pt"
TRAIN = "train.json"
CERTIFY = "certify.json"
AUDIT = "audit.json"  # cll audit: attacks on the certified points of a test sample


def fmt_number(value: float) -> str:
    """How an eps or p is written in paths and keys: 4 significant digits (36/255 -> 0.1412)."""
    return f"{value:.4g}"


# The directory of a cell below <root>/runs: the one place that knows the results layout. run_dir
# fills it in; the workflow uses it as its wildcard pattern (run_pattern).
CELL_PATTERN = "{dataset}/{arch}/{loss}/eps{eps}_p{p}/seed{seed}"


def run_dir(root: str | Path, dataset: str, arch: str, loss: str, eps: float, p: float, seed: int) -> Path:
    """The directory of one cell of a grid."""
    keys = dict(dataset=dataset, arch=arch, loss=loss, eps=fmt_number(eps), p=fmt_number(p), seed=seed)
    return Path(root) / "runs" / CELL_PATTERN.format(**keys)


def run_pattern(root: str | Path) -> str:
    """``<root>/runs/{dataset}/{arch}/{loss}/eps{eps}_p{p}/seed{seed}``: any cell's directory, with
    wildcards."""
    return str(Path(root) / "runs" / CELL_PATTERN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file readable by its owner only; give it the mode open() would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_text(path: Path, text: str) -> None:
    """Write a text file (UTF-8, newlines as given) atomically: summaries, tables."""
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_bytes(path: Path, data: bytes) -> None:
    """Write a binary file atomically: rendered figures."""
    _atomic(path, lambda f: f.write(data))


def read_json(path: Path) -> dict | None:
    """A run file's content (train.json, certify.json), or None if the run has not written it yet;
    an unreadable file fails in one line."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CllError(f"{str(path)!r} cannot be read ({type(err).__name__}); delete it and rerun that step") from None
    if not isinstance(value, dict):
        raise CllError(f"{str(path)!r} does not hold a JSON object")
    return value


def save_torch(path: Path, obj: Any) -> None:
    import torch  # here, not at the top: the workflow's parse path imports this module (snakemake -n)

    _atomic(path, lambda f: torch.save(obj, f))
