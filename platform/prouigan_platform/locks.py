"""An exclusive lock shared by every machine that sees the same bucket (or the same local folder).

The lock is an object created only if it does not exist: S3 ``PutObject`` with ``If-None-Match: *`` (atomic on
AWS S3 and the embedded S3 server), ``O_CREAT | O_EXCL`` on a local path.  It holds who took it and until when
(a lease): a holder that died leaves a lock that the next taker removes once the lease has run out (on S3 with
``If-Match`` on the stale object's ETag, so two takers cannot both remove it and both take it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from prouigan_platform import storage


class LockHeld(RuntimeError):
    pass


class Lock:
    """``with Lock(uri):`` takes it (waiting up to ``wait_s``) or raises ``LockHeld`` naming the holder."""

    def __init__(self, uri: str, lease_s: float = 6 * 3600, purpose: str = "", wait_s: float = 0.0):
        self.uri, self.lease_s, self.purpose, self.wait_s = uri, lease_s, purpose, wait_s
        self.held = False

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "purpose": self.purpose,
                           "taken": time.time(), "expires": time.time() + self.lease_s}).encode()

    def _try_create(self) -> bool:
        if storage.is_s3(self.uri):
            from botocore.exceptions import ClientError

            bucket, key = storage.split_s3(self.uri)
            try:
                storage.boto3_client().put_object(Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        p = Path(self.uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._body())
        return True

    def holder(self) -> dict | None:
        """The current holder's record (with ``_etag`` on S3), or None when the lock is free."""
        try:
            if storage.is_s3(self.uri):
                from botocore.exceptions import ClientError

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
        return f"{self.uri} is held by {rec.get('host')} pid {rec.get('pid')} ({rec.get('purpose')}) since {since}"

    def _remove_stale(self, rec: dict) -> None:
        if storage.is_s3(self.uri):
            from botocore.exceptions import ClientError

            bucket, key = storage.split_s3(self.uri)
            try:
                storage.boto3_client().delete_object(Bucket=bucket, Key=key, IfMatch=rec["_etag"])
            except ClientError:
                pass  # someone else removed or replaced it first
        else:
            try:
                if json.loads(Path(self.uri).read_bytes()).get("taken") == rec.get("taken"):
                    Path(self.uri).unlink()
            except (FileNotFoundError, json.JSONDecodeError):
                pass

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> bool:
        deadline = time.time() + wait_s
        while True:
            if self._try_create():
                self.held = True
                return True
            rec = self.holder()
            if rec is not None and rec.get("expires", 0) < time.time():
                self._remove_stale(rec)
                continue
            if time.time() >= deadline:
                return False
            time.sleep(poll_s)

    def release(self) -> None:
        if not self.held:
            return
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            storage.boto3_client().delete_object(Bucket=bucket, Key=key)
        else:
            Path(self.uri).unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> Lock:
        if not self.acquire(self.wait_s):
            raise LockHeld(self.held_by())
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_root(cfg) -> str:
    """Where a config's locks live: ``locks/`` beside its checkpoints (the bucket every node sees)."""
    base = cfg.train.storage.rstrip("/")
    parent = base.rsplit("/", 1)[0] if "/" in base.split("://")[-1] else base
    return storage.join(parent, "locks")


def registry_lock(cfg, model_name: str) -> Lock:
    """Held for the short read-compare-move of the champion alias (waits up to 5 minutes)."""
    return Lock(storage.join(lock_root(cfg), f"registry-{model_name}.lock"), lease_s=600,
                purpose=f"move {model_name}@champion", wait_s=300)
