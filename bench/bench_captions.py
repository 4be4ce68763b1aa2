"""Benchmark: template captions per second (target: >= 5,000/s for short captions), the fact checker, and
`fit_caption` with the real CLIP tokenizer, over the real HAM10000 metadata subset and a phantom Derm7pt set.

Run: python bench/bench_captions.py
"""
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lesiongen import captions as C  # noqa: E402
from lesiongen.core import DX_NAMES  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)


def ham_rows():
    df = pd.read_csv(ROOT / "tests/fixtures/ham10000_metadata_subset.csv")
    return [{"image_id": r.image_id, "dx": r.dx, "diagnosis": DX_NAMES[r.dx], "age": r.age, "sex": r.sex,
             "site": r.localization, "fitzpatrick": random.Random(i).randint(1, 6), "fitzpatrick_source": "estimated"}
            for i, r in enumerate(df.itertuples())]


def phantom_rows(n=300):
    from lesiongen import data, phantom
    with tempfile.TemporaryDirectory() as d:
        phantom.write_phantom(Path(d), phantom.PhantomConfig(n=n, size=32, format="derm7pt"), progress=False)
        recs = data.load_derm7pt(Path(d), estimate_skin_tone=True).records
        truth = pd.read_csv(Path(d) / "phantom_truth.csv")
    cols = ["file_name", "colors", *C.SCORE_DESCRIPTORS, *C.EXTRA_FEATURES]
    return recs.merge(truth[cols], on="file_name", how="left").to_dict("records")


def rate(fn, items, min_time=1.0):
    "Items per second of `fn` over `items`, repeated for at least `min_time` s"
    n, t0 = 0, time.perf_counter()
    while True:
        for x in items: fn(x)
        n += len(items)
        if (dt := time.perf_counter() - t0) >= min_time: return n / dt


if __name__ == "__main__":
    clip = C.load_tokenizer("clip")
    sets = {"HAM subset (3,017 rows)": ham_rows(), "phantom Derm7pt (300 rows)": phantom_rows()}
    print(f"{'operation':<44} {'dataset':<28} {'items/s':>10}")
    for name, rows in sets.items():
        facts = [C.record_facts(r) for r in rows]
        shorts = [C.short_caption(f) for f in facts]
        reports = [C.report_caption(f) for f in facts]
        clauses = [C.caption_clauses(f, "short") for f in facts]
        rows_ = [
            ("record_facts (dict row)", rate(C.record_facts, rows)),
            ("short_caption (from facts)", rate(C.short_caption, facts)),
            ("report_caption (from facts)", rate(C.report_caption, facts)),
            ("build_caption short (row -> text)", rate(C.build_caption, rows)),
            ("build_caption report (row -> text)", rate(lambda r: C.build_caption(r, "report"), rows)),
            ("fit_caption short, CLIP 77", rate(lambda c: C.fit_caption(c, clip, 77), clauses)),
            ("check_caption (short)", rate(lambda i: C.check_caption(shorts[i], facts[i]), range(len(facts)))),
            ("check_report (report)", rate(lambda i: C.check_report(reports[i], facts[i]), range(len(facts)))),
        ]
        for op, r in rows_: print(f"{op:<44} {name:<28} {r:>10,.0f}")
