"""lesiongen.generate end to end on a tiny compact model (and tiny SD/LoRA folders): plan counts, captions in the
training language, the manifest, determinism, resume after SIGKILL, refused settings, bad inputs, and a 2-process
split under torchrun."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lesiongen import generate as G
from lesiongen import model as M
from lesiongen.core import DERM7PT_CONCEPTS, LesionGenError
from lesiongen.data import curate
from lesiongen.phantom import PhantomConfig, write_phantom

BIN = Path(sys.executable).parent
LESIONGEN = str(BIN / "lesiongen")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as the in-process runs (and as torchrun's default)


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture of conftest.py


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_phantom(root / "ph", PhantomConfig(n=90, size=32, seed=0, format="derm7pt"), progress=False)
    curate("derm7pt", root / "ph", root / "cur")
    return str(root / "cur" / "records.csv")


@pytest.fixture(scope="module")
def train_rows(records):
    return G.training_rows(records)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    "An untrained tiny compact model saved as `lesiongen train --base compact` saves it"
    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    M.compact_pipeline(M.CompactConfig.tiny()).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd")
    M.tiny_stable_diffusion().save_pretrained(path)
    return str(path)


def run(*args, check=True, timeout=600, env=ENV):
    p = subprocess.run([LESIONGEN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"lesiongen {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def pngs(folder) -> dict:
    "file name -> bytes of the finished PNGs in `folder/images` (temp files excluded)"
    return {f.name: f.read_bytes() for f in sorted((Path(folder) / "images").glob("*.png"))}


# --- plans ---------------------------------------------------------------------------------------------------------

def test_empirical_follows_training_proportions(records, train_rows):
    plan = G.empirical_plan(records, 60)
    assert len(plan) == 60 and plan["image_id"].is_unique and plan["lesion_id"].is_unique
    dxs = sorted(train_rows["dx"].unique())
    want = dict(zip(dxs, G.allocate([int((train_rows["dx"] == d).sum()) for d in dxs], 60)))
    assert plan["dx"].value_counts().to_dict() == {d: k for d, k in want.items() if k}
    # every row is a real training combination: its facts are its donor's
    donors = train_rows.set_index("image_id")
    for r in plan.head(10).itertuples():
        d = donors.loc[r.source_image_id]
        assert (r.dx, r.fitzpatrick, r.streaks, r.site) == (d["dx"], d["fitzpatrick"], d["streaks"], d["site"])


def test_balanced_equal_per_cell_and_fills_empty_cells(records, train_rows):
    n_dx = train_rows["dx"].nunique()
    plan = G.balanced_plan(records, 3 * 6 * n_dx)
    cells = plan.groupby(["dx", "fitzpatrick"]).size()
    assert len(cells) == 6 * n_dx and set(cells) == {3}
    assert not (train_rows["fitzpatrick"] == 6).any()  # the phantom training split has no type VI ...
    vi = plan[plan["fitzpatrick"] == 6]  # ... so those cells borrow rows of the same diagnosis and set the type
    assert set(vi["donor_match"]) == {"diagnosis"}
    donors = train_rows.set_index("image_id")["dx"]
    assert (vi["source_image_id"].map(donors) == vi["dx"]).all()
    assert vi["text"].str.contains("type VI").all()
    exact = plan[plan["donor_match"] == "exact"]
    assert (exact["source_image_id"].map(train_rows.set_index("image_id")["fitzpatrick"]) == exact["fitzpatrick"]).all()


def test_targeted_follows_weights(records, tmp_path):
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"fitzpatrick=6": 2, "fitzpatrick=5,dx=mel": 1, "dx=nv,streaks=irregular": 1}))
    plan = G.targeted_plan(records, 41, w)
    assert plan["plan_group"].value_counts().to_dict() == {"fitzpatrick=6": 21, "fitzpatrick=5,dx=mel": 10,
                                                           "dx=nv,streaks=irregular": 10}
    g = plan.groupby("plan_group")
    assert set(g.get_group("fitzpatrick=6")["fitzpatrick"]) == {6}
    assert set(map(tuple, g.get_group("fitzpatrick=5,dx=mel")[["dx", "fitzpatrick"]].values)) == {("mel", 5)}
    nv = g.get_group("dx=nv,streaks=irregular")
    assert set(nv["dx"]) == {"nv"} and set(nv["streaks"]) == {"irregular"} and nv["text"].str.contains("irregular streaks").all()


def test_counterfactual_pairs(records):
    plan = G.counterfactual_plan(records, 5, seed=3)
    assert len(plan) == 5 * 6 and plan["lesion_id"].nunique() == 5
    for _, grp in plan.groupby("lesion_id"):
        assert sorted(grp["fitzpatrick"]) == [1, 2, 3, 4, 5, 6]
        assert grp["seed"].nunique() == 1 and grp["source_image_id"].nunique() == 1 and grp["cf_group"].nunique() == 1
        assert set(grp["cf_attribute"]) == {"fitzpatrick"}
        # the captions differ only in the skin clause
        stripped = {re.sub(r"Fitzpatrick type [IV]+ \([a-z ]+\)", "SKIN", t) for t in grp["text"]}
        assert len(stripped) == 1, grp["text"].tolist()
    assert plan["seed"].nunique() == 5


def test_counterfactual_other_attributes(records, train_rows):
    dx = G.counterfactual_plan(records, 3, attribute="dx", values=["mel", "nv"])
    assert len(dx) == 6 and dx["diagnosis"].isna().all()  # the fine diagnosis would name the old class
    assert dx.groupby("lesion_id")["dx"].apply(sorted).tolist() == [["mel", "nv"]] * 3
    assert all("melanoma" in t for t in dx[dx["dx"] == "mel"]["text"])
    veil = G.counterfactual_plan(records, 4, attribute="blue_whitish_veil", values=("absent", "present"))
    assert veil.groupby("lesion_id")["blue_whitish_veil"].apply(sorted).tolist() == [["absent", "present"]] * 4
    present = veil[veil["blue_whitish_veil"] == "present"]
    assert present["text"].str.contains("blue-whitish veil").all()
    assert not present["text"].str.contains("no blue-whitish veil").any()
    # the score counts the veil (major criterion, 2 points)
    pairs = veil.pivot(index="lesion_id", columns="blue_whitish_veil", values="seven_point_score")
    assert ((pairs["present"] - pairs["absent"]) == 2).all()
    with pytest.raises(LesionGenError, match="unknown value 'sometimes' of concept 'blue_whitish_veil'"):
        G.counterfactual_plan(records, 2, attribute="blue_whitish_veil", values=("absent", "sometimes"))


def test_captions_are_the_training_captions(records, train_rows, tmp_path):
    "Plan rows drawn from a training record get exactly the caption `lesiongen caption --max-tokens 77` wrote for it"
    from lesiongen.llm import caption_records, read_captions
    caption_records(records, tmp_path / "c.jsonl", style="short", max_tokens=77, progress=False)
    train_caps = read_captions(tmp_path / "c.jsonl").set_index("image_id")["text"]
    plan = G.empirical_plan(records, 40)
    assert (plan["text"] == plan["source_image_id"].map(train_caps)).all()


def test_csv_plan(records, tmp_path):
    f = tmp_path / "plan.csv"
    f.write_text("dx,fitzpatrick,streaks,text,seed\nmel,6,irregular,,7\nnv,II,,,\n,,,a dermoscopy image of a mole,\n")
    plan = G.csv_plan(f, n=2, records=records)
    assert len(plan) == 6 and plan["fitzpatrick"].tolist()[:4] == [6, 6, 2, 2]
    assert plan["seed"].tolist()[:2] == [7, 8]
    assert "irregular streaks" in plan["text"][0] and "estimated Fitzpatrick type VI (dark) skin" in plan["text"][0]
    assert plan["text"].tolist()[4:] == ["a dermoscopy image of a mole"] * 2


@pytest.mark.parametrize("content, match", [
    ("dx,fitzpatrick\nmel,3\nxyz,3\n", "row 2 (line 3), column 'dx': unknown diagnosis 'xyz'"),
    ("dx,fitzpatrick\nmel,7\n", "row 1 (line 2), column 'fitzpatrick': unknown skin type '7'"),
    ("dx,pigment_network\nnv,dotted\n", "row 1 (line 2), column 'pigment_network': unknown value 'dotted'"),
    ("dx,hair_colour\nnv,red\n", "unknown column(s) ['hair_colour']"),
    ("fitzpatrick\n3\n", "needs a 'text' or a 'dx' column"),
    ("dx,text\n,\n", "row 1 (line 2): no text and no dx"),
    ("dx,seed\nmel,-3\n", "column 'seed'"),
])
def test_csv_plan_errors_name_row_and_column(tmp_path, content, match):
    f = tmp_path / "plan.csv"
    f.write_text(content)
    with pytest.raises(LesionGenError, match=re.escape(match)):
        G.csv_plan(f)


@pytest.mark.parametrize("weights, match", [
    ({"fitzpatrick=7": 1}, "unknown skin type '7'"),
    ({"dx=akiec": 1}, "unknown diagnosis 'akiec'"),  # not in the training split
    ({"hair=red": 1}, "unknown column 'hair'"),
    ({"site=moon": 1}, "unknown site 'moon'"),
    ({"streaks=wavy": 1}, "unknown value 'wavy' of concept 'streaks'"),
    ({"fitzpatrick=6": 0}, "weight must be a positive number"),
    ({"fitzpatrick=6": -1}, "weight must be a positive number"),
    ({"fitzpatrick=6": float("nan")}, "weight must be a positive number"),
    ({"fitzpatrick=6": "2"}, "weight must be a positive number"),
    ({}, "names no group"),
])
def test_weights_errors_name_the_group(records, tmp_path, weights, match):
    f = tmp_path / "w.json"
    f.write_text(json.dumps(weights))  # NaN is written as the JSON extension `NaN`, which json.loads reads
    with pytest.raises(LesionGenError, match=re.escape(match)):
        G.targeted_plan(records, 10, f)


def test_weights_file_errors(records, tmp_path):
    with pytest.raises(LesionGenError, match="weights file not found"):
        G.targeted_plan(records, 10, tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{fitzpatrick=6: 2}")
    with pytest.raises(LesionGenError, match="not valid JSON"):
        G.targeted_plan(records, 10, tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LesionGenError, match="JSON object"):
        G.targeted_plan(records, 10, tmp_path / "list.json")


# --- generation ----------------------------------------------------------------------------------------------------

def test_manifest_and_curation(records, tiny_model, tmp_path):
    out = tmp_path / "syn"
    cfg = G.GenConfig.tiny(model=tiny_model, records=records, out=str(out), plan="counterfactual", n=2)
    res = G.generate(cfg)
    assert (res["n_images"], res["n_generated"]) == (12, 12)
    meta = pd.read_csv(out / "metadata.csv")
    assert tuple(meta.columns[:len(G.META_COLUMNS)]) == G.META_COLUMNS
    assert {"cf_group", "cf_attribute", "source_image_id", "diagnosis", "age", "sex", "site"} <= set(meta.columns)
    assert len(meta) == 12 and meta["file_name"].is_unique and meta["lesion_id"].nunique() == 2
    assert set(meta["scheduler"]) == {"dpmpp_sde"} and set(meta["steps"]) == {2} and set(meta["guidance"]) == {3.0}
    assert set(meta["model_hash"]) == {G.model_hash(tiny_model)} and set(meta["plan"]) == {"counterfactual"}
    assert set(meta["model"]) == {str(Path(tiny_model).resolve())}
    for f in meta["file_name"]:
        with Image.open(out / f) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (32, 32), "RGB")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "images", "metadata.csv", "plan.csv"]
    card = (out / "README.md").read_text()
    assert "not for clinical use" in card and "| total | 2 | 2 | 2 | 2 | 2 | 2 | 12 |" in card
    config = json.loads((out / "config.json").read_text())
    assert config["plan"] == "counterfactual" and config["n"] == 2 and config["settings"]["model"] == G.model_hash(tiny_model)
    # the set reads back as a dataset through the folder loader, labels and lesion groups intact
    res = curate("folder", out, tmp_path / "cur", csv=out / "metadata.csv", image_col="file_name", label_col="dx",
                 lesion_col="lesion_id", fitzpatrick_col="fitzpatrick")
    rec = res.records
    assert len(rec) == 12 and set(rec["fitzpatrick_source"]) == {"label"}
    assert rec["fitzpatrick"].astype(int).tolist() == meta["fitzpatrick"].tolist()
    assert rec["dx"].tolist() == meta["dx"].tolist()
    assert (rec.groupby("lesion_id")["split"].nunique() == 1).all()


def test_same_seed_same_bytes_other_seed_other_images(records, tiny_model, tmp_path):
    cfg = G.GenConfig.tiny(model=tiny_model, records=records, out=str(tmp_path / "a"), plan="empirical", n=6)
    G.generate(cfg)
    G.generate(replace(cfg, out=str(tmp_path / "b")))
    G.generate(replace(cfg, out=str(tmp_path / "c"), seed=1))
    a, b, c = (pngs(tmp_path / x) for x in "abc")
    assert len(a) == 6 and a == b
    assert all(a[k] != c[k] for k in a)
    # a seed is the image's: the same (caption, seed) in another chunk position gives the same pixels
    plan = pd.read_csv(tmp_path / "a" / "plan.csv")
    pipe = G.load_pipeline(tiny_model)
    pipe.scheduler = G.make_scheduler("dpmpp_sde", pipe.scheduler, pixel_space=True)
    first = G.sample_images(pipe, plan["text"][:4].tolist(), plan["seed"][:4].tolist(), 2, 3.0)
    again = G.sample_images(pipe, plan["text"][:4].tolist()[::-1], plan["seed"][:4].tolist()[::-1], 2, 3.0)[::-1]
    import numpy as np
    assert all(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1 for x, y in zip(first, again))


def test_settings_change_refused_naming_it(records, tiny_model, tmp_path):
    cfg = G.GenConfig.tiny(model=tiny_model, records=records, out=str(tmp_path / "s"), n=4)
    G.generate(cfg)
    before = pngs(tmp_path / "s")
    assert G.generate(cfg)["n_generated"] == 0  # the same settings: nothing left to do
    for change, name in ((dict(num_inference_steps=3), "num_inference_steps: 2 -> 3"), (dict(seed=5), "seed: 0 -> 5"),
                         (dict(n=5), "n: 4 -> 5"), (dict(scheduler="ddim"), "scheduler: 'dpmpp_sde' -> 'ddim'"),
                         (dict(guidance_scale=2.0), "guidance_scale: 3.0 -> 2.0")):
        with pytest.raises(LesionGenError, match=re.escape(name)):
            G.generate(replace(cfg, **change))
    assert pngs(tmp_path / "s") == before
    p = run("generate", "--model", tiny_model, "--records", records, "--n", 4, "--out", tmp_path / "s", "--steps", 3,
            "--batch-size", 4, "--quiet", check=False)
    assert p.returncode == 2 and "num_inference_steps" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("scheduler", G.SCHEDULERS)
def test_schedulers_render_deterministically(tiny_model, scheduler):
    pipe = G.load_pipeline(tiny_model)
    pipe.scheduler = G.make_scheduler(scheduler, pipe.scheduler, pixel_space=True)
    texts, seeds = ["dermoscopy image of a melanoma", "dermoscopy image of a nevus"], [1, 2]
    a = [im.tobytes() for im in G.sample_images(pipe, texts, seeds, 3, 3.0)]
    b = [im.tobytes() for im in G.sample_images(pipe, texts, seeds, 3, 3.0)]
    assert a == b and a[0] != a[1]


def test_resume_after_sigkill(records, tiny_model, tmp_path):
    "kill -9 mid-run, re-run: no duplicate, no truncated file, stale temp files gone, bytes equal an uninterrupted run"
    args = ["generate", "--model", tiny_model, "--records", records, "--plan", "balanced", "--n", 30, "--steps", 5,
            "--batch-size", 4, "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([LESIONGEN, *map(str, args), "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "images").glob("*.png"))) < 6 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = pngs(out)
    assert 0 < len(done) < 30, f"the run was not interrupted mid-way ({len(done)} images)"
    assert not (out / "metadata.csv").exists()
    for f in (out / "images").glob("*.png"):
        with Image.open(f) as im: im.load()  # a whole PNG, never a truncated one
    (out / "images" / ".syn_000029.png.stale.tmp").write_bytes(b"\x89PNG half")  # as a kill during a write leaves
    run(*args, "--out", out)
    assert not list(out.rglob(".*.tmp"))
    G.generate(G.GenConfig(model=tiny_model, records=records, plan="balanced", n=30, num_inference_steps=5, batch_size=4,
                           out=str(tmp_path / "whole"), progress=False))  # uninterrupted, in this process (also 1 thread)
    final, whole = pngs(out), pngs(tmp_path / "whole")
    assert len(final) == 30 and final == whole
    assert all(final[k] == v for k, v in done.items())  # what was written before the kill stands
    meta = pd.read_csv(out / "metadata.csv")
    assert len(meta) == 30 and meta["file_name"].is_unique


def test_bad_inputs_before_loading_the_model(records, tmp_path):
    "Each bad input is refused by check_inputs; the model folder's weights are garbage, so loading it would fail otherwise"
    fake = tmp_path / "fake_model"
    (fake / "unet").mkdir(parents=True)
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "LesionGenPipeline"}))
    (fake / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    base = G.GenConfig.tiny(model=str(fake), records=records, out=str(tmp_path / "out"))
    plan = tmp_path / "plan.csv"
    plan.write_text("dx,fitzpatrick\nmel,2\nmel,9\n")
    cases = [
        (dict(plan=str(plan), n=None), "row 2 (line 3), column 'fitzpatrick': unknown skin type '9'"),
        (dict(plan="counterfactual", cf_values=("1", "seven")), "unknown skin type 'seven'"),
        (dict(plan="targeted", weights=str(tmp_path / "none.json")), "weights file not found"),
        (dict(model=str(tmp_path)), "is not a lesiongen/diffusers model"),
        (dict(model=str(tmp_path / "missing")), "model folder not found"),
        (dict(splits=("holdout",)), "split(s) ['holdout']"),
        (dict(records=str(tmp_path / "none.csv")), "records file not found"),
    ]
    for change, match in cases:
        with pytest.raises(LesionGenError, match=re.escape(match)):
            G.check_inputs(replace(base, **change))
    assert not (tmp_path / "out").exists()
    for kw, match in ((dict(n=0), "n must be a positive integer"), (dict(num_inference_steps=0), "num_inference_steps"),
                      (dict(guidance_scale=-0.5), "guidance_scale"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(LesionGenError, match=match):
            replace(base, **kw)
    # and from the command line: status 2, one line, no traceback
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"fitzpatrick=6": 1, "dx=zz": 1}))
    for extra, match in ((["--n", 4, "--steps", 0], "steps"),
                         (["--n", 4, "--plan", "targeted", "--weights", w], "unknown diagnosis 'zz'"),
                         (["--n", 4, "--plan", plan], "unknown skin type '9'")):
        p = run("generate", "--model", fake, "--records", records, "--out", tmp_path / "cli", *extra, check=False)
        assert p.returncode == 2 and match in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    p = run("generate", "--model", tmp_path, "--records", records, "--out", tmp_path / "cli", "--n", 2, check=False)
    assert p.returncode == 2 and "not a lesiongen/diffusers model" in p.stderr


def test_foreign_or_tampered_folders_refused(records, tiny_model, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    cfg = G.GenConfig.tiny(model=tiny_model, records=records, out=str(tmp_path / "used"), n=4)
    with pytest.raises(LesionGenError, match="not empty"):
        G.generate(cfg)
    ok = replace(cfg, out=str(tmp_path / "ok"))
    G.generate(ok)
    plan = tmp_path / "ok" / "plan.csv"
    plan.write_text(plan.read_text().replace("syn_000001", "syn_000009"))
    with pytest.raises(LesionGenError, match="plan.csv differs"):
        G.generate(ok)


def test_stable_diffusion_and_lora_folders(records, tiny_sd, tmp_path):
    with pytest.raises(LesionGenError, match="not a lesiongen/diffusers model"):
        G.model_kind(tmp_path)
    assert G.model_kind(tiny_sd) == "sd"
    cfg = G.GenConfig.tiny(model=tiny_sd, records=records, n=4, out=str(tmp_path / "sd"))
    G.generate(cfg)
    meta = pd.read_csv(tmp_path / "sd" / "metadata.csv")
    assert set(meta["guidance"]) == {7.5} and set(meta["scheduler"]) == {"dpmpp"}  # Stable Diffusion's defaults
    with Image.open(tmp_path / "sd" / meta["file_name"][0]) as im: assert im.size == (32, 32)
    # a LoRA run folder, as `lesiongen train` writes it: the weights and a config.json naming the base
    pipe = M.tiny_stable_diffusion()
    M.add_lora(pipe.unet, rank=4)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))  # a non-zero adapter
    lora = tmp_path / "lora_run"
    M.save_lora(pipe.unet, lora)
    (lora / "config.json").write_text(json.dumps({"base": tiny_sd}))
    assert G.model_kind(lora) == "lora" and G.model_hash(lora) != G.model_hash(tiny_sd)
    G.generate(replace(cfg, model=str(lora), out=str(tmp_path / "lora")))
    assert pngs(tmp_path / "lora").keys() == pngs(tmp_path / "sd").keys()
    assert pngs(tmp_path / "lora") != pngs(tmp_path / "sd")  # the adapter changes the images
    # diffusers' script writes the weights alone: the base must be named
    script = tmp_path / "diffusers_lora"
    script.mkdir()
    shutil.copy(lora / M.LORA_WEIGHT_NAME, script / M.LORA_WEIGHT_NAME)
    with pytest.raises(LesionGenError, match="lora_base"):
        G.generate(replace(cfg, model=str(script), out=str(tmp_path / "script")))
    G.generate(replace(cfg, model=str(script), lora_base=tiny_sd, out=str(tmp_path / "script")))
    assert pngs(tmp_path / "script") == pngs(tmp_path / "lora")


def test_two_processes_cover_the_plan_once(records, tiny_model, tmp_path):
    "`torchrun --nproc_per_node 2 -- lesiongen generate`: every chunk once, images byte-equal to a single-process run"
    # the `--` keeps torchrun's own parser from reading `--n` (an ambiguous prefix of its options) as its own
    args = ["generate", "--model", tiny_model, "--records", records, "--plan", "counterfactual", "--n", 3,
            "--steps", 2, "--batch-size", 4, "--quiet"]  # 18 images in chunks of 4, 4, 4, 4, 2: 0, 2, 4 for rank 0
    env = {**ENV, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--", LESIONGEN, *map(str, args),
                        "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    shares = {int(m[0]): (int(m[1]), int(m[2]), int(m[3])) for m in
              re.findall(r"process (\d) of (\d) renders (\d+) in (\d+) chunk", p.stderr)}
    assert shares == {0: (2, 10, 3), 1: (2, 8, 2)}, p.stderr[-2000:]
    run(*args, "--out", tmp_path / "one")
    two, one = pngs(tmp_path / "two"), pngs(tmp_path / "one")
    assert len(one) == 18 and two == one
    assert (tmp_path / "two" / "metadata.csv").read_bytes() != b""
    m2, m1 = (pd.read_csv(tmp_path / x / "metadata.csv") for x in ("two", "one"))
    assert m2.drop(columns="model").equals(m1.drop(columns="model"))


@pytest.mark.parametrize("kind", ["compact", "sd"])
def test_guidance_interval(tiny_model, tiny_sd, kind):
    "Guidance limited to part of the schedule: an interval covering every step is full guidance exactly, one covering"
    " some steps lies strictly between full and no guidance, for the compact pipeline and (via callbacks) Stable Diffusion"
    pipe = G.load_pipeline(tiny_model if kind == "compact" else tiny_sd)
    pipe.scheduler = G.make_scheduler("dpmpp", pipe.scheduler, pixel_space=kind == "compact")
    pipe.set_progress_bar_config(disable=True)
    texts, seeds = ["dermoscopy image of a melanoma", "dermoscopy image of a melanocytic nevus"], [1, 2]

    def px(guidance_scale=5.0, **kw):
        ims = G.sample_images(pipe, texts, seeds, num_inference_steps=3, guidance_scale=guidance_scale, **kw)
        return torch.from_numpy(np.stack([np.asarray(im) for im in ims]))

    pipe.scheduler.set_timesteps(3)
    ts = [int(t) for t in pipe.scheduler.timesteps]  # e.g. [999, 666, 333]
    full, everything = px(), px(guidance_interval=(ts[-1] / 1000 - 0.01, 1.0))
    assert torch.equal(full, everything)  # the interval path, guiding all steps, is full guidance
    none = px(guidance_scale=1.0)
    for iv in [((ts[0] - 1) / 1000, 1.0), (0.0, (ts[1] + 1) / 1000)]:  # first step only; last two steps only
        part = px(guidance_interval=iv)
        assert not torch.equal(part, full) and not torch.equal(part, none), iv
    with pytest.raises(LesionGenError, match="guidance_interval"):
        G.sample_images(pipe, texts, seeds, num_inference_steps=3, guidance_interval=(0.9, 0.1))


@pytest.mark.parametrize("kind", ["compact", "sd"])
def test_negative_prompt_per_image(tiny_model, tiny_sd, kind):
    "One negative prompt per image: the shared string repeated is the string exactly; changing image 1's changes only it"
    pipe = G.load_pipeline(tiny_model if kind == "compact" else tiny_sd)
    pipe.scheduler = G.make_scheduler("dpmpp", pipe.scheduler, pixel_space=kind == "compact")
    pipe.set_progress_bar_config(disable=True)
    texts, seeds = ["dermoscopy image of a melanoma", "dermoscopy image of a melanocytic nevus"], [1, 2]

    def px(neg):
        ims = G.sample_images(pipe, texts, seeds, num_inference_steps=3, guidance_scale=5.0, negative_prompt=neg)
        return [np.asarray(im) for im in ims]

    def diff(a, b): return int(np.abs(a.astype(int) - b.astype(int)).max())
    shared, listed = px("blurry"), px(["blurry", "blurry"])
    assert all(diff(a, b) <= 1 for a, b in zip(shared, listed))
    mixed = px(["blurry", "dermoscopy image of a basal cell carcinoma"])
    assert diff(mixed[0], shared[0]) <= 1 and diff(mixed[1], shared[1]) > 1
    with pytest.raises(LesionGenError, match="2 captions but 1 negative prompts"):
        px(["blurry"])
