"""The experiment (`lesiongen.evaluate`): metrics by hand, baselines, run planning, a tiny end-to-end experiment
with an oracle and a prompt-blind synthetic set, resume (also under SIGKILL), refusals, the audit and the CLI."""
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import curated_phantom
from sklearn.metrics import roc_auc_score

from faults import leftover_temps, lesiongen_cmd, run_with_kills
from lesiongen.classify import Judges, decode_images
from lesiongen.core import RESEARCH_ONLY, LesionGenError, fitzpatrick_from_ita, lab_for_fitzpatrick
from lesiongen.data import curate, estimate_ita, read_records
from lesiongen.evaluate import (ExperimentConfig, Run, audit_classifier, balanced_indices, check_experiment_inputs,
                                classification_metrics, collect_results, colour_augment, evaluate, load_synthetic,
                                plan_runs, run_experiment, sensitivity_at_specificity, weighted_auroc)
from lesiongen.fairness import FairnessConfig, cluster_weights
from lesiongen.phantom import SKIN_LIGHTNESS, PhantomConfig, render_phantom, sample_lesions, write_phantom

pytestmark = pytest.mark.usefixtures("one_thread")
DX3 = {"nv": 0.4, "mel": 0.35, "bcc": 0.25}


def as_generated_set(records: pd.DataFrame, root: Path, out: Path, plan: str, shuffle_dx: bool = False) -> Path:
    "Phantom images written as a generated set (metadata.csv + images/): a stand-in for `lesiongen generate`"
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = records.reset_index(drop=True).copy()
    for i, f in enumerate(meta["file_name"]): shutil.copy(root / f, out / "images" / f"syn_{i:06d}.jpg")
    meta["file_name"] = [f"images/syn_{i:06d}.jpg" for i in range(len(meta))]
    meta["image_id"] = meta["lesion_id"] = [f"{out.name}_{i:06d}" for i in range(len(meta))]
    if shuffle_dx: meta["dx"] = np.random.default_rng(0).permutation(meta["dx"].to_numpy())
    meta["plan"] = plan
    meta.drop(columns=["split"]).to_csv(out / "metadata.csv", index=False)
    return out


def phantom_cohort(out: Path, n: int = 8, size: int = 32) -> Path:
    "n phantom lesions rendered on skin types I-VI: a counterfactual set"
    from PIL import Image
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for j, spec in sample_lesions(PhantomConfig(n=n, size=size, seed=3, format="derm7pt", dx_probs=DX3)).iterrows():
        for t in range(1, 7):
            L, b = lab_for_fitzpatrick(t, SKIN_LIGHTNESS[t])
            f = f"images/cf_{j:04d}_{t}.png"
            Image.fromarray(render_phantom({**spec.to_dict(), "fitzpatrick": t, "skin_L": L, "skin_b": b}, size)).save(out / f)
            rows.append(dict(file_name=f, image_id=f"cf_{j:04d}_{t}", lesion_id=f"cf_{j:04d}", cf_group=f"cf_{j:04d}",
                             cf_attribute="fitzpatrick", dx=spec["dx"], fitzpatrick=t, plan="counterfactual"))
    pd.DataFrame(rows).to_csv(out / "metadata.csv", index=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Real phantom records (300 cases, 3 diagnoses, 32 px), an oracle synthetic set and a prompt-blind one"
    d = tmp_path_factory.mktemp("evaluate")
    records = curated_phantom(d / "real", n=300, seed=1, dx_probs=DX3)
    syn = read_records(curated_phantom(d / "syn", n=300, seed=7, dx_probs=DX3))
    return dict(dir=d, records=records, root=d / "real" / "raw", syn=syn,
                oracle=as_generated_set(syn, d / "syn" / "raw", d / "oracle", "balanced"),
                blind=as_generated_set(syn, d / "syn" / "raw", d / "blind", "empirical", shuffle_dx=True))


@pytest.fixture(scope="module")
def experiment(data):
    "The tiny experiment: 2 seeds, both baselines, both sets, ratios 0 / 0.5 / 1 / 3 (3 is more than the sets hold)"
    cfg = ExperimentConfig.tiny(seeds=(0, 1), ratios=(0.0, 0.5, 1.0, 3.0))
    out = data["dir"] / "eval"
    results = evaluate(data["records"], [data["oracle"], data["blind"]], out, cfg)
    return dict(out=out, cfg=cfg, results=results, res=collect_results(out))


# --- metrics ---------------------------------------------------------------------------------------------------

def test_metrics_by_hand():
    p = pd.DataFrame({"bcc": [0.1, 0.1, 0.6, 0.2], "mel": [0.8, 0.1, 0.1, 0.1], "nv": [0.1, 0.8, 0.3, 0.1], "vasc": [0, 0, 0, 0.6]})
    m = classification_metrics(["mel", "nv", "nv", "vasc"], p, list("abcd"), n_boot=100).set_index("metric")["value"]
    assert m["accuracy"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(2.5 / 3)
    assert m["recall[nv]"] == pytest.approx(0.5) and np.isnan(m["recall[bcc]"])
    # macro-F1 over classes with true images: mel 1, nv 2/3 (P 1, R 1/2), vasc 1
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert m["auroc"] == pytest.approx(np.mean([roc_auc_score(np.array(["mel", "nv", "nv", "vasc"]) == c, p[c]) for c in ("mel", "nv", "vasc")]))


def test_sensitivity_at_specificity_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.2, 0.85, 0.3, 0.2, 0.1, 0.05])
    # specificity >= 0.8 allows one false positive of 5 (the 0.85 negative): threshold 0.4 catches 0.9, 0.8, 0.4
    assert sensitivity_at_specificity(y, s, 0.8) == pytest.approx(0.75)
    assert sensitivity_at_specificity(y, s, 0.9) == pytest.approx(0.25)  # no false positive: only 0.9 is above 0.85
    assert sensitivity_at_specificity(y, s, 0.4) == pytest.approx(1.0)   # three false positives allowed: threshold 0.2
    assert np.isnan(sensitivity_at_specificity(np.zeros(3, int), s[:3], 0.8))


