"""Fuzzing the loaders with hypothesis: random metadata CSVs and random image bytes.

Every input either curates correctly or raises a one-line `LesionGenError`; never another exception, and never a
partial output (`out` holds both `records.csv` and its `curation_report.json`, or nothing). "Correctly" means the
records read back identical, every row is accounted for (`n_rows_in == n_kept + n_dropped`), image ids are unique,
no lesion straddles two splits and every `file_name` is a decodable image inside the dataset root.

The CSVs mix valid values with wrong types, empty and 100,000-character fields, a BOM, CRLF or CR line ends, unquoted
separators and quotes, duplicate, missing, padded and extra headers, unicode, NUL bytes, path traversal (`..`, absolute,
drive and UNC paths, a symlink out of the root) and NaN/inf/1e400 numbers; the images are random bytes, truncated or
bit-flipped JPEGs, decompression bombs, and valid images of every mode and odd sizes.

CI runs a fixed, derandomized set of examples (`FUZZ_EXAMPLES`, default 120 per test: 499 inputs with the explicit
examples, 25–40 s on a busy 2-core machine); the `slow` soak draws fresh random examples (`FUZZ_SOAK_EXAMPLES`,
default 2,000 per test). Run with `-s` to see the number of inputs tried.
"""
from __future__ import annotations

import csv, io, os, tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (a dev requirement)")
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from lesiongen.core import DERM7PT_CONCEPTS, DERM7PT_DIAGNOSIS_MAP, DX_NAMES, ELEVATIONS, RECORD_COLUMNS, SPLITS, LesionGenError
from lesiongen.data import (DERM7PT_COLUMNS, HAM10000_COLUMNS, curate, read_curation_report, read_records,
                            unsafe_path_reason, write_placeholder_images)

TRIED: Counter = Counter()  # inputs tried per test, printed at the end of the module

_common = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
CI = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 120)), derandomize=True, **_common)
SOAK = settings(max_examples=int(os.environ.get("FUZZ_SOAK_EXAMPLES", 2000)), derandomize=False, **_common)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\nfuzz inputs tried: {sum(TRIED.values())} ({', '.join(f'{k} {v}' for k, v in sorted(TRIED.items()))})")


# -- values ----------------------------------------------------------------------------------------------------------
NASTY = ["", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e20", "-1", "0", "1.5", "7", "12",
         "0x10", "1_0", "١٢", "NA", "n/a", "unknown", "None", "null", "true", "../../etc/passwd", "/etc/passwd",
         "C:\\x.jpg", "C:x.jpg", "..\\..\\x.jpg", "a/../../b.jpg", "images/../../x.jpg", "\\\\server\\share\\x.jpg",
         "file:///etc/passwd", "\ufeff", "\x00", "a\x00b.jpg", "img\x00/a.jpg", "é", "😀", "İ", "ß", "\u202e", "=cmd|' /C calc'!A0", '"', "'",
         ",", ";", "\n", "\r\n", "\r", "\t", " x ", "x" * 100_000, "y" * 5000 + "/" + "z" * 300 + ".jpg"]
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
_nums = st.one_of(st.integers(-10**22, 10**22).map(str), st.floats().map(repr), st.floats().map(str))
_junk = st.one_of(st.sampled_from(NASTY), _text, _nums)


@st.composite
def _header(draw, required: tuple, optional: tuple = ()) -> list[str]:
    "A header with the required columns, some optional ones, and now and then a dropped, duplicated, padded or extra name"
    cols = list(required) + [c for c in optional if draw(st.booleans())]
    if draw(st.integers(0, 7)) == 0 and cols: cols.pop(draw(st.integers(0, len(cols) - 1)))
    if draw(st.integers(0, 7)) == 0 and cols: cols.append(draw(st.sampled_from(cols)))
    if draw(st.integers(0, 7)) == 0 and cols:
        i = draw(st.integers(0, len(cols) - 1))
        cols[i] = draw(st.sampled_from([f" {cols[i]}", f"{cols[i]} ", cols[i].upper(), f"\ufeff{cols[i]}", f'"{cols[i]}"']))
    if draw(st.integers(0, 7)) == 0: cols.append(draw(_text))
    return list(draw(st.permutations(cols)))


