"""The data platform on real components: Ray Data on the embedded stack's Ray head, shards on local disk and in
its S3 bucket, bad inputs quarantined with reasons, incremental versions, the streaming reader."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from prouigan.synthetic import synthetic_face, write_pts
from prouigan_platform import storage
from prouigan_platform.config import DataConfig, SourceConfig, load_config
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.build import build_version
from prouigan_platform.dataset.reader import FaceShards
from prouigan_platform.dataset.sources import list_sources
from tests.conftest import REPO

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def ray_on_stack(stack):
    from prouigan_platform.runtime import init_ray

    init_ray(log_to_driver=False)
    return stack


def _data(**kw) -> DataConfig:
    return load_config("smoke").data.model_copy(update=kw)


def _build(sources: list[SourceConfig], root, **data_kw):
    data = _data(sources=sources, **data_kw)
    return build_version(list_sources(data.sources), data, str(root), engine="ray")


def _face(i: int, folder: Path, name: str, transform=None, pts_text: str | None = None, fmt: str = "PNG") -> None:
    img, lm = synthetic_face(100 + i)
    if transform is not None:
        img = transform(img)
    img.save(folder / name, format=fmt)
    pts = folder / (Path(name).stem + ".pts")
    if pts_text is None:
        write_pts(pts, lm)
    elif pts_text != "":
        pts.write_text(pts_text)


def make_bad_folder(root: Path) -> tuple[Path, Path, dict[str, str | None]]:
    """A 300-W folder with six good faces and every kind of bad input; the expected reason per input
    (None = accepted).  Plus a second source of the same name that repeats one key."""
    a = root / "faces"
    (a / "sub").mkdir(parents=True)
    expect: dict[str, str | None] = {}
    for i in range(6):
        _face(i, a / "sub" if i % 2 else a, f"good_{i}.png")
        expect[f"good_{i}"] = None
    _, lm = synthetic_face(100)
    good_pts = (a / "good_0.pts").read_text()
    (a / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (a / "corrupt.pts").write_text(good_pts)
    buf = io.BytesIO()
    synthetic_face(100)[0].save(buf, format="JPEG")
    (a / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (a / "truncated.pts").write_text(good_pts)
    (a / "empty.jpg").write_bytes(b"")
    (a / "empty.pts").write_text(good_pts)
    _face(0, a, "cmyk.jpg", lambda im: im.convert("CMYK"), fmt="JPEG")
    _face(1, a, "grey.png", lambda im: im.convert("L"))
    _face(2, a, "grey16.png", lambda im: Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257))
    _face(3, a, "rgba.png", lambda im: im.convert("RGBA"))
    Image.new("RGB", (20, 20), (128, 90, 70)).save(a / "tiny.png")
    write_pts(a / "tiny.pts", lm * 0.05)
    synthetic_face(104)[0].save(a / "nopts.png")
    _face(5, a, "wrongn.png", pts_text="version: 1\nn_points: 60\n{\n" + "10 10\n" * 60 + "}\n")
    _face(6, a, "nan.png", pts_text="version: 1\nn_points: 68\n{\n" + "nan 10\n" * 68 + "}\n")
    _face(7, a, "text.png", pts_text="version: 1\nn_points: 68\n{\n" + "ten 10\n" * 68 + "}\n")
    img8, lm8 = synthetic_face(108)
    img8.save(a / "outside.png")
    write_pts(a / "outside.pts", lm8 + 5000)
    img9, lm9 = synthetic_face(109)
    small = img9.resize((img9.width // 3, img9.height // 3))
    small.save(a / "lowres.png")
    write_pts(a / "lowres.pts", lm9 / 3)
    expect.update({"corrupt": "corrupt_image", "truncated": "truncated_image", "empty": "empty_file", "cmyk": None,
                   "grey": None, "grey16": None, "rgba": None, "tiny": "image_too_small",
                   "nopts": "missing_landmarks", "wrongn": "bad_landmarks", "nan": "bad_landmarks",
                   "text": "bad_landmarks", "outside": "landmarks_outside_image", "lowres": "low_resolution"})
    b = root / "other" / "faces"  # same folder name -> same source name -> same keys
    b.mkdir(parents=True)
    _face(0, b, "good_0.png")
    return a, b, expect


def test_every_bad_input_ends_accepted_or_quarantined_with_its_reason(ray_on_stack, tmp_path):
    a, b, expect = make_bad_folder(tmp_path / "in")
    res = _build([SourceConfig(path=str(a)), SourceConfig(path=str(b))], tmp_path / "out")
    m = res.manifest
    accepted = {k.removeprefix("faces_").split("_", 1)[-1] if k.startswith("faces_sub_") else k.removeprefix("faces_")
                for k in m["samples"]}
    reasons = {q["key"].removeprefix("faces_"): q["reason"] for q in m["quarantine"]}
    assert accepted == {k for k, v in expect.items() if v is None}
    for key, reason in expect.items():
        if reason is not None:
            assert reasons.get(key) == reason, (key, reasons)
    assert reasons.get("good_0") == "duplicate_key"
    # counts add up: every listed input is either accepted or quarantined, none twice
    assert len(m["samples"]) + len(m["quarantine"]) == len(expect) + 1
    assert m["quarantine_by_reason"] == dict(Counter(q["reason"] for q in m["quarantine"]))
    # conversions are said, and every quarantine record has a reason and a detail
    metas = {json.loads(s["json"])["key"].removeprefix("faces_"): json.loads(s["json"])
             for uri in [storage.join(m["_root"], "shards", s["name"]) for s in m["shards"]]
             for s in mf.read_shard(uri)}
    assert "CMYK" in metas["cmyk"]["note"] and "greyscale" in metas["grey"]["note"]
    assert "16-bit" in metas["grey16"]["note"] and "alpha" in metas["rgba"]["note"]
    assert all(q["reason"] and q["detail"] for q in m["quarantine"])


def test_incremental_versions_reuse_shards_and_keep_splits(ray_on_stack, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        _face(i, src, f"f{i:02d}.png")
    root = tmp_path / "ds"
    v1 = _build([SourceConfig(path=str(src))], root, shard_max_samples=8).manifest
    assert v1["version"] == 1 and sum(v1["counts"].values()) == 20
    again = _build([SourceConfig(path=str(src))], root, shard_max_samples=8)
    assert again.manifest is None and again.processed == 0  # same inputs: no new work, no new version
    for i in range(20, 30):
        _face(i, src, f"f{i:02d}.png")
    res = _build([SourceConfig(path=str(src))], root, shard_max_samples=8)
    v2 = res.manifest
    assert res.processed == 10 and v2["version"] == 2 and v2["parent"] == 1
    assert sum(v2["counts"].values()) == 30
    old = {s["name"]: s["sha256"] for s in v1["shards"]}
    assert all(s["sha256"] == old[s["name"]] for s in v2["shards"] if s["name"] in old)
    assert set(old) < {s["name"] for s in v2["shards"]}
    assert all(v2["samples"][k][1] == v[1] for k, v in v1["samples"].items())  # splits never move
    # a changed input: its old sample is superseded, the new one lives in a new shard
    _face(99, src, "f00.png")
    v3 = _build([SourceConfig(path=str(src))], root, shard_max_samples=8).manifest
    key = "src_f00"
    old_shard = v2["samples"][key][2]
    assert key in v3["superseded"][old_shard] and v3["samples"][key][2] != old_shard
    keys = [e["key"] for sp in mf.SPLITS for e in FaceShards(v3["_uri"], sp, _data())]
    assert len(keys) == len(set(keys)) == 30


def test_the_same_inputs_make_the_same_shards_while_other_work_holds_a_cpu(ray_on_stack, tmp_path):
    import ray

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        _face(i, src, f"f{i:02d}.png")
    quiet = _build([SourceConfig(path=str(src))], tmp_path / "a").manifest

    @ray.remote(num_cpus=1)
    class Busy:
        def ping(self) -> bool:
            return True

    busy = Busy.remote()
    ray.get(busy.ping.remote())  # the actor holds its CPU from here on
    try:
        assert ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]
        loaded = _build([SourceConfig(path=str(src))], tmp_path / "b").manifest
    finally:
        ray.kill(busy)
    assert [s["sha256"] for s in loaded["shards"]] == [s["sha256"] for s in quiet["shards"]]


def test_a_crashed_run_leaves_no_visible_half_shard(ray_on_stack, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        _face(i, src, f"f{i}.png")
    root = tmp_path / "ds"
    (root / "shards" / "_tmp").mkdir(parents=True)
    (root / "shards" / "_tmp" / "train-deadbeef.tar").write_bytes(b"half a shard")
    (root / "shards" / "train-000007.tar").write_bytes(b"orphan of a run that died before its manifest")
    m = _build([SourceConfig(path=str(src))], root).manifest
    assert not list((root / "shards" / "_tmp").iterdir())
    names = [s["name"] for s in m["shards"]]
    assert "train-000007.tar" not in names and all(int(n.split("-")[1][:6]) > 7 for n in names)
    for s in m["shards"]:
        assert mf.verify_shard(str(root / "shards" / s["name"]), s["sha256"])


@pytest.fixture(scope="module")
def shared_local(ray_on_stack, shared_faces, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared") / "ds"
    res = _build([SourceConfig(path=str(shared_faces))], root, shard_max_samples=256)
    return res.manifest


def test_shared_faces_shard_to_local_and_reread_without_work(shared_local, shared_faces):
    m = shared_local
    assert set(m["counts"]) == {"train", "val", "test"} and all(m["counts"].values())
    assert m["accepted"] + m["quarantined"] == 1207
    again = _build([SourceConfig(path=str(shared_faces))], m["_root"], shard_max_samples=256)
    assert again.manifest is None and again.processed == 0


def test_shared_faces_shard_into_the_s3_bucket(ray_on_stack, shared_faces, shared_local):
    root = f"s3://{ray_on_stack.bucket}/datasets/shared-test"
    m = _build([SourceConfig(path=str(shared_faces))], root, shard_max_samples=256).manifest
    assert m["counts"] == shared_local["counts"]
    assert {s["sha256"] for s in m["shards"]} == {s["sha256"] for s in shared_local["shards"]}  # same bytes
    assert storage.exists(mf.manifest_uri(root, 1))
    assert _build([SourceConfig(path=str(shared_faces))], root, shard_max_samples=256).manifest is None
    ex = next(iter(FaceShards(mf.load(root), "val", _data())))
    assert ex["lr"].shape == (3, 16, 16)


def test_shards_read_back_identically_with_webdataset_and_ray_data(ray_on_stack, shared_local):
    import ray
    import webdataset as wds

    uris = mf.shard_uris(shared_local, "val")
    plain = {s["__key__"]: (np.asarray(Image.open(io.BytesIO(s["png"]))), json.loads(s["json"]))
             for s in wds.WebDataset(uris, shardshuffle=False)}
    rows = ray.data.read_webdataset(uris).take_all()
    viaray = {r["__key__"]: (np.asarray(r["png"]), r["json"]) for r in rows}
    assert len(plain) == shared_local["counts"]["val"] == len(viaray)
    assert plain.keys() == viaray.keys()
    for k, (png, meta) in plain.items():
        assert np.array_equal(png, viaray[k][0]) and meta == viaray[k][1]


def test_aligned_landmarks_have_face_geometry(shared_local, tmp_path):
    samples = list(mf.read_shard(mf.shard_uris(shared_local, "val")[0]))[:16]
    grid = Image.new("RGB", (128 * 4, 128 * 4))
    for i, s in enumerate(samples):
        img = Image.open(io.BytesIO(s["png"])).convert("RGB")
        lm = np.array(json.loads(s["json"])["landmarks68"])
        assert ((lm > -2) & (lm < 130)).mean() > 0.97
        assert lm[36:48, 1].mean() < lm[27:36, 1].mean() < lm[48:68, 1].mean()
        assert lm[36:42, 0].mean() < lm[42:48, 0].mean()
        d = ImageDraw.Draw(img)
        for x, y in lm:
            d.point((x, y), fill=(0, 255, 0))
        grid.paste(img, (128 * (i % 4), 128 * (i // 4)))
    grid.save(tmp_path / "landmarks_grid.png")
    assert (tmp_path / "landmarks_grid.png").stat().st_size > 10_000


def test_reader_parts_are_disjoint_and_cover_the_split(shared_local):
    data = _data(shuffle_buffer=64)
    n = shared_local["counts"]["train"]
    parts = [[e["key"] for e in FaceShards(shared_local, "train", data, rank=r, world_size=3)] for r in range(3)]
    assert sum(len(p) for p in parts) == n and len(set().union(*map(set, parts))) == n
    # fewer shards than readers: key hashing still splits without overlap
    val = [[e["key"] for e in FaceShards(shared_local, "val", data, rank=r, world_size=4)] for r in range(4)]
    assert sum(len(p) for p in val) == shared_local["counts"]["val"] == len(set().union(*map(set, val)))


def test_reader_examples_val_deterministic_train_random(shared_local):
    data = _data(shuffle_buffer=32)
    a = list(FaceShards(shared_local, "val", data, limit=6))
    b = list(FaceShards(shared_local, "val", data, limit=6))
    assert [e["key"] for e in a] == [e["key"] for e in b]
    assert all(torch.equal(x["lr"], y["lr"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b, strict=True))
    e = a[0]
    assert e["lr"].shape == (3, 16, 16) and e["hr"].shape == (3, 128, 128) and e["mask"].shape == (1, 128, 128)
    assert 0 <= e["lr"].min() and e["lr"].max() <= 1 and e["has_landmarks"] and e["landmarks"].shape == (68, 2)
    assert 0.05 < float(np.mean([x["mask"].mean() for x in a])) < 0.5
    t1 = [x["key"] for x in FaceShards(shared_local, "train", data, seed=1, limit=40)]
    t2 = [x["key"] for x in FaceShards(shared_local, "train", data, seed=2, limit=40)]
    assert t1 != t2
    it = iter(FaceShards(shared_local, "train", data, epochs=None))
    assert len([next(it) for _ in range(shared_local["counts"]["train"] + 5)]) > shared_local["counts"]["train"]


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_a_damaged_shard_is_skipped_with_a_count_and_evaluation_is_partial(shared_local, tmp_path, damage):
    """A shard whose bytes are not the ones the manifest recorded (cut short, or one pixel byte changed with the
    tar still valid) is detected by its sha256 while it streams, skipped with a warning and counted; an
    evaluation over it is not complete."""
    import shutil

    from prouigan_platform.evaluation import load_split

    root = tmp_path / "copy"
    shutil.copytree(shared_local["_root"], root)
    victim = root / "shards" / mf.shard_uris(shared_local, "val")[0].rsplit("/", 1)[-1]
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0x01  # inside some PNG's bytes: a valid tar, a different image
    victim.write_bytes(bytes(data))
    m = mf.load(str(root))
    ds = FaceShards(m, "val", _data())
    with pytest.warns(RuntimeWarning, match="skipping shard .*" + ("sha256 mismatch" if damage == "tampered" else "")):
        got = list(ds)
    n_victim = next(s["count"] for s in m["shards"] if s["name"] == victim.name)
    assert ds.stats["bad_shards"] == 1 and len(got) == m["counts"]["val"] - n_victim
    with pytest.warns(RuntimeWarning):
        split = load_split(m["_uri"], "val", _data())
    assert split.bad_shards == 1 and not split.complete


def test_celeba_layout_uses_five_points_and_its_partition(ray_on_stack, tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    lines, parts = [], []
    for i in range(6):
        img, lm = synthetic_face(200 + i)
        name = f"{i:06d}.jpg"
        img.save(root / "img_align_celeba" / name, quality=95)
        five = [lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]
        lines.append(name + " " + " ".join(f"{v:.0f}" for p in five for v in p))
        parts.append(f"{name} {i % 3}")
    lines.append("000099.jpg 1 2 3")  # a listed image that does not exist is simply not an input
    (root / "list_landmarks_align_celeba.txt").write_text("6\nlefteye_x ...\n" + "\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    m = _build([SourceConfig(kind="celeba", path=str(root))], tmp_path / "ds").manifest
    assert m["accepted"] == 6 and m["counts"] == {"train": 2, "val": 2, "test": 2}
    ex = next(iter(FaceShards(m, "train", _data())))
    assert not ex["has_landmarks"]


def test_photo_folder_needs_dlib_and_finds_faces(ray_on_stack, shared_faces, tmp_path):
    pytest.importorskip("dlib", reason="the eval extra (dlib) is not installed")
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted((shared_faces / "helen_train").glob("*.jpg"))[:2]:
        (photos / f.name).write_bytes(f.read_bytes())  # a temporary copy, never into the repo
    Image.new("RGB", (200, 200), (30, 120, 200)).save(photos / "sky.png")
    m = _build([SourceConfig(kind="photos", path=str(photos))], tmp_path / "ds").manifest
    assert m["accepted"] >= 2
    assert [q["reason"] for q in m["quarantine"]] == ["no_face_found"]
    # without dlib: a clear error naming the extra
    code = ("import sys; sys.modules['dlib'] = None\n"
            "from prouigan_platform.cli import main\n"
            f"sys.exit(main(['shard', '--local', '-c', 'smoke', 'data.sources=[{{kind: photos, path: {photos}}}]',"
            f" 'data.output={tmp_path / 'x'}']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 1 and "eval" in out.stderr and "pip install" in out.stderr


def test_a_relative_source_path_works_on_ray_workers(ray_on_stack, tmp_path, monkeypatch):
    """Ray workers run in another folder: a source given relative to the caller's folder must still be read
    (regression: every face was quarantined as unreadable_file)."""
    src = tmp_path / "rel" / "faces"
    src.mkdir(parents=True)
    for i in range(4):
        _face(i, src, f"f{i}.png")
    monkeypatch.chdir(tmp_path / "rel")
    m = _build([SourceConfig(path="faces")], tmp_path / "ds").manifest
    assert m["accepted"] == 4 and m["quarantined"] == 0


def test_unreadable_inputs_are_retried_on_the_next_run(ray_on_stack, tmp_path, monkeypatch):
    """An input that could not be read (a machine problem, not a property of the input) is not "known":
    the next run tries it again even though its fingerprint did not change."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        _face(i, src, f"f{i}.png")
    data = _data(sources=[SourceConfig(path=str(src))])
    records = list_sources(data.sources)
    monkeypatch.chdir(tmp_path)
    broken = [{**r, "image": f"src/{Path(r['image']).name}"} if r["key"].endswith("f2") else r for r in records]
    root = str(tmp_path / "ds")
    v1 = build_version(broken, data, root, engine="ray").manifest  # workers cannot see the relative path
    assert [q["reason"] for q in v1["quarantine"]] == ["unreadable_file"] and v1["accepted"] == 2
    res = build_version(records, data, root, engine="ray")
    assert res.processed == 1 and res.manifest["accepted"] == 3 and res.manifest["quarantined"] == 0
