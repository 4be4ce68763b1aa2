"""Attribute judges on a tiny phantom Derm7pt set: accuracy above chance, seeds, save/load, inputs, errors, pretrained backbones."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import curated_phantom
import torch
from PIL import Image

from lesiongen.classify import JUDGE_ATTRIBUTES, JudgeConfig, Judges, train_judges
from lesiongen.core import DERM7PT_CONCEPTS, LesionGenError
from lesiongen.data import curate, read_records
from lesiongen.phantom import PhantomConfig, write_phantom


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture of conftest.py


@pytest.fixture(scope="module")
def d7p(tmp_path_factory):
    "A curated phantom Derm7pt set: 200 cases at 32 px (about 80 train, 40 valid, 80 test)"
    return curated_phantom(tmp_path_factory.mktemp("d7p"), n=200, seed=1)


@pytest.fixture(scope="module")
def fitz(d7p, tmp_path_factory):
    "Fitzpatrick and dx judges trained with the tiny settings"
    out = tmp_path_factory.mktemp("judges") / "fitz"
    return train_judges(d7p, out, JudgeConfig.tiny(attributes=("fitzpatrick", "dx"), epochs=20, seed=0))


def test_attribute_list():
    assert JUDGE_ATTRIBUTES == ("dx", "fitzpatrick", *DERM7PT_CONCEPTS)
    assert len(JUDGE_ATTRIBUTES) == 9


def test_fitzpatrick_judge_beats_chance_on_held_out(fitz, d7p):
    ev = fitz.evaluate(d7p, split="test").set_index("attribute")
    assert list(ev.columns) == ["n", "accuracy", "balanced_accuracy", "macro_f1"]
    test = read_records(d7p).query("split == 'test'")
    assert ev.loc["fitzpatrick", "n"] == test.fitzpatrick.notna().sum()
    n_classes = test.fitzpatrick.nunique()
    # skin tone is a colour signal: a tiny CNN gets it well above chance within seconds
    assert ev.loc["fitzpatrick", "balanced_accuracy"] > 2.5 / n_classes
    majority = test.fitzpatrick.value_counts(normalize=True).max()
    assert ev.loc["fitzpatrick", "accuracy"] > majority + 0.15
    assert 0 <= ev.loc["dx", "accuracy"] <= 1


def test_label_maps_and_files(fitz, d7p):
    train = read_records(d7p).query("split == 'train'")
    assert fitz.attributes == ["fitzpatrick", "dx"]
    assert fitz.labels("fitzpatrick") == sorted(int(v) for v in train.fitzpatrick.dropna().unique())
    assert all(isinstance(v, int) for v in fitz.labels("fitzpatrick"))
    assert fitz.labels("dx") == sorted(train.dx.dropna().unique())
    info = json.loads((fitz.path / "judges.json").read_text())
    assert info["normalisation"]["name"] == "unit"
    assert info["config"]["resolution"] == 32 and info["resolution"] == 32
    assert info["records"]["path"] == str(Path(d7p).resolve()) and len(info["records"]["sha256"]) == 64
    s = info["summary"]["fitzpatrick"]
    assert s["epochs_run"] == 20 and 1 <= s["best_epoch"] <= 20 and 0 <= s["valid_balanced_accuracy"] <= 1
    assert sum(s["label_counts"].values()) == train.fitzpatrick.notna().sum()
    for a in ("fitzpatrick", "dx"):
        assert (fitz.path / a / "model.safetensors").is_file() and (fitz.path / a / "config.json").is_file()
        cfg = json.loads((fitz.path / a / "config.json").read_text())
        assert [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))] == [str(v) for v in fitz.labels(a)]
    assert not list(fitz.path.rglob("*.bin")) and not list(fitz.path.rglob("*.pt"))
    card = (fitz.path / "README.md").read_text()
    assert "Research use only" in card and "fitzpatrick" in card
    assert not [p for p in fitz.path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_save_load_round_trip(fitz, d7p):
    loaded = Judges.load(fitz.path)
    assert loaded.attributes == fitz.attributes and loaded.resolution == fitz.resolution
    for a in fitz.attributes: assert loaded.labels(a) == fitz.labels(a)
    test = read_records(d7p).query("split == 'test'")
    root = Path(d7p).parent.parent / "raw"
    ims = [Image.open(root / f) for f in test.file_name[:12]]
    p0, p1 = fitz.predict_proba(ims), loaded.predict_proba(ims)
    for a in fitz.attributes: np.testing.assert_array_equal(p0[a], p1[a])
    pd.testing.assert_frame_equal(fitz.evaluate(d7p), loaded.evaluate(d7p))


def test_predict_accepts_pil_array_and_tensor(fitz, d7p):
    test = read_records(d7p).query("split == 'test'")
    root = Path(d7p).parent.parent / "raw"
    ims = [Image.open(root / f).convert("RGB") for f in test.file_name[:10]]
    arr = np.stack([np.asarray(im) for im in ims])
    ten = torch.from_numpy(arr).permute(0, 3, 1, 2)
    a, b, c = fitz.predict(ims), fitz.predict(arr), fitz.predict(ten)
    assert list(a.columns) == ["fitzpatrick", "dx"] and len(a) == 10
    pd.testing.assert_frame_equal(a, b); pd.testing.assert_frame_equal(a, c)
    assert set(a.fitzpatrick) <= set(fitz.labels("fitzpatrick")) and set(a.dx) <= set(fitz.labels("dx"))
    proba = fitz.predict_proba(arr, attributes=["dx"])
    assert list(proba) == ["dx"] and proba["dx"].shape == (10, len(fitz.labels("dx")))
    np.testing.assert_allclose(proba["dx"].sum(1), 1, rtol=1e-5)
    big = np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR)) for im in ims])  # other sizes are resized
    assert fitz.predict(big).shape == (10, 2)
    with pytest.raises(LesionGenError, match="uint8"): fitz.predict(arr.astype(np.float32))
    with pytest.raises(LesionGenError, match="no judge for 'streaks'"): fitz.predict(arr, attributes=["streaks"])


def test_confusion_matrix(fitz, d7p):
    cm = fitz.confusion(d7p, "fitzpatrick")
    test = read_records(d7p).query("split == 'test'")
    assert cm.values.sum() == test.fitzpatrick.notna().sum()
    assert cm.index.name == "true" and cm.columns.name == "predicted"
    assert list(cm.columns)[:len(fitz.labels("fitzpatrick"))] == fitz.labels("fitzpatrick")
    acc = fitz.evaluate(d7p).set_index("attribute").loc["fitzpatrick", "accuracy"]
    assert np.trace(cm.values) / cm.values.sum() == pytest.approx(acc)


def test_same_seed_same_weights(d7p, tmp_path):
    kw = dict(attributes=("blue_whitish_veil",), epochs=2)
    a = train_judges(d7p, tmp_path / "a", JudgeConfig.tiny(**kw, seed=3))
    b = train_judges(d7p, tmp_path / "b", JudgeConfig.tiny(**kw, seed=3))
    c = train_judges(d7p, tmp_path / "c", JudgeConfig.tiny(**kw, seed=4))
    sa, sb, sc = (j.models["blue_whitish_veil"].state_dict() for j in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_default_attributes_cover_annotated_concepts(d7p, tmp_path):
    j = train_judges(d7p, tmp_path / "all", JudgeConfig.tiny(epochs=1))
    info = json.loads((tmp_path / "all" / "judges.json").read_text())
    assert set(j.attributes) | set(info["skipped"]) == set(JUDGE_ATTRIBUTES)
    assert {"dx", "fitzpatrick", "pigment_network", "streaks"} <= set(j.attributes)
    ev = j.evaluate(d7p, split="valid")
    assert list(ev.attribute) == j.attributes and (ev.n > 0).all()


def test_ham10000_records_train_dx_and_fitzpatrick_only(tmp_path):
    write_phantom(tmp_path / "raw", PhantomConfig(n=40, size=32, seed=2), progress=False)
    curate("ham10000", tmp_path / "raw", tmp_path / "cur")
    j = train_judges(tmp_path / "cur" / "records.csv", tmp_path / "j", JudgeConfig.tiny(epochs=1))
    assert set(j.attributes) <= {"dx", "fitzpatrick"} and "dx" in j.attributes
    with pytest.raises(LesionGenError, match="streaks"):
        train_judges(tmp_path / "cur" / "records.csv", tmp_path / "k", JudgeConfig.tiny(attributes=("streaks",)))


def test_single_valued_attribute_is_skipped(d7p, tmp_path):
    df = read_records(d7p)
    df["blue_whitish_veil"] = df["blue_whitish_veil"].where(df.split != "train", "absent")
    j = train_judges(df, tmp_path / "j", JudgeConfig.tiny(attributes=("fitzpatrick", "blue_whitish_veil"), epochs=1),
                     data_root=Path(d7p).parent.parent / "raw")
    assert j.attributes == ["fitzpatrick"]
    info = json.loads((tmp_path / "j" / "judges.json").read_text())
    assert "blue_whitish_veil" in info["skipped"] and info["records"]["path"] is None
    with pytest.raises(LesionGenError, match="2 distinct"):
        train_judges(df, tmp_path / "k", JudgeConfig.tiny(attributes=("blue_whitish_veil",)), data_root=Path(d7p).parent.parent / "raw")


def test_no_valid_split(d7p, tmp_path):
    df = read_records(d7p)
    df = df[df.split != "valid"]
    root = Path(d7p).parent.parent / "raw"
    with pytest.raises(LesionGenError, match="valid_split=None"):
        train_judges(df, tmp_path / "j", JudgeConfig.tiny(attributes=("fitzpatrick",)), data_root=root)
    j = train_judges(df, tmp_path / "j", JudgeConfig.tiny(attributes=("fitzpatrick",), epochs=2, valid_split=None, patience=3),
                     data_root=root)
    s = j.info["summary"]["fitzpatrick"]
    assert s["epochs_run"] == 2 and s["valid_balanced_accuracy"] is None


def test_pretrained_backbone_from_local_path(d7p, tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification
    ck = tmp_path / "ck"
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                              num_labels=1000)).save_pretrained(ck, safe_serialization=True)
    j = train_judges(d7p, tmp_path / "j", JudgeConfig.tiny(attributes=("fitzpatrick",), backbone=str(ck), epochs=1))
    assert j.normalisation["name"] == "imagenet"
    assert j.models["fitzpatrick"].config.num_labels == len(j.labels("fitzpatrick"))
    stem = "resnet.embedder.embedder.convolution.weight"
    from safetensors.torch import load_file
    pre = load_file(ck / "model.safetensors")[stem]
    assert pre.shape == j.models["fitzpatrick"].state_dict()[stem].shape  # the backbone weights were loaded, then trained
    loaded = Judges.load(tmp_path / "j")
    assert loaded.normalisation == j.normalisation and loaded.labels("fitzpatrick") == j.labels("fitzpatrick")
    with pytest.raises(LesionGenError, match="config.json"):
        train_judges(d7p, tmp_path / "k", JudgeConfig.tiny(backbone=str(tmp_path / "j")))


@pytest.mark.parametrize("kw, msg", [
    (dict(attributes=("colour",)), "unknown attribute 'colour'"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=-1), "batch_size"),
    (dict(resolution=0), "resolution"),
    (dict(depths=(1,)), "depths"),
    (dict(backbone="no such backbone"), "backbone"),
])
def test_config_errors(kw, msg):
    with pytest.raises(LesionGenError, match=msg): JudgeConfig(**kw)


def test_input_errors(d7p, tmp_path):
    cfg = JudgeConfig.tiny(attributes=("fitzpatrick",))
    df = read_records(d7p)
    root = Path(d7p).parent.parent / "raw"
    with pytest.raises(LesionGenError, match="no 'train' split"):
        train_judges(df[df.split != "train"], tmp_path / "j", cfg, data_root=root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LesionGenError, match="file"): train_judges(d7p, tmp_path / "file", cfg)
    with pytest.raises(LesionGenError, match="not found"): train_judges(tmp_path / "none.csv", tmp_path / "j", cfg)
    with pytest.raises(LesionGenError, match="data_root"): train_judges(df, tmp_path / "j", cfg)
    with pytest.raises(LesionGenError, match="not a judges folder"): Judges.load(tmp_path)
    with pytest.raises(LesionGenError, match="not a judges folder"): Judges.load(tmp_path / "missing")
    bad = df.copy(); bad.loc[bad.index[0], "file_name"] = "images/none.jpg"
    with pytest.raises(LesionGenError, match="not found"): train_judges(bad, tmp_path / "j", cfg, data_root=root)
    assert not (tmp_path / "j").exists()  # nothing written on bad input


def test_as_image_batch_with_and_without_resolution():
    from lesiongen.classify import as_image_batch
    ims = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(2)]
    assert as_image_batch(ims).shape == (2, 3, 6, 8)                 # no resolution: kept at their shared size
    assert as_image_batch(ims, 4).shape == (2, 3, 4, 4)              # resized and centre-cropped like train.load_image
    assert as_image_batch(np.zeros((2, 6, 8, 3), np.uint8), 6).shape == (2, 3, 6, 6)
    assert as_image_batch([], 4).shape == (0, 3, 4, 4)
    mixed = ims + [Image.new("RGB", (4, 4))]
    assert as_image_batch(mixed, 4).shape == (3, 3, 4, 4)
    with pytest.raises(LesionGenError, match="real images have different sizes \\(4x4 and 8x6 px\\)"):
        as_image_batch(mixed, what="real images")
    with pytest.raises(LesionGenError, match="no images: the set is empty"): as_image_batch([], allow_empty=False)
    with pytest.raises(LesionGenError, match="resolution must be a positive integer"): as_image_batch(ims, 0)
    with pytest.raises(LesionGenError, match="as a tensor must be uint8"): as_image_batch(torch.zeros(1, 3, 4, 4))