def test_weighted_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y, s = rng.random(200) < 0.3, rng.integers(0, 10, 200) / 10
    W = cluster_weights(np.arange(200) // 3, 15, seed=2)
    np.testing.assert_allclose(weighted_auroc(y, s, W), [roc_auc_score(y, s, sample_weight=w) for w in W], atol=1e-12)


def test_bootstrap_interval_contains_the_true_accuracy():
    rng = np.random.default_rng(1)
    n, p_true = 1500, 0.7
    y = rng.choice(["mel", "nv"], n)
    right = rng.random(n) < p_true
    pred = np.where(right, y, np.where(y == "mel", "nv", "mel"))
    proba = pd.DataFrame({"mel": (pred == "mel").astype(float), "nv": (pred == "nv").astype(float)})
    m = classification_metrics(y, proba, np.arange(n) // 3, n_boot=300).set_index("metric")
    assert m.loc["accuracy", "lo"] < p_true < m.loc["accuracy", "hi"]
    assert m.loc["accuracy", "hi"] - m.loc["accuracy", "lo"] < 0.1


def test_unknown_test_label_is_named():
    with pytest.raises(LesionGenError, match="test diagnosis 'akiec'"):
        classification_metrics(["akiec"], pd.DataFrame({"nv": [1.0]}), ["a"])


# --- baselines and planning --------------------------------------------------------------------------------------

def test_balanced_indices_equalise_groups():
    groups = ["I"] * 90 + ["II"] * 9 + ["III"]
    share = pd.Series(np.array(groups)[balanced_indices(groups, 30000, seed=0)]).value_counts(normalize=True)
    np.testing.assert_allclose(share.sort_index().to_numpy(), [1 / 3] * 3, atol=0.02)


def test_colour_augmentation_moves_skin_to_darker_types(data):
    rec = read_records(data["records"])
    light = rec[(rec["split"] == "train") & (rec["fitzpatrick"] <= 2)].head(12).reset_index(drop=True)
    x = decode_images(light, data["root"], 32)
    aug, src, target = colour_augment(x, light["fitzpatrick"], 1.0, seed=0)
    assert len(aug) == len(x) and (target > light["fitzpatrick"].to_numpy()[src]).all()
    read = np.array([fitzpatrick_from_ita(estimate_ita(im.permute(1, 2, 0).numpy())) for im in aug])
    assert np.mean(np.abs(read - target) <= 1) >= 0.75
    assert np.mean(read > light["fitzpatrick"].to_numpy()[src]) >= 0.9


class _Set:
    def __init__(self, name, plan, n): self.name, self.plan, self.n = name, plan, n
    def __len__(self): return self.n


def test_plan_runs_dedupes_and_reports_unfillable_ratios():
    runs, skipped = plan_runs(ExperimentConfig(seeds=(0, 1), ratios=(0, 0.5, 1, 5)), [_Set("bal", "balanced", 300), _Set("tgt", "targeted", 50)], 100)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys)) == 2 * 8
    assert "mixed-bal-r1-s1" in keys and "mixed-tgt-r0.5-s0" in keys and "mixed-bal-r0.5-s0" in keys
    assert not any("tgt-r0.5" in k and k.startswith("mixed-tgt-r0.5") and False for k in keys)
    assert skipped == [dict(set="bal", ratio=5.0, reason="needs 500 synthetic images, the set has 300")]


