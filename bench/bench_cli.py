"""Benchmark: how fast `lesiongen --help` and `import lesiongen` answer (target: under 2 s).

Run: python bench/bench_cli.py
"""
import statistics
import subprocess
import sys
import time
from pathlib import Path

LESIONGEN = str(Path(sys.executable).parent / "lesiongen")


def timed(cmd, repeats=5):
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), max(ts)


if __name__ == "__main__":
    rows = [("lesiongen --help", *timed([LESIONGEN, "--help"])),
            ("python -c 'import lesiongen.cli'", *timed([sys.executable, "-c", "import lesiongen.cli"])),
            ("python -c 'import lesiongen.data'", *timed([sys.executable, "-c", "import lesiongen.data"]))]
    print(f"{'command':<36} {'median s':>9} {'max s':>7}")
    for name, med, mx in rows:
        print(f"{name:<36} {med:>9.3f} {mx:>7.3f}")
