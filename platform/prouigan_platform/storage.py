"""Storage URIs: local paths and ``s3://bucket/key`` on any S3-compatible endpoint.

The endpoint comes from the standard ``AWS_ENDPOINT_URL`` variable (set by ``prouigan platform up``'s
environment, or by a cluster's), so the same URI works on a laptop stack and on a real cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pyarrow.fs as pafs
from botocore.exceptions import ClientError

from prouigan_platform.local_files import fsync_dir, write_local_atomic, write_local_tmp


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "http")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers never see a half-written object, and once this returns the bytes are on disk (fsync of the file
    and its folder): a temporary file renamed into place locally; one PUT on S3 (atomic there)."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    write_local_atomic(path, data)


def write_png(path: str | Path, image) -> None:
    """An (H, W, 3) uint8 array as a PNG file, written whole or not at all (``write_bytes_atomic``)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    write_bytes_atomic(str(path), buf.getvalue())


def create_exclusive(uri: str, data: bytes) -> None:
    """Like ``write_bytes_atomic``, but only if nothing exists at ``uri`` yet; else FileExistsError.
    Locally a hard link (atomic, fails on an existing name); on S3 ``PutObject`` with ``If-None-Match: *``."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            boto3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise FileExistsError(f"{uri} already exists") from None
            if code in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                raise RuntimeError(f"{uri}: the S3 store refused a conditional write (If-None-Match: *, {code}); the "
                                   "platform's fences (dataset versions, shards, locks) need a store that checks "
                                   "it (AWS S3, MinIO, Ceph RGW ...)") from None
            raise
        return
    _, path = filesystem(uri)
    tmp = write_local_tmp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{uri} already exists") from None
    finally:
        os.unlink(tmp)
    fsync_dir(os.path.dirname(path))


def move_exclusive(src: str, dst: str) -> None:
    """Move an object to a name that must be free (FileExistsError otherwise): never overwrites.  On S3 the write
    is conditional (``If-None-Match: *``): a stale writer that checked before the winner wrote is refused by the
    store itself, not by a check that could be out of date."""
    if is_s3(dst):
        create_exclusive(dst, read_bytes(src))
        fs, path = filesystem(src)
        fs.delete_file(path)
        return
    s, d = filesystem(src)[1], filesystem(dst)[1]
    os.makedirs(os.path.dirname(d), exist_ok=True)
    try:
        os.link(s, d)
    except FileExistsError:
        raise FileExistsError(f"{dst} already exists") from None
    os.unlink(s)
    fsync_dir(os.path.dirname(d))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files directly under a folder/prefix (sorted); empty if it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    base = str(uri).rstrip("/")
    return sorted(f"{base}/{i.base_name}" for i in infos
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def boto3_client():
    """A boto3 S3 client for the configured endpoint (boto3 itself honours AWS_ENDPOINT_URL)."""
    return boto3.client("s3", region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key
