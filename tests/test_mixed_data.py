"""CelebA-scale data: dlib labelling inside the Ray Data tasks, quarantine reasons, identity-disjoint splits,
labels kept so nothing is labelled twice, mixed versions counted per source, the reader's source weights."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from prouigan_platform.config import SourceConfig, load_config
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.build import SettingsChanged, build_version
from prouigan_platform.dataset.reader import FaceShards
from prouigan_platform.dataset.sources import list_sources

# six CelebA identities with three or four photos each among the shared photos; 000004 and 000036 are photos in
# which dlib's detector finds no face
IDENTITIES = {"2880": ["000001", "004390", "047978"], "5805": ["000004", "027057", "032973"],
              "667": ["000017", "041273", "096915", "098893"], "2929": ["000019", "007212", "028560", "075004"],
              "181": ["000021", "001533", "080038", "090853"], "3272": ["000036", "016358", "047635"]}
NO_FACE = {"000004", "000036"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def celeba20(shared_celeba, tmp_path_factory) -> Path:
    """A temporary copy of 20 shared CelebA photos with their MANIFEST entries (never copied into the repo)."""
    pytest.importorskip("dlib", reason="dlib labelling needs the eval extra")
    folder = tmp_path_factory.mktemp("celeba20")
    entries = []
    for ident, names in IDENTITIES.items():
        for n in names:
            shutil.copy2(shared_celeba / f"{n}.jpg", folder / f"{n}.jpg")
            entries.append({"name": n, "identity": int(ident)})
    (folder / "MANIFEST.json").write_text(json.dumps(entries))
    return folder


def _data(sources, **kw):
    return load_config("smoke").data.model_copy(update={"sources": sources, **kw})


def _shard_faces(manifest) -> list[dict]:
    """Every accepted face's JSON meta, read back from the shards."""
    return [json.loads(s["json"]) for sh in manifest["shards"]
            for s in mf.read_shard(mf.shard_uris(manifest, sh["split"])[0].rsplit("/", 1)[0] + "/" + sh["name"])]


@pytest.mark.stack  # a local Ray for the Ray Data tasks
def test_celeba_photos_are_labelled_in_ray_data_tasks_split_by_identity_and_never_twice(ray_local, celeba20,
                                                                                        tmp_path):
    src = SourceConfig(kind="celeba", path=str(celeba20), val_fraction=0.3, test_fraction=0.3)
    data = _data([src])
    root = str(tmp_path / "ds")
    res = build_version(list_sources(data.sources), data, root, engine="ray")
    m = res.manifest
    n_inputs = sum(len(v) for v in IDENTITIES.values())
    assert res.processed == n_inputs and res.labelled == n_inputs and res.labels_reused == 0

    # a photo with no face: quarantined with its reason, counted in the summary
    reasons = {q["input"].removeprefix("celeba_"): q["reason"] for q in m["quarantine"]}
    assert {k for k, r in reasons.items() if r == "no_face_found"} == NO_FACE
    assert m["quarantine_by_source"]["celeba"]["no_face_found"] == 2
    assert all(q["detail"] for q in m["quarantine"])
    assert m["accepted"] + m["quarantined"] == n_inputs

    # labels: 68 points inside the aligned face, eyes above the nose above the mouth
    faces = _shard_faces(m)
    assert len(faces) == m["accepted"] > 0
    for f in faces:
        lm = np.asarray(f["landmarks68"])
        assert f["landmarks_from"] == "dlib" and lm.shape == (68, 2)
        inner, jaw = lm[17:], lm[:17]  # the FFHQ square may cut the chin of a long face: the jaw gets a margin
        assert (inner > 0).all() and (inner < 128).all() and (jaw > -13).all() and (jaw < 141).all()
        eyes, nose, mouth = lm[36:48, 1].mean(), lm[30, 1], lm[48:68, 1].mean()
        assert eyes < nose < mouth
        assert 30 < lm[36:48, 0].mean() < 98  # the face is centred by the alignment

    # identity-disjoint splits: every person in exactly one split, and the splits are really used
    split_of = defaultdict(set)
    for f in faces:
        split_of[f["group"]].add(f["split"])
    assert all(len(s) == 1 for s in split_of.values()), split_of
    assert len({next(iter(s)) for s in split_of.values()}) >= 2
    assert sum(m["counts_by_source"]["celeba"].values()) == m["accepted"]

    # a re-run labels nothing and makes no version
    again = build_version(list_sources(data.sources), data, root, engine="ray")
    assert again.manifest is None and again.processed == 0 and again.labelled == 0

    # a crash before the manifest: the labels the tasks wrote are kept, the next run relabels nothing
    Path(m["_uri"]).unlink()
    redo = build_version(list_sources(data.sources), data, root, engine="ray")
    assert redo.labelled == 0 and redo.labels_reused == n_inputs
    assert redo.manifest["counts"] == m["counts"] and redo.manifest["labels"] == m["labels"]

    # a source's split sizes cannot change under the same root (faces would move between splits)
    moved = _data([src.model_copy(update={"test_fraction": 0.1})])
    with pytest.raises(SettingsChanged, match="test_fraction"):
        build_version(list_sources(moved.sources), moved, root, engine="plain")


