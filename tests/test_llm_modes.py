"""Per-entry and constrained LLM reports: assembly, reply handling (valid, invalid, false, truncated), the JSON schema
sent to an OpenAI-compatible server, the builtin grammar, and the diversity measures."""
import json
import random
import re

import pytest

from lesiongen import captions
from lesiongen.llm import (DIAGNOSIS_KEY, NOT_ASSESSED, JsonObjectLogits, LLMConfig, LocalChatServer, OpenAIBackend,
                           ReplyFormatError, assemble_report, build_entry_messages, caption_diversity, entry_facts,
                           parse_json_reply, report_schema, write_entries, write_report)

FACTS = {"dx": "mel", "diagnosis": "melanoma", "fitzpatrick": 3, "fitzpatrick_source": "estimated", "age": 55,
         "sex": "female", "site": "back", "pigment_network": "atypical", "streaks": "absent", "pigmentation": "absent",
         "regression_structures": "absent", "dots_and_globules": "irregular", "blue_whitish_veil": "present",
         "vascular_structures": "absent", "seven_point_score": 6, "elevation": "flat", "colors": "light brown;dark brown;black",
         "diameter": 0.5, "asymmetry": 0.8, "border_irregularity": 0.8, "border_sharpness": 0.8, "heterogeneity": 0.8,
         "milia_cysts": False}


def findings_of(messages):
    "The bullet findings of the last user message"
    return [l[2:] for l in messages[-1]["content"].splitlines() if l.startswith("- ")]


def entry_of(messages):
    return re.search(r'Entry "([^"]+)"', messages[-1]["content"]).group(1)


class EchoEntries:
    "A backend that restates each entry's findings (JSON when a schema is given); `plan` overrides replies per entry"
    sequential = True
    name = "echo"

    def __init__(self, plan=None):
        self.plan, self.calls = {k: list(v) for k, v in (plan or {}).items()}, []

    def generate(self, messages, *, seed=0, temperature=None, max_new_tokens=None, json_schema=None):
        entry = entry_of(messages)
        self.calls.append((entry, json_schema))
        if self.plan.get(entry): return self.plan[entry].pop(0)
        text = "; ".join(findings_of(messages))
        return json.dumps({entry: text}) if json_schema else text


def test_assembly_gives_the_schema_entries_in_order():
    text = assemble_report(FACTS, {"texture": "mottled and heterogeneous"})
    assert list(captions.parse_report(text)) == ["diagnosis", *captions.SCHEMA]
    assert captions.parse_report(text)["patient info"] == NOT_ASSESSED
    for constrained in (False, True):
        be = EchoEntries()
        o = write_entries(FACTS, be, config=LLMConfig(mode="per-entry", constrained=constrained))
        assert o.source == "llm" and o.attempts == 1, o.reason
        assert list(captions.parse_report(o.text)) == ["diagnosis", *captions.SCHEMA]
        assert captions.check_report(o.text, FACTS).ok
        assert all((s is not None) == constrained for _, s in be.calls)


def test_entries_without_facts_are_not_asked():
    f = {"dx": "nv", "age": 40, "sex": "male", "site": "back"}  # HAM10000-like: no concepts or descriptors
    be = EchoEntries()
    o = write_entries(f, be, config=LLMConfig(mode="per-entry"))
    assert [e for e, _ in be.calls] == ["patient info"] and o.source == "llm"
    assert captions.parse_report(o.text)["texture"] == NOT_ASSESSED


def test_entry_prompt_holds_that_entry_facts_only():
    msgs = build_entry_messages(FACTS, "texture")
    assert findings_of(msgs) == [entry_facts(FACTS)["texture"]]
    assert "melanoma" not in msgs[-1]["content"] and "back" not in msgs[-1]["content"]
    with pytest.raises(Exception, match="no fact"): build_entry_messages({"dx": "nv"}, "texture")