# --- the experiment -----------------------------------------------------------------------------------------------

def test_oracle_trains_a_classifier_a_prompt_blind_set_does_not(experiment):
    res = experiment["res"]
    oracle, blind = res.value("synthetic only: oracle")["value"], res.value("synthetic only: blind")["value"]
    assert oracle > blind + 0.15, res.table()
    assert oracle > 0.8 * res.value("real")["value"]


def test_outputs_schema_predictions_and_report(experiment, data):
    out, results = experiment["out"], experiment["results"]
    assert results["schema"] == "lesiongen-evaluate/1" and results["research_use"] == RESEARCH_ONLY
    assert set(results) >= {"inputs", "runs", "regimes", "dose_response", "claims", "synthetic"}
    assert {"real", "resampled", "colour", "synthetic only: oracle", "real + oracle"} <= set(results["regimes"])
    assert [p["ratio"] for p in results["dose_response"]["points"] if p["metric"] == "balanced_accuracy"] == [0.0, 0.5, 1.0]
    assert results["dose_response"]["skipped"][0]["ratio"] == 3.0
    test = read_records(data["records"]).query("split == 'test'")
    for r in results["runs"]:
        pred = pd.read_csv(out / r["predictions"])
        assert list(pred["image_id"].astype(str)) == list(test["image_id"].astype(str))
        np.testing.assert_allclose(pred.drop(columns="image_id").sum(axis=1), 1, atol=1e-4)
    assert len(results["runs"]) == 2 * 8  # real, 2 baselines, 2 x (synthetic only, real + set), real + oracle at 0.5
    fid = results["synthetic"]["oracle"]["fidelity"]["judge"]["groups"]
    assert {g["attribute"] for g in fid} == {"all", "dx", "fitzpatrick"}
    assert 0 <= results["synthetic"]["oracle"]["memorization"]["replication_rate"] <= 1
    for f in ("report.md", "report.html"): assert RESEARCH_ONLY in (out / f).read_text()
    assert all((out / "figures" / f"{k}.png").stat().st_size > 0 for k in ("regimes", "by_fitzpatrick_group", "gaps", "dose"))
    assert Judges.load(out / "runs" / "colour-s1" / "classifier").attributes == ["dx"]


def test_claims_are_computed_not_asserted(experiment):
    res = experiment["res"]
    real = res.value("real")["value"]
    for c in experiment["results"]["claims"]:
        if c["claim"].startswith("synthetic only: oracle"):
            assert c["holds"] == (res.value("synthetic only: oracle")["value"] >= 0.9 * real)
        if c["claim"] == "real + blind: balanced accuracy >= real-only":
            assert c["holds"] == (res.value("real + blind")["value"] >= real)


