"""Crash safety of the caption stage: `lesiongen caption` (template captions, and LLM reports from a loopback
OpenAI-compatible server) is SIGKILLed at seeded moments and resumed; it must end byte-for-byte where an uninterrupted
run ends, with no temp file left, no duplicate and no missing caption. Kill times fall inside the stretch of an
uninterrupted run during which it writes captions, so the kills land mid-run. Two fast in-process tests cover what a
kill leaves behind (torn last lines, temp files of atomic writes) and the final record order. About 40 s in all on a
busy 2-core machine (about 23 s of CPU)."""
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from faults import leftover_temps, lesiongen_cmd, run_with_kills, tree_digest
from lesiongen import captions
from lesiongen.core import DERM7PT_CONCEPTS, DX_NAMES, RECORD_COLUMNS, seven_point_score
from lesiongen.llm import LLMConfig, LocalChatServer, build_messages, caption_records, read_captions

RUN_SPECIFIC = ("captions_summary.json",      # seconds, skipped/written counts: differ between runs by design
                "captions_failures.jsonl")   # compared without its `time` field


def toy_records(n, seed=0):
    "`n` Derm7pt-like records with every concept known, so short captions need fitting to 77 CLIP tokens"
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        dx = list(DX_NAMES)[i % len(DX_NAMES)]
        concepts = {k: rng.choice(v) for k, v in DERM7PT_CONCEPTS.items()}
        rows.append({"image_id": f"IMG_{i:05d}", "lesion_id": f"L{i}", "file_name": f"images/{i}.jpg",
                     "dataset": "toy", "dx": dx, "diagnosis": DX_NAMES[dx], "split": "train",
                     "age": float(rng.choice([25, 45, 70])), "sex": rng.choice(["female", "male"]),
                     "site": rng.choice(["back", "face", "lower extremity"]), "fitzpatrick": rng.randint(1, 6),
                     "fitzpatrick_source": "estimated", "ita": 10.0, **concepts,
                     "seven_point_score": seven_point_score(concepts), "elevation": rng.choice(["flat", "palpable"])})
    return pd.DataFrame(rows)[list(RECORD_COLUMNS)]


def run_once(cmd, out: Path) -> tuple[float, float]:
    "Run `cmd` uninterrupted; return when it started writing `out` and when it ended, seconds after its start"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0, first = time.monotonic(), None
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    while p.poll() is None:
        if first is None and out.exists(): first = time.monotonic() - t0
        time.sleep(0.01)
    assert p.returncode == 0, p.stderr.read().decode()[-2000:]
    p.stderr.close()
    end = time.monotonic() - t0
    return (first if first is not None else end), end


def killed_run(cmd, out: Path, kills: int, seed: int, window: tuple[float, float], tries: int = 3):
    """SIGKILL `cmd` `kills` times at seeded moments inside the writing `window` of an uninterrupted run, then run it
    to the end. On a busy machine run times vary, so a try whose first run was not killed after it had written
    something (it finished first, or every kill hit the start-up) is repeated from scratch with the next seed."""
    first, end = window
    for t in range(tries):
        shutil.rmtree(out, ignore_errors=True)
        rep = run_with_kills(cmd, kills=kills, seed=seed + t, min_s=first + 0.1 * (end - first),
                             max_s=first + 0.9 * (end - first))
        assert rep.returncodes[-1] == 0, rep.stderr_tail
        assert rep.resumes_ok == rep.returncodes.count(-9), rep  # every run after a kill started cleanly
        summary = json.loads((out / "captions_summary.json").read_text())
        if rep.returncodes[0] == -9 and summary["n_skipped"] > 0: return rep
    pytest.fail(f"no kill landed while captions were being written in {tries} tries: {rep}")


def assert_same(ref: Path, got: Path, records):
    "`got` holds exactly the files of `ref`, byte for byte; no temps; one caption per record"
    assert leftover_temps(got) == [] and leftover_temps(ref) == []
    a, b = tree_digest(ref, ignore=RUN_SPECIFIC), tree_digest(got, ignore=RUN_SPECIFIC)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"differ after kills: {differ}"
    cap = read_captions(got / "captions.jsonl", records=records)  # refuses duplicates, missing and stale rows
    assert len(cap) == len(pd.read_csv(records))
    fa, fb = ([{k: v for k, v in json.loads(l).items() if k != "time"} for l in (d / "captions_failures.jsonl").read_text().splitlines()]
              if (d / "captions_failures.jsonl").exists() else None for d in (ref, got))
    assert fa == fb
    sa, sb = (json.loads((d / "captions_summary.json").read_text()) for d in (ref, got))
    for k in ("style", "model", "n_records", "research_use"):
        assert sa[k] == sb[k], k


def test_template_captions_survive_kill9(tmp_path):
    toy_records(2000).to_csv(tmp_path / "records.csv", index=False)
    cmd = lambda out: lesiongen_cmd("caption", "--records", str(tmp_path / "records.csv"), "--out",
                                    str(tmp_path / out / "captions.jsonl"), "--style", "short", "--max-tokens", "77",
                                    "--quiet")
    window = run_once(cmd("ref"), tmp_path / "ref" / "captions.jsonl")
    killed_run(cmd("killed"), tmp_path / "killed", kills=2, seed=0, window=window)
    assert_same(tmp_path / "ref", tmp_path / "killed", tmp_path / "records.csv")


OTHER_DX = {"mel": "nv", "nv": "mel", "bcc": "bkl", "bkl": "bcc", "akiec": "bcc", "df": "nv", "vasc": "mel", "misc": "mel"}


