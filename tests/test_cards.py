"""Hugging Face cards: the README.md of a trained model folder and of a generated set parse as model/dataset cards
with the right front matter, say research use only, state their evaluation, and do not confuse the folder loader."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from huggingface_hub import DatasetCard, ModelCard

from lesiongen.core import NOT_EVALUATED, RESEARCH_ONLY, data_sources
from lesiongen.data import curate
from lesiongen.llm import caption_records
from lesiongen.phantom import PhantomConfig, write_phantom
from lesiongen.train import TrainConfig, check_inputs, model_card, train

LESIONGEN = str(Path(sys.executable).parent / "lesiongen")
MODEL_SECTIONS = ["Intended use", "Data sources and licences", "Training data", "Training configuration", "Evaluation",
                  "Known limitations"]

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture of conftest.py


def front_matter(path) -> dict:
    "The YAML between the card's leading `---` lines, parsed on its own (not through huggingface_hub)"
    text = Path(path).read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


def headings(path) -> list[str]:
    return [l[3:].strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.startswith("## ")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    write_phantom(root / "raw", PhantomConfig(n=40, size=32, seed=0, format="derm7pt"), progress=False)
    curate("derm7pt", root / "raw", root / "cur")
    caption_records(root / "cur" / "records.csv", root / "cur" / "captions.jsonl", style="short", progress=False)
    return dict(records=str(root / "cur" / "records.csv"), captions=str(root / "cur" / "captions.jsonl"))


@pytest.fixture(scope="module")
def compact_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    return train(TrainConfig.tiny(**inputs, out=str(out), max_train_steps=2, validation_prompts=()))


def test_compact_run_card(compact_run):
    meta = front_matter(compact_run / "README.md")
    assert meta == ModelCard.load(compact_run / "README.md").data.to_dict()  # huggingface_hub reads the same
    # phantom data (Apache-2.0) and the MiniLM text encoder stored with it (Apache-2.0); trained from scratch: no base
    assert (meta["license"], meta["library_name"], meta["pipeline_tag"]) == ("apache-2.0", "diffusers", "text-to-image")
    assert meta["datasets"] == ["lesiongen-phantom"] and "base_model" not in meta
    assert {"lesiongen", "dermatology", "synthetic", "diffusers", "text-to-image", "compact"} <= set(meta["tags"])
    text = (compact_run / "README.md").read_text()
    assert RESEARCH_ONLY in text and NOT_EVALUATED in text and "More Information Needed" not in text
    assert headings(compact_run / "README.md") == MODEL_SECTIONS
    assert "| optimizer steps | 2 |" in text and "final loss" in text


def test_lora_and_full_cards_name_the_base(inputs, tmp_path):
    "A fine-tune of a Hub model names it as `base_model` and inherits its licence (checked offline: no weights load)"
    for full, relation in ((False, "adapter"), (True, "finetune")):
        cfg = TrainConfig(**inputs, out=str(tmp_path / f"run{full}"), base="CompVis/stable-diffusion-v1-4", rank=4,
                          full=full, use_ema=full, max_train_steps=3)
        card = model_card(cfg, check_inputs(cfg))
        meta = ModelCard(card).data.to_dict()
        assert (meta["base_model"], meta["base_model_relation"]) == ("CompVis/stable-diffusion-v1-4", relation)
        assert (meta["license"], meta["license_name"]) == ("other", "apache-2.0-and-creativeml-openrail-m")
        assert ("lora" in meta["tags"]) == (not full)
        assert ("| method | full UNet fine-tune |" if full else "| method | LoRA rank 4 |") in card
        assert RESEARCH_ONLY in card and NOT_EVALUATED in card


def test_generated_set_card_and_folder_curation(inputs, compact_run, tmp_path):
    from lesiongen.generate import GenConfig, generate
    syn = tmp_path / "syn"
    generate(GenConfig.tiny(model=str(compact_run), records=inputs["records"], out=str(syn), plan="balanced", n=12))
    meta = front_matter(syn / "README.md")
    assert meta == DatasetCard.load(syn / "README.md").data.to_dict()
    assert meta["license"] == "apache-2.0"  # the model's card (phantom, MiniLM) and the phantom records
    assert meta["task_categories"] == ["image-classification", "text-to-image"] and meta["size_categories"] == ["n<1K"]
    assert meta["source_datasets"] == ["lesiongen-phantom"] and {"lesiongen", "dermatology", "synthetic"} <= set(meta["tags"])
    text = (syn / "README.md").read_text()
    assert RESEARCH_ONLY in text and NOT_EVALUATED in text and "| total | 2 | 2 | 2 | 2 | 2 | 2 | 12 |" in text
    assert headings(syn / "README.md")[:2] == ["Intended use", "Data sources and licences"]
    assert headings(syn / "README.md")[-2:] == ["Evaluation", "Known limitations"]
    # the card sits in the dataset's root; the folder loader reads the set exactly as before
    p = subprocess.run([LESIONGEN, "curate", "--dataset", "folder", "--root", str(syn), "--csv", "metadata.csv",
                        "--image-col", "file_name", "--label-col", "dx", "--lesion-col", "lesion_id",
                        "--fitzpatrick-col", "fitzpatrick", "--out", str(tmp_path / "cur")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec, gen = pd.read_csv(tmp_path / "cur" / "records.csv"), pd.read_csv(syn / "metadata.csv")
    assert len(rec) == 12 and sorted(rec["dx"]) == sorted(gen["dx"]) and not rec["file_name"].str.endswith(".md").any()
    # a model trained on the curated set would name it as a synthetic source, with the licence of its card
    src = data_sources(tmp_path / "cur" / "records.csv")
    assert [(s["id"], s["licences"]) for s in src] == [("lesiongen-synthetic", ["apache-2.0"])]


def test_evaluated_set_shows_its_subgroup_metrics(inputs, compact_run, tmp_path):
    "Prompt adherence saved in the set's folder replaces the not-evaluated line with per-value (subgroup) tables"
    from lesiongen.generate import GenConfig, generate
    cfg = GenConfig.tiny(model=str(compact_run), records=inputs["records"], out=str(tmp_path / "syn"), plan="balanced", n=6)
    generate(cfg)
    (tmp_path / "syn" / "adherence.json").write_text(json.dumps({"summary": {"fitzpatrick_within_one": 0.5}}))
    pd.DataFrame({"attribute": ["fitzpatrick", "fitzpatrick"], "value": ["1", "6"], "n": [3, 3],
                  "agreement": [0.6667, 0.0]}).to_csv(tmp_path / "syn" / "adherence_by_value.csv", index=False)
    generate(cfg)  # a re-run of a finished set renders nothing and rewrites the card
    text = (tmp_path / "syn" / "README.md").read_text()
    assert NOT_EVALUATED not in text and "`fitzpatrick_within_one`: 0.5" in text and "| fitzpatrick | 6 | 3 | 0.0 |" in text
