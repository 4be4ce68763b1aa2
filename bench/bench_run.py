"""`lesiongen run --preset quick` stage by stage: wall-clock minutes, CPU minutes and peak RSS of each stage, against
the README's targets (the whole run <= 10 minutes and <= 4 GB peak RSS on 2 cores).

Each stage runs as its own process, `lesiongen run --preset quick --out DIR --until STAGE` (earlier stages are reused),
so its peak RSS is its own (`os.wait4`, the numbers `/usr/bin/time -v` prints). The sum slightly overstates one
`lesiongen run` (each process imports the libraries again, a few seconds). CPU minutes (user + system) are printed
beside wall-clock minutes: on a shared machine the wall clock measures the other jobs too; the load average before
and after is printed for that reason. A stage already finished in DIR is reported as reused (run with --fresh).

Usage: python bench/bench_run.py [--out DIR] [--fresh] [--threads N] [--preset quick]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

from lesiongen.cli import STAGES
from lesiongen.core import RESEARCH_ONLY

TARGET_MIN, TARGET_GB = 10, 4


def run_stage(out: Path, stage: str, preset: str, threads: int|None) -> dict:
    "Run `lesiongen run` up to `stage` in its own process; return its wall and CPU minutes, peak RSS and summary line"
    cmd = [str(Path(sys.executable).parent / "lesiongen"), "run", "--preset", preset, "--out", str(out), "--until", stage, "--quiet"]
    if threads: cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        _, status, ru = os.wait4(proc.pid, 0)  # this child's own rusage: peak RSS and CPU time
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0); fe.seek(0); stdout, stderr = fo.read(), fe.read()
    wall = (time.perf_counter() - t0) / 60
    if proc.returncode != 0: sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    line = next((l for l in stdout.splitlines() if l.startswith(f"{stage}: ")), "")
    return dict(stage=stage, wall_min=wall, cpu_min=(ru.ru_utime + ru.ru_stime) / 60, peak_gb=ru.ru_maxrss / 2**20,
                reused="; reused (" in line, summary=line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out/run_quick"))
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--threads", type=int, help="torch threads of the heavy stages (default: torch's)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first: measure every stage")
    a = ap.parse_args()
    if a.fresh and a.out.exists(): shutil.rmtree(a.out)
    load0 = os.getloadavg()
    rows = []
    for stage in STAGES:
        r = run_stage(a.out, stage, a.preset, a.threads)
        rows.append(r)
        print(f"{stage}: {r['wall_min']:.2f} min wall, {r['cpu_min']:.2f} min CPU, {r['peak_gb']:.2f} GB{' (reused)' if r['reused'] else ''}",
              flush=True)
    load1 = os.getloadavg()
    print(f"\n| stage | minutes (wall) | minutes (CPU) | peak RSS, GB | summary |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']}{' (reused)' if r['reused'] else ''} | {r['wall_min']:.2f} | {r['cpu_min']:.2f} | {r['peak_gb']:.2f} | "
              f"{r['summary'].split(': ', 1)[-1].rsplit(';', 1)[0]} |")
    wall, cpu, peak = sum(r["wall_min"] for r in rows), sum(r["cpu_min"] for r in rows), max(r["peak_gb"] for r in rows)
    print(f"| total | {wall:.2f} | {cpu:.2f} | {peak:.2f} | target <= {TARGET_MIN} min, <= {TARGET_GB} GB: "
          f"wall {'met' if wall <= TARGET_MIN else 'NOT met'}, memory {'met' if peak <= TARGET_GB else 'NOT met'} |")
    print(f"\nload average (1 min) {load0[0]:.1f} before, {load1[0]:.1f} after, on {os.cpu_count()} CPU(s): "
          "above the CPU count, the wall clock also measures other jobs")
    res = a.out / "results.json"
    if res.is_file():
        from lesiongen.cli import format_effect
        print("\nwhat the run shows (resolved: the 95% intervals do not overlap):")
        for e in json.loads(res.read_text())["effects"]: print(f"  {format_effect(e)}")
    print(RESEARCH_ONLY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
