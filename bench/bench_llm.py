"""Benchmark LLM-assisted reports on this machine: SmolLM2-135M offline per mode (acceptance, failure reasons,
diversity against the templates, tokens/s, captions/min) on phantom Derm7pt records and real HAM10000 metadata rows,
and the OpenAI-compatible path over loopback HTTP (captions/s with 1 vs 4 workers against a server with fixed latency).

Run: python bench/bench_llm.py [--n-smol 5] [--modes per-entry+json+facts,per-entry+json,whole+json+facts] [--n-http 80]
     [--latency 0.02] [--skip-smol]
A `+facts` mode forces each value's fact words with the grammar (`force_facts`); the model only continues after them, so
diversity is reported both for the kept reports and for the model's own words (`model_words`, the continuations).
"""
import argparse
import math
import os
import random
import tempfile
import time
from pathlib import Path

import pandas as pd

from lesiongen import captions
from lesiongen.core import DERM7PT_CONCEPTS, DX_NAMES, RECORD_COLUMNS
from lesiongen.llm import (LLMConfig, LocalChatServer, TransformersBackend, build_messages, caption_diversity, caption_records,
                           model_words, report_bodies, summarize_outcomes, write_report)

HAM_CSV = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ham10000_metadata_subset.csv"


def toy_records(n, seed=0):
    "`n` records in the `RECORD_COLUMNS` schema, cycling through the diagnoses, some facts missing"
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        dx = list(DX_NAMES)[i % len(DX_NAMES)]
        concepts = {k: rng.choice(v) if rng.random() > 0.2 else None for k, v in DERM7PT_CONCEPTS.items()}
        rows.append({"image_id": f"B{seed}_{i:05d}", "lesion_id": f"L{i}", "file_name": f"{i}.jpg", "dataset": "bench",
                     "dx": dx, "diagnosis": DX_NAMES[dx], "split": "train",
                     "age": float(rng.choice([30, 45, 70])) if i % 4 else math.nan,
                     "sex": rng.choice(["female", "male", None]), "site": rng.choice(["back", "face", None]),
                     "fitzpatrick": rng.randint(1, 6), "fitzpatrick_source": "ita", "ita": 10.0, **concepts,
                     "seven_point_score": None, "elevation": None})
    return pd.DataFrame(rows)[list(RECORD_COLUMNS)]


def bench_smol(n, max_new_tokens):
    recs = toy_records(n, seed=1)
    t0 = time.perf_counter()
    be = TransformersBackend("smollm2", max_new_tokens=max_new_tokens).load()
    load = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        s = caption_records(recs, Path(d) / "c.jsonl", style="llm", backend=be, progress=False,
                            config=LLMConfig(max_new_tokens=max_new_tokens, max_attempts=1, temperature=0.3))
    return load, s


def mode_config(spec, max_new_tokens):
    "`per-entry+json+facts`, `per-entry+json`, `per-entry`, `whole+json+facts`, `whole+json` or `whole` -> an LLMConfig"
    mode, *fmt = spec.split("+")
    if mode not in ("per-entry", "whole") or not set(fmt) <= {"json", "facts"} or ("facts" in fmt and "json" not in fmt):
        raise SystemExit(f"--modes: unknown mode {spec!r}; use e.g. per-entry+json+facts, per-entry+json, whole+json, whole")
    facts = "facts" in fmt
    return LLMConfig(mode=mode, constrained="json" in fmt, force_facts=facts, temperature=0.7 if facts else 0.3,
                     max_new_tokens=max(max_new_tokens, 400) if facts and mode == "whole" else max_new_tokens,
                     max_attempts=(3 if facts else 4) if mode == "per-entry" else 1)