@st.composite
def _csv(draw, header: list[str], cells: dict, n_rows: st.SearchStrategy = st.integers(0, 6)) -> bytes:
    "Serialise rows of valid `cells[column]` values with 0–2 junk cells each under `header`, quoted or not, with random line ends, BOM and encoding"
    rows = []
    for _ in range(draw(n_rows)):  # mostly valid rows, so that inputs get past the first checks and reach the later code
        bad = draw(st.sets(st.integers(0, max(len(header) - 1, 0)), max_size=2)) if draw(st.integers(0, 2)) else set()
        rows.append([draw(_junk if i in bad else cells.get(c.strip(), _junk)) for i, c in enumerate(header)])
    eol = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    if draw(st.integers(0, 4)):  # proper CSV quoting
        buf = io.StringIO(); csv.writer(buf, lineterminator=eol).writerows([header, *rows]); text = buf.getvalue()
    else:  # naive join: separators, quotes and line ends inside values break the structure
        text = eol.join(",".join(r) for r in [header, *rows]) + draw(st.sampled_from(["", eol]))
    if draw(st.integers(0, 5)) == 0: text = "\ufeff" + text
    enc = draw(st.sampled_from(["utf-8"] * 8 + ["latin-1", "utf-16"]))
    data = text.encode(enc, errors="replace")
    if draw(st.integers(0, 15)) == 0: data += draw(st.binary(min_size=1, max_size=16))
    return data


# -- images ----------------------------------------------------------------------------------------------------------
def _encode(a: np.ndarray, fmt: str = "JPEG", mode: str|None = None) -> bytes:
    im = Image.fromarray(a)
    if mode: im = im.convert(mode)
    buf = io.BytesIO(); im.save(buf, fmt); return buf.getvalue()

_SKIN = np.full((16, 16, 3), (205, 160, 140), np.uint8); _SKIN[5:11, 5:11] = (90, 60, 50)
VALID_JPEG, VALID_PNG = _encode(_SKIN), _encode(_SKIN, "PNG")


def _png_header(w: int, h: int) -> bytes:
    "A PNG whose header claims `w`×`h` pixels and that has no pixel data (a decompression bomb if large)"
    import struct, zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@st.composite
def valid_images(draw) -> bytes:
    "A decodable image of a random mode, format and (odd) size"
    w, h = draw(st.sampled_from([(1, 1), (2, 3), (16, 16), (33, 7), (1, 300), (300, 2), (129, 130)]))
    a = np.asarray(draw(st.lists(st.integers(0, 255), min_size=3, max_size=3)), np.uint8)[None, None] \
        * np.ones((h, w, 1), np.uint8)
    a = (a + np.random.default_rng(draw(st.integers(0, 9))).integers(0, 40, a.shape)).astype(np.uint8)
    fmt, mode = draw(st.sampled_from([("JPEG", None), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", None), ("PNG", "L"),
                                      ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "1"), ("PNG", "I;16"), ("PNG", "LA")]))
    return _encode(a, fmt, mode)


@st.composite
def broken_images(draw) -> bytes:
    "Random bytes, a truncated or bit-flipped valid image, or a decompression bomb"
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "bomb", "empty"]))
    src = draw(st.sampled_from([VALID_JPEG, VALID_PNG]))
    if kind == "random": return draw(st.binary(max_size=600))
    if kind == "truncated": return src[:draw(st.integers(0, len(src) - 1))]
    if kind == "bomb": return _png_header(20_000, 20_000)
    if kind == "empty": return b""
    b = bytearray(src)
    for i in draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)): b[i] ^= draw(st.integers(1, 255))
    return bytes(b)


any_image = st.one_of(st.just(VALID_JPEG), valid_images(), broken_images())


