"""Storage URIs: local paths and ``s3://bucket/key`` on any S3-compatible endpoint.

The endpoint comes from the standard ``AWS_ENDPOINT_URL`` variable (set by ``prouigan platform up``'s
environment, or by a cluster's), so the same URI works on a laptop stack and on a real cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


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
    """Write under a temporary name, then move into place: readers never see a half-written object.
    (On S3 a single PUT is already atomic; the move keeps one code path for both.)"""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if not is_s3(uri):  # object stores have no folders; creating markers only litters the bucket
        fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/_tmp.{os.getpid()}.{path.rsplit('/', 1)[-1]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files directly under a folder/prefix (sorted); empty if it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    base = str(uri).rstrip("/")
    return sorted(f"{base}/{i.base_name}" for i in infos
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def boto3_client():
    """A boto3 S3 client for the configured endpoint (boto3 itself honours AWS_ENDPOINT_URL)."""
    import boto3

    return boto3.client("s3", region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key