def stub_llm(records, delay):
    """A loopback server that answers from the prompt and seed alone (so a resumed run gets what an uninterrupted one
    got): the right report, except a wrong first sample for every 4th record (accepted on re-sample) and wrong samples
    only for every 5th (template fallback)"""
    right, wrong = {}, {}
    for i, (_, r) in enumerate(records.iterrows()):
        f = captions.record_facts(r)
        p = build_messages(f)[1]["content"]
        o = OTHER_DX[f["dx"]]
        right[p] = (i, captions.report_caption(f))
        wrong[p] = captions.report_caption({**f, "dx": o, "diagnosis": DX_NAMES[o]})

    def respond(body, headers):
        p = body["messages"][1]["content"]
        i, good = right[p]
        return wrong[p] if i % 5 == 0 or (i % 4 == 0 and body["seed"] == 0) else good
    return LocalChatServer(respond, delay=delay)


def test_llm_captions_survive_kill9(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    recs = toy_records(100, seed=1)
    recs.to_csv(tmp_path / "records.csv", index=False)
    with stub_llm(pd.read_csv(tmp_path / "records.csv"), delay=0.02) as srv:
        cmd = lambda out: lesiongen_cmd("caption", "--records", str(tmp_path / "records.csv"), "--out",
                                        str(tmp_path / out / "captions.jsonl"), "--style", "llm", "--backend", "openai",
                                        "--model", "loopback", "--base-url", srv.base_url, "--workers", "2",
                                        "--max-attempts", "2", "--max-retries", "1", "--timeout", "10", "--quiet")
        window = run_once(cmd("ref"), tmp_path / "ref" / "captions.jsonl")
        killed_run(cmd("killed"), tmp_path / "killed", kills=2, seed=1, window=window)
    ref, got = tmp_path / "ref", tmp_path / "killed"
    assert_same(ref, got, tmp_path / "records.csv")
    lines = [json.loads(l) for l in (got / "captions.jsonl").read_text().splitlines()]
    assert {l["source"] for l in lines} == {"llm", "fallback"}
    assert [l["image_id"] for l in lines] == list(recs.image_id), "captions are not in record order"
    assert sum(l["attempts"] == 2 and l["source"] == "llm" for l in lines) > 0
    fails = [json.loads(l) for l in (got / "captions_failures.jsonl").read_text().splitlines()]
    assert [f["image_id"] for f in fails] == [l["image_id"] for l in lines if l["source"] == "fallback"]


# ---------------------------------------------------------------- what a killed run leaves behind, in-process

def stub_run(records, out, srv, workers=2):
    return caption_records(records, out, style="llm", backend="openai", model="loopback", base_url=srv.base_url,
                           workers=workers, config=LLMConfig(max_attempts=2, max_retries=0, timeout=5), progress=False)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_leftovers_of_a_killed_run_are_repaired(tmp_path, no_env):
    "Torn last lines (captions and failures) and temp files of interrupted atomic writes: the next run repairs them"
    recs = toy_records(12, seed=3)
    with stub_llm(recs, delay=0) as srv:
        stub_run(recs, tmp_path / "ref" / "captions.jsonl", srv)
        out = tmp_path / "run"
        out.mkdir()
        ref_lines = (tmp_path / "ref" / "captions.jsonl").read_bytes().splitlines(keepends=True)
        (out / "captions.jsonl").write_bytes(b"".join(ref_lines[:5]) + ref_lines[5][:40])  # killed inside a write
        fail_lines = (tmp_path / "ref" / "captions_failures.jsonl").read_bytes().splitlines(keepends=True)
        (out / "captions_failures.jsonl").write_bytes(fail_lines[0] + fail_lines[1][:30])
        for t in (".captions.jsonl.x1y2.tmp", ".captions_summary.json.a8b9.tmp", ".captions_failures.jsonl.q.tmp"):
            (out / t).write_bytes(b"half a file")  # killed inside atomic_write_bytes
        s = stub_run(recs, out / "captions.jsonl", srv)
    assert s["n_skipped"] == 5 and leftover_temps(out) == []
    assert_same(tmp_path / "ref", out, recs_csv(recs, tmp_path))


def test_lines_end_in_record_order_and_failures_once(tmp_path, no_env):
    "Concurrent requests finish in any order; the finished file is in record order, with one failure per fallback"
    recs = toy_records(10, seed=4)
    slow_first = stub_llm(recs, delay=0)
    respond = slow_first.respond
    order = {build_messages(captions.record_facts(r))[1]["content"]: i for i, (_, r) in enumerate(recs.iterrows())}
    slow_first.respond = lambda body, headers: (time.sleep(0.02 * (10 - order[body["messages"][1]["content"]])),
                                                respond(body, headers))[1]  # later records answer first
    out = tmp_path / "captions.jsonl"
    with slow_first as srv:
        stub_run(recs, out, srv, workers=4)
        fails = out.with_name("captions_failures.jsonl")
        first = fails.read_bytes().splitlines(keepends=True)
        llm_row = next(l for l in out.read_text().splitlines() if json.loads(l)["source"] == "llm")
        stray = json.dumps({"image_id": json.loads(llm_row)["image_id"], "kind": "transport", "reason": "old"}) + "\n"
        fails.write_bytes(b"".join(first) + first[0] + stray.encode())  # a failure twice, one for a row now fine
        s = stub_run(recs, out, srv, workers=4)
    assert s["n_written"] == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["image_id"] for l in lines] == list(recs.image_id)
    assert fails.read_bytes().splitlines(keepends=True) == first
    assert [json.loads(f)["image_id"] for f in first] == [l["image_id"] for l in lines if l["source"] == "fallback"]


def recs_csv(recs, folder):
    recs.to_csv(folder / "records.csv", index=False)
    return folder / "records.csv"
