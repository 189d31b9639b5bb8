"""What a person sees first of cll's runs in the MLflow UI: the experiment tags cll sets (the
model-training kind, the saved view ``cll`` of the runs table with the certified numbers as
columns), the address that opens that view, and each run's data set as MLflow dataset inputs (the
runs table's Dataset column). ``cll.tracking`` logs them; mlflow is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .tables import STANDARD_EPS

# MLflow 3's experiment kind: "custom_model_development" is "Machine learning" (model training)
# in the UI, "genai_development" "GenAI apps & agents" (traces, evaluations). UIs that pick an
# experiment's first tab by this tag open a model-training experiment on its runs table. MLflow
# 3.17's UI ignores it: it follows its sidebar switch (GenAI / Model training, kept per browser,
# GenAI at first) or ``?workflowType=machine_learning`` in the address, hence ui_url().
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# A saved view of the runs table, as the UI's "Save view" stores one: the experiment tag
# mlflow.sharedViewState.<id>, listed under "Views", opened by ?viewStateShareKey=<id>. MLflow has
# no per-experiment default columns (a browser keeps the ones a person picked), so this is how the
# CRA columns are there without picking them.
VIEW_KEY = "cll"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "cll: certified accuracy"
DATA_CONTEXT_TAG = "mlflow.data.context"  # MLflow's dataset-input tag: what the run used the data for
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a sqlite store by default


def metric_name(prefix: str, eps_key: str) -> str:
    """The metric of a radius as people say it: ``cra_36_255`` for 36/255 (the tables' radii),
    else the radius itself, ``cra_0.15``."""
    return f"{prefix}_{STANDARD_EPS.get(eps_key, eps_key).replace('/', '_')}"


# the view's metric columns before any run: the tables' radii (a run's other radii join them)
VIEW_METRICS = (
    "clean_accuracy",
    *(metric_name("cra", key) for key in STANDARD_EPS),
    "k_hf",
    "lipschitz_constant",
    "audit_broken",
)


def make_view(metrics: list[str] | tuple[str, ...], created: int | None = None) -> str:
    """The view ``cll`` (VIEW_TAG) as MLflow 3.17 stores a saved view: its name, times and the runs
    table's state as JSON. Its columns: ``metrics``, which the UI puts (alphabetically) right after
    each run's name, start and duration; no Dataset column, the run names say the data set."""
    now = int(time.time() * 1000)
    state = json.dumps({"selectedColumns": [f"metrics.`{m}`" for m in metrics]})
    return json.dumps({"name": VIEW_NAME, "createdAt": created or now, "updatedAt": now, "state": state})


def experiment_tags() -> dict[str, str]:
    """The experiment tags cll sets: the model-training kind and the view ``cll``."""
    return {KIND_TAG: TRAINING_KIND, VIEW_TAG: make_view(VIEW_METRICS)}


def with_columns(saved: str | None, metrics: list[str]) -> str | None:
    """The view ``cll`` with the columns of ``metrics`` (CRA at a run's radii) it lacks; None if it
    has them all, or is no view :func:`make_view` wrote (missing, or saved over in the UI, which
    compresses it: left as it is)."""
    try:
        view = json.loads(saved)
        selected = json.loads(view["state"])["selectedColumns"]
    except (TypeError, ValueError, KeyError):
        return None
    columns = [c[len("metrics.`") : -1] for c in selected if c.startswith("metrics.`")]
    new = [m for m in metrics if m not in columns]
    return make_view(columns + new, view.get("createdAt")) if new else None


def ui_url(exp_id: str, uri: str) -> str:
    """The experiment's runs table with the view ``cll`` in the MLflow UI: at the tracking server
    where ``uri`` is one, else at ``mlflow ui``'s address. ``/runs``: the experiment's own address
    drops the view on its way to the first tab; ``workflowType=machine_learning``: MLflow 3.17 would
    show the GenAI sidebar."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def _listing(folder: Path) -> list[tuple[str, int]]:
    """(path, size) of the files in ``folder`` and in its subfolders, not deeper: a data set's
    archives and metadata lie there (MNIST/raw, CIFAR's batches, Tiny-ImageNet's wnids.txt and
    val_annotations.txt), its images, if any, further down, so no image is touched."""
    if not folder.is_dir():
        return []
    entries = [p for d in (folder, *(s for s in folder.iterdir() if s.is_dir())) for p in d.iterdir()]
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in entries if p.is_file())


def dataset_inputs(config: dict) -> list:
    """The run's data set as two MLflow dataset inputs, named for it: the train split (context
    ``training``) and the test split (``eval``). The digest hashes what selects a split's data:
    data set, split, first-N limit, the seed for moons (generated from it), and the file listing of
    a file-based set, whose source is its folder (``$CLL_DATA`` or ./data where data_root is
    unset); moons and digits, made in memory, have source type ``code``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .data import data_folder

    name = config["dataset"]
    folder = data_folder(name, config.get("data_root"))
    if folder is None:
        source_type, source = "code", {"tags": {"loader": "cll.data.load_dataset"}}
    else:
        source_type, source = "local", {"uri": str(folder)}
    listing = _listing(folder) if folder else []
    seed = config.get("seed") if name == "moons" else None
    inputs = []
    for split, context, limit in (("train", "training", "max_train"), ("test", "eval", "max_test")):
        text = json.dumps([name, split, config.get(limit), seed, listing])
        dataset = Dataset(name, hashlib.sha1(text.encode()).hexdigest()[:12], source_type, json.dumps(source))
        inputs.append(DatasetInput(dataset, [InputTag(DATA_CONTEXT_TAG, context)]))
    return inputs
