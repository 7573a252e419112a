"""An exclusive lock shared by every machine that sees the same bucket (or the same local folder).

The lock is an object created only if it does not exist: S3 ``PutObject`` with ``If-None-Match: *`` (atomic on
AWS S3 and the embedded S3 server), ``O_CREAT | O_EXCL`` on a local path.  It records who holds it, a random
owner token and until when (a lease).  While the holder works, a heartbeat thread extends the lease; a holder
that died stops renewing, and the next taker removes the lock once its lease has run out (on S3 with
``If-Match`` on the stale object's ETag, so two takers cannot both remove it and both take it).  Only the
owner (same token) renews or releases: a holder whose lease was taken over never deletes the new holder's lock.

On local disk every read-check-write of the lock object (take over, renew, release) runs under ``flock`` of a
guard file beside it, so it is atomic between processes.  A holder that stalled past its lease (SIGSTOP, a long
GC, a suspended VM) and was taken over must not act on its stale belief: work done under the lock is fenced,
``check()`` (called right before every commit: moving shards into place, writing a manifest, moving the champion
alias) raises ``LockLost`` when the lock no longer holds this holder's token, and the commit does not happen.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from botocore.exceptions import ClientError

from prouigan_platform import storage
from prouigan_platform.paths import store_root


class LockHeld(RuntimeError):
    pass


class LockLost(RuntimeError):
    """The lock was taken over while its holder worked (its lease ran out): the holder's commit is refused."""


