"""What dlib found in each photo, kept beside the dataset versions so no unchanged photo is labelled twice.

    ROOT/labels/part-{sha256[:24]}.parquet    one file per work block that ran dlib: input, fingerprint,
                                              labeller, faces (JSON: [{"box", "points"}, ...], [] = no face)

Parts are written by the Ray Data tasks as they finish, before the version's manifest exists, so a build that
crashes half way keeps the labels it made; the next build reads every part and labels only what is missing.
Each manifest lists the parts its labels came from.  A photo whose fingerprint (size, mtime) changed, or a
labeller that changed, is labelled again.
"""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from prouigan_platform import storage

SCHEMA = pa.schema([("input", pa.string()), ("fingerprint", pa.string()), ("labeller", pa.string()),
                    ("faces", pa.string())])


def labels_dir(root: str) -> str:
    return storage.join(root, "labels")


def write_part(root: str, entries: list[dict]) -> str:
    """entries [{"input", "fingerprint", "labeller", "faces"}] -> the part's file name (content-addressed)."""
    table = pa.Table.from_pylist(sorted(entries, key=lambda e: e["input"]), schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    name = f"part-{hashlib.sha256(data).hexdigest()[:24]}.parquet"
    storage.write_bytes_atomic(storage.join(labels_dir(root), name), data)
    return name


def load(root: str, labeller: str) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """Every label under ``root`` made by ``labeller``: ({(input, fingerprint): faces JSON}, {same: part name})."""
    faces: dict[tuple[str, str], str] = {}
    part_of: dict[tuple[str, str], str] = {}
    for uri in storage.list_files(labels_dir(root), ".parquet"):
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        except Exception:  # a torn part (a crash mid-write cannot leave one; a hand edit can): label again
            continue
        name = uri.rsplit("/", 1)[-1]
        for row in table.to_pylist():
            if row["labeller"] == labeller:
                k = (row["input"], row["fingerprint"])
                faces[k] = row["faces"]
                part_of[k] = name
    return faces, part_of
