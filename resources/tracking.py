"""One training run logged to MLflow, bounded in time and never failing the caller.

Why it exists: Dagster records what was materialised; researchers compare training runs
(parameters, loss curves, evaluation metrics) across experiments in MLflow. This module
is the MLflow side only, generic infrastructure with no Dagster and no ``lab_assets``:
plain data in (`RunRecord`), a `TrackedRun` (or None) out, and two callbacks for the
caller's info and warning lines.

Where runs go (`tracking_uri`):

- ``$MLFLOW_TRACKING_URI`` when it is set (a server, Databricks, a SQLite file...);
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``
  are read by MLflow itself, never by this module, and never logged;
- else, for a local storage root, a SQLite store ``<root>/<experiment>/mlflow/mlflow.db``
  (MLflow 3 refuses the old file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set), its
  artifact root beside it; writers on one machine take turns under ``flock``;
- else (a ``gs://`` root with no tracking URI) nowhere: one info line says so.

Nothing here raises: an unreachable server or any MLflow error becomes one warning line
(credentials stripped from URIs) and None. HTTP retries and timeouts are capped for the
lab's calls (`HTTP_LIMITS`) unless the environment already sets them, and the caller
waits at most `DEADLINE_S` whatever MLflow does (its database retries are not
configurable).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
LOCAL_STORE_DIR = "mlflow"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "artifacts"
# MLflow's own settings, defaults only for the lab's calls: one retry, 5 s per request,
# so an unreachable server costs seconds rather than MLflow's minutes (7 retries, 120 s).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
LOCK_TIMEOUT_S = 20.0
DEADLINE_S = 30.0  # the most one `log_run` holds up its caller
# MLflow's batch limits (log_batch): 100 params, 100 tags, 1000 metrics per request.
_PARAM_BATCH, _TAG_BATCH, _METRIC_BATCH = 100, 100, 1000

Log = Callable[[str], None]
_CREDENTIALS = re.compile(r"//[^/@\s]+@")  # the user:password@ of a URI in a message


@dataclass(frozen=True)
class RunRecord:
    """What to log: plain values only."""

    experiment: str  # the MLflow experiment's name
    run_name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    # metric histories: value i is logged at step i + 1 (a loss curve, one value per step)
    series: Mapping[str, Sequence[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str
    tracking_uri: str  # credentials stripped
    link: str | None  # the run's page in the MLflow UI when the URI is http(s)
    local_db: Path | None  # the SQLite file of a local store


def tracking_uri(storage_root: str, experiment: str) -> str | None:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store under a local root, else None."""
    explicit = os.environ.get(TRACKING_URI_ENV, "").strip()
    if explicit:
        return explicit
    db = local_db(storage_root, experiment)
    return f"sqlite:///{db}" if db else None


def local_db(storage_root: str, experiment: str) -> Path | None:
    """The local store's SQLite file for a local storage root; None for ``scheme://`` roots."""
    if "://" in storage_root:
        return None
    return Path(storage_root).resolve() / experiment / LOCAL_STORE_DIR / LOCAL_DB


def public_uri(uri: str) -> str:
    """`uri` without any ``user:password@`` part, for logs and metadata."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI for an http(s) tracking URI, else None."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    return f"{public_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def log_run(
    record: RunRecord,
    storage_root: str,
    *,
    info: Log,
    warn: Log,
    deadline_s: float = DEADLINE_S,
) -> TrackedRun | None:
    """Log `record` as one finished MLflow run; None when skipped, when MLflow failed, or
    when it took longer than `deadline_s` (the attempt goes on in a daemon thread)."""
    uri = tracking_uri(storage_root, record.experiment)
    if uri is None:
        info(
            f"MLflow: not logging run {record.run_name}: the storage root {storage_root} is "
            f"not local and {TRACKING_URI_ENV} is not set"
        )
        return None
    shown = public_uri(uri)
    db = (
        None
        if os.environ.get(TRACKING_URI_ENV, "").strip()
        else local_db(storage_root, record.experiment)
    )
    t0 = time.perf_counter()
    outcome: list[TrackedRun | BaseException] = []

    def attempt() -> None:
        try:
            with _http_limits(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MLflow's and SQLAlchemy's deprecation chatter
                import mlflow.tracking  # noqa: F401 - imported (~1 s) before taking the lock

                with _store_lock(db):
                    outcome.append(_log(record, uri, db))
        except BaseException as e:  # tracking must never fail the caller
            outcome.append(e)

    # A database URI that does not answer is retried by MLflow for ~2 min, whatever the
    # HTTP settings say: the caller waits at most `deadline_s`.
    worker = threading.Thread(target=attempt, name="mlflow-log-run", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if not outcome:
        warn(
            f"MLflow: run {record.run_name} not logged to {shown}: no answer in {deadline_s:.0f} s"
        )
        return None
    if isinstance(outcome[0], BaseException):
        e = outcome[0]
        message = _CREDENTIALS.sub("//", f"{type(e).__name__}: {e}")
        warn(f"MLflow: run {record.run_name} not logged to {shown}: {message[:1000]}")
        return None
    tracked = outcome[0]
    info(
        f"MLflow: run {tracked.run_id} in experiment {record.experiment!r} at {shown} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return tracked


def _log(record: RunRecord, uri: str, db: Path | None) -> TrackedRun:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(record.experiment)
    if exp is None:
        location = (db.parent / LOCAL_ARTIFACTS).as_uri() if db else None
        try:
            experiment_id = client.create_experiment(record.experiment, location)
        except MlflowException:  # created meanwhile by another writer
            exp = client.get_experiment_by_name(record.experiment)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
    run = client.create_run(experiment_id, run_name=record.run_name)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = [Param(k, _param(v)) for k, v in record.params.items()]
        tags = [RunTag(k, str(v)) for k, v in record.tags.items()]
        metrics = [Metric(k, float(v), now, 0) for k, v in record.metrics.items()]
        for key, values in record.series.items():
            metrics += [Metric(key, float(v), now, i + 1) for i, v in enumerate(values)]
        for i in range(0, len(params), _PARAM_BATCH):
            client.log_batch(run_id, params=params[i : i + _PARAM_BATCH])
        for i in range(0, len(tags), _TAG_BATCH):
            client.log_batch(run_id, tags=tags[i : i + _TAG_BATCH])
        for i in range(0, len(metrics), _METRIC_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _METRIC_BATCH])
    except Exception:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return TrackedRun(
        run_id, experiment_id, public_uri(uri), run_link(uri, experiment_id, run_id), db
    )


def _param(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


@contextlib.contextmanager
def _http_limits() -> Iterator[None]:
    """`HTTP_LIMITS` for the duration, where the environment does not set them itself."""
    added = [k for k in HTTP_LIMITS if k not in os.environ]
    os.environ.update({k: HTTP_LIMITS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _store_lock(db: Path | None) -> Iterator[None]:
    """An exclusive lock on a local store (concurrent steps share one SQLite file and
    would race to create its tables); waits at most `LOCK_TIMEOUT_S`."""
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f"{LOCAL_DB}.lock", "a") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{db}: locked by another writer for {LOCK_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
