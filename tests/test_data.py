"Curation on the real HAM10000 metadata subset, and the error messages for bad inputs (pytest)"
import hashlib, json, os, shutil
from pathlib import Path

import pandas as pd
import pytest

from lesiongen.core import LesionGenError, RECORD_COLUMNS, SPLITS
from lesiongen.data import (curate, load_ham10000, read_curation_report, read_records, write_imagefolder,
                            write_placeholder_images)

FIXTURE = Path(__file__).parent/"fixtures"/"ham10000_metadata_subset.csv"


def _ham(tmp_path: Path, meta: pd.DataFrame) -> Path:
    "Write `meta` and a placeholder image per row in HAM10000 layout under `tmp_path/ham`"
    root = tmp_path/"ham"
    write_placeholder_images(root/"HAM10000_images_part_1", [f"{i}.jpg" for i in meta["image_id"]])
    meta.to_csv(root/"HAM10000_metadata.csv", index=False)
    return root


@pytest.fixture
def real_meta() -> pd.DataFrame:
    return pd.read_csv(FIXTURE, dtype=str, keep_default_na=False)


def test_real_subset_curates_without_leaks(tmp_path, real_meta):
    root = _ham(tmp_path, real_meta)
    res = curate("ham10000", root, tmp_path/"out", seed=0)
    rec = read_records(tmp_path/"out"/"records.csv")
    report = json.loads((tmp_path/"out"/"curation_report.json").read_text())
    assert list(rec.columns) == list(RECORD_COLUMNS)
    assert len(rec) == len(real_meta) == report["n_kept"] == report["n_rows_in"]
    assert report["lesions_in_multiple_splits"] == 0
    assert rec.groupby("lesion_id")["split"].nunique().max() == 1
    assert rec["sex"].isna().sum() == (real_meta["sex"] == "unknown").sum() > 0
    assert rec["age"].isna().sum() == (real_meta["age"] == "").sum() == 10
    fr = rec["split"].value_counts(normalize=True)
    assert all(abs(fr[s] - f) < 0.01 for s, f in zip(SPLITS, (0.7, 0.15, 0.15)))
    again = load_ham10000(root, seed=0, estimate_skin_tone=False).records["split"]
    assert again.tolist() == res.records["split"].tolist()  # deterministic, and independent of skin tone estimation
    other = load_ham10000(root, seed=1, estimate_skin_tone=False).records["split"]
    assert (other != res.records["split"]).mean() > 0.2  # but the seed does reach the split


def test_imagefolder_from_real_subset(tmp_path, real_meta):
    meta = real_meta.head(40)
    root = _ham(tmp_path, meta)
    recs = load_ham10000(root, estimate_skin_tone=False).records
    path = write_imagefolder(recs, root, tmp_path/"hf", splits=("train",))
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(lines) == (recs["split"] == "train").sum()
    assert all((tmp_path/"hf"/l["file_name"]).is_file() and l["text"].startswith("a dermoscopic image of ") for l in lines)