def test_a_photo_folder_with_a_groups_sidecar_keeps_each_person_in_one_split(celeba20, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = ["file,group"]
    for ident, names in IDENTITIES.items():
        for n in names:
            shutil.copy2(celeba20 / f"{n}.jpg", photos / f"{n}.jpg")
            rows.append(f"{n}.jpg,person{ident}")
    (photos / "groups.csv").write_text("\n".join(rows) + "\n")
    data = _data([SourceConfig(kind="photos", path=str(photos), val_fraction=0.3, test_fraction=0.3)])
    records = list_sources(data.sources)
    assert all(r["group"].startswith("person") and r["label"] == "one" for r in records)
    m = build_version(records, data, str(tmp_path / "ds"), engine="plain").manifest
    split_of = defaultdict(set)
    for f in _shard_faces(m):
        split_of[f["group"]].add(f["split"])
    assert len(split_of) >= 4 and all(len(s) == 1 for s in split_of.values())
    # a groups file that is named but missing is an error, not a silent key split
    from prouigan_platform.dataset.sources import SourceError

    with pytest.raises(SourceError, match="groups file not found"):
        list_sources([SourceConfig(kind="photos", path=str(photos), groups="nope.csv")])


def test_a_mixed_version_counts_each_source_and_the_reader_weights_them(tmp_path):
    data = _data([SourceConfig(kind="synthetic", count=40, name="a"),
                  SourceConfig(kind="synthetic", count=40, name="b")], shard_max_samples=8)
    m = build_version(list_sources(data.sources), data, str(tmp_path / "ds"), engine="plain").manifest
    assert set(m["counts_by_source"]) == {"a", "b"}
    assert sum(sum(c.values()) for c in m["counts_by_source"].values()) == m["accepted"] == 80
    assert {s["source"] for s in m["shards"]} == {"a", "b"}
    assert mf.source_names(m) == ["a", "b"]

    def mix(weights: dict) -> Counter:
        d = data.model_copy(update={"source_weights": weights})
        return Counter(ex["source"] for ex in FaceShards(m, "train", d, epochs=None, limit=400))

    natural = mix({})
    assert natural["a"] > 100 and natural["b"] > 100
    assert set(mix({"a": 1.0, "b": 0.0})) == {"a"}
    skewed = mix({"a": 1.0, "b": 3.0})
    assert 0.65 < skewed["b"] / 400 < 0.85
    with pytest.raises(ValueError, match="must name each source"):
        FaceShards(m, "train", data.model_copy(update={"source_weights": {"a": 1.0}}), epochs=None)
    # a limited pass (training's validation) takes turns between the sources; a full pass reads every face once
    assert {ex["source"] for ex in FaceShards(m, "val", data, limit=4)} == {"a", "b"}
    assert len(list(FaceShards(m, "val", data))) == m["counts"]["val"]
    # one source's split: what evaluation scores per source
    val_a = list(FaceShards(m, "val", data, source="a"))
    assert len(val_a) == m["counts_by_source"]["a"]["val"] and {ex["source"] for ex in val_a} == {"a"}
    with pytest.raises(ValueError, match="no source 'c'"):
        FaceShards(m, "val", data, source="c")
