"""MLflow tracking: a side channel fed from the files of a run directory.

``results/`` is the source of truth; MLflow only mirrors it so runs can be browsed and compared
in ``mlflow ui``. Everything here reads the files that ``cll train``, ``cll certify`` and ``cll
audit`` wrote (``train.json``, ``certify.json``, ``audit.json``) and logs them into ONE MLflow run
per run directory, named by method and cell (``CLL 8C2F tinyimagenet eps1 p0.025 seed1``; the
method is the grid row's, ``--method``, else the loss) and tagged ``cll.method``, ``cll.dataset``,
``cll.arch``, ``cll.loss``, ``cll.eps``, ``cll.p``, ``cll.seed``:

- params: the resolved run config (``train.json["config"]``);
- per-epoch metrics (step = epoch): ``train_loss``, ``train_accuracy``,
  ``train_lipschitz_estimate``, ``lr``, ``epoch_seconds``;
- final metrics, named for the radius as the tables write it (``metric_name``: ``cra_36_255`` for
  36/255, ``cra_0.15`` for 0.15): ``clean_accuracy``, ``cra_<r>``, ``cra_estimate_<r>``,
  ``lipschitz_constant`` (the sound bound), ``lipschitz_estimate``, ``lipschitz_body``,
  ``n_samples``, ``certify_seconds`` (certify.json); ``k_hf`` for CLL runs (K^(h∘f) = 1/sigma);
  ``lipschitz_bound``, ``train_wall_time`` (train.json); from audit.json ``audit_attacked_<r>``
  (certified points attacked at radius r), ``audit_broken_<r>`` (of those, misclassified inside
  the radius: any is a failed certificate), ``audit_own_radius_broken``, ``audit_broken`` (all),
  ``audit_tightness_median`` (nearest adversarial distance / certified radius, median over points)
  and ``audit_lipschitz_tightness`` (Lipschitz lower bound found / certified bound);
- artifacts: ``train.json``, ``certify.json``, ``audit.json``, and ``model.pt`` when it is at most
  ``$CLL_TRACK_CHECKPOINT_MB`` megabytes (default 20; 0 never), so small models can be downloaded
  from the UI and loaded with ``cll.api.load_run``;
- dataset inputs (the runs table's Dataset column), logged once per run: the data set's train
  split (context ``training``) and test split (``eval``, what certify evaluates), each with a
  digest of what selects its data and its source, the data set's folder or ``code`` for moons and
  digits (``cll.tracking_ui.dataset_inputs``).

Every experiment cll logs into carries two experiment tags, set where missing (never replacing
one a person changed): the model-training kind, and a saved view ``cll`` of the runs table with
clean accuracy, CRA at every radius logged, K^(h∘f), the sound bound and the audit's broken
certificates as columns. ``tracking_ui.ui_url`` is the experiment's address that opens it.

The grid's summary.csv, tables (with the reproduction summary, also as ``reproduction_*``
metrics) and figures go into one more run of the experiment, named ``summary`` (``cll aggregate
--track``, ``cll tables --track``, ``cll figures --track``), updated on every rebuild.

The run is found again by the tag ``cll.key`` (a hash of the run directory's absolute path and its
config), so ``cll certify --track`` adds to the run that ``cll train --track`` created, and a rerun
updates that run instead of creating a second one. Logging is idempotent: epochs already logged
and final metrics that did not change are skipped.

Each mirrored run carries the tag ``cll.files``, a digest of the two JSON files, set last: a run
whose digest matches the files is up to date and skipped without any further request.

Tracking never fails a job: any error (mlflow not installed, no server, a locked database) becomes
one warning line on stderr. Whatever a job could not log is logged later by :func:`backfill`
(``cll aggregate --track``, the workflow's aggregate step, which runs on the login node): it reads
every finished run directory of the grid and logs those whose digest MLflow lacks, so no run is
lost and, because runs are found by their ``cll.key`` tag, none is logged twice.

On a cluster, sqlite on a shared filesystem is unsafe (its locks are unreliable on NFS/Lustre/
GPFS): point ``MLFLOW_TRACKING_URI`` at a tracking server, ``http://<login-node>:5000`` (README,
"Cluster"). A server that is down or unreachable from the compute nodes costs each job a few
seconds of retries and one warning line. The store is ``$MLFLOW_TRACKING_URI`` if set, else MLflow 3's default
``sqlite:///mlflow.db`` in the working directory (so ``mlflow ui`` there shows the runs).

Parallel jobs against a fresh sqlite file race in MLflow's schema migration and in experiment
creation (two jobs each create the tables or the experiment; one fails); ``init`` (``cll track
init``) creates both once, before the jobs start.
This module and ``cll.tracking_ui`` (the experiment tags, the view, the dataset inputs) are the
only ones that import mlflow, and only inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import results
from .tracking_ui import VIEW_TAG, dataset_inputs, experiment_tags, metric_name, with_columns

DEFAULT_URI = "sqlite:///mlflow.db"
CHECKPOINT_MB = 20.0  # default of $CLL_TRACK_CHECKPOINT_MB: largest model.pt logged as an artifact
SUMMARY_RUN = "summary"  # name and cll.key of the run holding the grid's tables and figures
KEY_TAG = "cll.key"
DIR_TAG = "cll.run_dir"
FILES_TAG = "cll.files"
EPOCH_METRICS = {  # train.json epoch field -> metric name
    "loss": "train_loss",
    "accuracy": "train_accuracy",
    "lipschitz_estimate": "train_lipschitz_estimate",
    "lr": "lr",
    "seconds": "epoch_seconds",
}
FILES = (results.TRAIN, results.CERTIFY, results.AUDIT)  # the JSON files mirrored, as artifacts too
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` (relative to the cwd)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def warn(err: BaseException) -> None:
    """The one line a tracking failure prints."""
    text = (str(err).strip().splitlines() or [""])[0][:300]
    print(
        f"cll: warning: MLflow tracking skipped ({type(err).__name__}: {text}); "
        f"the files in the run directory are unaffected",
        file=sys.stderr,
    )


def _client():
    # A dead server would otherwise be retried for minutes (7 retries, exponential backoff).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):  # schema-migration chatter; mlflow sets INFO on import
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri())


def _experiment(client, name: str) -> tuple[str, dict[str, str]]:
    """The id and tags of experiment ``name``, created if missing. It gets the tags of
    ``tracking_ui.experiment_tags`` it lacks (an experiment older than them, or made by hand) and keeps
    those it has: a kind a person chose, a view saved over cll's."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        tags = experiment_tags()
        try:
            return client.create_experiment(name, tags=tags), tags
        except Exception:  # created by a parallel job in between: use theirs
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    missing = {k: v for k, v in experiment_tags().items() if k not in exp.tags}
    for key, value in missing.items():
        client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id, {**exp.tags, **missing}