class Lock:
    """``with Lock(uri):`` takes it (waiting up to ``wait_s``) or raises ``LockHeld`` naming the holder.
    While held, a heartbeat renews the lease every ``lease_s / 3`` seconds."""

    def __init__(self, uri: str, lease_s: float = 600.0, purpose: str = "", wait_s: float = 0.0,
                 heartbeat: bool = True):
        self.uri, self.lease_s, self.purpose, self.wait_s = uri, lease_s, purpose, wait_s
        self.token = uuid.uuid4().hex
        self.held = False
        self.taken = 0.0
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # set when a renewal found the lock no longer ours

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "purpose": self.purpose,
                           "token": self.token, "taken": self.taken or now, "renewed": now,
                           "expires": now + self.lease_s}).encode()

    def _try_create(self) -> bool:
        try:
            storage.create_exclusive(self.uri, self._body())
            return True
        except FileExistsError:
            return False

    def holder(self) -> dict | None:
        """The current holder's record (with ``_etag`` on S3), or None when the lock is free."""
        try:
            if storage.is_s3(self.uri):
                bucket, key = storage.split_s3(self.uri)
                try:
                    r = storage.boto3_client().get_object(Bucket=bucket, Key=key)
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        return None
                    raise
                return {**json.loads(r["Body"].read()), "_etag": r["ETag"]}
            return json.loads(Path(self.uri).read_bytes())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def held_by(self) -> str:
        """Who holds the lock, in words (for messages)."""
        rec = self.holder() or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("taken", 0)))
        left = rec.get("expires", 0) - time.time()
        return (f"{self.uri} is held by {rec.get('host')} pid {rec.get('pid')} ({rec.get('purpose')}) since {since}"
                f"; its lease {'runs out in ' + str(int(left)) + ' s' if left > 0 else 'has run out'}")

    @contextlib.contextmanager
    def _guard(self):
        """Local disk: an exclusive ``flock`` of ``<lock>.guard`` around a read-check-write (no-op on S3, where
        conditional requests make each step atomic)."""
        if storage.is_s3(self.uri):
            yield
            return
        path = Path(storage.filesystem(self.uri)[1] + ".guard")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _delete_if(self, rec: dict) -> bool:
        """Delete the lock object if it is still exactly ``rec`` (same ETag on S3, same token locally); True when it
        is gone.  A store that denies the delete is a PermissionError naming the lock (retrying would not help)."""
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            try:
                storage.boto3_client().delete_object(Bucket=bucket, Key=key, IfMatch=rec["_etag"])
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code in ("AccessDenied", "AllAccessDisabled", "403"):
                    raise PermissionError(f"{self.uri}: the expired lock cannot be removed ({code}): this "
                                          "identity may not delete it") from None
                return False  # someone else removed or replaced it first
            return True
        with self._guard():
            try:
                if json.loads(Path(self.uri).read_bytes()).get("token") == rec.get("token"):
                    Path(self.uri).unlink()
                    return True
                return False
            except FileNotFoundError:
                return True
            except json.JSONDecodeError:
                return False

    def check(self) -> None:
        """Fencing: raise ``LockLost`` unless the lock still holds this holder's token.  Call right before a commit."""
        rec = self.holder()
        if rec is None or rec.get("token") != self.token:
            why = f"it is now held by {rec.get('host')} pid {rec.get('pid')} ({rec.get('purpose')})" if rec \
                else "its lock object is gone"
            raise LockLost(f"{self.purpose or self.uri}: this run's lease ran out and {why}; nothing was committed. "
                           "Run it again")

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> bool:
        deadline = time.time() + wait_s
        while True:
            self.taken = time.time()
            if self._try_create():
                self.held, self.lost = True, None
                if self.heartbeat:
                    self._start_heartbeat()
                return True
            rec = self.holder()
            if rec is not None and rec.get("expires", 0) < time.time() and self._delete_if(rec):
                continue  # the holder died (its heartbeat stopped): take over at once
            # held, or an expired record someone else replaced first: wait, within the deadline, never spin
            if time.time() >= deadline:
                return False
            time.sleep(poll_s)

    def renew(self) -> bool:
        """Extend the lease if the lock is still ours; False (and ``lost`` set) when it is not."""
        with self._guard():
            rec = self.holder()
            if rec is None or rec.get("token") != self.token:
                self.lost = f"the lock was taken over: {self.held_by()}" if rec else "the lock object disappeared"
                return False
            if storage.is_s3(self.uri):
                bucket, key = storage.split_s3(self.uri)
                try:
                    storage.boto3_client().put_object(Bucket=bucket, Key=key, Body=self._body(),
                                                      IfMatch=rec["_etag"])
                except ClientError as e:
                    self.lost = f"renewal refused ({e.response.get('Error', {}).get('Code')})"
                    return False
            else:
                storage.write_bytes_atomic(self.uri, self._body())
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(max(0.05, self.lease_s / 3)):
                try:
                    if not self.renew():
                        return
                except Exception:  # a storage hiccup: try again at the next beat, the lease covers two misses
                    continue

        self._thread = threading.Thread(target=beat, name=f"lease:{self.uri}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lock, only if it is still ours."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        rec = self.holder()
        if rec is not None and rec.get("token") == self.token:
            self._delete_if(rec)
        self.held = False

    def __enter__(self) -> Lock:
        if not self.acquire(self.wait_s):
            raise LockHeld(self.held_by())
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def registry_identity(tracking_uri: str | None = None) -> str:
    """A name for the registry server behind ``tracking_uri`` that does not depend on how its address is spelled
    (``http://mlflow:5000`` in a pod, a port-forward to ``127.0.0.1:5000`` on a laptop): MLflow creates its Default
    experiment once per backend store and never lets it be deleted, so its creation time and artifact location
    name the store.  Asks the server (one request)."""
    import mlflow

    exp = mlflow.MlflowClient(tracking_uri).get_experiment("0")
    return hashlib.sha256(f"{exp.creation_time}|{exp.artifact_location}".encode()).hexdigest()[:12]


def _model_lock(kind: str, model_name: str, tracking_uri: str | None, **kw) -> Lock:
    registry = registry_identity(tracking_uri)
    return Lock(storage.join(store_root(), "locks", f"{kind}-{registry}-{model_name}.lock"), **kw)


def registry_lock(model_name: str, tracking_uri: str | None = None) -> Lock:
    """Held for the short read-compare-move of the champion alias (waits up to 5 minutes).  One lock per
    (registry server, model), whatever a config's storage or the spelling of the server's address: it lives in
    the platform's store (``PROUIGAN_STORE``).  Clients with different stores do not share it; the fence the
    gate writes into the registry itself (gate.move_champion) catches what the lock cannot."""
    return _model_lock("registry", model_name, tracking_uri, lease_s=120, wait_s=300,
                       purpose=f"move {model_name}@champion")


def retrain_lock(model_name: str, tracking_uri: str | None = None) -> Lock:
    """Held by one `prouigan retrain` of a registered model at a time, whichever recipe or storage it runs with
    (a short lease renewed by the heartbeat: a crashed retrain frees it in minutes)."""
    return _model_lock("retrain", model_name, tracking_uri, lease_s=300, purpose=f"retrain {model_name}")


def dataset_lock(root: str, wait_s: float = 0.0) -> Lock:
    """Held by one `prouigan shard` (or retrain's sharding step) at a time per dataset root."""
    return Lock(storage.join(root, "locks", "shard.lock"), lease_s=120, purpose=f"shard into {root}", wait_s=wait_s)