@pytest.mark.parametrize("constrained", [False, True])
def test_valid_invalid_false_and_truncated_replies(constrained):
    cfg = LLMConfig(mode="per-entry", constrained=constrained, max_attempts=2)
    ok = json.dumps({"texture": "a mottled, heterogeneous texture"}) if constrained else "a mottled, heterogeneous texture"
    # valid: accepted at once
    o = write_entries(FACTS, EchoEntries({"texture": [ok]}), config=cfg)
    assert (o.source, o.attempts, o.reason) == ("llm", 1, None)
    # a planted false finding, then a good reply: retried, the failed sample says why
    false = "a homogeneous texture"
    o = write_entries(FACTS, EchoEntries({"texture": [json.dumps({"texture": false}) if constrained else false, ok]}), config=cfg)
    assert (o.source, o.attempts) == ("llm", 2)
    bad = [s for s in o.samples if not s["ok"]]
    assert bad[0]["entry"] == "texture" and any("heterogeneity" in p for p in bad[0]["problems"])
    # the false finding every time: fallback to the template report, reason names the entry and the fact
    o = write_entries(FACTS, EchoEntries({"texture": [false, false]}), config=LLMConfig(mode="per-entry", max_attempts=2))
    assert o.source == "fallback" and o.kind == "fact_check" and "texture" in o.reason and "heterogeneity" in o.reason
    assert o.text == captions.report_caption(FACTS)
    if constrained:
        # invalid JSON, then valid: retried with reason invalid_json
        o = write_entries(FACTS, EchoEntries({"texture": ["texture = mottled", ok]}), config=cfg)
        assert (o.source, o.attempts) == ("llm", 2) and o.samples[[s["entry"] for s in o.samples].index("texture")]["problems"][0].startswith("invalid_json")
        # truncated twice: fallback with reason truncated
        cut = '{"texture": "a mottled, hetero'
        o = write_entries(FACTS, EchoEntries({"texture": [cut, cut]}), config=cfg)
        assert (o.source, o.kind) == ("fallback", "format") and "truncated" in o.reason


def test_whole_report_json_valid_invalid_false_truncated():
    keys = (DIAGNOSIS_KEY, *captions.SCHEMA)
    good = {DIAGNOSIS_KEY: "melanoma", **captions.parse_report(captions.report_caption(FACTS))}
    good = {k: good[k] for k in keys}
    false = {**good, "elevation": "nodular, clearly raised"}
    script = iter([json.dumps(good)])

    class Whole:
        name, sequential = "whole", True
        def __init__(self, replies): self.replies, self.schemas = list(replies), []
        def generate(self, messages, *, seed=0, temperature=None, max_new_tokens=None, json_schema=None):
            self.schemas.append(json_schema); return self.replies.pop(0)

    cfg = LLMConfig(constrained=True, max_attempts=2)
    be = Whole([json.dumps(good)])
    o = write_report(FACTS, be, config=cfg)
    assert (o.source, o.attempts) == ("llm", 1) and be.schemas[0] == report_schema(keys, cfg.entry_max_chars)
    assert list(captions.parse_report(o.text)) == ["diagnosis", *captions.SCHEMA]
    o = write_report(FACTS, Whole(["not json at all", json.dumps(good)]), config=cfg)
    assert (o.source, o.attempts) == ("llm", 2) and o.samples[0]["problems"][0].startswith("invalid_json")
    o = write_report(FACTS, Whole([json.dumps(false)] * 2), config=cfg)
    assert (o.source, o.kind) == ("fallback", "fact_check") and "elevation" in o.reason
    o = write_report(FACTS, Whole([json.dumps(good)[:300]] * 2), config=cfg)
    assert (o.source, o.kind) == ("fallback", "format") and o.reason.startswith("format: truncated")


def test_parse_json_reply_reasons():
    assert parse_json_reply('{"a": "x  y"}', ("a",)) == {"a": "x y"}
    for text, reason in (('{"a": "x', "truncated"), ("a: x", "invalid_json"), ('{"b": "x"}', "schema"), ('{"a": ""}', "schema"),
                         ("[1]", "schema")):
        with pytest.raises(ReplyFormatError) as e: parse_json_reply(text, ("a",))
        assert e.value.reason == reason, text


