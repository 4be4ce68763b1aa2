"""`lesiongen run`, the whole method: a tiny end-to-end run, reuse, refusal of other settings, resume after SIGKILL
(training from its checkpoint), bad input in one line, and the configs of the quick and paper presets."""
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from faults import leftover_temps, lesiongen_cmd, run_with_kills
from lesiongen.core import RESEARCH_ONLY

STAGES = ("phantom", "curated", "captions", "train", "generate", "evaluate")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(*args, check=True, timeout=900):
    "Run `lesiongen run ...` on one thread; return the completed process"
    p = subprocess.run(lesiongen_cmd("run", *map(str, args)), capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"lesiongen run {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def error_line(p):
    "The one line a refused command prints: no traceback, nothing after it"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("lesiongen run:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def summary_lines(stdout):
    "The one-line summary of each stage, by stage"
    return {l.split(":")[0]: l for l in stdout.splitlines() if re.match(rf"({'|'.join(STAGES)}): ", l)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    "The whole method with the test preset, run once for the module"
    out = tmp_path_factory.mktemp("run") / "tiny"
    p = run("--out", out, "--preset", "tiny", "--quiet")
    return dict(out=out, stdout=p.stdout)


def test_tiny_run_end_to_end(tiny_run):
    out, lines = tiny_run["out"], summary_lines(tiny_run["stdout"])
    assert list(lines) == list(STAGES), tiny_run["stdout"]
    assert all(re.search(r"; in \d+\.\d min -> ", l) for l in lines.values()), lines
    assert "24 steps of the compact model, final loss" in lines["train"]
    assert "12 balanced + 6 targeted images" in lines["generate"]
    assert "lesions in more than one split: 0" in lines["curated"]
    assert {p.name for p in out.iterdir()} == {*STAGES, "config.json", "report.md", "report.html", "results.json"}
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "lesiongen-run/1" and list(res["stages"]) == list(STAGES)
    assert {"real", "resampled", "colour", "synthetic only: balanced", "real + targeted"} <= set(res["regimes"])
    assert res["effects"] and all(e["resolved"] in ("higher", "lower", None) for e in res["effects"])
    md = (out / "report.md").read_text()
    assert RESEARCH_ONLY in md and "## What this run shows" in md and RESEARCH_ONLY in (out / "report.html").read_text()
    figures = re.findall(r"\]\((evaluate/figures/[^)]+)\)", md)
    assert figures and all((out / f).is_file() for f in figures)  # links resolve from the run folder
    meta = (out / "generate" / "targeted" / "metadata.csv").read_text().splitlines()
    fitz = meta[0].split(",").index("fitzpatrick")
    assert {int(r.split(",")[fitz]) for r in meta[1:]} <= {5, 6}  # the targeted set is on the darkest skin types
    assert (out / "train" / "model_index.json").is_file() and not leftover_temps(out)


def test_rerun_reuses_every_stage(tiny_run):
    out = tiny_run["out"]
    before = {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES}
    p = run("--out", out, "--preset", "tiny", "--quiet")
    lines = summary_lines(p.stdout)
    assert list(lines) == list(STAGES) and all("; reused (" in l for l in lines.values()), p.stdout
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES} == before


def test_other_settings_are_refused(tiny_run):
    out = tiny_run["out"]
    report = (out / "results.json").read_bytes()
    p = run("--out", out, "--preset", "tiny", "--train-steps", 30, "--quiet", check=False)
    assert p.returncode == 2
    assert re.fullmatch(r"lesiongen run: error: stage 'train' in .* was run with other settings \(.*max_train_steps.*\); "
                        r"use another --out or --force", error_line(p)), p.stderr
    p = run("--out", out, "--preset", "tiny", "--seed", 1, "--quiet", check=False)
    assert p.returncode == 2 and "stage 'phantom'" in error_line(p) and "other settings (seed" in error_line(p)
    assert (out / "results.json").read_bytes() == report  # nothing was touched


def _wait_for_checkpoint(proc, train_dir, timeout=600):
    "Poll until `train_dir` holds a complete checkpoint; return its name (None if the run ended first)"
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        done = sorted(p.name for p in train_dir.glob("checkpoint-*") if (p / "state.json").is_file())
        if done: return done[-1]
        time.sleep(0.02)
    return None


def test_sigkill_during_training_resumes_from_the_checkpoint(tmp_path):
    "SIGKILL once training has checkpointed: the re-run resumes there, and the weights equal an uninterrupted run's"
    common = ["--preset", "tiny", "--train-steps", 60, "--until", "train", "--quiet"]
    out = tmp_path / "killed"
    run("--out", out, *common[:4], "--until", "captions", "--quiet")  # data stages first: the kill lands in training
    proc = subprocess.Popen(lesiongen_cmd("run", "--out", str(out), *map(str, common)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try: ckpt = _wait_for_checkpoint(proc, out / "train")
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ckpt is not None and proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (out / "train" / "stage.json").exists() and not (out / "train" / "model_index.json").exists()
    p = run("--out", out, *common)
    resumed = re.search(r"^train: resuming from checkpoint-(\d+)$", p.stdout, re.M)
    assert resumed and int(resumed.group(1)) >= int(ckpt.split("-")[1]), p.stdout
    steps = [int(l.split(",")[0]) for l in (out / "train" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 61))  # every step once: resumed, not restarted nor repeated
    ref = tmp_path / "uninterrupted"
    run("--out", ref, *common)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert sha(out / "train" / weights) == sha(ref / "train" / weights)
    assert not leftover_temps(out)


@pytest.mark.slow
def test_random_kills_anywhere_then_finish(tmp_path, tiny_run):
    "SIGKILL at three random moments of the whole run; the last run finishes with the same generated images"
    out = tmp_path / "run"
    rep = run_with_kills(lesiongen_cmd("run", "--out", str(out), "--preset", "tiny", "--quiet"), kills=3, seed=1,
                         min_s=2, max_s=10, timeout=900)
    assert rep.returncodes[-1] == 0, rep.stderr_tail
    assert rep.kills >= 1 and rep.resumes_ok >= 1, rep  # at least one run really died mid-way and was resumed
    assert not leftover_temps(out)
    for s in ("balanced", "targeted"):
        imgs = sorted((out / "generate" / s / "images").iterdir())
        ref = tiny_run["out"] / "generate" / s / "images"
        assert [sha(p) for p in imgs] == [sha(ref / p.name) for p in imgs]
    assert json.loads((out / "results.json").read_text())["stages"].keys() == set(STAGES)


def test_real_dataset_layout(tmp_path):
    "`--dataset derm7pt --root DIR` curates a dataset folder instead of writing phantom data"
    subprocess.run(lesiongen_cmd("phantom", "--out", str(tmp_path / "d7p"), "--n", "30", "--size", "32", "--format", "derm7pt",
                                 "--quiet"), check=True, capture_output=True, env=ENV)
    p = run("--out", tmp_path / "run", "--dataset", "derm7pt", "--root", tmp_path / "d7p", "--until", "captions", "--quiet")
    assert list(summary_lines(p.stdout)) == ["curated", "captions"]
    assert not (tmp_path / "run" / "phantom").exists()
    assert "30 images of 30 lesions kept" in p.stdout
    p = run("--out", tmp_path / "folder_run", "--dataset", "folder", "--root", tmp_path / "d7p", "--csv", tmp_path / "d7p" / "phantom_truth.csv",
            "--image-col", "file_name", "--label-col", "dx", "--lesion-col", "lesion_id", "--until", "curated", "--quiet")
    assert "30 images of 30 lesions kept" in summary_lines(p.stdout)["curated"]


# --- bad input: one line, exit 2, before any work

def _main(capsys, argv):
    from lesiongen.cli import main
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--dataset", "folder"], "--dataset folder needs --root DIR: the dataset folder"),
    (["--dataset", "folder", "--root", "ROOT"], "--dataset folder needs --csv"),
    (["--dataset", "ham10000", "--root", "ROOT/none"], "--root ROOT/none is not a folder"),
    (["--root", "ROOT"], "--root applies to a real --dataset"),
    (["--csv", "x.csv"], "apply to --dataset folder only"),
    (["--preset", "paper"], "--preset paper needs --base PATH: a local Stable Diffusion v1.4 folder"),
    (["--preset", "paper", "--base", "ROOT/none"], "--base ROOT/none is not a local Stable Diffusion folder (no model_index.json)"),
    (["--preset", "paper", "--base", "ROOT"], "is not a local Stable Diffusion folder"),
    (["--base", "ROOT"], "--base applies to --preset paper"),
    (["--preset", "fast"], "preset must be 'quick' or 'paper'"),
    (["--train-steps", "0"], "train_steps must be a positive integer"),
    (["--n", "0"], "n must be > 0"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, says):
    argv = ["run", "--out", tmp_path / "out", *[str(a).replace("ROOT", str(tmp_path)) for a in extra]]
    status, err = _main(capsys, argv)
    says = says.replace("ROOT", str(tmp_path))
    assert status == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_bad_input_from_the_shell(tmp_path):
    p = run("--out", tmp_path / "out", "--dataset", "folder", check=False)
    assert p.returncode == 2 and error_line(p) == "lesiongen run: error: --dataset folder needs --root DIR: the dataset folder"
    assert not (tmp_path / "out").exists()


# --- the presets' configs (paper cannot run here: no GPU, no weights)

def _args(*argv):
    from lesiongen.cli import build_parser
    return build_parser().parse_args(["run", *map(str, argv)])


def test_paper_preset_config(tmp_path):
    from lesiongen.cli import pipeline_config_from_args, pipeline_plan
    (tmp_path / "sd").mkdir(); (tmp_path / "sd" / "model_index.json").write_text("{}")
    cfg = pipeline_config_from_args(_args("--out", tmp_path / "run", "--preset", "paper", "--base", tmp_path / "sd"))
    plan = pipeline_plan(cfg)
    t = plan["train"]
    assert (t.base, t.full, t.rank, t.resolution, t.learning_rate, t.max_train_steps) == (str(tmp_path / "sd"), False, 64, 256, 5e-6, 15_000)
    assert (t.train_batch_size, t.gradient_accumulation_steps, t.resume_from_checkpoint) == (1, 4, "latest")
    g = plan["generate"]
    assert (g["balanced"].n, g["targeted"].n, g["balanced"].num_inference_steps, g["balanced"].model) == (2100, 700, 25, str(tmp_path / "run" / "train"))
    e = plan["evaluate"]
    assert (e.seeds, e.classifier.resolution, e.ratios) == ((0, 1, 2), 64, (0.0, 0.5, 1.0, 2.0, 5.0, 10.0))
    assert (plan["phantom"].size, len(plan["phantom"].dx_probs)) == (256, 7)
    assert not (tmp_path / "run").exists()


def test_quick_preset_config(tmp_path):
    from lesiongen.cli import pipeline_config_from_args, pipeline_plan
    cfg = pipeline_config_from_args(_args("--out", tmp_path / "run"))
    plan = pipeline_plan(cfg)
    t = plan["train"]
    assert (cfg.preset, t.base, t.resolution, t.max_train_steps, t.noise_offset, t.model_config, t.balance_by, t.balance_power) == (
        "quick", "compact", 32, 300, 0.1, {"addition_embed_type": "text"}, ("dx", "fitzpatrick"), 1.0)
    assert (plan["phantom"].format, plan["phantom"].n, sorted(plan["phantom"].dx_probs)) == ("derm7pt", 1000, ["bcc", "mel", "nv"])
    assert (plan["generate"]["balanced"].n, plan["generate"]["targeted"].n, plan["evaluate"].seeds) == (360, 180, (0, 1, 2))
    llm = pipeline_plan(pipeline_config_from_args(_args("--out", tmp_path / "run", "--captions", "llm")))["captions"]
    assert (llm["style"], llm["config"].mode, llm["config"].constrained, llm["config"].force_facts) == ("llm", "per-entry", True, True)
    assert "targeted" not in pipeline_plan(pipeline_config_from_args(_args("--out", tmp_path / "r", "--n-targeted", 0)))["generate"]


def test_help_names_the_presets():
    p = subprocess.run(lesiongen_cmd("run", "--help"), capture_output=True, text=True, env=ENV)
    text = " ".join(p.stdout.split())
    assert p.returncode == 0 and "{quick,paper}" in text and "--base PATH" in text and "tiny" not in text
