"""Crash safety of `lesiongen phantom` and `lesiongen curate` (issue 8).

Each stage runs as a subprocess, is SIGKILLed at seeded random moments and re-run until a run finishes
(`faults.run_with_kills`); the result must be byte-for-byte the output of an uninterrupted run (`faults.tree_digest`),
with no temp file left (`faults.leftover_temps`). Kill times fall between the start-up time of the stage (measured as a
run with nothing left to do) and the length of the uninterrupted run, so most kills land while images or tables are
being written. The whole module takes 25–40 s on a busy 2-core machine.
"""
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from faults import leftover_temps, lesiongen_cmd, run_with_kills, tree_digest

PHANTOM = ("phantom", "--n", "400", "--size", "32", "--format", "derm7pt", "--seed", "5", "--quiet")


def timed(cmd: list[str]) -> float:
    "Run `cmd` to completion (it must succeed); return its wall time in seconds"
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "An uninterrupted phantom and its curation, with the times of a full run and of a run with nothing left to do"
    d = tmp_path_factory.mktemp("reference")
    t_phantom = timed(lesiongen_cmd(*PHANTOM, "--out", str(d / "ph")))
    t_phantom_idle = timed(lesiongen_cmd(*PHANTOM, "--out", str(d / "ph")))  # a resume that finds every image
    curate = ("curate", "--dataset", "derm7pt", "--root", str(d / "ph"))
    t_curate = min(timed(lesiongen_cmd(*curate, "--out", str(d / "cur"))) for _ in range(2))  # the 2nd run is warm
    return {"root": d / "ph", "curated": d / "cur", "curate": curate,
            "t_phantom": t_phantom, "t_phantom_idle": t_phantom_idle, "t_curate": t_curate}


def test_phantom_survives_kills(reference, tmp_path):
    out = tmp_path / "ph"
    kills, start = 4, reference["t_phantom_idle"]  # start-up, sampling and metadata: the time of a run with no image left
    work = max(reference["t_phantom"] - start, 0.5)
    # each run gets at most 1/kills of the rendering time before its kill, so every kill still finds images to write
    rep = run_with_kills(lesiongen_cmd(*PHANTOM, "--out", str(out)), kills=kills, seed=8,
                         min_s=0.9 * start, max_s=start + work / kills)
    assert rep.returncodes[-1] == 0, rep.stderr_tail
    assert rep.kills >= 2, rep  # the kills landed while the stage was running
    assert rep.resumes_ok == rep.kills, rep  # every run after a kill started, and went on or finished
    assert leftover_temps(out) == []
    assert tree_digest(out) == tree_digest(reference["root"])
    meta = pd.read_csv(out / "meta" / "meta.csv")
    assert meta["case_num"].tolist() == list(range(1, 401))  # no duplicate or missing row
    idx = sorted(i for s in ("train", "valid", "test") for i in pd.read_csv(out / "meta" / f"{s}_indexes.csv")["indexes"])
    assert idx == list(range(400))
    # the killed folder belongs to its settings: a run with others is refused with one line, not a traceback
    p = subprocess.run(lesiongen_cmd(*PHANTOM[:-2], "6", "--quiet", "--out", str(out)), capture_output=True, text=True)
    assert p.returncode == 2 and "other settings (seed 5 there, 6 now)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_curate_survives_kills(reference, tmp_path):
    out = tmp_path / "cur"
    rep = run_with_kills(lesiongen_cmd(*reference["curate"], "--out", str(out)), kills=3, seed=3,
                         min_s=0.3 * reference["t_curate"], max_s=0.9 * reference["t_curate"])
    assert rep.returncodes[-1] == 0, rep.stderr_tail
    assert rep.kills >= 1, rep
    assert leftover_temps(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["curation_report.json", "records.csv"]
    assert tree_digest(out) == tree_digest(reference["curated"])