BAD_INPUTS = {  # name: (edit of the metadata table, edit of the image folder, text the message must contain)
    "missing column": (lambda m: m.drop(columns=["dx_type"]), None, "'dx_type'"),
    "unknown dx": (lambda m: m.assign(dx=["nv", "tumour"] + ["nv"] * (len(m) - 2)), None, "'tumour' (row 1)"),
    "duplicated image_id": (lambda m: m.assign(image_id=[m["image_id"][0]] * 2 + list(m["image_id"][2:])), None,
                            "duplicated image_id"),
    "missing image": (None, lambda r, m: (r/"HAM10000_images_part_1"/f"{m['image_id'][3]}.jpg").unlink(), "row 3"),
    "corrupt image": (None, lambda r, m: (r/"HAM10000_images_part_1"/f"{m['image_id'][4]}.jpg").write_bytes(b"\0" * 50),
                      "unreadable or corrupt image file"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_name_the_problem(tmp_path, real_meta, name):
    edit_meta, edit_files, expected = BAD_INPUTS[name]
    meta = real_meta.head(8).copy()
    root = _ham(tmp_path, meta)
    if edit_meta: edit_meta(meta).to_csv(root/"HAM10000_metadata.csv", index=False)
    if edit_files: edit_files(root, meta)
    with pytest.raises(LesionGenError) as e: load_ham10000(root)
    assert expected in str(e.value), str(e.value)
    if name != "missing column":  # the same problem, dropped and accounted for
        res = load_ham10000(root, on_error="drop")
        assert res.report["n_rows_in"] == 8 == res.report["n_kept"] + res.report["n_dropped"]
        assert res.report["n_dropped"] >= 1 and all(d["reason"] for d in res.report["dropped"])


def test_curate_publishes_a_matching_pair(tmp_path, real_meta):
    "The report carries the SHA-256 of records.csv; a mismatched or damaged pair is refused with one line saying what to do"
    root, out = _ham(tmp_path, real_meta.head(20)), tmp_path / "out"
    curate("ham10000", root, out, estimate_skin_tone=False)
    rec, rep = out / "records.csv", out / "curation_report.json"
    assert read_curation_report(out)["records_sha256"] == hashlib.sha256(rec.read_bytes()).hexdigest()
    good = rec.read_bytes()
    rec.write_bytes(good.replace(b",train,", b",valid,", 1))  # the records of another (or an interrupted) run
    with pytest.raises(LesionGenError, match="does not match .*re-run curate") as e: read_records(rec)
    assert "\n" not in str(e.value)
    rec.write_bytes(good); rep.write_text(rep.read_text()[:-30])  # a torn report
    with pytest.raises(LesionGenError, match=r"curation_report.json is damaged or not JSON \(JSONDecodeError.*re-run curate"):
        read_records(rec)
    with pytest.raises(LesionGenError, match="is damaged or not JSON"): read_curation_report(out)
    curate("ham10000", root, out, estimate_skin_tone=False); rec.unlink()  # a report whose records never arrived
    with pytest.raises(LesionGenError, match="has no records.csv beside it"): read_records(rec)


def test_curated_root_works_from_another_working_folder(tmp_path, real_meta, monkeypatch):
    "A relative root is stored absolute, so the report finds the images from any working folder"
    _ham(tmp_path, real_meta.head(10))
    monkeypatch.chdir(tmp_path)
    curate("ham10000", "ham", "out", estimate_skin_tone=False)
    monkeypatch.chdir(tmp_path / "out")
    report = read_curation_report(tmp_path / "out")
    root = Path(report["params"]["root"])
    assert root.is_absolute() and os.path.samefile(root, tmp_path / "ham")
    assert all((root / f).is_file() for f in read_records(tmp_path / "out" / "records.csv")["file_name"])


@pytest.mark.slow
def test_data_root_of_from_another_working_folder(tmp_path, real_meta, monkeypatch):
    "`train.data_root_of` (7 s to import) finds the root of a curation made with a relative path"
    from lesiongen.train import data_root_of
    _ham(tmp_path, real_meta.head(10))
    monkeypatch.chdir(tmp_path)
    curate("ham10000", "ham", "out", estimate_skin_tone=False)
    monkeypatch.chdir(tmp_path / "out")
    assert os.path.samefile(data_root_of(tmp_path / "out" / "records.csv"), tmp_path / "ham")


def test_curate_checks_out_first_and_writes_all_or_nothing(tmp_path, real_meta):
    root = _ham(tmp_path, real_meta.head(10))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LesionGenError, match="file is a file"): curate("ham10000", root, tmp_path / "file" / "out")
    meta = real_meta.head(10).assign(dx="psoriasis")
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    with pytest.raises(LesionGenError, match=r"kept no image of 10 row\(s\).*nothing written"):
        curate("ham10000", root, tmp_path / "none", on_error="drop")
    assert not (tmp_path / "none").exists()