# -- the check -------------------------------------------------------------------------------------------------------
def curate_or_refuse(dataset: str, root: Path, out: Path, **kwargs):
    "Curate; on `LesionGenError` check that nothing was written; on success check that the output is correct"
    try:
        res = curate(dataset, root, out, **kwargs)
    except LesionGenError as e:
        assert "\n" not in str(e), f"multi-line error: {str(e)[:300]!r}"
        assert not out.exists() or not any(out.iterdir()), f"partial output after {e}: {sorted(os.listdir(out))}"
        return None
    assert sorted(p.name for p in out.iterdir()) == ["curation_report.json", "records.csv"]
    report = read_curation_report(out)
    rec = read_records(out / "records.csv")
    pd.testing.assert_frame_equal(rec, res.records)
    assert list(rec.columns)[:len(RECORD_COLUMNS)] == list(RECORD_COLUMNS)
    assert report["n_rows_in"] == report["n_kept"] + report["n_dropped"] and report["n_kept"] == len(rec) > 0
    assert rec["image_id"].notna().all() and rec["image_id"].is_unique
    assert rec["dx"].notna().all() and set(rec["split"]) <= set(SPLITS)
    assert (rec.groupby("lesion_id")["split"].nunique() == 1).all()
    real_root = os.path.realpath(root)
    for f in rec["file_name"]:
        assert unsafe_path_reason(f) is None, f
        assert os.path.realpath(root / f).startswith(real_root + os.sep) and (root / f).is_file(), f
    return res


# -- HAM10000 --------------------------------------------------------------------------------------------------------
HAM_IDS = [f"ISIC_{i:07d}" for i in range(5)]  # 0–2 valid JPEGs, 3 a fuzzed image, 4 absent
HAM_CELLS = {"lesion_id": st.sampled_from(["HAM_1", "HAM_2", "HAM_3"]), "image_id": st.sampled_from(HAM_IDS),
             "dx": st.sampled_from([*DX_NAMES, "MEL", " nv "]), "dx_type": st.sampled_from(["histo", "consensus"]),
             "age": st.sampled_from(["50", "45.0", "", "unknown", "85"]), "sex": st.sampled_from(["male", "female", "unknown"]),
             "localization": st.sampled_from(["back", "face", "unknown"]),
             "fitzpatrick": st.sampled_from(["1", "6", "-1", "0", "12", "56", "3.0"])}


@st.composite
def ham_inputs(draw):
    return (draw(_header(HAM10000_COLUMNS, ("fitzpatrick",)).flatmap(lambda h: _csv(h, HAM_CELLS))),
            draw(any_image), draw(st.sampled_from(["raise", "drop"])))


