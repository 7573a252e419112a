"""The judges of the paper's downstream table: a face parser trained on ../shared/parsing and an expression classifier
trained on a dataset version's attribute labels, stored as checked versions, and the evaluation's parsing and
expression columns (with the originals as a third row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prouigan import ProUIGANGenerator, generator_config
from prouigan.inference import Hallucinator
from prouigan.judges import CELEBAMASK, CELEBAMASK_TO_PARSE, IGNORE, Parser, parse_scores
from prouigan.synthetic import synthetic_face, write_pts
from prouigan.vocabulary import PARSE_CLASSES
from prouigan_platform import judging
from prouigan_platform.config import SourceConfig, load_config
from prouigan_platform.dataset import manifest as mf
from prouigan_platform.dataset.build import build_version
from prouigan_platform.dataset.sources import list_sources
from prouigan_platform.errors import UserError
from prouigan_platform.evaluation import ORIGINAL, evaluate, write_report

SHARED_PARSING = Path(__file__).resolve().parents[2] / "shared" / "parsing"


@pytest.fixture(scope="module")
def shared_parsing() -> Path:
    if not (SHARED_PARSING / "masks").is_dir():
        pytest.skip(f"parsing labels not found at {SHARED_PARSING} (CelebAMask-HQ, non-commercial research licence; "
                    "a fresh clone has no ../shared/parsing — these tests run in CI, where it exists)")
    return SHARED_PARSING


def test_the_19_celebamask_classes_merge_into_helens_as_documented():
    to = lambda name: CELEBAMASK_TO_PARSE[CELEBAMASK.index(name)]  # noqa: E731
    assert to("left_eye") == to("right_eye") == PARSE_CLASSES.index("eyes")
    assert to("left_brow") == to("right_brow") == PARSE_CLASSES.index("brows")
    assert to("left_ear") == to("skin") == PARSE_CLASSES.index("skin")
    assert to("hat") == to("hair") == PARSE_CLASSES.index("hair")
    assert to("neck") == to("cloth") == to("necklace") == to("earring") == PARSE_CLASSES.index("background")
    assert to("eyeglasses") == IGNORE
    assert [to(c) for c in ("nose", "upper_lip", "inner_mouth", "lower_lip")] == \
        [PARSE_CLASSES.index(c) for c in ("nose", "upper_lip", "inner_mouth", "lower_lip")]


def test_parse_f1_per_face_class_and_its_mean_over_the_classes_present():
    skin, hair = PARSE_CLASSES.index("skin"), PARSE_CLASSES.index("hair")
    ref = torch.zeros(2, 8, 8, dtype=torch.uint8)
    ref[:, :, :4], ref[:, :, 4:] = skin, hair
    pred = ref.clone()
    pred[1] = skin  # the second face's hair parsed as skin
    s = parse_scores(pred, ref)
    assert s["parse_f1_skin"][0] == s["parse_f1_hair"][0] == s["parse_f1"][0] == 1.0
    assert s["parse_f1_hair"][1] == 0.0 and s["parse_f1_skin"][1] == pytest.approx(2 * 32 / (2 * 32 + 32))
    assert s["parse_f1"][1] == pytest.approx((2 / 3 + 0) / 2)  # the two classes present, not all eight
    assert np.isnan(s["parse_f1_eyes"]).all()  # in neither parse


def test_the_parser_trains_on_the_shared_labels_and_a_changed_version_is_refused(shared_parsing, tmp_path):
    root = str(tmp_path / "store")
    j = judging.train_parser(shared_parsing, minutes=None, steps=6, limit=20, width=8, root=root, log=lambda m: None)
    assert j.version == 1 and judging.versions("parser", root) == [1]
    rec = j.record
    assert rec["data"]["train_faces"] + rec["data"]["held_out_faces"] + len(rec["data"]["quarantined"]) == 20
    assert rec["held_out"]["faces"] == rec["data"]["held_out_faces"] == 2
    assert 0 <= rec["held_out"]["mean_f1"] <= 1 and set(rec["held_out"]["f1"]) == set(PARSE_CLASSES)
    loaded = judging.load("parser", root=root)
    for k, v in j.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    # the weights changed under the record: refused in one line, nothing unpickled
    weights = Path(root) / "judges" / "parser" / rec["weights"]
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="sha256"):
        judging.load("parser", root=root)


def test_the_held_out_parsing_faces_do_not_depend_on_the_folders_order():
    names = [f"{i:05d}" for i in range(1000)]
    held = judging.parsing_split(names)
    assert len(held) == 100 and judging.parsing_split(list(reversed(names))) == held


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A dataset version of 40 procedural faces whose folder holds an attribute table (CelebA's layout)."""
    src = tmp_path_factory.mktemp("labelled") / "faces"
    src.mkdir()
    rows = ["name Mouth_Slightly_Open Smiling Young"]
    for i in range(40):
        img, lm = synthetic_face(900 + i)
        img.save(src / f"f{i:02d}.png")
        write_pts(src / f"f{i:02d}.pts", lm)
        rows.append(f"f{i:02d} {'1' if i % 3 else '-1'} {'1' if i % 2 else '-1'} 1")
    (src / "ATTRIBUTES.txt").write_text("\n".join(rows) + "\n")
    data = load_config("smoke").data.model_copy(update={"sources": [SourceConfig(path=str(src), name="faces")],
                                                        "val_fraction": 0.25, "test_fraction": 0.25})
    m = build_version(list_sources(data.sources), data, str(src.parent / "ds"), engine="plain").manifest
    return m["_uri"], data


