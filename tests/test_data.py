"Curation on the real HAM10000 metadata subset, and the error messages for bad inputs (pytest)"
import json, shutil
from pathlib import Path

import pandas as pd
import pytest

from lesiongen.core import LesionGenError, RECORD_COLUMNS, SPLITS
from lesiongen.data import curate, load_ham10000, read_records, write_imagefolder, write_placeholder_images

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
    assert again.tolist() == res.records["split"].tolist()


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
