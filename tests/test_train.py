"""The training loop end to end on tiny models: compact and SD-LoRA runs, bit-identical resume, bad inputs, `accelerate launch`."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lesiongen.core import LesionGenError
from lesiongen.data import curate, read_records
from lesiongen.llm import caption_records
from lesiongen.phantom import PhantomConfig, write_phantom
from lesiongen.train import TrainConfig, check_inputs, list_checkpoints, read_loss, train


def make_inputs(root: Path, n: int = 16, size: int = 32, seed: int = 0) -> dict:
    "Write a curated, captioned phantom dataset under `root`"
    write_phantom(root / "raw", PhantomConfig(n=n, size=size, seed=seed), progress=False)
    curate("ham10000", root / "raw", root / "cur")
    caption_records(root / "cur" / "records.csv", root / "cur" / "captions.jsonl", style="short", progress=False)
    return dict(records=str(root / "cur" / "records.csv"), captions=str(root / "cur" / "captions.jsonl"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from lesiongen.model import tiny_stable_diffusion
    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_stable_diffusion().save_pretrained(path)
    return path


def test_compact_run_writes_everything(inputs, tmp_path):
    out = train(TrainConfig.tiny(**inputs, out=str(tmp_path / "run"), max_train_steps=2, checkpointing_steps=1,
                                 checkpoints_total_limit=1, num_validation_images=1))
    loss = read_loss(out)
    assert [r["step"] for r in loss] == [1, 2] and all(math.isfinite(r["loss"]) for r in loss)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # the total limit removed checkpoint-1
    for f in ("config.json", "loss.png", "validation/step-1.png", "validation/step-2.png", "model_index.json",
              "unet/diffusion_pytorch_model.safetensors", "README.md"):
        assert (out / f).is_file(), f
    assert json.loads((out / "config.json").read_text())["base"] == "compact"
    for f in (out / "checkpoint-2").iterdir():  # only JSON and safetensors: nothing is unpickled on resume
        assert f.suffix in (".json", ".safetensors"), f
        json.loads(f.read_text()) if f.suffix == ".json" else load_file(f)


def test_clause_conditioned_run_generates_with_the_training_encoding(inputs, tmp_path):
    from dataclasses import asdict
    from lesiongen.generate import load_pipeline
    from lesiongen.model import CompactConfig, split_clauses
    from lesiongen.train import encode_prompts
    tiny = {k: v for k, v in asdict(CompactConfig.tiny()).items() if k not in ("resolution", "prediction_type")}
    out = train(TrainConfig.tiny(**inputs, out=str(tmp_path / "run"), max_train_steps=1, validation_prompts=(),
                                 model_config={**tiny, "text_units": "token+clause", "max_text_clauses": 16}))
    pipe = load_pipeline(out)
    assert (pipe.text_units, pipe.text_length) == ("token+clause", 77 + 16)
    caption = json.loads(Path(inputs["captions"]).read_text().splitlines()[0])["text"]
    seen = encode_prompts([caption], pipe.tokenizer, pipe.text_encoder, compact=True, units="token+clause", max_clauses=16)
    emb, mask = pipe.encode_prompt([caption], torch.device("cpu"))
    assert torch.equal(mask, seen["mask"][seen["index"]]) and torch.allclose(emb, seen["hidden"][seen["index"]], atol=1e-5)
    assert int(mask[0, 77:].sum()) == len(split_clauses(caption)) > 1  # the caption's clauses follow its tokens


def test_resume_is_bit_identical(inputs, tmp_path):
    kw = dict(**inputs, max_train_steps=6, checkpointing_steps=3, gradient_accumulation_steps=2, validation_prompts=())
    train(TrainConfig.tiny(**kw, out=str(tmp_path / "a")))
    train(TrainConfig.tiny(**kw, out=str(tmp_path / "b")), stop_at_step=3)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-3"]
    assert not (tmp_path / "b" / "model_index.json").exists()  # an interrupted run writes no final weights
    train(TrainConfig.tiny(**kw, out=str(tmp_path / "b"), resume_from_checkpoint="latest"))
    for f in ("model", "ema", "optimizer"):
        a, b = (load_file(tmp_path / r / "checkpoint-6" / f"{f}.safetensors") for r in ("a", "b"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f
    assert read_loss(tmp_path / "a") == read_loss(tmp_path / "b")
    a, b = (load_file(tmp_path / r / "unet" / "diffusion_pytorch_model.safetensors") for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(inputs, tmp_path):
    kw = dict(**inputs, out=str(tmp_path / "r"), max_train_steps=2, checkpointing_steps=1, validation_prompts=())
    train(TrainConfig.tiny(**kw), stop_at_step=1)
    with pytest.raises(LesionGenError, match="learning_rate"):
        train(TrainConfig.tiny(**{**kw, "learning_rate": 0.5}, resume_from_checkpoint="latest"))
    with pytest.raises(LesionGenError, match="already holds checkpoints"):
        train(TrainConfig.tiny(**kw))


def _lines(path):
    return Path(path).read_text().splitlines(keepends=True)


@pytest.mark.parametrize("case, match", [
    ("empty captions", "holds no captions"),
    ("missing captions", "have no caption"),
    ("foreign ids", "share no image_id"),
    ("other records", "do not match their record's facts"),
    ("missing image", "ISIC_"),
    ("bad resolution", "resolution=34"),
    ("missing base", "/no/such/sd-v1-4"),
    ("unknown split", "holdout"),
    ("undecodable image", "cannot be decoded, first"),
    ("damaged curation report", "curation_report.json"),
    ("out through a file", "runs through the file"),
    ("out not writable", "is not writable"),
])
def test_bad_inputs_are_named(inputs, tmp_path, case, match, monkeypatch):
    kw = dict(**inputs, out=str(tmp_path / "out"))
    cap = tmp_path / "captions.jsonl"
    if case == "empty captions": cap.write_text(""); kw["captions"] = str(cap)
    elif case == "missing captions": cap.write_text("".join(_lines(inputs["captions"])[2:])); kw["captions"] = str(cap)
    elif case == "foreign ids": cap.write_text("".join(l.replace('"ISIC_', '"X_') for l in _lines(inputs["captions"]))); kw["captions"] = str(cap)
    elif case == "other records": kw["captions"] = make_inputs(tmp_path / "other", seed=1)["captions"]
    elif case == "missing image":
        mine = make_inputs(tmp_path / "mine")
        rec = read_records(mine["records"])
        (tmp_path / "mine" / "raw" / rec["file_name"][0]).unlink()
        kw.update(mine)
    elif case in ("undecodable image", "damaged curation report"):
        mine = make_inputs(tmp_path / "mine")
        if case == "undecodable image":
            rec = read_records(mine["records"])
            (tmp_path / "mine" / "raw" / rec["file_name"][3]).write_bytes(b"\xff\xd8 not a JPEG")
            match = f"cannot be decoded, first {tmp_path / 'mine' / 'raw' / rec['file_name'][3]}"
        else: (tmp_path / "mine" / "cur" / "curation_report.json").write_text('{"params": {"root": ')
        kw.update(mine)
    elif case == "out through a file":
        (tmp_path / "a_file").write_text("x"); kw["out"] = str(tmp_path / "a_file" / "run")
    elif case == "out not writable":  # as root a chmod does not stop writes, so the permission check is faked
        import lesiongen.train as T
        monkeypatch.setattr(T.os, "access", lambda path, mode: False)
    elif case == "bad resolution": kw.update(resolution=34, model_config={})  # 3 levels: multiples of 4
    elif case == "unknown split": kw["splits"] = ("holdout",)
    if case == "missing base": cfg = TrainConfig(**kw, base="/no/such/sd-v1-4")
    else: cfg = TrainConfig.tiny(**kw)
    with pytest.raises(LesionGenError, match=match): check_inputs(cfg)


def test_data_root_of_damaged_report(inputs, tmp_path):
    from lesiongen.train import data_root_of
    rec = tmp_path / "records.csv"
    rec.write_text(Path(inputs["records"]).read_text())
    (tmp_path / "curation_report.json").write_text('{"params": {"root": "/da')  # cut short by a full disk
    with pytest.raises(LesionGenError, match=f"curation report {re.escape(str(tmp_path))}/curation_report.json is damaged"):
        data_root_of(rec)


def test_bad_config_values():
    for kw, match in ((dict(rank=0), "rank"), (dict(max_train_steps=0), "max_train_steps"),
                      (dict(caption_dropout=1.5), "caption_dropout"), (dict(prediction_type="x0"), "prediction_type")):
        with pytest.raises(LesionGenError, match=match): TrainConfig(**kw)


def test_sd_resolution_checked_against_vae_and_unet(inputs, tiny_sd, tmp_path):
    cfg = TrainConfig(**inputs, out=str(tmp_path / "sd"), base=str(tiny_sd), rank=4, resolution=34, train_batch_size=2,
                      max_train_steps=1, validation_prompts=(), progress=False)
    with pytest.raises(LesionGenError, match="multiple of the model's downsampling factor 4"): train(cfg)


def test_sd_lora_output_loads_in_diffusers(inputs, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = train(TrainConfig(**inputs, out=str(tmp_path / "lora"), base=str(tiny_sd), rank=4, resolution=32,
                            train_batch_size=2, gradient_accumulation_steps=1, max_train_steps=2, checkpointing_steps=2,
                            learning_rate=1e-3, validation_prompts=("dermoscopy image of a melanoma",),
                            num_validation_images=1, validation_inference_steps=2, progress=False))
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "validation" / "step-2.png").is_file()
    assert set(load_file(out / "checkpoint-2" / "model.safetensors")) and all(
        "lora" in k for k in load_file(out / "checkpoint-2" / "model.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    x, e = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): before = pipe.unet(x, 10, e).sample
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad(): after = pipe.unet(x, 10, e).sample
    assert (after - before).abs().max() > 0  # the trained adapter is applied
    img = pipe("dermoscopy image of a nevus", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_accelerate_launch_one_process(inputs, tmp_path):
    "`accelerate launch $(which lesiongen) train ...` runs the command line under accelerate, as on several GPUs"
    accelerate, lesiongen = (Path(sys.executable).parent / n for n in ("accelerate", "lesiongen"))
    p = subprocess.run([str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", str(lesiongen), "train", "--records", inputs["records"],
                        "--captions", inputs["captions"], "--base", "compact", "--out", str(tmp_path / "run"),
                        "--max-steps", "2", "--batch-size", "4", "--checkpointing-steps", "2",
                        "--validation-prompt", "dermoscopy image of a melanoma", "--num-validation-images", "1",
                        "--no-progress"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in read_loss(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "checkpoint-2" / "rng-0.safetensors").is_file()


def test_torchrun_two_cpu_processes_split_the_data(inputs, tmp_path):
    "Under `torchrun --nproc_per_node 2` on a CPU each process has its own rank, and every step uses each image once"
    from lesiongen.train import batch_indices, epoch_permutation
    order = epoch_permutation(16, seed=0, epoch=0)
    seen = torch.cat([batch_indices(order, b, 4, num_processes=2, process_index=r) for b in range(2) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(16))  # one epoch of 2 batches x 2 processes x 4 images: no duplicate, no gap
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, sys\nfrom accelerate import PartialState\nfrom lesiongen.train import TrainConfig, train\n"
        f"train(TrainConfig.tiny(records={inputs['records']!r}, captions={inputs['captions']!r}, out={str(tmp_path / 'run')!r}, "
        "max_train_steps=2, checkpointing_steps=2, validation_prompts=()))\n"
        "s = PartialState()\n"
        "print(json.dumps({'rank': s.process_index, 'world': s.num_processes, 'type': str(s.distributed_type)}))\n")
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world"] for r in ranks} == {2}, ranks
    run = tmp_path / "run"
    state = json.loads((run / "checkpoint-2" / "state.json").read_text())
    assert state["num_processes"] == 2
    assert (run / "checkpoint-2" / "rng-0.safetensors").is_file() and (run / "checkpoint-2" / "rng-1.safetensors").is_file()
    assert [r["step"] for r in read_loss(run)] == [1, 2]  # one loss row per step, written by the main process only
    assert (run / "model_index.json").is_file()


# --- crash safety: what a kill or bad luck leaves behind, and what the next run makes of it -----------------------

def _tiny(inputs, out, **kw):
    return TrainConfig.tiny(**{**dict(inputs, out=str(out), max_train_steps=4, checkpointing_steps=1,
                                      validation_prompts=()), **kw})


def test_torn_loss_tail_is_cut_on_resume(inputs, tmp_path):
    "A kill in the middle of an append leaves a last line without newline; the resumed run cuts it and goes on"
    out = tmp_path / "run"
    train(_tiny(inputs, out), stop_at_step=2)
    with open(out / "loss.csv", "a") as f: f.write("3,0.1")
    assert [r["step"] for r in read_loss(out)] == [1, 2]  # readers skip the torn line
    train(_tiny(inputs, out, resume_from_checkpoint="latest"))
    text = (out / "loss.csv").read_text()
    assert text.endswith("\n") and text.count("\n") == 5 and "3,0.1\n" not in text
    assert [r["step"] for r in read_loss(out)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def stopped_run(inputs, tmp_path_factory):
    "A run of 2 steps stopped after step 1, as a kill after the first checkpoint leaves it"
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(_tiny(inputs, out, max_train_steps=2), stop_at_step=1)
    return out


def _damage(ck: Path, case: str) -> str:
    "Damage the checkpoint `ck` as `case` says; return the file the error must name"
    if case == "state.json cut short": (ck / "state.json").write_text((ck / "state.json").read_text()[:50]); return "state.json"
    if case == "foreign state.json": (ck / "state.json").write_text('{"global_step": 1}'); return "state.json"
    if case == "state.json of another format":
        st = json.loads((ck / "state.json").read_text()); st["format"] = 7
        (ck / "state.json").write_text(json.dumps(st)); return "state.json"
    if case == "damaged weights": (ck / "model.safetensors").write_bytes(b"\x00" * 64); return "model.safetensors"
    if case == "missing optimizer": (ck / "optimizer.safetensors").unlink(); return "optimizer.safetensors"
    if case == "damaged ema":
        data = (ck / "ema.safetensors").read_bytes(); (ck / "ema.safetensors").write_bytes(data[: len(data) // 2]); return "ema.safetensors"
    if case == "damaged rng": (ck / "rng-0.json").write_text("[1, 2"); return "rng-0.json"
    if case == "another tool's checkpoint": (ck / "state.json").unlink(); return "checkpoint-1"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["state.json cut short", "foreign state.json", "state.json of another format",
                                  "damaged weights", "missing optimizer", "damaged ema", "damaged rng",
                                  "another tool's checkpoint"])
def test_damaged_checkpoint_is_named(inputs, stopped_run, tmp_path, case):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    name = _damage(out / "checkpoint-1", case)
    with pytest.raises(LesionGenError, match=re.escape(name)) as e:
        train(_tiny(inputs, out, max_train_steps=2, resume_from_checkpoint="latest"))
    assert "\n" not in str(e.value)


def test_nan_loss_names_the_step(inputs, tmp_path, monkeypatch):
    import lesiongen.train as T
    real = T.compute_loss
    monkeypatch.setattr(T, "compute_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(LesionGenError, match=r"loss is nan at step 1: .*lower learning_rate \(now 0.001\)"):
        train(_tiny(inputs, tmp_path / "run"))
    assert not list_checkpoints(tmp_path / "run")  # no checkpoint of the diverged weights


def test_resume_refuses_other_training_data(inputs, tmp_path):
    "Same settings and paths, but the captions file was rewritten since the checkpoint: the data hash differs"
    caps = tmp_path / "captions.jsonl"
    shutil.copy(inputs["captions"], caps)
    mine, out = dict(inputs, captions=str(caps)), tmp_path / "run"
    train(_tiny(mine, out, max_train_steps=2), stop_at_step=1)
    lines = [json.loads(l) for l in caps.read_text().splitlines()]
    caps.write_text("".join(json.dumps({**l, "text": l["text"] + ", seen again"}) + "\n" for l in lines))
    with pytest.raises(LesionGenError, match="training data changed"):
        train(_tiny(mine, out, max_train_steps=2, resume_from_checkpoint="latest"))


def test_final_weights_marked_only_when_complete(inputs, tmp_path, monkeypatch):
    "model_index.json, written last, means the folder holds the final weights of its config.json; never before"
    from diffusers import ModelMixin
    from lesiongen.generate import model_kind
    out = tmp_path / "run"
    train(_tiny(inputs, out, max_train_steps=2))
    assert model_kind(out) == "compact"
    train(_tiny(inputs, out, resume_from_checkpoint="latest"), stop_at_step=3)  # continued to 4 steps, interrupted
    assert not (out / "model_index.json").exists()  # the step-2 weights are not this run's final weights
    with pytest.raises(LesionGenError, match="has training finished"): model_kind(out)
    real = ModelMixin.save_pretrained

    def killed(self, path, *a, **k):  # the UNet's weights are half written when the run dies
        real(self, path, *a, **k)
        next(Path(path).glob("*.safetensors")).write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(ModelMixin, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt): train(_tiny(inputs, out, resume_from_checkpoint="latest"))
    assert not (out / "model_index.json").exists()
    monkeypatch.setattr(ModelMixin, "save_pretrained", real)
    train(_tiny(inputs, out, resume_from_checkpoint="latest"))
    assert model_kind(out) == "compact" and not [p for p in out.rglob("*") if ".tmp" in p.name]
    from lesiongen.model import LesionGenPipeline
    LesionGenPipeline.from_pretrained(out)


def test_pruned_checkpoint_never_half_deleted(inputs, tmp_path, monkeypatch):
    "A kill while an old checkpoint is deleted must not leave a folder that looks like a checkpoint but lacks files"
    import lesiongen.train as T
    real = shutil.rmtree

    def killed(path, *a, **k):  # the kill comes after the first file is gone
        path = Path(path)
        if path.is_dir() and (path / "model.safetensors").is_file() and "checkpoint-1" in path.name:
            (path / "model.safetensors").unlink(); raise KeyboardInterrupt
        return real(path, *a, **k)
    monkeypatch.setattr(T.shutil, "rmtree", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt): train(_tiny(inputs, out, checkpoints_total_limit=1))
    assert all((p / "model.safetensors").is_file() for p in list_checkpoints(out)), list_checkpoints(out)
    monkeypatch.setattr(T.shutil, "rmtree", real)
    train(_tiny(inputs, out, checkpoints_total_limit=1, resume_from_checkpoint="latest"))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_images_decoded_before_the_models_load(inputs, tmp_path, monkeypatch):
    "An image that passes the quick check but does not decode is named before any model is built"
    import lesiongen.train as T
    mine = make_inputs(tmp_path / "mine")
    bad = tmp_path / "mine" / "raw" / read_records(mine["records"])["file_name"][0]
    bad.write_bytes(bad.read_bytes()[:200])
    monkeypatch.setattr(T, "undecodable_images", lambda paths: [], raising=False)

    def no_models(*a, **k): raise AssertionError("the models were loaded before the images were decoded")
    monkeypatch.setattr(T, "load_components", no_models)
    with pytest.raises(LesionGenError, match=f"cannot decode image {re.escape(str(bad))}"):
        train(_tiny(mine, tmp_path / "run"))


def test_noise_offset_from_the_cli():
    from lesiongen.cli import build_parser, train_config_from_args
    base = ["train", "--records", "r.csv", "--captions", "c.jsonl", "--base", "compact", "--out", "o"]
    assert train_config_from_args(build_parser().parse_args(base + ["--noise-offset", "0.05"])).noise_offset == 0.05
    assert train_config_from_args(build_parser().parse_args(base + ["--noise-offset", "0"])).noise_offset == 0.0
    default = train_config_from_args(build_parser().parse_args(base))  # the compact recipe
    assert (default.noise_offset, default.balance_by, default.balance_power) == (0.1, ("dx", "fitzpatrick"), 1.0)
    natural = train_config_from_args(build_parser().parse_args(base + ["--balance-power", "0"]))
    assert natural.balance_power == 0.0
    with pytest.raises(LesionGenError, match=r"noise_offset must be a number in \[0, 1\)"):
        train_config_from_args(build_parser().parse_args(base + ["--noise-offset", "1.5"]))


def test_snr_gamma_off_from_the_cli(capsys):
    from lesiongen.cli import build_parser, train_config_from_args
    base = ["train", "--records", "r.csv", "--captions", "c.jsonl", "--base", "compact", "--out", "o"]
    assert train_config_from_args(build_parser().parse_args(base)).snr_gamma == 5.0  # the compact recipe
    assert train_config_from_args(build_parser().parse_args(base + ["--snr-gamma", "2.5"])).snr_gamma == 2.5
    assert train_config_from_args(build_parser().parse_args(base + ["--snr-gamma", "off"])).snr_gamma is None
    for bad in ("0", "-1", "high"):
        with pytest.raises(SystemExit) as e: build_parser().parse_args(base + ["--snr-gamma", bad])
        assert e.value.code == 2 and f"got {bad!r}" in capsys.readouterr().err
