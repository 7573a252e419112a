"""MLflow helpers: one experiment per config, the whole resolved config as params + a YAML artifact,
git and data tags.  Everything here runs on the driver or on rank 0 only."""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import mlflow
from PIL import Image

from prouigan_platform.config import Config


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def log_config(config: Config) -> None:
    """The whole resolved config: flat params (dotted keys) and config.yaml."""
    params = {k: ("" if v is None else str(v))[:6000] for k, v in config.to_flat_dict().items()}
    mlflow.log_params(params)
    mlflow.log_text(config.to_yaml(), "config.yaml")
    mlflow.set_tag("config_digest", config.digest())


@contextmanager
def start_run(config: Config, run_name: str, tags: dict[str, str] | None = None, nested: bool = False):
    mlflow.set_experiment(config.tracking.experiment)
    with mlflow.start_run(run_name=run_name, nested=nested,
                          tags={"git_commit": git_commit(), **(tags or {})}) as run:
        log_config(config)
        yield run


class BackgroundLogger:
    """Rank 0's MLflow logging, off the training loop and best-effort.

    Metrics and files go into a bounded queue that a daemon thread sends.  While MLflow is unreachable they wait
    and the thread retries with back-off; beyond ``max_metrics`` / ``max_files`` pending items the oldest are
    dropped and counted.  So an MLflow outage costs no training step and no checkpoint (checkpoints go to storage
    through ``ray.train.report`` before anything is logged here), and what was logged before and after the outage
    still arrives."""

    def __init__(self, run_id: str, max_metrics: int = 20_000, max_files: int = 20, timeout_s: float = 10.0):
        # fail fast inside the thread and retry here, instead of MLflow's own minutes-long retry loop
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
        self.run_id = run_id
        self.client = mlflow.MlflowClient()
        self.metrics: deque = deque(maxlen=max_metrics)
        self.files: deque = deque(maxlen=max_files)
        self.dropped = 0
        self.failures = 0
        self.last_error = ""
        self._tmp = tempfile.mkdtemp(prefix="prouigan-track-")
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
                    self.metrics.append(mlflow.entities.Metric(k, float(v), now, int(step)))
        self._wake.set()

    def log_image(self, image, name: str, artifact_path: str) -> None:
        """An (H, W, 3) uint8 array, written to a file now and sent later."""
        path = Path(self._tmp) / name
        Image.fromarray(image).save(path)
        with self._lock:
            if len(self.files) == self.files.maxlen:
                self.dropped += 1
                Path(self.files[0][0]).unlink(missing_ok=True)
            self.files.append((str(path), artifact_path))
        self._wake.set()

    def _send_once(self) -> bool:
        """Send what is queued; False when MLflow failed (the items stay queued)."""
        with self._lock:
            batch = list(self.metrics)[:1000]
            file = self.files[0] if self.files else None
        try:
            if batch:
                self.client.log_batch(self.run_id, metrics=batch)
                with self._lock:
                    for _ in batch:
                        self.metrics.popleft()
            if file is not None:
                self.client.log_artifact(self.run_id, file[0], file[1])
                with self._lock:
                    if self.files and self.files[0] == file:
                        self.files.popleft()
                Path(file[0]).unlink(missing_ok=True)
            return True
        except Exception as e:  # unreachable, timing out, 5xx: keep the items, retry later
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            return False

    def pending(self) -> int:
        with self._lock:
            return len(self.metrics) + len(self.files)

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