def test_resume_retrains_only_what_is_missing_and_refuses_other_settings(experiment, data):
    out, cfg = experiment["out"], experiment["cfg"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    shutil.rmtree(out / "runs" / "synthetic-blind-s1")
    (out / "runs" / ".mixed-oracle-r1-s0.tmp-stale").mkdir()  # what a killed run leaves
    run_experiment(data["records"], [data["oracle"], data["blind"]], out, cfg)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir() if not p.name.startswith(".")}
    assert [k for k in after if after[k] != before.get(k)] == ["synthetic-blind-s1"]
    with pytest.raises(LesionGenError, match=r"other settings \(config.mix_ratio\)"):
        run_experiment(data["records"], [data["oracle"], data["blind"]], out, replace(cfg, mix_ratio=0.5))
    with pytest.raises(LesionGenError, match="other settings"):
        run_experiment(data["records"], [data["oracle"]], out, cfg)


# --- refusals ------------------------------------------------------------------------------------------------------

def test_refuses_leaks_labels_and_attributes(data):
    cfg = ExperimentConfig.tiny()
    rec = read_records(data["records"])
    leaky = rec.copy()
    leaky.loc[leaky["split"] == "test", "lesion_id"] = leaky.loc[leaky["split"] == "train", "lesion_id"].iloc[0]
    with pytest.raises(LesionGenError, match="test split shares"): check_experiment_inputs(leaky, [], cfg, data["root"])
    d = data["dir"]
    odd = as_generated_set(data["syn"].head(4).assign(dx="akiec"), d / "syn" / "raw", d / "odd", "balanced")
    with pytest.raises(LesionGenError, match="diagnosis 'akiec', which is not in the real training labels"):
        check_experiment_inputs(data["records"], [load_synthetic(odd)], cfg)
    donor = as_generated_set(data["syn"].head(4), d / "syn" / "raw", d / "donor", "balanced")
    m = pd.read_csv(donor / "metadata.csv"); m["source_image_id"] = rec.loc[rec["split"] == "test", "image_id"].iloc[0]
    m.to_csv(donor / "metadata.csv", index=False)
    with pytest.raises(LesionGenError, match="planned from 1 test-split record"):
        check_experiment_inputs(data["records"], [load_synthetic(donor)], cfg)
    gen = d / "generator"; gen.mkdir(exist_ok=True)
    (gen / "config.json").write_text(json.dumps({"records": str(data["records"]), "splits": ["train", "test"]}))
    peek = as_generated_set(data["syn"].head(4), d / "syn" / "raw", d / "peek", "balanced")
    m = pd.read_csv(peek / "metadata.csv"); m["model"] = str(gen); m.to_csv(peek / "metadata.csv", index=False)
    with pytest.raises(LesionGenError, match="generator of synthetic set 'peek' was trained on"):
        check_experiment_inputs(data["records"], [load_synthetic(peek)], cfg)
    (gen / "config.json").write_text(json.dumps({"records": str(data["records"]), "splits": ["train"]}))
    assert check_experiment_inputs(data["records"], [load_synthetic(peek)], cfg)["generators"]["peek"]["verified"]
    with pytest.raises(LesionGenError, match="attribute column 'skin_colour' does not exist"):
        check_experiment_inputs(data["records"], [], replace(cfg, attributes=("skin_colour",)))
    with pytest.raises(LesionGenError, match="attribute 'sex' has 1 group"):
        check_experiment_inputs(rec.assign(sex="female"), [], replace(cfg, attributes=("sex",)), data["root"])
    with pytest.raises(LesionGenError, match="has no metadata.csv"): load_synthetic(d / "raw_real")
    unseen = rec.copy(); unseen.loc[unseen["split"] == "test", "dx"] = "vasc"
    with pytest.raises(LesionGenError, match="test diagnosis 'vasc' has no training image"):
        check_experiment_inputs(unseen, [], cfg, data["root"])


# --- audit ---------------------------------------------------------------------------------------------------------