def _experiment_id(client, name: str) -> str:
    return _experiment(client, name)[0]


def init(experiment: str) -> str | None:
    """Create the tracking store and the experiment if missing; return its id (None on failure)."""
    try:
        return _experiment_id(_client(), experiment)
    except Exception as err:
        warn(err)
        return None


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_name(config: dict, method: str | None = None) -> str:
    """``CLL 8C2F tinyimagenet eps1 p0.025 seed1``: the method (else the loss), then the cell."""
    eps, p = results.fmt_number(config["eps"]), results.fmt_number(config["p"])
    return f"{method or config['loss']} {config['arch']} {config['dataset']} eps{eps} p{p} seed{config['seed']}"


def _audit_metrics(audit: dict) -> dict[str, Any]:
    """The audit's headline numbers (``cll.audit.audit``): broken certificates (in all, per radius,
    at the points' own radius), certified points attacked per radius, and its two tightness
    measures: the median over points of (nearest adversarial distance found / certified radius)
    and (Lipschitz lower bound found / certified bound), both 1 when tight."""
    quantiles = (audit.get("tightness") or {}).get("quantiles") or {}
    out: dict[str, Any] = {
        "audit_broken": audit.get("broken"),
        "audit_own_radius_broken": (audit.get("own_radius") or {}).get("broken"),
        "audit_tightness_median": quantiles.get("median"),
        "audit_lipschitz_tightness": audit.get("lipschitz_tightness"),
    }
    for key, c in (audit.get("per_eps") or {}).items():
        out[metric_name("audit_attacked", key)] = c.get("attacked")
        out[metric_name("audit_broken", key)] = c.get("broken")
    return out