def test_constrained_openai_request_sends_the_schema(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    bodies = []
    def respond(body, headers):
        bodies.append(body)
        entry = entry_of(body["messages"])
        return json.dumps({entry: "; ".join(findings_of(body["messages"]))})
    with LocalChatServer(respond) as srv:
        be = OpenAIBackend("local", base_url=srv.base_url, timeout=5)
        o = write_report(FACTS, be, config=LLMConfig(mode="per-entry", constrained=True))
    assert o.source == "llm", o.reason
    rf = bodies[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    entry = entry_of(bodies[0]["messages"])
    assert rf["json_schema"]["schema"] == report_schema((entry,), LLMConfig().entry_max_chars)
    assert be.stats["calls"] == len(bodies) and be.stats["completion_tokens"] > 0
    # unconstrained requests carry no response_format
    bodies.clear()
    with LocalChatServer(lambda body, h: (bodies.append(body), "; ".join(findings_of(body["messages"])))[1]) as srv:
        write_report(FACTS, OpenAIBackend("local", base_url=srv.base_url, timeout=5), config=LLMConfig(mode="per-entry"))
    assert bodies and all("response_format" not in b for b in bodies)


class CharTokenizer:
    "A toy tokenizer: one token per printable ASCII character plus a few words, quotes and braces; id 0 is EOS"
    def __init__(self):
        self.vocab = ["</s>"] + [chr(c) for c in range(32, 127)] + ['"}', '", "', "colour", " brown", '{"', "\\n", "é"]
        self.eos_token_id = 0
    def __len__(self): return len(self.vocab)
    def decode(self, ids, skip_special_tokens=False): return "".join("" if i == 0 else self.vocab[i] for i in ids)


@pytest.mark.parametrize("seed", range(8))
def test_builtin_grammar_always_parses(seed):
    import torch
    tok, keys = CharTokenizer(), ("lesion colour", "texture")
    proc = JsonObjectLogits(tok, keys, prompt_len=3, max_chars=25, vocab=[tok.decode([i]) for i in range(len(tok))])
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[5, 6, 7]])
    for _ in range(200):
        scores = proc(ids, torch.randn(1, len(tok), generator=g))
        nxt = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=g))
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        if nxt == tok.eos_token_id: break
    text = tok.decode(ids[0, 3:].tolist())
    assert nxt == tok.eos_token_id, text
    obj = parse_json_reply(text, keys)
    assert list(json.loads(text)) == list(keys) and all(0 < len(v) < 25 + 6 for v in json.loads(text).values())


def test_caption_diversity():
    same = ["a b c d"] * 4
    varied = ["a b c d", "e f g h", "i j k l", "m n o p"]
    d0, d1 = caption_diversity(same), caption_diversity(varied)
    assert d1["distinct_1"] == 1.0 and d0["distinct_1"] == 0.25 and d1["distinct_2"] > d0["distinct_2"]
    assert d1["self_bleu"] < d0["self_bleu"]


def test_config_rejects_bad_mode():
    with pytest.raises(Exception, match="mode"): LLMConfig(mode="poem")


# --- forced facts: the grammar writes each value's fact words, the model only continues --------------------------------

def lead_of(schema, entry):
    "The forced lead a schema's `pattern` asks for (the literal after `^`, up to the one-sentence tail)"
    from lesiongen.llm import _pattern_prefix
    return _pattern_prefix(schema["properties"][entry]["pattern"])[0]


class LeadEntries(EchoEntries):
    "A backend that writes each forced lead plus `tail` (or a scripted continuation per entry), as a grammar would"
    def __init__(self, tail=" as seen on dermoscopy.", plan=None):
        super().__init__(); self.tail, self.cont = tail, {k: list(v) for k, v in (plan or {}).items()}
    def generate(self, messages, *, seed=0, temperature=None, max_new_tokens=None, json_schema=None):
        entry = entry_of(messages); self.calls.append((entry, json_schema))
        tail = self.cont[entry].pop(0) if self.cont.get(entry) else self.tail
        return json.dumps({entry: lead_of(json_schema, entry) + tail})


