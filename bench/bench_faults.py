"""Soak: kill -9 every long stage many times, resume it, and compare with an uninterrupted run.

Each stage (curate, caption, train, generate) is run once uninterrupted as a reference, then again from scratch in
another folder with the same command and the same relative `--out`, SIGKILLed `--kills` times at seeded moments
and restarted after each kill, then run to the end. For train and generate the moments follow the progress (loss
rows, images): some in start-up, most after a seeded share of the work left plus part of one unit, i.e. in the
middle of steps, validation, checkpoint and image writes, and the last in the final publication. Curate, whose
output appears only at the end, and caption, whose lines come in a few chunks of 512 (fewer than the kills), are
killed at seeded moments of their run time. The table gives, per stage: kills, runs that ended before their kill
came, restarts after a kill that went on without error, whether the outputs are byte-for-byte those of the
reference (files of run-specific content excluded: `captions_summary.json`, which holds timings), whether every row
is there once (loss steps, images, captions), and temp files left.

Run: nice -n 15 python bench/bench_faults.py --kills 25 [--out DIR] [--stages curate caption train generate]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faults import KillReport, leftover_temps, lesiongen_cmd, tree_digest  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TINY_MODEL = {"block_out_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
              "attention_head_dim": 2, "norm_num_groups": 8}  # `model.CompactConfig.tiny()`'s architecture


def lines(f: Path, header: int = 0) -> int:
    "Complete lines in `f`, less `header`"
    return max(0, f.read_bytes().count(b"\n") - header) if f.is_file() else 0


def pngs(folder: Path) -> int:
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def reference(cmd: list[str], cwd: Path, progress, total: int|None) -> tuple[float, float, float]:
    """Run `cmd` in `cwd` uninterrupted; return its start-up (until `progress() > 0`), its working time and the time
    from reaching `total` progress to its end (publication), seconds"""
    cwd.mkdir(parents=True, exist_ok=True)
    t0, first, full = time.monotonic(), None, None
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    while p.poll() is None:
        n = progress()
        if first is None and n > 0: first = time.monotonic() - t0
        if full is None and total and n >= total: full = time.monotonic() - t0
        time.sleep(0.005)
    err = p.stderr.read().decode(errors="replace"); p.stderr.close()
    if p.returncode != 0: raise SystemExit(f"reference run failed: {' '.join(cmd)}\n{err[-3000:]}")
    end = time.monotonic() - t0
    first = first if first is not None else 0.2 * end  # no progress visible before the end (curate)
    return first, end - first, end - (full if full is not None else end)


def soak(cmd: list[str], cwd: Path, kills: int, seed: int, startup: float, work: float, tail: float, progress,
         total: int|None) -> KillReport:
    """SIGKILL `cmd` `kills` times, then run it to the end. A fifth of the runs (every run, for stages whose progress
    is not followed: `total` None) are killed at a seeded moment of start-up (of the whole run); the others once they have made a seeded
    share of the progress left (`progress()` of `total`), and a seeded part of one more unit, so that kills land between
    and inside the units of work (steps, checkpoints, chunks, lines) all along; the last one in the final publication
    (`tail` seconds after the last unit). A run that ends before its kill comes counts as an early exit; runs go on
    until `kills` kills have landed (at most 3 x `kills` runs)"""
    rng, rep, killed_before = random.Random(seed), KillReport(), False
    unit = work / total if total else None  # seconds per unit of progress in the reference run
    cwd.mkdir(parents=True, exist_ok=True)
    while rep.kills < kills and rep.kills + rep.early_exits < 3 * kills:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                             start_new_session=True)
        t0, start, last = time.monotonic(), progress(), rep.kills == kills - 1

        def wait(cond):
            while p.poll() is None and not cond(): time.sleep(0.005)
        if total is None or start >= total or (not last and rng.random() < 0.2):
            # in start-up; anywhere in the run without fine-grained progress to follow, or once the work is done
            at = rng.uniform(0.2, 1.0) * (startup + (work if total is None else tail if start >= total else 0))
            wait(lambda: time.monotonic() - t0 >= at)
        elif last:  # while the finished work is published
            wait(lambda: progress() >= total)
            at = time.monotonic() + rng.uniform(0, tail)
            wait(lambda: time.monotonic() >= at)
        else:  # after a share of the work left, then part of one more unit
            target = min(total, start + max(1, round(rng.uniform(0, 1) * (total - start) / (kills - rep.kills))))
            wait(lambda: progress() >= target)
            at = time.monotonic() + rng.uniform(0, unit)
            wait(lambda: time.monotonic() >= at)
        if p.poll() is None:
            try: os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError: pass  # it exited between the poll and the kill
        p.wait()
        if p.returncode == -signal.SIGKILL: rep.kills += 1
        else: rep.early_exits += 1
        err = p.stderr.read().decode(errors="replace"); p.stderr.close()
        rep.returncodes.append(p.returncode)
        if killed_before and p.returncode in (0, -signal.SIGKILL): rep.resumes_ok += 1
        if p.returncode not in (0, -signal.SIGKILL):
            rep.stderr_tail = "\n".join(err.strip().splitlines()[-5:]); return rep
        killed_before = p.returncode == -signal.SIGKILL
    done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, timeout=3600)
    rep.returncodes.append(done.returncode)
    if killed_before and done.returncode == 0: rep.resumes_ok += 1
    rep.stderr_tail = "\n".join(done.stderr.decode(errors="replace").strip().splitlines()[-5:])
    return rep


def same(ref: Path, got: Path, ignore: tuple = ()) -> bool:
    "Every file of `ref` and `got` equal byte for byte, none missing, none extra (`ignore`d files aside)"
    return ref.exists() and tree_digest(ref, ignore) == tree_digest(got, ignore)


def prepare(root: Path, phantom: Path|None) -> dict:
    "The inputs: a Derm7pt-layout phantom set to curate (`phantom`, else 1,500 images written here), a tiny training set"
    from lesiongen.data import curate
    from lesiongen.llm import caption_records
    from lesiongen.phantom import PhantomConfig, write_phantom
    if phantom is None:
        phantom = root / "inputs" / "d7"
        if not (phantom / "phantom_truth.csv").is_file():
            write_phantom(phantom, PhantomConfig(n=1500, size=64, seed=0, format="derm7pt"), progress=False)
    small = root / "inputs" / "small"
    if not (small / "cur" / "captions.jsonl").is_file():
        write_phantom(small / "raw", PhantomConfig(n=40, size=32, seed=0), progress=False)
        curate("ham10000", small / "raw", small / "cur")
        caption_records(small / "cur" / "records.csv", small / "cur" / "captions.jsonl", style="short", progress=False)
    (root / "inputs" / "model.json").write_text(json.dumps(TINY_MODEL))
    return dict(phantom=str(phantom), records=str(small / "cur" / "records.csv"),
                captions=str(small / "cur" / "captions.jsonl"), model_config=str(root / "inputs" / "model.json"))


def stages(root: Path, inp: dict, steps: int, images: int) -> dict:
    "name -> (command, output folder relative to the working folder, progress(cwd), total, files ignored)"
    cur_records = root / "curate" / "ref" / "cur" / "records.csv"  # the caption stage captions the curated set
    return {
        "curate": (lesiongen_cmd("curate", "--dataset", "derm7pt", "--root", inp["phantom"], "--out", "cur"),
                   "cur", lambda d: 0, None, ()),
        "caption": (lesiongen_cmd("caption", "--records", str(cur_records), "--out", "cap/captions.jsonl", "--style",
                                  "short", "--max-tokens", "77", "--quiet"),
                    "cap", lambda d: lines(d / "cap" / "captions.jsonl"), None, ("captions_summary.json",)),
        "train": (lesiongen_cmd("train", "--records", inp["records"], "--captions", inp["captions"], "--base", "compact",
                                "--model-config", inp["model_config"], "--out", "run", "--max-steps", str(steps),
                                "--batch-size", "4", "--checkpointing-steps", "2", "--checkpoints-total-limit", "2",
                                "--num-validation-images", "1", "--validation-prompt", "dermoscopy image of a melanoma",
                                "--validation-inference-steps", "2", "--num-threads", "1", "--no-progress",
                                "--resume", "latest"),
                  "run", lambda d: lines(d / "run" / "loss.csv", header=1), steps, ()),
        "generate": (lesiongen_cmd("generate", "--model", str(root / "train" / "ref" / "run"), "--records", inp["records"],
                                   "--plan", "empirical", "--n", str(images), "--steps", "4", "--batch-size", "4",
                                   "--num-threads", "1", "--quiet", "--out", "syn"),
                     "syn", lambda d: pngs(d / "syn" / "images"), images, ()),
    }


def check_rows(name: str, got: Path, steps: int, images: int) -> bool:
    "No duplicate and no missing row: loss steps 1..N, one metadata row per image, one caption per record"
    import pandas as pd
    if name == "train":
        return [int(l.split(",")[0]) for l in (got / "loss.csv").read_text().splitlines()[1:]] == list(range(1, steps + 1))
    if name == "generate":
        meta = pd.read_csv(got / "metadata.csv")
        return len(meta) == images and meta["file_name"].is_unique and pngs(got / "images") == images
    if name == "caption":
        ids = [json.loads(l)["image_id"] for l in (got / "captions.jsonl").read_text().splitlines()]
        return len(ids) == len(set(ids))
    return (got / "records.csv").is_file() and (got / "curation_report.json").is_file()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=25, help="SIGKILLs per stage (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="working folder (default: a new temp folder)")
    ap.add_argument("--phantom", help="a Derm7pt-layout dataset to curate (default: 1,500 phantom images written in --out)")
    ap.add_argument("--steps", type=int, default=40, help="training steps (default: %(default)s)")
    ap.add_argument("--images", type=int, default=96, help="generated images (default: %(default)s)")
    ap.add_argument("--stages", nargs="+", default=["curate", "caption", "train", "generate"])
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="bench_faults-")).resolve()
    inp = prepare(root, Path(a.phantom) if a.phantom else None)
    plan = stages(root, inp, a.steps, a.images)
    rows = []
    order = [s for s in ("curate", "caption", "train", "generate") if s in a.stages]
    for name in order:  # caption needs curate's reference output, generate train's
        cmd, out, progress, total, ignore = plan[name]
        ref, got = root / name / "ref", root / name / "killed"
        t0 = time.monotonic()
        timing = root / name / "timing.json"
        if not (ref / out).exists() or leftover_temps(ref) or not timing.is_file() or "tail" not in json.loads(timing.read_text()):
            shutil.rmtree(ref, ignore_errors=True)
            startup, work, tail = reference(cmd, ref, lambda: progress(ref), total)
            timing.write_text(json.dumps({"startup": startup, "work": work, "tail": tail}))
        else:
            startup, work, tail = (json.loads(timing.read_text())[k] for k in ("startup", "work", "tail"))
        shutil.rmtree(got, ignore_errors=True)
        rep = soak(cmd, got, a.kills, a.seed, startup, work, tail, lambda: progress(got), total)
        ok = rep.returncodes[-1] == 0
        row = dict(stage=name, kills=rep.kills, early_exits=rep.early_exits, resumes_ok=rep.resumes_ok,
                   final_run_ok=ok, identical=ok and same(ref / out, got / out, ignore),
                   rows_ok=ok and check_rows(name, got / out, a.steps, a.images),
                   temps_left=len(leftover_temps(got)), startup_s=round(startup, 1), work_s=round(work, 1),
                   seconds=round(time.monotonic() - t0))
        rows.append(row)
        print(json.dumps(row) + ("" if ok else f"\n  last run failed:\n{rep.stderr_tail}"), flush=True)
    with open(root / "bench_faults.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    print(f"\n{'stage':<9} {'kills':>5} {'early exits':>11} {'resumes ok':>10} {'identical':>9} {'rows ok':>7} "
          f"{'temps left':>10} {'seconds':>7}")
    for r in rows:
        print(f"{r['stage']:<9} {r['kills']:>5} {r['early_exits']:>11} {r['resumes_ok']:>10} {str(r['identical']):>9} "
              f"{str(r['rows_ok']):>7} {r['temps_left']:>10} {r['seconds']:>7}")
    print(f"\n(working folder: {root})")