def _final_metrics(train: dict | None, cert: dict | None, audit: dict | None = None) -> dict[str, float]:
    out: dict[str, Any] = {}
    if train:
        out["lipschitz_bound"] = train.get("lipschitz_bound")
        out["train_wall_time"] = train.get("wall_time")
        out["k_hf"] = train.get("k_hf")
    if audit:
        out.update(_audit_metrics(audit))
    if cert:
        for key in (
            "clean_accuracy",
            "lipschitz_constant",
            "lipschitz_estimate",
            "lipschitz_body",
            "n_samples",
            "k_hf",
        ):
            out[key] = cert.get(key)
        out["certify_seconds"] = cert.get("seconds")
        for eps, value in (cert.get("cra") or {}).items():
            out[metric_name("cra", eps)] = value
        for eps, value in (cert.get("cra_estimate") or {}).items():
            out[metric_name("cra_estimate", eps)] = value
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run_key(run_dir: Path, config: dict) -> str:
    """The ``cll.key`` tag of a run directory (an absolute path) trained with ``config``."""
    return hashlib.sha1(f"{run_dir}\n{json.dumps(config, sort_keys=True)}".encode()).hexdigest()[:20]


def checkpoint_limit_mb() -> float:
    """``$CLL_TRACK_CHECKPOINT_MB`` (default 20): model.pt files up to this size are logged; 0: none."""
    text = os.environ.get("CLL_TRACK_CHECKPOINT_MB", "")
    try:
        return float(text) if text.strip() else CHECKPOINT_MB
    except ValueError:
        raise ValueError(f"CLL_TRACK_CHECKPOINT_MB={text!r} is not a number of megabytes") from None


def _files_digest(run_dir: Path, method: str | None) -> str:
    """The ``cll.files`` tag: a digest of the run's JSON files as they are now (and its method)."""
    digest = hashlib.sha1(f"{method}\0".encode())
    for name in FILES:
        path = run_dir / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\0")
    return digest.hexdigest()[:20]