def test_report_schema_forces_prefixes():
    from lesiongen.llm import _literal_pattern, _pattern_prefix
    s = report_schema(("a", "b", "c"), 20, {"a": "No streaks", "b": "not assessed"}, closed=("b",), one_sentence=True, min_chars=5)
    pa, pb = s["properties"]["a"], s["properties"]["b"]
    assert re.match(pa["pattern"], "No streaks are seen.") and not re.match(pa["pattern"], "Streaks are seen.")
    assert not re.match(pa["pattern"], "No streaks. More. Sentences.")  # one sentence at most
    assert (pa["minLength"], pa["maxLength"]) == (10 + 5, 10 + 20) and (pb["minLength"], pb["maxLength"]) == (12, 12)
    assert s["properties"]["c"] == {"type": "string", "minLength": 1, "maxLength": 20}
    for t in ("type II (light skin), about 35% [x] a.b*c", "No streaks"):
        assert _pattern_prefix(_literal_pattern(t)) == (t, False) and _pattern_prefix(_literal_pattern(t, True)) == (t, True)
        assert re.match(_literal_pattern(t), t)
    assert _pattern_prefix("^a.*") is None
    with pytest.raises(Exception, match="prefixes"): report_schema(("a",), 20, {"a": 'say "x"'})
    with pytest.raises(Exception, match="force_facts"): LLMConfig(force_facts=True)
    with pytest.raises(Exception, match="continue_min_chars"): LLMConfig(constrained=True, force_facts=True, continue_min_chars=99)


@pytest.mark.parametrize("seed", range(6))
def test_builtin_grammar_writes_the_prefix_then_one_bounded_sentence(seed):
    import torch
    tok, keys = CharTokenizer(), ("lesion colour", "texture")
    pre = ("Light brown and black", "Heterogeneous texture")
    proc = JsonObjectLogits(tok, keys, prompt_len=3, max_chars=(15, 20), vocab=[tok.decode([i]) for i in range(len(tok))],
                            prefixes=pre, stop=".", min_chars=4)
    g = torch.Generator().manual_seed(seed)
    ids, chosen = torch.tensor([[5, 6, 7]]), 0
    for _ in range(300):
        scores = proc(ids, torch.randn(1, len(tok), generator=g))
        if int(torch.isfinite(scores).sum()) > 1: chosen += 1
        nxt = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=g))
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        if nxt == tok.eos_token_id: break
    obj = parse_json_reply(tok.decode(ids[0, 3:].tolist()), keys)
    for (k, v), p, cap in zip(obj.items(), pre, (15, 20)):
        cont = json.loads(tok.decode(ids[0, 3:].tolist()))[k][len(p):]
        assert v.startswith(p) and 4 <= len(cont) < cap + 6, (v, cont)  # the cap is checked before each token (longest 6 chars)
        assert "." not in cont[:-1] and not any(c in cont for c in "{}[]<>")  # one sentence, no brackets
    assert chosen >= 8  # the model chose the continuations; the prefixes and punctuation were forced


def test_forced_facts_per_entry_keeps_leads_and_measures_the_model_words():
    from lesiongen.llm import _prompt_version, model_words, report_bodies
    cfg = LLMConfig(mode="per-entry", constrained=True, force_facts=True, max_attempts=2)
    be = LeadEntries()
    o = write_entries(FACTS, be, config=cfg)
    assert o.source == "llm" and o.attempts == 1, o.reason
    assert captions.check_report(o.text, FACTS).ok and list(captions.parse_report(o.text)) == ["diagnosis", *captions.SCHEMA]
    n_calls = len(be.calls)
    assert n_calls == 11 + len([c for c in captions.DERM7PT_CONCEPTS if c in FACTS])  # one call per entry, per finding of the patterns
    for entry, schema in be.calls:  # every request forces its entry's facts and asks for one sentence after them
        p = schema["properties"][entry]
        assert p["pattern"].startswith("^") and p["minLength"] > cfg.continue_min_chars and p["maxLength"] - p["minLength"] == cfg.continue_chars - cfg.continue_min_chars
    assert _prompt_version(cfg) == "entry-v1+json+facts60"
    words = model_words(o)
    assert words.split().count("dermoscopy.") == n_calls and "heterogeneous" not in words  # the leads are stripped
    assert len(words) < len(report_bodies(o.text))


