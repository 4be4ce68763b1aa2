"""Prompt adherence: exact scores on hand-made cases, and a check that fails when a model ignores its prompt."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesiongen.adherence import (Scores, adherence, counterfactual_control, prompt_blind, real_reference, score_labels,
                                 skin_tone_check)
from lesiongen.core import LesionGenError


class StubJudges:
    "Judge `dx` from the mean red value (red: vasc) and `streaks` from the mean blue value (blue: irregular)"
    attributes, resolution = ["dx", "streaks"], 32
    def labels(self, a): return ["nv", "vasc"] if a == "dx" else ["absent", "irregular", "regular"]
    def predict_proba(self, images, attributes=None):
        a = np.stack([np.asarray(im, dtype=float).mean((0, 1)) for im in images])
        red, blue = a[:, 0] > 128, a[:, 2] > 128
        return {"dx": np.stack([~red, red], 1).astype(float),
                "streaks": np.stack([~blue, blue, np.zeros_like(blue)], 1).astype(float)}


def img(r, g, b): return Image.fromarray(np.full((32, 32, 3), (r, g, b), np.uint8))


def test_hand_made_case_is_scored_exactly():
    images = [img(200, 0, 0), img(200, 0, 200), img(0, 0, 200), img(0, 0, 0), img(200, 0, 0)]
    prompted = pd.DataFrame({"dx": ["vasc", "vasc", "nv", "nv", "nv"],
                             "streaks": ["absent", "irregular", "regular", "absent", "absent"]})
    rep = adherence(StubJudges(), images, prompted, ita=False)
    t = rep.table.set_index("attribute")
    assert t.loc["dx", "agreement"] == pytest.approx(4 / 5)
    assert t.loc["dx", "balanced_agreement"] == pytest.approx((2 / 2 + 2 / 3) / 2)
    # value level: `regular` was judged `irregular`; presence level: all five agree
    assert t.loc["streaks", "agreement"] == pytest.approx(4 / 5)
    assert t.loc["streaks:presence", "agreement"] == pytest.approx(1.0)
    bv = rep.by_value.set_index(["attribute", "value"])
    assert bv.loc[("dx", "nv"), "n"] == 3 and bv.loc[("dx", "nv"), "agreement"] == pytest.approx(2 / 3)
    assert rep.confusion["dx"].loc["nv", "vasc"] == 1 and rep.confusion["dx"].loc["vasc", "vasc"] == 2


def test_relative_adherence_divides_by_the_real_reference():
    ref = score_labels(pd.DataFrame({"dx": ["nv", "nv", "vasc", "vasc"]}), pd.DataFrame({"dx": ["nv", "vasc", "vasc", "vasc"]}))
    rep = adherence(StubJudges(), [img(200, 0, 0), img(0, 0, 0)], pd.DataFrame({"dx": ["vasc", "vasc"]}), reference=ref, ita=False)
    t = rep.table.set_index("attribute")
    assert t.loc["dx", "real_agreement"] == pytest.approx(0.75)
    assert t.loc["dx", "relative"] == pytest.approx(0.5 / 0.75)


def test_skin_tone_check_bins_ita_like_curation():
    t = skin_tone_check([70, 50, 30, 15, -10, -60], [1, 2, 3, 4, 5, 6])
    assert t["in_group"].tolist() == [1.0] * 6 and t["n"].tolist() == [1] * 6


def test_counterfactual_control_follows_and_stays():
    plan = pd.DataFrame({"lesion_id": ["a", "a", "b", "b"], "cf_attribute": "dx", "dx": ["vasc", "nv", "vasc", "nv"],
                         "streaks": ["absent"] * 4})
    images = [img(200, 0, 0), img(0, 0, 0), img(200, 0, 0), img(0, 0, 200)]  # lesion b's second image grew streaks
    row = counterfactual_control(StubJudges(), images, plan, ita=False).iloc[0]
    assert row["follows"] == pytest.approx(1.0)
    assert row["stays[streaks:presence]"] == pytest.approx(0.5) and row["groups"] == 2


def test_concept_counterfactual_counts_switched_lesions():
    plan = pd.DataFrame({"lesion_id": ["a", "a", "b", "b", "c", "c"], "cf_attribute": "streaks", "dx": ["nv"] * 6,
                         "streaks": ["absent", "regular"] * 3})
    # a: off then on (switched); b: on in both images (not switched); c: off then on (switched)
    images = [img(0, 0, 0), img(0, 0, 200), img(0, 0, 200), img(0, 0, 200), img(0, 0, 0), img(0, 0, 200)]
    row = counterfactual_control(StubJudges(), images, plan, ita=False).iloc[0]
    assert row["lesions_switched"] == pytest.approx(2 / 3)
    assert row["follows_presence"] == pytest.approx(5 / 6)
    assert row["follows"] == pytest.approx(2 / 6)  # exact value: only the two `absent` images judged black; blue is `irregular`, never `regular`
    assert row["stays[dx]"] == pytest.approx(1.0)


def test_bad_input_is_named():
    with pytest.raises(LesionGenError, match="2 images but 1 prompted"):
        adherence(StubJudges(), [img(0, 0, 0)] * 2, pd.DataFrame({"dx": ["nv"]}))
    with pytest.raises(LesionGenError, match="cf_attribute"):
        counterfactual_control(StubJudges(), [img(0, 0, 0)], pd.DataFrame({"lesion_id": ["a"], "dx": ["nv"]}))


@pytest.fixture(scope="module")
def phantom_judges(tmp_path_factory):
    "Tiny judges of the skin type, trained on a small phantom set in seconds"
    from lesiongen.classify import JudgeConfig, train_judges
    from lesiongen.data import curate
    from lesiongen.phantom import PhantomConfig, write_phantom
    root = tmp_path_factory.mktemp("adh")
    truth = write_phantom(root / "raw", PhantomConfig(n=160, size=32, seed=1, format="derm7pt",
                                                      fitzpatrick_probs={1: .3, 2: 0, 3: 0, 4: 0, 5: 0, 6: .7} ),
                          progress=False)
    curate("derm7pt", root / "raw", root / "cur")
    judges = train_judges(root / "cur" / "records.csv", root / "judges", JudgeConfig.tiny(attributes=("fitzpatrick",)))
    return judges, truth, root


def test_adherence_fails_a_model_that_ignores_its_prompt(phantom_judges):
    "A prompt-following mock (phantom rendered from the prompt) passes; a prompt-blind mock (any image) is flagged"
    from lesiongen.phantom import render_phantom
    judges, truth, root = phantom_judges
    rng = np.random.default_rng(0)
    prompts = truth.sample(60, random_state=0).reset_index(drop=True)  # each carries its true skin type
    prompted = pd.DataFrame({"fitzpatrick": prompts["fitzpatrick"]})
    following = [Image.fromarray(render_phantom(r, 32)) for r in prompts.to_dict("records")]
    blind = [following[i] for i in rng.permutation(len(following))]  # same images, unrelated to their prompts
    ok, bad = (adherence(judges, ims, prompted, ita=False) for ims in (following, blind))
    assert prompt_blind(ok) == [] and prompt_blind(bad) == ["fitzpatrick"]
    assert ok.table.set_index("attribute").loc["fitzpatrick", "balanced_agreement"] > 0.9
    ref = real_reference(judges, root / "cur" / "records.csv", split="test")
    assert ref.table.set_index("attribute").loc["fitzpatrick", "agreement"] > 0.9