def log_run_dir(run_dir: str | Path, experiment: str, method: str | None = None) -> str:
    """Mirror a run directory into its MLflow run (created on first use); return the run id.
    ``method``: the grid row's method, for the run's name. Raises on any tracking error: callers
    that must not fail use :func:`track`."""
    from mlflow.entities import Metric, Param, RunTag

    run_dir = Path(run_dir).resolve()
    digest = _files_digest(run_dir, method)  # before reading: a file rewritten meanwhile is logged again later
    train = results.read_json(run_dir / results.TRAIN)
    cert = results.read_json(run_dir / results.CERTIFY)
    audit = results.read_json(run_dir / results.AUDIT)
    if train is None:
        raise FileNotFoundError(f"{run_dir / results.TRAIN} is missing (run cll train first)")
    config = train["config"]
    key = _run_key(run_dir, config)

    client = _client()
    exp_id, exp_tags = _experiment(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    if found and found[0].data.tags.get(FILES_TAG) == digest:
        return found[0].info.run_id  # up to date
    view = with_columns(exp_tags.get(VIEW_TAG), [metric_name("cra", eps) for eps in (cert or {}).get("cra") or {}])
    if view is not None:  # a radius the view has no column for yet
        client.set_experiment_tag(exp_id, VIEW_TAG, view)
    name = run_name(config, method)
    if found:
        run = found[0]
    else:
        tags = {
            KEY_TAG: key,
            DIR_TAG: str(run_dir),
            **{f"cll.{k}": str(config[k]) for k in ("dataset", "arch", "loss", "eps", "p", "seed")},
        }
        run = client.create_run(exp_id, run_name=name, tags=tags)
    run_id = run.info.run_id

    now = int(time.time() * 1000)
    params = [Param(k, _param_text(v)) for k, v in sorted(config.items()) if k not in run.data.params]
    tags = [RunTag("cll.stage", "audit" if audit else "certify" if cert else "train")]
    if method is not None:  # a hand run (no --method) keeps the name a grid job gave it
        tags += [RunTag("cll.method", method), RunTag("mlflow.runName", name)]
    metrics = []
    logged = {m.step for m in client.get_metric_history(run_id, EPOCH_METRICS["loss"])}
    for row in train.get("epochs", []):
        if row["epoch"] in logged:
            continue
        metrics += [
            Metric(name, float(row[field]), now, row["epoch"])
            for field, name in EPOCH_METRICS.items()
            if isinstance(row.get(field), (int, float))
        ]
    final = _final_metrics(train, cert, audit)
    metrics += [Metric(k, v, now, 0) for k, v in final.items() if run.data.metrics.get(k) != v]
    for i in range(0, max(len(metrics), 1), _BATCH):
        client.log_batch(
            run_id, metrics=metrics[i : i + _BATCH], params=params if i == 0 else [], tags=tags if i == 0 else []
        )
    if not run.inputs.dataset_inputs:  # once per run (and for a run logged before inputs were)
        client.log_inputs(run_id, dataset_inputs(config))
    for file in FILES:
        if (run_dir / file).is_file():
            client.log_artifact(run_id, str(run_dir / file))
    _log_checkpoint(client, run_id, run_dir / results.MODEL)
    client.set_terminated(run_id, "FINISHED")
    client.set_tag(run_id, FILES_TAG, digest)  # last: a run interrupted before this is redone
    return run_id


def _log_checkpoint(client, run_id: str, path: Path) -> None:
    """model.pt as an artifact if it is at most checkpoint_limit_mb() (and not logged as it is)."""
    limit = checkpoint_limit_mb()
    if limit <= 0 or not path.is_file() or path.stat().st_size > limit * 1e6:
        return
    logged = {a.path: a.file_size for a in client.list_artifacts(run_id)}
    if logged.get(path.name) != path.stat().st_size:
        client.log_artifact(run_id, str(path))


def backfill(run_dirs: list[str | Path], experiment: str, methods: list[str | None] | None = None) -> tuple[int, int]:
    """Log every run directory (with a train.json) whose files MLflow does not have yet; return
    (logged, already up to date). ``methods``: each directory's grid method (run names). One
    search lists the experiment's runs, so an up-to-date grid costs one request. Raises on the
    first tracking error (the tracker is down): callers that must not fail use :func:`track_backfill`."""
    methods = methods or [None] * len(run_dirs)
    pairs = [(Path(d).resolve(), m) for d, m in zip(run_dirs, methods)]
    pairs = [(d, m) for d, m in pairs if (d / results.TRAIN).is_file()]
    client = _client()
    exp_id = _experiment_id(client, experiment)
    synced: dict[str, str | None] = {}
    token = None
    while True:  # every run of the experiment, page by page
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        for run in page:
            if KEY_TAG in run.data.tags:
                synced[run.data.tags[KEY_TAG]] = run.data.tags.get(FILES_TAG)
        token = page.token
        if not token:
            break
    logged = 0
    for run_dir, method in pairs:
        train = results.read_json(run_dir / results.TRAIN)
        if synced.get(_run_key(run_dir, train["config"])) == _files_digest(run_dir, method):
            continue
        log_run_dir(run_dir, experiment, method)
        logged += 1
    return logged, len(pairs) - logged


def track_backfill(
    run_dirs: list[str | Path], experiment: str, methods: list[str | None] | None = None
) -> tuple[int, int] | None:
    """:func:`backfill` that never raises: a failure prints one warning line, returns None."""
    try:
        return backfill(run_dirs, experiment, methods)
    except Exception as err:
        warn(err)
        return None


def track(run_dir: str | Path, experiment: str, method: str | None = None) -> str | None:
    """:func:`log_run_dir` that never raises: a failure prints one warning line, returns None."""
    try:
        return log_run_dir(run_dir, experiment, method)
    except Exception as err:
        warn(err)
        return None


def log_summary(paths: list[Path], experiment: str, folder: str | None, metrics: dict[str, float] | None = None) -> str:
    """Log files (summary.csv, tables, figures) as artifacts under ``folder`` (None: the top) of the
    experiment's ``summary`` run (created on first use), and ``metrics`` (the reproduction counts)."""
    client = _client()
    exp_id = _experiment_id(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{SUMMARY_RUN}'", max_results=1)
    run_id = (
        found[0].info.run_id
        if found
        else client.create_run(exp_id, run_name=SUMMARY_RUN, tags={KEY_TAG: SUMMARY_RUN}).info.run_id
    )
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=folder)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def track_summary(
    paths: list[Path], experiment: str, folder: str | None, metrics: dict[str, float] | None = None
) -> str | None:
    """:func:`log_summary` that never raises (one warning line instead)."""
    try:
        return log_summary(paths, experiment, folder, metrics)
    except Exception as err:
        warn(err)
        return None
