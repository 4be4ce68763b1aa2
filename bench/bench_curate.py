"""Benchmark HAM10000 curation on placeholder images.

Writes N placeholder JPEGs (skin with a dark central disc) in the HAM10000 layout into a temporary folder,
then times `lesiongen.data.load_ham10000` with and without skin-tone estimation and prints rows per second.

    python bench/bench_curate.py            # N=2000, 64x64 images, best of 3 repeats
    python bench/bench_curate.py --n 10015 --size 600
"""
from __future__ import annotations
import argparse, os, tempfile, time
from pathlib import Path

import numpy as np
import pandas as pd

from lesiongen.data import load_ham10000, write_placeholder_images

DX = {"nv": 0.67, "mel": 0.11, "bkl": 0.11, "bcc": 0.05, "akiec": 0.03, "vasc": 0.015, "df": 0.015}

def make_ham(root: Path, n: int, size: int, seed: int = 0) -> Path:
    "Write `n` placeholder images and a HAM10000 metadata table (about 1.34 images per lesion) into `root`"
    rng = np.random.default_rng(seed)
    lesion = np.sort(rng.integers(0, int(n / 1.34), n))
    dx_of_lesion = rng.choice(list(DX), lesion.max() + 1, p=np.array(list(DX.values())) / sum(DX.values()))
    meta = pd.DataFrame({"lesion_id": [f"HAM_{l:07d}" for l in lesion], "image_id": [f"ISIC_{i:07d}" for i in range(n)],
                         "dx": dx_of_lesion[lesion], "dx_type": "histo", "age": rng.integers(5, 90, n).astype(float),
                         "sex": rng.choice(["male", "female", "unknown"], n), "localization": "back"})
    meta.to_csv(root/"HAM10000_metadata.csv", index=False)
    half = n // 2
    for part, ids in (("HAM10000_images_part_1", meta["image_id"][:half]), ("HAM10000_images_part_2", meta["image_id"][half:])):
        write_placeholder_images(root/part, [f"{i}.jpg" for i in ids], size=size, lesion=(90, 60, 50))
    return root

def time_it(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    return best

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image side, pixels")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter(); root = make_ham(Path(d), a.n, a.size)
        print(f"wrote {a.n} placeholder {a.size}x{a.size} JPEGs in {time.perf_counter() - t0:.2f} s "
              f"({os.cpu_count()} CPUs)\n")
        rows = []
        for est in (False, True):
            t = time_it(lambda: load_ham10000(root, estimate_skin_tone=est), a.repeats)
            rows.append((f"load_ham10000(estimate_skin_tone={est})", t, a.n / t))
        w = max(len(r[0]) for r in rows)
        print(f"{'call':<{w}}  {'seconds':>8}  {'rows/s':>8}")
        for name, t, rps in rows: print(f"{name:<{w}}  {t:8.2f}  {rps:8.0f}")

if __name__ == "__main__": main()
