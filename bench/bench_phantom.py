"""Benchmark the phantom generator: images/s for rendering only, render + JPEG write, and write_phantom with workers.

Usage: python bench/bench_phantom.py [--n 1000] [--sizes 64 128] [--workers 2]
"""
import argparse, os, tempfile, time
from pathlib import Path

import numpy as np
from PIL import Image

from lesiongen.phantom import PhantomConfig, render_phantom, sample_lesions, write_phantom


def rate(fn, n: int) -> float:
    "Return n / seconds taken by `fn()`"
    t0 = time.perf_counter(); fn(); return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="images per measurement")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes, px")
    p.add_argument("--workers", type=int, default=2, help="processes for the parallel write_phantom row")
    a = p.parse_args()
    rows = []
    for size in a.sizes:
        cfg = PhantomConfig(n=a.n, size=size, seed=0)
        t0 = time.perf_counter(); truth = sample_lesions(cfg); t_sample = time.perf_counter() - t0
        specs = truth.to_dict("records")
        render_phantom(specs[0], size)  # warm the grid caches
        rows.append((size, "sample_lesions (table only)", a.n / t_sample))
        rows.append((size, "render only", rate(lambda: [render_phantom(s, size) for s in specs], a.n)))
        with tempfile.TemporaryDirectory() as d:
            def render_write():
                for k, s in enumerate(specs): Image.fromarray(render_phantom(s, size)).save(Path(d) / f"{k}.jpg", quality=95)
            rows.append((size, "render + JPEG write", rate(render_write, a.n)))
            rows.append((size, "write_phantom, 1 process", rate(lambda: write_phantom(Path(d) / "w0", cfg, progress=False), a.n)))
            if a.workers > 0:
                rows.append((size, f"write_phantom, {a.workers} workers",
                             rate(lambda: write_phantom(Path(d) / "w2", cfg, progress=False, n_workers=a.workers), a.n)))
    print(f"phantom benchmark: n={a.n} per row, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print(f"{'size':>5} | {'what':<30} | {'images/s':>9}")
    print("-" * 52)
    for size, what, r in rows: print(f"{size:>5} | {what:<30} | {r:>9.0f}")


if __name__ == "__main__":
    main()