def bench_modes(n, specs, max_new_tokens, torch_threads=1):
    "SmolLM2 per mode on `n` phantom Derm7pt records and `n` HAM10000 rows: acceptance, reasons, diversity, speed"
    import torch
    from lesiongen.phantom import PhantomConfig, sample_lesions
    torch.set_num_threads(torch_threads)
    d7p = [captions.record_facts(r) for _, r in sample_lesions(PhantomConfig(n=n, format="derm7pt", seed=5)).iterrows()]
    ham = pd.read_csv(HAM_CSV).rename(columns={"localization": "site"}).sample(n, random_state=0)
    ham = [captions.record_facts(r) for _, r in ham.iterrows()]
    be = TransformersBackend("smollm2").load()
    rows = []
    for name, facts in (("derm7pt-phantom", d7p), ("ham10000-rows", ham)):
        for spec in specs:
            be.stats.update(calls=0, completion_tokens=0, seconds=0.0)
            t0 = time.perf_counter()
            outs = [write_report(f, be, seed=i, config=mode_config(spec, max_new_tokens)) for i, f in enumerate(facts)]
            secs = time.perf_counter() - t0
            s = summarize_outcomes(outs)
            ok = [i for i, o in enumerate(outs) if o.source == "llm"]
            d_llm = caption_diversity([report_bodies(outs[i].text) for i in ok]) if len(ok) > 1 else {}
            d_tpl = caption_diversity([report_bodies(captions.report_caption(facts[i])) for i in ok]) if len(ok) > 1 else {}
            d_own = caption_diversity([model_words(outs[i]) for i in ok]) if len(ok) > 1 else {}
            rows.append({"records": name, "mode": spec, "n": len(facts), "accepted": s["accepted"], "retried": s["retried"],
                         "fallback": s["fallback"], "tokens/s": round(be.stats["completion_tokens"] / max(be.stats["seconds"], 1e-9), 1),
                         "captions/min": round(60 * len(facts) / secs, 2),
                         "distinct-2 llm/own/tpl": "/".join(f"{d.get('distinct_2', float('nan')):.3f}" for d in (d_llm, d_own, d_tpl)),
                         "self-BLEU llm/own/tpl": "/".join(f"{d.get('self_bleu', float('nan')):.3f}" for d in (d_llm, d_own, d_tpl)),
                         "problems": ", ".join(f"{k} {v}" for k, v in list(s["sample_problems"].items())[:3])})
    return rows


def bench_http(n, latency, workers):
    recs = toy_records(n, seed=2)
    answers = {build_messages(f)[1]["content"]: captions.report_caption(f)
               for f in (captions.record_facts(r) for _, r in recs.iterrows())}
    with LocalChatServer(lambda body, headers: answers[body["messages"][1]["content"]], delay=latency) as srv, \
            tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = caption_records(recs, Path(d) / "c.jsonl", style="llm", backend="openai", model="bench",
                            base_url=srv.base_url, workers=workers, config=LLMConfig(timeout=10), progress=False)
        secs = time.perf_counter() - t0
        assert s["by_source"]["llm"] == n, s
        return n / secs, srv.max_in_flight


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-smol", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--n-http", type=int, default=80)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--skip-smol", action="store_true")
    ap.add_argument("--modes", default="", help="comma-separated SmolLM2 modes to measure: per-entry+json+facts, per-entry+json, per-entry, whole+json+facts, whole+json, whole")
    a = ap.parse_args()
    os.environ.pop("OPENAI_API_KEY", None)  # the loopback server needs none
    import torch
    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, load average: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = []
    for w in (1, 4):
        rate, inflight = bench_http(a.n_http, a.latency, w)
        rows.append((f"loopback HTTP, {a.latency * 1000:.0f} ms latency, workers={w}", f"{rate:.1f} captions/s",
                     f"max in flight {inflight}, n={a.n_http}"))
    if not a.skip_smol:
        load, s = bench_smol(a.n_smol, a.max_new_tokens)
        rows.append(("SmolLM2-135M Q4_1 offline, CPU", f"{s['per_minute']:.2f} reports/min",
                     f"load {load:.0f} s, n={a.n_smol}, max_new_tokens={a.max_new_tokens}, "
                     f"accepted {s['llm']['accepted']}/{a.n_smol}"))
    if a.modes and not a.skip_smol:
        print(pd.DataFrame(bench_modes(a.n_smol, a.modes.split(","), a.max_new_tokens)).to_string(index=False))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'what':<{w0}}  {'throughput':>{w1}}  notes")
    for name, rate, note in rows:
        print(f"{name:<{w0}}  {rate:>{w1}}  {note}")
