"""MLflow in one place: the life of every pipeline's run, the dataset as a run input, and rank 0's background logger.

A run is opened by ``open_run`` (created, or found by a tag and re-opened), carries tags of one vocabulary (the
``TAG_*`` names below), the whole resolved config (flat params and config.yaml) and the dataset version it read
(``log_dataset``: MLflow's run inputs, so the UI shows the lineage dataset -> run -> model version), and is ended by
``end_run``: FINISHED, FAILED with the error as a tag, or KILLED when the process was stopped (Ctrl-C, SIGTERM).
Everything here runs on a driver or on rank 0; ``enabled()`` says whether there is a tracking server at all.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from prouigan_platform import run_names as names
from prouigan_platform.config import Config
from prouigan_platform.dataset.manifest import Manifest
from prouigan_platform.errors import stop_reason

ERROR_CHARS = 4000  # an error tag holds at most this much (MLflow's tag values are limited to 5,000)


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def experiment_id(name: str) -> str:
    """The experiment's id, created when missing.  Two runs starting at once on a new server both find it missing;
    the one whose create loses the race reads the winner's."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := client.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def log_config(run_id: str, config: Config) -> None:
    """The whole resolved config: flat params (dotted keys), config.yaml and its digest; credentials in URLs masked
    (``paths.redact``)."""
    client = mlflow.MlflowClient()
    params = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in config.to_flat_dict(redacted=True).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_text(run_id, config.to_yaml(redacted=True), "config.yaml")
    client.set_tag(run_id, names.CONFIG_DIGEST, config.digest())


def dataset_name(manifest: Manifest) -> str:
    """``<dataset root's folder>@v<version>``, e.g. ``mixed@v0003``: how runs and model versions name a version."""
    return f"{manifest.base.rstrip('/').rsplit('/', 1)[-1]}@v{manifest.version:04d}"