def test_expression_labels_come_from_the_attribute_table_by_sample_key(labelled):
    uri, _ = labelled
    labels, sources, why = judging.expression_labels(mf.load(uri))
    assert why is None and sources == ["faces"] and len(labels) == 40
    assert labels["faces_f03"].tolist() == [1.0, 0.0]  # smiling (i odd), mouth open (i % 3 != 0)
    assert labels["faces_f04"].tolist() == [0.0, 1.0]


def test_the_evaluation_reports_parsing_and_expression_for_bicubic_the_model_and_the_originals(labelled, tmp_path):
    uri, data = labelled
    root = str(tmp_path / "store")
    empty = judging.panel(mf.load(uri), root=root)
    assert "prouigan judges train parser" in empty.skipped["parse_f1"]
    assert "prouigan judges train expression" in empty.skipped["expression_accuracy"]

    ex = judging.train_expression(uri, minutes=None, steps=3, batch_size=8, width=8, root=root, log=lambda m: None)
    assert ex.version == 1 and ex.record["held_out"]["test"]["faces"] > 0
    assert 0 <= ex.record["held_out"]["test"]["smiling"]["accuracy"] <= 1
    torch.manual_seed(0)
    judging.save("parser", Parser(width=4), {"held_out": {"mean_f1": 0.0, "miou": 0.0, "faces": 0}}, root)
    panel = judging.panel(mf.load(uri), root=root)
    assert not panel.skipped
    models = {"model": Hallucinator(ProUIGANGenerator(generator_config("tiny")))}
    ev = evaluate(models, uri, "val", data, use_dlib=False, progress_every=None, cases=2, judges=panel)
    n = len(ev.data.keys)
    assert list(ev.methods) == ["bicubic", "model", ORIGINAL]
    for name in ("bicubic", "model"):
        s, cov = ev.methods[name].summary, ev.methods[name].coverage
        assert 0 <= s["parse_f1"] <= 1 and 0 <= s["expression_accuracy"] <= 1
        assert cov["expression_accuracy"] == n and cov["psnr"] == n
        assert {f"expression_accuracy_{e}" for e in judging.EXPRESSIONS} <= set(s)
    orig = ev.methods[ORIGINAL].summary
    assert "expression_accuracy" in orig and "psnr" not in orig and "parse_f1" not in orig
    assert not ev.problems(["psnr", "parse_f1", "expression_accuracy"])  # the originals' empty columns are no gap
    files = write_report(ev, tmp_path / "report", "tiny")
    md = files["markdown"].read_text()
    assert "parse_f1 ↑" in md and "expression_accuracy ↑" in md and "expression_accuracy_smiling ↑" in md
    assert "Parsing F1 per face class" in md
    assert f"| faces | {n:,} |" in md  # how many faces each column covers
    assert "| original | – |" in md
    assert ev.to_json()["judges"]["expression"]["version"] == 1