def _run_ham(csv_bytes: bytes, image: bytes, on_error: str):
    TRIED["ham10000"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "ham"
        write_placeholder_images(root / "HAM10000_images_part_1", [f"{i}.jpg" for i in HAM_IDS[:2]], size=16, lesion=(90, 60, 50))
        write_placeholder_images(root / "HAM10000_images_part_2", [f"{HAM_IDS[2]}.jpg"], size=16, lesion=(90, 60, 50))
        (root / "HAM10000_images_part_2" / f"{HAM_IDS[3]}.jpg").write_bytes(image)
        (root / "HAM10000_metadata.csv").write_bytes(csv_bytes)
        return curate_or_refuse("ham10000", root, Path(d) / "out", on_error=on_error)


_HAM_OK = b"lesion_id,image_id,dx,dx_type,age,sex,localization\nHAM_1,ISIC_0000000,nv,histo,50,male,back\n"


@CI
@given(ham_inputs())
@example((_HAM_OK, VALID_JPEG, "raise"))  # a valid input curates
@example((b"lesion_id,image_id,dx,dx_type,age,sex,localization\n", VALID_JPEG, "raise"))  # header only: nothing to curate
@example((_HAM_OK.replace(b"back\n", b"back,extra\n"), VALID_JPEG, "raise"))  # one field too many: pandas took column 1 as the index
@example((b"lesion_id,image_id,dx,dx_type,age,sex,localization,fitzpatrick\n"
          b"HAM_1,ISIC_0000000,nv,histo,50,male,back,inf\n", VALID_JPEG, "raise"))  # OverflowError in parse_fitzpatrick
@example((b"lesion_id,image_id,dx,dx_type,age,sex,localization,dx \nHAM_1,ISIC_0000000,nv,histo,50,male,back,nv\n",
          VALID_JPEG, "raise"))  # 'dx' twice once stripped: df['dx'] was a DataFrame
@example((b"lesion_id,image_id,dx,dx_type,age,sex,localization,lesion_id\n"
          b"HAM_1,ISIC_0000000,nv,histo,50,male,back,HAM_2\n", VALID_JPEG, "raise"))  # a duplicated header
def test_fuzz_ham10000(inp):
    _run_ham(*inp)


@pytest.mark.slow
@SOAK
@given(ham_inputs())
def test_fuzz_ham10000_soak(inp):
    _run_ham(*inp)


# -- Derm7pt ---------------------------------------------------------------------------------------------------------
D7_IMAGES = ["NEL/a.jpg", "NEL/b.jpg", "NEL/c.jpg", "NEL/d.jpg", "NEL/fuzz.jpg"]  # the last one is fuzzed
D7_CELLS = {"case_num": st.sampled_from(["1", "2", "3", "4"]), "diagnosis": st.sampled_from(sorted(DERM7PT_DIAGNOSIS_MAP)),
            "seven_point_score": st.sampled_from([str(i) for i in range(11)] + ["3.0"]),
            **{c: st.sampled_from(v) for c, v in DERM7PT_CONCEPTS.items()},
            "level_of_diagnostic_difficulty": st.sampled_from(["low", "medium", "high"]),
            "elevation": st.sampled_from(ELEVATIONS), "location": st.sampled_from(["back", "head neck"]),
            "sex": st.sampled_from(["male", "female"]), "management": st.just("excision"),
            "clinic": st.sampled_from(D7_IMAGES + ["NEL/gone.jpg"]), "derm": st.sampled_from(D7_IMAGES + ["NEL/gone.jpg"]),
            "notes": _text}


@st.composite
def _split_files(draw, n_rows: int) -> dict[str, bytes]:
    "Split index files: a valid partition of the rows, or random indexes and junk"
    if draw(st.integers(0, 3)):
        member = [draw(st.sampled_from(SPLITS)) for _ in range(n_rows)]
        return {s: ("indexes\n" + "".join(f"{i}\n" for i, m in enumerate(member) if m == s)).encode() for s in SPLITS}
    idx = st.one_of(st.integers(0, n_rows + 1).map(str), _junk)
    return {s: draw(_csv([draw(st.sampled_from(["indexes", "index", " indexes"]))], {"indexes": idx})) for s in SPLITS}


@st.composite
def derm7pt_inputs(draw):
    header = draw(_header(DERM7PT_COLUMNS))
    n_rows = draw(st.integers(0, 5))
    meta = draw(_csv(header, D7_CELLS, st.just(n_rows)))
    return meta, draw(_split_files(n_rows)), draw(any_image), draw(st.sampled_from(["raise", "drop"])), draw(st.booleans())


def _run_derm7pt(meta: bytes, splits: dict, image: bytes, on_error: str, include_clinic: bool):
    TRIED["derm7pt"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "d7p"
        write_placeholder_images(root / "images", D7_IMAGES[:-1], size=16, lesion=(90, 60, 50))
        (root / "images" / D7_IMAGES[-1]).write_bytes(image)
        (root / "meta").mkdir()
        (root / "meta" / "meta.csv").write_bytes(meta)
        for s, b in splits.items(): (root / "meta" / f"{s}_indexes.csv").write_bytes(b)
        return curate_or_refuse("derm7pt", root, Path(d) / "out", on_error=on_error, include_clinic=include_clinic)


_D7_ROW = ["1", "clark nevus", "0", *(v[0] for v in DERM7PT_CONCEPTS.values()), "low", "flat", "back", "male", "excision",
           "NEL/a.jpg", "NEL/b.jpg", ""]
_D7_OK = (",".join(DERM7PT_COLUMNS) + "\n" + ",".join(_D7_ROW) + "\n").encode()
_D7_SPLITS = {"train": b"indexes\n0\n", "valid": b"indexes\n", "test": b"indexes\n"}


@CI
@given(derm7pt_inputs())
@example((_D7_OK, _D7_SPLITS, VALID_JPEG, "raise", True))  # a valid input curates
@example((_D7_OK.replace(b",0,absent", b",inf,absent"), _D7_SPLITS, VALID_JPEG, "raise", False))  # int(inf): OverflowError
@example((_D7_OK.replace(b",0,absent", b",1e20,absent"), _D7_SPLITS, VALID_JPEG, "raise", False))  # 1e20 overflowed Int64
@example((_D7_OK.replace(b"NEL/b.jpg", b"NEL\x00/b.jpg"), _D7_SPLITS, VALID_JPEG, "raise", False))  # NUL: ValueError in scandir
@example((_D7_OK.replace(b"NEL/b.jpg", b"NEL/" + b"x" * 300 + b"/b.jpg"), _D7_SPLITS, VALID_JPEG, "raise", False))  # ENAMETOOLONG
@example((_D7_OK.rstrip(b"\n").rsplit(b",", 3)[0] + b"\n", _D7_SPLITS, VALID_JPEG, "raise", False))  # a short row
def test_fuzz_derm7pt(inp):
    _run_derm7pt(*inp)


@pytest.mark.slow
@SOAK
@given(derm7pt_inputs())
def test_fuzz_derm7pt_soak(inp):
    _run_derm7pt(*inp)


# -- image folder with a CSV -----------------------------------------------------------------------------------------
FOLDER_FILES = ["img/a.jpg", "img/b.png", "c.jpg", "nan.jpg", "img/fuzz.jpg"]  # fuzz.jpg is fuzzed; img/link.jpg points outside
FOLDER_CELLS = {"file": st.sampled_from(["img/a.jpg", "img/a", "img/b", "img\\b.png", "c", "c.JPG", "img/fuzz.jpg",
                                         "img/link.jpg", "img/nothere.jpg", "img", "img/./a.jpg", "img//a.jpg", "nan.jpg", "nan"]),
                "label": st.sampled_from(["melanoma", "nv", "Psoriasis", "squamous cell carcinoma", "é"]),
                "patient": st.sampled_from(["p1", "p2", "p3"]), "fst": st.sampled_from(["1", "2", "-1", "34", "6.0"]),
                "age": st.sampled_from(["30", "", "unknown"]), "note": _text}


@st.composite
def folder_inputs(draw):
    kw = {"lesion_col": draw(st.sampled_from([None, "patient"])), "fitzpatrick_col": draw(st.sampled_from([None, "fst"])),
          "extra_cols": draw(st.sampled_from([None, ["age"], ["note"], ["age", "note"]])),
          "on_error": draw(st.sampled_from(["raise", "drop"])), "estimate_skin_tone": draw(st.booleans())}
    needed = ("file", "label", *(c for c in (kw["lesion_col"], kw["fitzpatrick_col"]) if c), *(kw["extra_cols"] or []))
    return draw(_header(needed, ("note",)).flatmap(lambda h: _csv(h, FOLDER_CELLS))), draw(any_image), kw


def _run_folder(csv_bytes: bytes, image: bytes, kw: dict):
    TRIED["folder"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "set"
        write_placeholder_images(root, FOLDER_FILES[:-1], size=16, lesion=(90, 60, 50))
        (root / FOLDER_FILES[-1]).write_bytes(image)
        (Path(d) / "outside.jpg").write_bytes(VALID_JPEG)
        (root / "img" / "link.jpg").symlink_to(Path(d) / "outside.jpg")
        (Path(d) / "set.csv").write_bytes(csv_bytes)
        return curate_or_refuse("folder", root, Path(d) / "out", csv=Path(d) / "set.csv", image_col="file",
                                label_col="label", **kw)


_FOLDER_KW = {"lesion_col": None, "fitzpatrick_col": "fst", "extra_cols": None, "on_error": "raise", "estimate_skin_tone": True}
_FOLDER_KW0 = {**_FOLDER_KW, "fitzpatrick_col": None, "lesion_col": "patient"}


@CI
@given(folder_inputs())
@example((b"file,label,fst\nimg/a.jpg,melanoma,1\nc,nv,34\n", VALID_JPEG, _FOLDER_KW))  # a valid input curates
@example((b"file,label,fst\nimg/a.jpg,melanoma,1e400\n", VALID_JPEG, _FOLDER_KW))  # int(inf): OverflowError
@example((b"file,label,fst\nimg\x00/a.jpg,melanoma,1\n", VALID_JPEG, _FOLDER_KW))  # NUL in a folder: ValueError in scandir
@example((b"file,label,fst\n../set/img/a.jpg,melanoma,1\n/etc/passwd,nv,1\nimg/link.jpg,nv,1\n", VALID_JPEG,
          {**_FOLDER_KW, "on_error": "drop"}))  # path traversal and a symlink out of the root: all dropped, nothing left
@example((b"file,label,fst,label\nimg/a.jpg,melanoma,1,nv\n", VALID_JPEG, _FOLDER_KW))  # a duplicated header
# found by the random examples once the generator made mostly valid rows:
@example((b"patient,label,file\n\x00,melanoma,img/a.jpg\n", VALID_JPEG, _FOLDER_KW0))  # NUL: KeyError in split_by_lesion
@example((b"file,label,patient\nimg/a.jpg,melanoma,p1\x00", VALID_JPEG, _FOLDER_KW0))  # pandas hashes 'p1\0' as 'p1'
@example((b'file,label,note,patient\r\nimg/a.jpg,melanoma,"0\r",p1\r\n', VALID_JPEG, {**_FOLDER_KW0, "extra_cols": ["note"]}))  # a lone CR: records.csv gave '0'
@example((b"file,label,patient\nimg/a.jpg,-nan,p1\n", VALID_JPEG, _FOLDER_KW0))  # the label's slug 'nan' read as a missing dx
@example((b"file,label,patient\nnan.jpg,nv,p1\n", VALID_JPEG, _FOLDER_KW0))  # image_id 'nan' was stored as missing (found by reading, next to the case above)
def test_fuzz_folder(inp):
    _run_folder(*inp)


@pytest.mark.slow
@SOAK
@given(folder_inputs())
def test_fuzz_folder_soak(inp):
    _run_folder(*inp)


# -- images ----------------------------------------------------------------------------------------------------------
@st.composite
def image_sets(draw):
    "1–4 images, each tagged valid (must be kept) or broken (may or may not decode), and `on_error`"
    tagged = st.one_of(valid_images().map(lambda b: (b, True)), broken_images().map(lambda b: (b, False)))
    return draw(st.lists(tagged, min_size=1, max_size=4)), draw(st.sampled_from(["raise", "drop"]))


def _run_images(images: list[tuple[bytes, bool]], on_error: str):
    "A valid CSV over random image bytes: valid images are always kept, the others refused or dropped if unreadable"
    TRIED["images"] += 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "set"; root.mkdir()
        for i, (b, _) in enumerate(images): (root / f"{i}.png").write_bytes(b)
        (root / "set.csv").write_text("file,label\n" + "".join(f"{i}.png,nv\n" for i in range(len(images))))
        res = curate_or_refuse("folder", root, Path(d) / "out", csv="set.csv", image_col="file", label_col="label",
                               on_error=on_error)
        valid = {str(i) for i, (_, v) in enumerate(images) if v}
        if len(valid) == len(images): assert res is not None and len(res.records) == len(images)
        if res is not None:
            assert valid <= set(res.records["image_id"])  # a valid image is never dropped
            assert set(res.report["dropped_by_reason"]) <= {"unreadable or corrupt image file"}


@CI
@given(image_sets())
@example(([(_png_header(20_000, 20_000), False)], "raise"))  # a decompression bomb is refused, not decoded
@example(([(VALID_JPEG[:300], False), (VALID_JPEG, True)], "drop"))  # a truncated JPEG is dropped
def test_fuzz_images(inp):
    _run_images(*inp)


@pytest.mark.slow
@SOAK
@given(image_sets())
def test_fuzz_images_soak(inp):
    _run_images(*inp)