def test_forced_facts_false_continuation_is_rejected():
    cfg = LLMConfig(mode="per-entry", constrained=True, force_facts=True, max_attempts=2)
    # the lead says heterogeneous; a continuation that says homogeneous is a planted false finding
    o = write_entries(FACTS, LeadEntries(plan={"texture": [", yet quite homogeneous overall.", ", clearly visible here."]}), config=cfg)
    assert (o.source, o.attempts) == ("llm", 2)
    bad = [s for s in o.samples if not s["ok"]]
    assert bad[0]["entry"] == "texture" and bad[0]["problems"]
    # every continuation adds an off-topic claim: fallback to the template report, with the entry and the reason
    o = write_entries(FACTS, LeadEntries(plan={"elevation": [", which suggests a benign lesion."] * 2}), config=cfg)
    assert o.source == "fallback" and "elevation" in o.reason and o.text == captions.report_caption(FACTS)
    o = write_entries(FACTS, LeadEntries(plan={"patient info": [" with a family history of melanoma."] * 2}), config=cfg)
    assert o.source == "fallback" and "gate" in o.reason


def test_forced_facts_whole_report_and_openai_schema(monkeypatch):
    from lesiongen.llm import model_words
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    bodies = []
    def respond(body, headers):
        bodies.append(body); schema = body["response_format"]["json_schema"]["schema"]
        return json.dumps({k: lead_of(schema, k) + ("" if schema["properties"][k]["maxLength"] == len(lead_of(schema, k)) else " on dermoscopy.")
                           for k in schema["properties"]})
    f = {k: v for k, v in FACTS.items() if k not in ("elevation",)}  # one entry `not assessed`: its value is closed
    with LocalChatServer(respond) as srv:
        be = OpenAIBackend("local", base_url=srv.base_url, timeout=5)
        o = write_report(f, be, config=LLMConfig(constrained=True, force_facts=True))
    assert o.source == "llm", o.reason
    schema = bodies[0]["response_format"]["json_schema"]["schema"]
    assert list(schema["properties"]) == [DIAGNOSIS_KEY, *captions.SCHEMA] and lead_of(schema, DIAGNOSIS_KEY) == "melanoma"
    assert schema["properties"]["elevation"]["maxLength"] == len(NOT_ASSESSED)
    assert captions.parse_report(o.text)["elevation"] == NOT_ASSESSED
    assert model_words(o).split().count("dermoscopy.") == 12  # diagnosis and the 11 assessed entries


def test_forced_facts_whole_report_rejects_a_finding_in_a_continuation():
    class Whole:
        name, sequential = "whole", True
        def __init__(self, tail): self.tail = tail
        def generate(self, messages, *, seed=0, temperature=None, max_new_tokens=None, json_schema=None):
            return json.dumps({k: lead_of(json_schema, k) + (self.tail(k) if v["maxLength"] > len(lead_of(json_schema, k)) else "")
                               for k, v in json_schema["properties"].items()})
    cfg = LLMConfig(constrained=True, force_facts=True, max_attempts=1)
    o = write_report(FACTS, Whole(lambda k: " as seen here."), config=cfg)
    assert o.source == "llm", o.reason
    # "only one colour" contradicts three colours, and check_report does not read colour counts in that entry: the gate does
    o = write_report(FACTS, Whole(lambda k: "; only one colour." if k == "lesion colour" else " as seen here."), config=cfg)
    assert o.source == "fallback" and "continuation" in o.reason and "lesion colour" in o.reason
