"""Benchmark the attribute judges: train them on a records file and score them on its held-out split.

For each resolution, trains `lesiongen.classify.train_judges` with the default `JudgeConfig` (or the overrides
given) on one torch thread, then prints per attribute: held-out n, accuracy, balanced accuracy, macro F1, the
balanced accuracy of *presence* (any value but `absent`, Derm7pt concepts only, read off the same predictions),
epochs run, best epoch, valid balanced accuracy, and training wall and CPU seconds. Wall time depends on what
else runs on the machine; CPU seconds of a one-thread run much less so (the load average is printed too).

    python bench/bench_classify.py                                   # /work/runs/phd7_cur, 64 and 32 px
    python bench/bench_classify.py --records R/records.csv --data-root D --resolutions 64 --out-dir /tmp/judges
    python bench/bench_classify.py --epochs 5 --attributes fitzpatrick dx
    python bench/bench_classify.py --resolutions 64 --attributes dots_and_globules pigment_network --depths 2 2 2
"""
from __future__ import annotations
import argparse, os, tempfile, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from lesiongen.classify import JudgeConfig, Judges, decode_images, known_labels, train_judges
from lesiongen.core import DERM7PT_CONCEPTS, LesionGenError
from lesiongen.data import read_records


def presence_scores(judges: Judges, records: Path, split: str, data_root) -> dict:
    "Balanced accuracy of `absent` vs anything else for each concept judge, on `split`"
    df = read_records(records)
    rows = df[df.split == split].reset_index(drop=True)
    root = Path(data_root) if data_root else Path(judges.info["data_root"])
    x = decode_images(rows, root, judges.resolution)
    out = {}
    for a in judges.attributes:
        if a not in DERM7PT_CONCEPTS or "absent" not in judges.labels(a): continue
        vals = known_labels(rows, a)
        pred = judges.predict(x[torch.from_numpy(rows.index.get_indexer(vals.index))], [a])[a]
        out[a] = balanced_accuracy_score(np.asarray(vals) != "absent", np.asarray(pred) != "absent")
    return out


def run(records: Path, data_root, out: Path, cfg: JudgeConfig, split: str) -> pd.DataFrame:
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    judges = train_judges(records, out, cfg, data_root=data_root)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ev = judges.evaluate(records, split=split, data_root=data_root)
    pres = presence_scores(judges, records, split, data_root)
    s = judges.info["summary"]
    ev["presence_bacc"] = [pres.get(a, np.nan) for a in ev.attribute]
    ev["epochs"] = [s[a]["epochs_run"] for a in ev.attribute]
    ev["best"] = [s[a]["best_epoch"] for a in ev.attribute]
    ev["valid_bacc"] = [s[a]["valid_balanced_accuracy"] for a in ev.attribute]
    ev["wall_s"] = [s[a]["seconds"] for a in ev.attribute]
    ev["cpu_s"] = [s[a]["cpu_seconds"] for a in ev.attribute]
    print(f"\n{cfg.resolution} px, {cfg.backbone} {cfg.hidden_sizes}, {torch.get_num_threads()} thread(s): "
          f"{len(judges.attributes)} judges in {wall:.0f} s wall, {cpu:.0f} s CPU "
          f"(load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after); written to {out}")
    if judges.info["skipped"]: print("skipped:", judges.info["skipped"])
    print(ev.round(3).to_string(index=False))
    return ev


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default="/work/runs/phd7_cur/records.csv", help="records.csv to train and score on")
    p.add_argument("--data-root", default=None, help="dataset root of file_name (default: from curation_report.json)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 32], help="judge resolutions to measure, px")
    p.add_argument("--out-dir", default=None, help="folder for the judges (judges<R>/ inside); default: a temporary folder")
    p.add_argument("--split", default="test", help="held-out split to score")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--attributes", nargs="+", default=None, help="attributes to judge (default: all annotated)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--backbone", default=None, help="`resnet`, `convnext` or a local checkpoint folder")
    p.add_argument("--embedding-size", type=int, default=None, help="scratch resnet: stem channels")
    p.add_argument("--hidden-sizes", type=int, nargs="+", default=None, help="scratch backbones: channels per stage")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="scratch backbones: blocks per stage")
    p.add_argument("--patch-size", type=int, default=None, help="scratch convnext: stem patch size")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    records = Path(a.records)
    if a.data_root is None and not (records.with_name("curation_report.json")).is_file():
        raise SystemExit(f"no curation_report.json beside {records}: pass --data-root")
    overrides = {k: v for k, v in dict(attributes=a.attributes, epochs=a.epochs, learning_rate=a.learning_rate,
                                       patience=a.patience, backbone=a.backbone, embedding_size=a.embedding_size,
                                       hidden_sizes=a.hidden_sizes, depths=a.depths, patch_size=a.patch_size).items()
                 if v is not None}
    try:  # every setting is checked before any judge trains
        cfgs = [JudgeConfig(resolution=r, seed=a.seed, num_threads=a.threads, progress=False, **overrides) for r in a.resolutions]
    except LesionGenError as e: p.error(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out_dir) if a.out_dir else Path(tmp)
        for cfg in cfgs: run(records, a.data_root, base / f"judges{cfg.resolution}", cfg, a.split)


if __name__ == "__main__": main()
