"""Fidelity metrics and the memorization audit: small inputs whose right answers are known by construction."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lesiongen.core import LesionGenError
from lesiongen.fidelity import (FidelityConfig, FidelityResult, MemorizationConfig, PixelFeatures, extract_features,
                                fidelity, fidelity_scores, frechet_distance, kernel_distance, memorization, prdc_scores)


def fields(n, seed, size=32):
    "Random smooth colour fields, uint8 [n, size, size, 3]"
    g = np.random.default_rng(seed).integers(0, 256, (n, 3, 4, 4)).astype(np.float32)
    x = F.interpolate(torch.from_numpy(g), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def brighten(images, by):
    return np.clip(images.astype(int) + by, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- FID / KID -------------------------------------------------------------------------------------------------------

def test_fid_kid_of_identical_sets_is_zero_and_of_shifted_sets_positive():
    real = fields(60, 0)
    cfg = FidelityConfig(kid_subsets=20, kid_subset_size=60, nearest_k=3, min_group_size=8)
    same = fidelity(real, real.copy(), PixelFeatures(4), config=cfg).overall()
    shifted = fidelity(real, brighten(real, 40), PixelFeatures(4), config=cfg).overall()
    assert abs(same["fid"]) < 1e-6
    assert shifted["fid"] > 0.1  # 48 features each moved by ~40/255: ||d mu||^2 ~ 48 * 0.024 ~ 1.1
    assert abs(same["kid"]) < 0.05 * shifted["kid"] and shifted["kid"] > 0
    assert same["precision"] == 1.0 and same["coverage"] == 1.0


def test_fid_matches_the_closed_form():
    "Same covariance, means apart by 1 in each of d dimensions: FID = d exactly"
    x = np.random.default_rng(1).normal(size=(300, 5))
    assert frechet_distance(x, x + 1) == pytest.approx(5.0, abs=1e-6)
    # different spread: y vs 2y in 1-d gives (2m - m)^2 + s^2 + 4 s^2 - 2 * 2 s^2 = m^2 + s^2 (sample mean m, variance s^2)
    y = np.random.default_rng(2).normal(size=(500, 1))
    assert frechet_distance(y, 2 * y) == pytest.approx(y.mean() ** 2 + y.var(ddof=1), rel=1e-6)


def test_kid_is_seeded():
    x, y = np.random.default_rng(3).normal(size=(50, 4)), np.random.default_rng(4).normal(size=(50, 4)) + 0.5
    assert kernel_distance(x, y, 10, 20, seed=7) == kernel_distance(x, y, 10, 20, seed=7)


# --- precision / recall / density / coverage ---------------------------------------------------------------------------

def test_prdc_hand_made_case():
    "Real 0..4 (k=1 radii 1); generated 0.5, 10, 20 (radii 9.5, 9.5, 10)"
    p = prdc_scores(np.arange(5.0)[:, None], np.array([[0.5], [10.0], [20.0]]), k=1)
    assert p["precision"] == pytest.approx(1 / 3)   # only 0.5 lies in a real ball
    assert p["recall"] == pytest.approx(1.0)        # every real point within 9.5 of 0.5
    assert p["density"] == pytest.approx(2 / 3)     # 0.5 lies in 2 real balls: (2 + 0 + 0) / 3 / k
    assert p["coverage"] == pytest.approx(0.4)      # real 0 and 1 have a generated point inside their ball


def test_prdc_mode_collapse_keeps_precision_loses_recall():
    real = np.random.default_rng(5).normal(size=(100, 2))
    collapsed = np.repeat(real[:3], 34, axis=0)[:100] + 1e-3 * np.random.default_rng(6).normal(size=(100, 2))
    p = prdc_scores(real, collapsed, k=5)
    assert p["precision"] == 1.0 and p["coverage"] < 0.5 and p["recall"] < 0.5


# --- per group -----------------------------------------------------------------------------------------------------------

def test_per_group_hand_made_case():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    real = np.concatenate([a, b, rng.normal(size=(3, 3)), rng.normal(size=(10, 3))])
    syn = np.concatenate([a, b + 10, rng.normal(size=(3, 3))])
    gr = pd.DataFrame({"dx": ["a"] * 30 + ["b"] * 30 + ["c"] * 3 + ["d"] * 10,
                       "fitzpatrick": [1.0] * 30 + [6.0] * 30 + [None] * 13})
    gs = pd.DataFrame({"dx": ["a"] * 30 + ["b"] * 30 + ["c"] * 3, "fitzpatrick": [1] * 30 + [6] * 30 + [2] * 3})
    res = fidelity_scores(real, syn, gr, gs, FidelityConfig.tiny(), extractor="test")
    t = res.table.set_index(["attribute", "group"])
    assert t.loc[("dx", "a"), "fid"] == pytest.approx(0, abs=1e-6)
    assert t.loc[("dx", "b"), "fid"] == pytest.approx(300, abs=1e-6)  # 3 features shifted by 10
    assert t.loc[("dx", "a"), "precision"] == 1.0 and t.loc[("dx", "b"), "precision"] == 0.0
    # Fitzpatrick 3.0 and 3 are the same group; type 1 is group a, type 6 is group b
    assert t.loc[("fitzpatrick", "1"), "fid"] == pytest.approx(0, abs=1e-6)
    assert t.loc[("fitzpatrick", "6"), "fid"] == pytest.approx(300, abs=1e-6)
    # small, one-sided and missing groups keep their rows, counts and reasons
    assert t.loc[("dx", "c"), ["n_real", "n_syn"]].tolist() == [3, 3] and math.isnan(t.loc[("dx", "c"), "kid"])
    assert "too few images" in t.loc[("dx", "c"), "reason"]
    assert t.loc[("dx", "d"), "reason"] == "no synthetic images"
    assert t.loc[("fitzpatrick", "2"), "reason"] == "no real images"
    assert t.loc[("fitzpatrick", "<missing>"), "n_real"] == 13
    assert t.loc[("all", "all"), "reason"] == "" and t.loc[("all", "all"), "n_real"] == 73
    # JSON round trip, NaN as null
    d = json.loads(json.dumps(res.to_dict()))
    assert d["extractor"] == "test" and d["overall"]["n_syn"] == 63
    back = FidelityResult.from_dict(d).table.set_index(["attribute", "group"])
    assert back.loc[("dx", "b"), "fid"] == pytest.approx(300, abs=1e-6) and math.isnan(back.loc[("dx", "c"), "fid"])
    assert set(res.long()["metric"]) == {"fid", "kid", "kid_std", "precision", "recall", "density", "coverage"}


def test_features_are_extracted_once_per_set():
    class Counting(PixelFeatures):
        calls = 0
        def forward(self, x):
            Counting.calls += 1; return super().forward(x)
    real = fields(40, 1)
    g = pd.DataFrame({"dx": ["a", "b"] * 20})
    fidelity(real, real, Counting(4), g, g, FidelityConfig.tiny(batch_size=64))
    assert Counting.calls == 2


def test_result_saves(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 2))
    res = fidelity_scores(x, x + 0.1, config=FidelityConfig.tiny(), extractor="x")
    res.save(tmp_path)
    j = json.loads((tmp_path / "fidelity.json").read_text())
    assert "research" in j["research_use"].lower() and j["overall"]["n_real"] == 20
    assert pd.read_csv(tmp_path / "fidelity.csv").shape[0] == 1


# --- memorization ----------------------------------------------------------------------------------------------------

def test_planted_duplicates_are_found_and_distinct_images_are_not():
    train, test, new = fields(40, 1), fields(40, 2), fields(10, 3)
    noisy = brighten(train[7], np.random.default_rng(4).integers(-6, 7, train[7].shape))
    syn = np.concatenate([new, train[3:4], noisy[None]])
    rep = memorization(syn, train, PixelFeatures(8), test, train_ids=[f"t{i}" for i in range(40)])
    flagged = rep.pairs.index[rep.pairs["near_copy"]].tolist()
    assert flagged == [10, 11]
    assert rep.pairs.loc[10, "feature_nn"] == "t3" and rep.pairs.loc[10, "pixel_distance"] == pytest.approx(0, abs=1e-6)
    assert rep.pairs.loc[11, "pixel_nn"] == "t7" and rep.pairs.loc[11, "feature_nn"] == "t7"
    assert rep.replication_rate == pytest.approx(2 / 12)
    assert rep.reference is not None and rep.reference_rate <= 2 * 0.01 + 1 / 40
    assert rep.p_excess < 0.05
    s = json.loads(json.dumps(rep.to_dict()))
    assert s["n_flagged"] == 2 and len(s["flagged"]) == 2


def test_honest_set_is_flagged_at_most_at_the_reference_rate():
    train, test, honest = fields(60, 11), fields(60, 12), fields(30, 13)
    rep = memorization(honest, train, PixelFeatures(8), test)
    assert rep.pairs["near_copy"].sum() <= 2 and rep.p_excess > 0.05


def test_fixed_thresholds_need_no_test_images():
    train = fields(10, 1)
    rep = memorization(train[:2], train, PixelFeatures(4), config=MemorizationConfig(feature_threshold=0.0, pixel_threshold=0.0))
    assert rep.pairs["near_copy"].all() and rep.thresholds["source"]["pixel"] == "fixed"
    assert math.isnan(rep.reference_rate)


# --- bad input, one line each ----------------------------------------------------------------------------------------

def test_bad_input_is_named():
    x = fields(12, 0)
    with pytest.raises(LesionGenError, match="no synthetic images"):
        fidelity(x, [], PixelFeatures(4))
    with pytest.raises(LesionGenError, match="no real images"):
        fidelity(np.zeros((0, 32, 32, 3), np.uint8), x, PixelFeatures(4))
    with pytest.raises(LesionGenError, match="groups_syn has 5 rows but there are 12 synthetic images"):
        fidelity(x, x, PixelFeatures(4), pd.DataFrame({"dx": ["a"] * 12}), pd.DataFrame({"dx": ["a"] * 5}))
    with pytest.raises(LesionGenError, match="pass both groups_real and groups_syn"):
        fidelity(x, x, PixelFeatures(4), pd.DataFrame({"dx": ["a"] * 12}))
    with pytest.raises(LesionGenError, match="32x32 px but synthetic images are 16x16 px"):
        fidelity(x, fields(12, 1, size=16), PixelFeatures(4))
    with pytest.raises(LesionGenError, match="different sizes"):
        fidelity([Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))], x, PixelFeatures(4))
    with pytest.raises(LesionGenError, match="kid_subset_size=50 is more than the 12 real / 12 synthetic images"):
        fidelity(x, x, PixelFeatures(4), config=FidelityConfig(kid_subset_size=50))
    with pytest.raises(LesionGenError, match="need at least nearest_k \\+ 2 = 7"):
        fidelity(x[:4], x, PixelFeatures(4))
    with pytest.raises(LesionGenError, match="min_group_size must be at least nearest_k"):
        FidelityConfig(nearest_k=5, min_group_size=5)
    with pytest.raises(LesionGenError, match="needs real test images"):
        memorization(x[:2], x, PixelFeatures(4))
    with pytest.raises(LesionGenError, match="at least 2 reference"):
        memorization(x[:2], x[:1], PixelFeatures(4), x)
    with pytest.raises(LesionGenError, match="quantile must be in"):
        MemorizationConfig(quantile=0.7)
    with pytest.raises(LesionGenError, match="uint8"):
        extract_features(x.astype(np.float32), PixelFeatures(4))


def test_image_batch_is_the_classify_helper():
    "fidelity.image_batch is classify.as_image_batch without a resolution: the same inputs, results and messages"
    from lesiongen.classify import as_image_batch
    from lesiongen.fidelity import image_batch
    x = fields(3, 0, size=8)
    assert torch.equal(image_batch(x), as_image_batch(x)) and image_batch(x).shape == (3, 3, 8, 8)
    ims = [Image.fromarray(im) for im in x]
    assert torch.equal(image_batch(ims), image_batch(torch.from_numpy(x).permute(0, 3, 1, 2)))
    for bad in (x.astype(np.float32), [x[0]], "images", ims + [Image.new("RGB", (4, 4))], []):
        with pytest.raises(LesionGenError) as a: image_batch(bad, "synthetic images")
        with pytest.raises(LesionGenError) as b: as_image_batch(bad, None, "synthetic images", allow_empty=False)
        assert str(a.value) == str(b.value) and "synthetic images" in str(a.value)
