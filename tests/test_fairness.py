"""Subgroup fairness: hand-counted groups, gaps and EOD; bootstrap intervals that cover the truth; the counterfactual
audit flagging a biased toy classifier and passing a fair one; bad input refused with a one-line error."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equal_opportunity_difference, equalized_odds_difference

from lesiongen.core import LesionGenError
from lesiongen.fairness import (FairnessConfig, FairnessResult, assess_fairness, audit_counterfactual, cluster_weights,
                                join_predictions, plot_by_group, plot_dose_response, plot_gaps, pool_seeds)


def cfg(**kw):
    return FairnessConfig(**{"attributes": ("sex",), "intersections": (), "n_boot": 200, "min_group_size": 1, **kw})


@pytest.fixture
def six():
    "Six images (one per lesion): women all right; the men's melanoma called nevus and one nevus called melanoma"
    preds = pd.DataFrame({"image_id": list("abcdef"), "y_pred": ["mel", "nv", "nv", "nv", "nv", "mel"]})
    records = pd.DataFrame({"image_id": list("abcdef"), "lesion_id": list("ABCDEF"), "dx": ["mel", "nv", "nv"] * 2,
                            "sex": ["female"] * 3 + ["male"] * 3, "age": [20, 35, 50, 65, 80, 25],
                            "site": ["back", "face", "back", "face", "back", "face"]})
    return preds, records


def value(res, attribute, group, metric):
    g = res.groups
    return float(g[(g["attribute"] == attribute) & (g["group"] == group) & (g["metric"] == metric)]["value"].iloc[0])


def test_worst_group_and_gaps_by_hand(six):
    res = assess_fairness(*six, cfg())
    # female: 3/3 right; male: 1/3 right; balanced: female (1+1)/2, male (0 + 1/2)/2
    assert value(res, "sex", "female", "accuracy") == pytest.approx(1.0)
    assert value(res, "sex", "male", "accuracy") == pytest.approx(1 / 3)
    assert value(res, "sex", "male", "balanced_accuracy") == pytest.approx(0.25)
    assert value(res, "sex", "male", "n") == 3
    assert res.worst_group("sex", "accuracy") == "male"
    assert res.worst_group("sex", "balanced_accuracy") == "male"
    assert res.worst_group("sex", "fpr[mel]") == "male"  # FPR: higher is worse (male 1/2, female 0)
    assert res.gap("sex", "accuracy")["value"] == pytest.approx(2 / 3)
    assert res.gap("sex", "accuracy", "ratio")["value"] == pytest.approx(1 / 3)
    assert res.gap("sex", "balanced_accuracy")["value"] == pytest.approx(0.75)


def test_equalized_odds_equal_opportunity_and_parity_by_hand(six):
    preds, records = six
    # men: melanoma found, one of two nevi called melanoma -> TPR 1 vs 1 (EOp 0), FPR 1/2 vs 0 (EOD 1/2),
    # predicted melanoma 2/3 vs 1/3 (DPD 1/3)
    preds = preds.assign(y_pred=["mel", "nv", "nv", "mel", "nv", "mel"])
    res = assess_fairness(preds, records, cfg())
    assert res.gap("sex", "equal_opportunity")["value"] == pytest.approx(0.0)
    assert res.gap("sex", "equalized_odds")["value"] == pytest.approx(0.5)
    assert res.gap("sex", "demographic_parity")["value"] == pytest.approx(1 / 3)
    # and fairlearn's own functions agree
    j = join_predictions(preds, records)
    args = dict(y_true=j["y_true"] == "mel", y_pred=j["y_pred"] == "mel", sensitive_features=j["sex"])
    assert equalized_odds_difference(**args) == pytest.approx(0.5)
    assert equal_opportunity_difference(**args) == pytest.approx(0.0)
    assert demographic_parity_difference(**args) == pytest.approx(1 / 3)


def test_intersection_and_age_bins(six):
    res = assess_fairness(*six, cfg(attributes=("sex", "age_group"), intersections=(("sex", "site"),)))
    # male+face: d (mel->nv) and f (nv->mel), both wrong; male+back: e right
    assert value(res, "sex+site", "male+face", "accuracy") == pytest.approx(0.0)
    assert value(res, "sex+site", "male+back", "accuracy") == pytest.approx(1.0)
    # ages 20, 35, 50, 65, 80, 25 with edges [0,30,45,60,75,120): <30 holds a and f
    assert value(res, "age_group", "<30", "n") == 2
    assert value(res, "age_group", "<30", "accuracy") == pytest.approx(0.5)
    assert res.bins["age_group"]["edges"] == [0, 30, 45, 60, 75, 120]


def test_small_groups_are_marked_not_dropped(six):
    preds, records = six
    records = records.assign(site=["back", "back", "back", "back", "back", "scalp"])
    res = assess_fairness(preds, records, cfg(attributes=("site",), min_group_size=2))
    g = res.groups[(res.groups["metric"] == "n")].set_index("group")
    assert g.loc["scalp", "n"] == 1 and bool(g.loc["scalp", "small"]) and not bool(g.loc["back", "small"])
    # only one group is large enough: no gaps, no worst group, but the small group is reported
    assert res.gaps.empty and res.worst_group("site") is None


def test_missing_values_are_counted_not_grouped(six):
    preds, records = six
    records = records.assign(sex=["female", "female", "unknown", "male", "male", None])
    res = assess_fairness(preds, records, cfg())
    assert res.missing["sex"] == 2
    assert set(res.groups["group"]) == {"female", "male"}
    assert value(res, "sex", "male", "n") == 2


def simulate(n, seed, p=(0.9, 0.6)):
    "n lesions, 2 images each; a lesion's images are both right (probability p[0] for women, p[1] for men) or both wrong"
    rng = np.random.default_rng(seed)
    group = np.where(np.arange(n) < n // 2, "female", "male")
    right = rng.random(n) < np.where(group == "female", *p)
    dx = rng.choice(["mel", "nv"], n)
    recs = pd.DataFrame({"image_id": [f"i{k}_{j}" for k in range(n) for j in range(2)],
                         "lesion_id": np.repeat([f"L{k}" for k in range(n)], 2), "dx": np.repeat(dx, 2),
                         "sex": np.repeat(group, 2)})
    y_pred = np.repeat(np.where(right, dx, np.where(dx == "mel", "nv", "mel")), 2)
    return pd.DataFrame({"image_id": recs["image_id"], "y_pred": y_pred}), recs


def test_bootstrap_interval_contains_the_true_value():
    # true accuracies 0.9 and 0.6, true gap 0.3; a 95% interval covers them in about 19 of 20 independent data sets
    # (fewer than 16 of 20 has probability < 0.001 for a correct 95% interval)
    hits, widths = {"female": 0, "male": 0, "gap": 0}, []
    for s in range(20):
        res = assess_fairness(*simulate(200, seed=100 + s), cfg(n_boot=200, seed=s))
        g = res.groups.set_index(["group", "metric"])
        for grp, truth in (("female", 0.9), ("male", 0.6)):
            lo, hi, v = g.loc[(grp, "accuracy"), ["lo", "hi", "value"]]
            assert lo <= v <= hi
            hits[grp] += lo < truth < hi
            widths.append(hi - lo)
        gap = res.gap("sex", "accuracy")
        hits["gap"] += gap["lo"] < 0.3 < gap["hi"]
    assert all(h >= 16 for h in hits.values()), hits
    assert max(widths) < 0.35  # not covering by being uselessly wide


def test_lesion_bootstrap_is_wider_than_an_image_bootstrap():
    # a lesion's two images are perfectly correlated here: resampling images as if independent gives intervals about
    # 1/sqrt(2) as wide, i.e. too narrow; the lesion bootstrap is wider
    preds, recs = simulate(400, seed=0)
    by_lesion = assess_fairness(preds, recs, cfg(n_boot=400, seed=1)).groups.set_index(["group", "metric"])
    by_image = assess_fairness(preds, recs.assign(lesion_id=recs["image_id"]), cfg(n_boot=400, seed=1)
                               ).groups.set_index(["group", "metric"])
    def width(g): return g.loc[("male", "accuracy"), "hi"] - g.loc[("male", "accuracy"), "lo"]
    assert width(by_lesion) > 1.2 * width(by_image)


def test_bootstrap_is_seeded():
    data = simulate(60, seed=0)
    a = assess_fairness(*data, cfg(seed=3)).groups
    b = assess_fairness(*data, cfg(seed=3)).groups
    c = assess_fairness(*data, cfg(seed=4)).groups
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_series_equal(a["value"], c["value"])  # the observed numbers do not depend on the seed
    assert not np.allclose(a["lo"].fillna(-1), c["lo"].fillna(-1))


def test_cluster_weights_keep_lesions_together():
    W = cluster_weights(["L1", "L1", "L2"], 50, seed=0)
    assert W.shape == (51, 3) and (W[0] == 1).all() and (W[:, 0] == W[:, 1]).all()
    assert set(W[1:, [1, 2]].sum(1)) == {2.0}


def test_json_round_trip_and_tidy(six, tmp_path):
    res = assess_fairness(*six, cfg())
    path = res.save(tmp_path / "fairness.json")
    d = json.loads(path.read_text())  # valid JSON: NaN written as null
    assert d["summary"]["sex"]["worst_group"] == "male" and "research_use" in d
    back = FairnessResult.from_dict(d)
    assert back.worst_group("sex", "accuracy") == "male"
    assert back.gap("sex", "accuracy")["value"] == pytest.approx(2 / 3)
    t = res.tidy(regime="real", seed=0, ratio=0.0)
    assert list(t.columns) == ["regime", "seed", "ratio", "attribute", "group", "metric", "kind", "value", "lo", "hi",
                               "n", "small"]
    assert set(t["kind"]) == {"group", "difference", "ratio"}


def test_figures_from_tidy_rows(six):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    for regime, ratio, shift in (("real", 0.0, 0), ("mixed", 1.0, 1), ("mixed", 2.0, 2)):
        for seed in (0, 1):
            preds = six[0].copy()
            preds.loc[3:3 + shift, "y_pred"] = ["mel", "nv", "nv"][:shift + 1]
            rows.append(assess_fairness(preds, six[1], cfg(n_boot=20, seed=seed)).tidy(regime, seed, ratio))
    tidy = pd.concat(rows, ignore_index=True)
    for fig in (plot_by_group(tidy, "sex"), plot_gaps(tidy, "accuracy"), plot_dose_response(tidy, "sex", "accuracy")):
        assert fig.axes
        plt.close(fig)
    pooled = pool_seeds(tidy[tidy["kind"] == "group"])
    assert (pooled["seeds"] == 2).all()
    with pytest.raises(LesionGenError, match="no group rows"):
        plot_by_group(tidy, "sex", metric="nonsense")


# --- bad input ------------------------------------------------------------------------------------------------------

def test_unknown_attribute_is_named(six):
    with pytest.raises(LesionGenError, match="attribute column 'skin_tone' does not exist"):
        assess_fairness(*six, cfg(attributes=("skin_tone",)))


def test_fewer_than_two_groups(six):
    preds, records = six
    with pytest.raises(LesionGenError, match="'sex' has 1 group"):
        assess_fairness(preds, records.assign(sex="female"), cfg())
    with pytest.raises(LesionGenError, match="'sex' has 0 group"):
        assess_fairness(preds, records.assign(sex="unknown"), cfg())


def test_mismatched_ids_and_labels(six):
    preds, records = six
    with pytest.raises(LesionGenError, match=r"1 prediction image_id\(s\) are not in the records, e.g. 'z'"):
        assess_fairness(preds.assign(image_id=list("abcdez")), records, cfg())
    with pytest.raises(LesionGenError, match="repeat image_id"):
        assess_fairness(preds.assign(image_id=list("abcdee")), records, cfg())
    with pytest.raises(LesionGenError, match="disagrees"):
        assess_fairness(preds.assign(y_true="nv"), records, cfg())
    with pytest.raises(LesionGenError, match="cluster column 'lesion_id'"):
        assess_fairness(preds, records.drop(columns=["lesion_id"]), cfg())


def test_probability_columns_give_the_prediction(six):
    preds, records = six
    probs = pd.DataFrame({"image_id": preds["image_id"], "mel": (preds["y_pred"] == "mel") * 0.8 + 0.1})
    probs["nv"] = 1 - probs["mel"]
    res = assess_fairness(probs, records, cfg())
    assert value(res, "sex", "male", "accuracy") == pytest.approx(1 / 3)


# --- counterfactual audit -------------------------------------------------------------------------------------------

def cohort(n_mel=10, n_nv=20):
    return pd.DataFrame([dict(image_id=f"g{k}_f{t}", cf_group=k, lesion_id=f"L{k}", cf_attribute="fitzpatrick",
                              fitzpatrick=t, dx="mel" if k < n_mel else "nv") for k in range(n_mel + n_nv)
                         for t in range(1, 7)])


def test_audit_flags_a_biased_classifier():
    c = cohort()
    # right on types I-IV, "nevus" for everything on V-VI: the 10 melanomas flip
    preds = c[["image_id"]].assign(y_pred=np.where(c["fitzpatrick"] >= 5, "nv", c["dx"]))
    aud = audit_counterfactual(preds, c, config=FairnessConfig(n_boot=200, min_group_size=2))
    assert aud.flagged and len(aud.reasons) >= 2
    assert aud.flip_rate["value"] == pytest.approx(10 / 30)
    assert aud.flip_rate["lo"] < 10 / 30 < aud.flip_rate["hi"]
    t = aud.table().set_index(["group", "metric"])["value"]
    assert t["III", "recall[mel]"] == pytest.approx(1.0) and t["VI", "recall[mel]"] == pytest.approx(0.0)
    assert t["V", "error_rate"] == pytest.approx(10 / 30) and t["I", "error_rate"] == pytest.approx(0.0)
    assert t["V", "changed_vs_lightest"] == pytest.approx(10 / 30) and t["II", "changed_vs_lightest"] == 0
    assert aud.worst_type in ("V", "VI")
    assert aud.fairness.gap("fitzpatrick", "recall[mel]")["value"] == pytest.approx(1.0)
    json.dumps(aud.to_dict())


def test_audit_passes_a_fair_classifier():
    c = cohort()
    # misreads melanomas 0 and 1 on every skin type: errors, but none caused by the skin type
    preds = c[["image_id"]].assign(y_pred=np.where(c["cf_group"] < 2, "nv", c["dx"]))
    aud = audit_counterfactual(preds, c, config=FairnessConfig(n_boot=200, min_group_size=2))
    assert not aud.flagged and aud.reasons == []
    assert aud.flip_rate["value"] == 0
    assert aud.fairness.gap("fitzpatrick", "accuracy")["value"] == pytest.approx(0.0)


def test_audit_with_a_predict_function_and_real_results(six):
    c = cohort()
    lookup = dict(zip(c["image_id"], np.where(c["fitzpatrick"] >= 5, "nv", c["dx"])))
    real = assess_fairness(*six, cfg())
    aud = audit_counterfactual(lambda images: [lookup[i] for i in images], c, images=list(c["image_id"]), real=real,
                               config=FairnessConfig(n_boot=50, min_group_size=2))
    assert aud.flip_rate["value"] == pytest.approx(10 / 30)
    assert aud.real is not None


def test_audit_refuses_a_cohort_without_counterfactual_groups():
    c = cohort()
    preds = c[["image_id"]].assign(y_pred=c["dx"])
    with pytest.raises(LesionGenError, match="no cf_group column"):
        audit_counterfactual(preds, c.drop(columns=["cf_group"]))
    with pytest.raises(LesionGenError, match="no cf_group column"):
        audit_counterfactual(preds, c.assign(cf_group=None))
    with pytest.raises(LesionGenError, match="no counterfactual groups"):
        audit_counterfactual(preds, c.assign(cf_group=range(len(c))))  # every rendering its own group
    with pytest.raises(LesionGenError, match="not fitzpatrick"):
        audit_counterfactual(preds, c.assign(cf_attribute="dx"))
    with pytest.raises(LesionGenError, match="have no prediction"):
        audit_counterfactual(preds.iloc[:-1], c)