class ManifestDataset(MetaDataset):
    """A dataset version as MLflow sees it: the manifest's URI as source, its content digest, and a profile of
    its counts per split and per source (shown in the run's Datasets panel)."""

    def __init__(self, manifest: Manifest):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        uri = manifest.uri
        with warnings.catch_warnings():  # a local path matches two of MLflow's local source kinds; either will do
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
        self._profile = {"version": manifest.version, "counts": manifest.counts,
                         "counts_by_source": manifest.counts_by_source, "quarantined": manifest.quarantined}
        super().__init__(source, name=dataset_name(manifest), digest=manifest.digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_dataset(run_id: str, manifest: Manifest, context: str) -> None:
    """Record the dataset version as an input of the run (``context``: training, tuning, evaluation ...)."""
    ds = ManifestDataset(manifest)
    mlflow.MlflowClient().log_inputs(run_id, datasets=[DatasetInput(
        ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])


def find_run(exp_id: str, tag: str, value: str):
    """The newest run of the experiment whose tag ``tag`` is ``value``, or None."""
    found = mlflow.MlflowClient().search_runs([exp_id], f"tags.{tag} = '{value}'", max_results=1)
    return found[0] if found else None


def open_run(config: Config, pipeline: str, run_name: str, *, manifest: Manifest | None = None,
             find_tag: tuple[str, str] | None = None, parent_run_id: str | None = None,
             experiment: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The run of a pipeline, RUNNING: found by ``find_tag`` (name, value) and re-opened, else created with the
    tag vocabulary, the whole config and the dataset as its input.  -> run id."""
    client = mlflow.MlflowClient()
    exp_id = experiment_id(experiment or config.tracking.experiment)
    if find_tag is not None and (found := find_run(exp_id, *find_tag)) is not None:
        run_id = found.info.run_id
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, v)
        if manifest is not None and found.data.tags.get(names.DATASET_DIGEST) != manifest.digest:
            # resumed on another dataset version: the run's lineage names the one it goes on with
            client.set_tag(run_id, names.DATASET, manifest.uri)
            client.set_tag(run_id, names.DATASET_DIGEST, manifest.digest)
            log_dataset(run_id, manifest, "tuning" if pipeline.startswith("tune") else "training")
        client.update_run(run_id, status="RUNNING")
        return run_id
    # mlflow.note.content is the run's description on its page; mlflow.source.name its "Source"
    all_tags = {names.PIPELINE: pipeline, names.GIT: git_commit(), "mlflow.source.name": f"prouigan {pipeline}",
                "mlflow.source.type": "JOB",
                "mlflow.note.content": f"`prouigan {pipeline}` of recipe `{config.name}`"
                + (f" on dataset `{dataset_name(manifest)}` ({manifest.uri})" if manifest else "") + ".",
                **(tags or {})}
    if find_tag is not None:
        all_tags[find_tag[0]] = find_tag[1]
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if manifest is not None:
        all_tags.update({names.DATASET: manifest.uri, names.DATASET_DIGEST: manifest.digest})
    run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    log_config(run_id, config)
    if manifest is not None:
        log_dataset(run_id, manifest, "tuning" if pipeline.startswith("tune") else "training")
    return run_id


def end_run(run_id: str | None, error: BaseException | None = None, stopped: str | None = None) -> None:
    """FINISHED; KILLED for a stopped process or run (``stopped``: why, when nothing raised); FAILED with the error
    as a tag.  An unreachable MLflow is reported on stderr, never raised: the pipeline's own outcome stands."""
    if not run_id:
        return
    status = "FINISHED" if error is None and stopped is None else (
        "KILLED" if stopped is not None or isinstance(error, KeyboardInterrupt) else "FAILED")
    try:
        client = mlflow.MlflowClient()
        if status == "KILLED":
            client.set_tag(run_id, names.STOPPED, stopped or stop_reason(error))
        elif error is not None:
            client.set_tag(run_id, names.ERROR, f"{type(error).__name__}: {error}"[:ERROR_CHARS])
        client.set_terminated(run_id, status)
    except Exception as e:
        print(f"[tracking] could not mark MLflow run {run_id} {status}: {type(e).__name__}: {e}", file=sys.stderr)


@contextmanager
def run_scope(run_id: str | None):
    """Ends ``run_id`` as what happens inside: FINISHED, FAILED or KILLED (the error is re-raised)."""
    try:
        yield run_id
    except BaseException as e:
        end_run(run_id, e)
        raise
    end_run(run_id)


@contextmanager
def start_run(config: Config, run_name: str, pipeline: str, tags: dict[str, str] | None = None):
    """A short run of its own, as the fluent API's active run (``mlflow.log_*`` inside), ended by ``run_scope``."""
    run_id = open_run(config, pipeline, run_name, tags=tags)
    with run_scope(run_id), mlflow.start_run(run_id=run_id, log_system_metrics=False) as run:
        yield run


class BackgroundLogger:
    """Rank 0's MLflow logging, off the training loop and best-effort.

    Metrics and images go into a bounded queue that a daemon thread sends.  While MLflow is unreachable they wait
    and the thread retries with back-off; beyond ``max_metrics`` / ``max_images`` pending items the oldest are
    dropped and counted.  So an MLflow outage costs no training step and no checkpoint (checkpoints go to storage
    through ``ray.train.report`` before anything is logged here), and what was logged before and after the outage
    still arrives.  Images are step-wise (``log_image(key=, step=)``): the run page browses them by step."""

    def __init__(self, run_id: str, max_metrics: int = 20_000, max_images: int = 20, timeout_s: float = 10.0):
        # fail fast inside the thread and retry here, instead of MLflow's own minutes-long retry loop
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
        self.run_id = run_id
        self.client = mlflow.MlflowClient()
        self.metrics: deque = deque(maxlen=max_metrics)
        self.images: deque = deque(maxlen=max_images)
        self.tags: dict[str, str] = {}
        self.dropped = 0
        self.failures = 0
        self.last_error = ""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    if len(self.metrics) == self.metrics.maxlen:
                        self.dropped += 1
                    self.metrics.append(Metric(k, float(v), now, int(step)))
        self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run tags, sent with the next batch (the latest value of a tag wins)."""
        with self._lock:
            self.tags.update(tags)
        self._wake.set()

    def log_image(self, image, key: str, step: int) -> None:
        """An (H, W, 3) uint8 array, sent later as the run's image ``key`` at ``step``."""
        with self._lock:
            if len(self.images) == self.images.maxlen:
                self.dropped += 1
            self.images.append((image, key, int(step), int(time.time() * 1000)))
        self._wake.set()

    def _send_once(self) -> bool:
        """Send what is queued; False when MLflow failed (the items stay queued)."""
        with self._lock:
            batch = list(self.metrics)[:1000]
            image = self.images[0] if self.images else None
            tags = dict(self.tags)
        try:
            if tags:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                with self._lock:
                    for k, v in tags.items():
                        if self.tags.get(k) == v:
                            del self.tags[k]
            if batch:
                self.client.log_batch(self.run_id, metrics=batch)
                with self._lock:
                    for _ in batch:
                        self.metrics.popleft()
            if image is not None:
                self.client.log_image(self.run_id, image[0], key=image[1], step=image[2], timestamp=image[3])
                with self._lock:
                    if self.images and self.images[0] is image:
                        self.images.popleft()
            return True
        except Exception as e:  # unreachable, timing out, 5xx: keep the items, retry later
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            return False

    def pending(self) -> int:
        with self._lock:
            return len(self.metrics) + len(self.images) + len(self.tags)

    def _loop(self) -> None:
        backoff = 1.0
        while not self._stop:
            self._wake.wait(timeout=backoff if self.pending() else 5.0)
            self._wake.clear()
            while self.pending() and not self._stop:
                if not self._send_once():
                    backoff = min(backoff * 2, 30.0)
                    break
                backoff = 1.0

    def close(self, timeout_s: float = 60.0) -> str:
        """Stop the thread, send what is left (for at most ``timeout_s``); -> a line saying what was not sent."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        deadline = time.time() + timeout_s
        while self.pending() and time.time() < deadline:
            if not self._send_once():
                time.sleep(min(2.0, max(0.0, deadline - time.time())))
        left = self.pending()
        if left or self.dropped:
            return (f"MLflow logging: {left} item(s) not sent, {self.dropped} dropped while MLflow was unreachable "
                    f"(last error: {self.last_error})")
        return ""


class NodeMetrics:
    """CPU, memory, disk, network (and GPU where there is one) of this node, logged to the run as
    ``system/<node>/...`` every 10 s by MLflow's monitor, and once more at ``finish`` (so a run shorter than one
    interval still has a sample per node)."""

    def __init__(self, run_id: str, node: str):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, node_id=node, resume_logging=True)
        self.monitor.start()

    def finish(self) -> None:
        try:
            self.monitor.finish()
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as e:  # best-effort, like all tracking
            print(f"[tracking] system metrics: {type(e).__name__}: {e}", file=sys.stderr)


def system_metrics(run_id: str, node: str) -> NodeMetrics | None:
    """This node's system metrics into the run until ``.finish()``; None when the monitor cannot start."""
    try:
        return NodeMetrics(run_id, node)
    except Exception as e:  # best-effort, like all tracking
        print(f"[tracking] no system metrics for node {node}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
