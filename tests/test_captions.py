"""pytest checks of lesiongen.captions as the LLM stage and the CLI use it: offline tokenizer loading, the
environment override, and the public names."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lesiongen import captions as C
from lesiongen.core import LesionGenError

FIXTURE = Path(__file__).parent / "fixtures" / "clip_tokenizer"
ROW = {"image_id": "x", "dx": "bcc", "diagnosis": "basal cell carcinoma", "age": 70, "sex": "female", "site": "face",
       "fitzpatrick": 2, "fitzpatrick_source": "label", "vascular_structures": "arborizing"}


def test_public_names():
    for name in ("SCHEMA", "record_facts", "facts_hash", "short_caption", "report_caption", "caption_clauses",
                 "parse_report", "CheckResult", "check_report", "check_caption", "load_tokenizer", "fit_caption",
                 "build_caption"):
        assert hasattr(C, name), name
    assert len(C.SCHEMA) == 12


def test_import_is_offline_and_light():
    code = "import lesiongen.captions, sys; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_clip_tokenizer_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LESIONGEN_CLIP_TOKENIZER", str(FIXTURE))
    C.load_tokenizer.cache_clear()
    tok = C.load_tokenizer("clip")
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    cap = C.build_caption(ROW, tokenizer=tok, max_tokens=20)
    assert C.count_tokens(cap, tok) <= 20 and cap.startswith("derm") and "Fitzpatrick type II" in cap
    assert C.check_caption(cap, C.record_facts(ROW)).ok
    with pytest.raises(LesionGenError, match="max_tokens=8"):
        C.build_caption(ROW, tokenizer=tok, max_tokens=8)
    C.load_tokenizer.cache_clear()


def test_report_roundtrip():
    facts = C.record_facts(ROW)
    rep = C.build_caption(ROW, "report", seed=5)
    assert set(C.parse_report(rep)) == set(C.SCHEMA)
    assert C.check_report(rep, facts).ok
    bad = rep.replace("arborizing vessels", "no vessels")
    res = C.check_report(bad, facts)
    assert not res.ok and any(p.startswith("vascular_structures") for p in res.problems)


def test_every_real_ham10000_row_captions_without_contradiction(tmp_path):
    "Curate all 3,017 real HAM10000 metadata rows (placeholder images); no template caption contradicts its record"
    import pandas as pd
    from lesiongen.data import load_ham10000, write_placeholder_images
    meta = pd.read_csv(Path(__file__).parent / "fixtures" / "ham10000_metadata_subset.csv")
    meta.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    write_placeholder_images(tmp_path / "HAM10000_images_part_1", [f"{i}.jpg" for i in meta["image_id"]])
    records = load_ham10000(tmp_path).records
    assert len(records) == len(meta)
    clip = C.load_tokenizer(str(FIXTURE))
    bad = []
    for row in records.to_dict("records"):
        facts = C.record_facts(row)
        short = C.fit_caption(C.caption_clauses(facts, "short"), clip, 77)
        for text, check in ((short, C.check_caption), (C.report_caption(facts, seed=0), C.check_report)):
            if not (r := check(text, facts)).ok: bad.append((row["image_id"], text, r.problems))
        assert C.DX_NAMES[row["dx"]] in short
    assert bad == []
    # ...and the check can fail: the same captions against a record with another diagnosis are rejected
    facts = C.record_facts(records.iloc[0].to_dict())
    other = {**facts, "dx": "mel" if facts["dx"] != "mel" else "nv"}
    other.pop("diagnosis", None)
    assert not C.check_caption(C.short_caption(other), facts).ok