def test_audit_classifier_writes_its_report_and_refuses_non_cohorts(experiment, data):
    clf = experiment["out"] / "runs" / "real-r0-s0" / "classifier"
    cohort = phantom_cohort(data["dir"] / "cohort")
    audit = audit_classifier(clf, cohort, data["dir"] / "audit", records=data["records"], config=FairnessConfig.tiny())
    assert sorted(p.name for p in (data["dir"] / "audit").iterdir()) == ["audit.csv", "audit.json", "audit.md", "audit.png"]
    t = audit.table()
    assert set(t["source"]) == {"counterfactual", "real"}
    assert set(t.loc[t["source"] == "counterfactual", "group"]) == {"I", "II", "III", "IV", "V", "VI"}
    with pytest.raises(LesionGenError, match="no cf_group column"): audit_classifier(clf, data["oracle"])
    with pytest.raises(LesionGenError, match="is not a judges folder"): audit_classifier(data["dir"], cohort)


# --- CLI -----------------------------------------------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run(lesiongen_cmd(*args), capture_output=True, text=True, cwd=cwd)


def test_cli_bad_input_exits_2_with_one_line(data, tmp_path):
    for args, msg in ((["evaluate", "--records", str(data["records"]), "--synthetic", str(data["dir"] / "nope"), "--out", str(tmp_path / "e")], "has no metadata.csv"),
                      (["evaluate", "--records", str(data["records"]), "--out", str(tmp_path / "e"), "--seeds", "0"], "--seeds"),
                      (["audit", "--classifier", str(data["dir"]), "--cohort", str(data["oracle"]), "--out", str(tmp_path / "a")], "not a judges folder")):
        p = _cli(*args)
        assert p.returncode == 2, p.stderr
        assert msg in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_cli_evaluate_survives_sigkill(data, tmp_path):
    cfg = ExperimentConfig.tiny(seeds=(0,), ratios=(), baselines=(), synthetic_only=False).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cmd = lesiongen_cmd("evaluate", "--records", str(data["records"]), "--synthetic", str(data["oracle"]),
                        "--out", str(tmp_path / "eval"), "--config", str(tmp_path / "cfg.json"), "--quiet")
    rep = run_with_kills(cmd, kills=2, seed=3, min_s=4.0, max_s=12.0, timeout=300)
    assert rep.returncodes[-1] == 0, rep.stderr_tail
    assert leftover_temps(tmp_path / "eval") == []
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert sorted(r["key"] for r in res["runs"]) == ["mixed-oracle-r1-s0", "real-r0-s0"]
    for k in ("mixed-oracle-r1-s0", "real-r0-s0"):
        assert sorted(p.name for p in (tmp_path / "eval" / "runs" / k).iterdir()) == ["classifier", "fairness.json", "metrics.csv", "predictions.csv", "run.json"]


def test_filter_keeps_what_the_judge_reads_as_prompted(experiment, data, tmp_path):
    from lesiongen.evaluate import filter_synthetic
    clf = experiment["out"] / "runs" / "real-r0-s0" / "classifier"
    kept = {k: filter_synthetic(data[k], clf, tmp_path / k) for k in ("oracle", "blind")}
    assert len(kept["oracle"]) > len(kept["blind"]) > 0
    J = Judges.load(clf)
    from lesiongen.adherence import read_generated
    images, meta = read_generated(tmp_path / "blind")
    assert (J.predict(images, ["dx"])["dx"].astype(str).to_numpy() == meta["dx"].astype(str).to_numpy()).all()
    assert meta["filtered_by"].nunique() == 1 and RESEARCH_ONLY in (tmp_path / "blind" / "README.md").read_text()
    with pytest.raises(LesionGenError, match="out must differ"): filter_synthetic(data["oracle"], clf, data["oracle"])
    with pytest.raises(LesionGenError, match="not a judges folder"): filter_synthetic(data["oracle"], tmp_path, tmp_path / "x")


def test_cli_audit_writes_its_report(experiment, data, tmp_path):
    cohort = data["dir"] / "cohort" if (data["dir"] / "cohort" / "metadata.csv").is_file() else phantom_cohort(data["dir"] / "cohort")
    p = _cli("audit", "--classifier", str(experiment["out"] / "runs" / "real-r0-s0" / "classifier"), "--cohort", str(cohort),
             "--records", str(data["records"]), "--out", str(tmp_path / "audit"), "--n-boot", "50")
    assert p.returncode == 0, p.stderr
    assert "worst skin type by accuracy" in p.stdout and RESEARCH_ONLY in p.stdout
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["research_use"] == RESEARCH_ONLY
