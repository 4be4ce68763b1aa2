"""Command-line and cross-module behaviour: what a user typing `lesiongen ...` sees."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lesiongen.core import RECORD_COLUMNS

FIXTURES = Path(__file__).parent / "fixtures"
LESIONGEN = str(Path(sys.executable).parent / "lesiongen")


def run(*args, check=True):
    "Run the `lesiongen` console script; return the completed process"
    p = subprocess.run([LESIONGEN, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"lesiongen {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr}")
    return p


def test_help_lists_commands():
    out = " ".join(run("--help").stdout.split())
    for cmd in ("run", "phantom", "curate"):
        assert cmd in out
    assert "not for clinical use" in out


def test_import_is_light():
    "Importing the package and its CLI pulls in no heavy library, data, GPU or API key"
    code = ("import sys, lesiongen, lesiongen.cli, lesiongen.core; "
            "heavy = [m for m in ('torch', 'pandas', 'PIL', 'diffusers', 'transformers', 'sklearn') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing lesiongen.cli imported {out}"


@pytest.mark.parametrize("fmt", ["ham10000", "derm7pt"])
def test_phantom_curate_round_trip(tmp_path, fmt):
    run("phantom", "--out", tmp_path / "ph", "--n", 60, "--size", 32, "--seed", 1, "--format", fmt, "--quiet")
    p = run("curate", "--dataset", fmt, "--root", tmp_path / "ph", "--out", tmp_path / "cur")
    assert "lesions in more than one split: 0" in p.stdout
    rec = pd.read_csv(tmp_path / "cur" / "records.csv")
    assert tuple(rec.columns) == RECORD_COLUMNS
    truth = pd.read_csv(tmp_path / "ph" / "phantom_truth.csv")
    assert len(rec) == len(truth) if fmt == "ham10000" else len(rec) == truth["lesion_id"].nunique()
    assert (rec.groupby("lesion_id")["split"].nunique() == 1).all()
    assert set(rec["split"]) <= {"train", "valid", "test"}
    report = json.loads((tmp_path / "cur" / "curation_report.json").read_text())
    assert report["n_rows_in"] == len(rec)


def test_curate_missing_column_fails_naming_it(tmp_path):
    run("phantom", "--out", tmp_path / "ph", "--n", 20, "--size", 32, "--quiet")
    meta = tmp_path / "ph" / "HAM10000_metadata.csv"
    pd.read_csv(meta).drop(columns=["localization"]).to_csv(meta, index=False)
    p = run("curate", "--dataset", "ham10000", "--root", tmp_path / "ph", "--out", tmp_path / "cur", check=False)
    assert p.returncode != 0
    assert "localization" in p.stderr and "HAM10000_metadata.csv" in p.stderr
    assert not (tmp_path / "cur" / "records.csv").exists()


def test_curate_drop_lists_every_dropped_row(tmp_path):
    run("phantom", "--out", tmp_path / "ph", "--n", 30, "--size", 32, "--quiet")
    meta = pd.read_csv(tmp_path / "ph" / "HAM10000_metadata.csv")
    victim = meta["image_id"].iloc[3]
    next((tmp_path / "ph").rglob(f"{victim}.jpg")).unlink()
    p = run("curate", "--dataset", "ham10000", "--root", tmp_path / "ph", "--out", tmp_path / "c1", check=False)
    assert p.returncode != 0 and victim in p.stderr
    run("curate", "--dataset", "ham10000", "--root", tmp_path / "ph", "--out", tmp_path / "c2", "--on-error", "drop")
    report = json.loads((tmp_path / "c2" / "curation_report.json").read_text())
    assert [d["image_id"] for d in report["dropped"]] == [victim]
    assert len(pd.read_csv(tmp_path / "c2" / "records.csv")) == len(meta) - 1


def test_real_ham10000_metadata_with_placeholder_images(tmp_path):
    "The 3,017 real HAM10000 metadata rows curate with placeholder images: every row kept, no lesion leaks"
    meta = pd.read_csv(FIXTURES / "ham10000_metadata_subset.csv")
    (tmp_path / "HAM10000_images_part_1").mkdir()
    img = Image.new("RGB", (8, 8), (200, 150, 130))
    for i in meta["image_id"]:
        img.save(tmp_path / "HAM10000_images_part_1" / f"{i}.jpg")
    meta.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    run("curate", "--dataset", "ham10000", "--root", tmp_path, "--out", tmp_path / "cur")
    rec = pd.read_csv(tmp_path / "cur" / "records.csv")
    assert len(rec) == len(meta) == 3017
    assert (rec.groupby("lesion_id")["split"].nunique() == 1).all()
    assert rec["sex"].isna().sum() == (meta["sex"] == "unknown").sum()
    assert rec["site"].isna().sum() == (meta["localization"] == "unknown").sum()
    assert rec["age"].isna().sum() == meta["age"].isna().sum()


def test_run_pipeline_resumes(tmp_path):
    "The data stages of `lesiongen run` (the whole method is tested in test_cli_run.py)"
    out = tmp_path / "run"
    p = run("run", "--out", out, "--n", 40, "--size", 32, "--until", "captions", "--quiet")
    assert "lesions in more than one split: 0" in p.stdout
    marker = out / "phantom" / "stage.json"
    before = marker.read_text()
    run("run", "--out", out, "--n", 40, "--size", 32, "--until", "captions", "--quiet")
    assert marker.read_text() == before
    p = run("run", "--out", out, "--n", 41, "--size", 32, "--until", "captions", "--quiet", check=False)
    assert p.returncode == 2 and "other settings (n)" in p.stderr and "--force" in p.stderr


def test_bad_argument_named(tmp_path):
    p = run("phantom", "--out", tmp_path / "ph", "--n", 0, check=False)
    assert p.returncode == 2 and re.fullmatch(r"lesiongen phantom: error: n must be .*\b0", _error_line(p)), p.stderr


def _curated(tmp_path, n=24, fmt="derm7pt"):
    run("phantom", "--out", tmp_path / "ph", "--n", n, "--size", 32, "--format", fmt, "--quiet")
    run("curate", "--dataset", fmt, "--root", tmp_path / "ph", "--out", tmp_path / "cur")
    return tmp_path / "cur" / "records.csv"


@pytest.mark.parametrize("style", ["short", "report"])
def test_caption_templates(tmp_path, style):
    records = _curated(tmp_path)
    extra = ["--max-tokens", 77] if style == "short" else []
    p = run("caption", "--records", records, "--style", style, "--out", tmp_path / "c.jsonl", "--quiet", *extra)
    lines = [json.loads(l) for l in (tmp_path / "c.jsonl").read_text().splitlines()]
    rec = pd.read_csv(records)
    assert sorted(l["image_id"] for l in lines) == sorted(rec["image_id"])
    assert {l["source"] for l in lines} == {"template"} and {l["style"] for l in lines} == {style}
    p2 = run("caption", "--records", records, "--style", style, "--out", tmp_path / "c.jsonl", "--quiet", *extra)
    assert "0 caption(s) written" in p2.stdout, p2.stdout  # a re-run skips what is done


def test_caption_llm_over_loopback_http(tmp_path, monkeypatch):
    "`--style llm --backend openai` against a loopback server: fact-checked reports, key only from the environment"
    from lesiongen.llm import LocalChatServer
    records = _curated(tmp_path, n=8)
    sentinel = "sk-test-SENTINEL-never-on-disk"
    with LocalChatServer(lambda body, headers: "Diagnosis: psoriasis\nnot a real report") as srv:
        env = {"OPENAI_API_KEY": sentinel}
        p = subprocess.run([LESIONGEN, "caption", "--records", str(records), "--style", "llm", "--backend", "openai",
                            "--model", "local", "--base-url", srv.base_url, "--max-attempts", "2", "--max-retries", "0",
                            "--timeout", "5", "--out", str(tmp_path / "llm.jsonl"), "--quiet"],
                           capture_output=True, text=True, timeout=300, env={**__import__("os").environ, **env})
    assert p.returncode == 0, p.stderr
    lines = [json.loads(l) for l in (tmp_path / "llm.jsonl").read_text().splitlines()]
    assert len(lines) == len(pd.read_csv(records))
    assert {l["source"] for l in lines} == {"fallback"}  # every LLM answer contradicted the facts
    assert "0 accepted" in p.stdout and srv.n_requests == 2 * len(lines)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert sentinel.encode() not in f.read_bytes(), f
    assert sentinel not in p.stdout + p.stderr


def test_caption_llm_per_entry_constrained(tmp_path):
    "`--llm-mode per-entry --constrained`: one request per entry, each carrying the JSON schema; answers are checked"
    import re
    from lesiongen.llm import LocalChatServer
    records = _curated(tmp_path, n=4)
    bodies = []
    def respond(body, headers):
        bodies.append(body)
        user = body["messages"][-1]["content"]
        entry = re.search(r'Entry "([^"]+)"', user).group(1)
        return json.dumps({entry: "; ".join(l[2:] for l in user.splitlines() if l.startswith("- "))})
    with LocalChatServer(respond) as srv:
        p = subprocess.run([LESIONGEN, "caption", "--records", str(records), "--style", "llm", "--backend", "openai",
                            "--model", "local", "--base-url", srv.base_url, "--llm-mode", "per-entry", "--constrained",
                            "--timeout", "5", "--out", str(tmp_path / "llm.jsonl"), "--quiet"],
                           capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OPENAI_API_KEY": ""})
    assert p.returncode == 0, p.stderr
    lines = [json.loads(l) for l in (tmp_path / "llm.jsonl").read_text().splitlines()]
    assert {l["source"] for l in lines} == {"llm"} and {l["prompt_version"] for l in lines} == {"entry-v1+json"}
    assert bodies and all(b["response_format"]["type"] == "json_schema" for b in bodies)
    p = subprocess.run([LESIONGEN, "caption", "--records", str(records), "--style", "llm", "--llm-mode", "poem",
                        "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--llm-mode" in p.stderr


def test_caption_bad_style_and_missing_records(tmp_path):
    p = run("caption", "--records", tmp_path / "nope.csv", "--out", tmp_path / "c.jsonl", check=False)
    assert p.returncode == 2 and "nope.csv" in p.stderr
    p = run("caption", "--records", tmp_path / "nope.csv", "--out", tmp_path / "c.jsonl", "--style", "poem", check=False)
    assert p.returncode != 0 and "poem" in p.stderr


def test_train_compact_from_the_command_line(tmp_path):
    records = _curated(tmp_path, n=24, fmt="ham10000")
    run("caption", "--records", records, "--style", "short", "--max-tokens", 77, "--out", tmp_path / "c.jsonl", "--quiet")
    out = tmp_path / "run"
    p = run("train", "--records", records, "--captions", tmp_path / "c.jsonl", "--base", "compact", "--out", out,
            "--max-steps", 2, "--batch-size", 4, "--checkpointing-steps", 1, "--num-validation-images", 1,
            "--validation-prompt", "dermoscopy image of a melanoma", "--balance-by", "dx", "--balance-power", 1, "--no-progress")
    assert "not for clinical use" in p.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["base"], cfg["max_train_steps"], cfg["train_batch_size"], cfg["resolution"]) == ("compact", 2, 4, 32)
    assert (cfg["balance_by"], cfg["balance_power"]) == (["dx"], 1)
    assert len(pd.read_csv(out / "loss.csv")) == 2
    weights = [f.name for f in out.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".pkl", ".ckpt")]
    assert weights and all(w.endswith(".safetensors") for w in weights)


def test_train_bad_input_named(tmp_path):
    records = _curated(tmp_path, n=16, fmt="ham10000")
    run("caption", "--records", records, "--out", tmp_path / "c.jsonl", "--quiet")
    common = ["train", "--records", records, "--captions", tmp_path / "c.jsonl", "--out", tmp_path / "run"]
    p = run(*common, "--base", tmp_path / "no_such_model", check=False)
    assert p.returncode == 2 and "no_such_model" in p.stderr
    from lesiongen.model import tiny_stable_diffusion
    tiny_stable_diffusion().save_pretrained(tmp_path / "tiny_sd")
    p = run(*common, "--base", tmp_path / "tiny_sd", "--lora-rank", 0, check=False)
    assert p.returncode == 2 and "rank" in p.stderr
    p = run(*common, "--base", "compact", "--resolution", 30, check=False)
    assert p.returncode == 2 and "resolution" in p.stderr
    p = run(*common, "--base", "compact", "--balance-by", "lesion_colour", check=False)
    assert p.returncode == 2 and "lesion_colour" in _error_line(p)
    (tmp_path / "empty.jsonl").write_text("")
    p = run("train", "--records", records, "--captions", tmp_path / "empty.jsonl", "--out", tmp_path / "run",
            "--base", "compact", check=False)
    assert p.returncode == 2 and "caption" in p.stderr.lower()


def _tiny_compact_model(path):
    "Save an untrained tiny compact model as `lesiongen train --base compact` saves a run's weights"
    import torch
    from lesiongen.model import CompactConfig, compact_pipeline
    torch.manual_seed(0)
    compact_pipeline(CompactConfig.tiny()).save_pretrained(path, safe_serialization=True)
    return path


def _error_line(p):
    "The error of a failed command: its last stderr line (earlier lines are third-party import warnings)"
    assert "Traceback" not in p.stderr, p.stderr
    return p.stderr.strip().splitlines()[-1]


def test_generate_then_curate_from_the_command_line(tmp_path):
    records = _curated(tmp_path, n=60)
    model = _tiny_compact_model(tmp_path / "model")
    assert "--plan" in run("generate", "--help").stdout and "generate" in run("--help").stdout
    syn = tmp_path / "syn"
    p = run("generate", "--model", model, "--records", records, "--plan", "balanced", "--n", 12, "--out", syn,
            "--steps", 2, "--batch-size", 4, "--seed", 3, "--guidance-interval", 0.2, 0.8, "--quiet")
    assert "not for clinical use" in p.stdout and "12 images" in p.stdout
    meta = pd.read_csv(syn / "metadata.csv")
    assert len(meta) == 12 and set(meta["steps"]) == {2} and meta["fitzpatrick"].between(1, 6).all()
    assert set(meta["guidance_interval"]) == {"0.2-0.8"}
    assert sorted(f.name for f in (syn / "images").iterdir()) == sorted(Path(f).name for f in meta["file_name"])
    assert json.loads((syn / "config.json").read_text())["seed"] == 3
    p = run("curate", "--dataset", "folder", "--root", syn, "--csv", "metadata.csv", "--image-col", "file_name",
            "--label-col", "dx", "--lesion-col", "lesion_id", "--fitzpatrick-col", "fitzpatrick", "--out", tmp_path / "cur2")
    rec = pd.read_csv(tmp_path / "cur2" / "records.csv")
    assert len(rec) == 12 and sorted(rec["dx"]) == sorted(meta["dx"])
    p = run("generate", "--model", model, "--records", records, "--plan", "balanced", "--n", 12, "--out", syn,
            "--steps", 2, "--batch-size", 4, "--seed", 4, "--guidance-interval", 0.2, 0.8, "--quiet", check=False)
    assert p.returncode == 2 and "seed: 3 -> 4" in _error_line(p)


def test_generate_bad_input_named(tmp_path):
    records = _curated(tmp_path, n=24)
    model = _tiny_compact_model(tmp_path / "model")
    common = ["generate", "--records", records, "--out", tmp_path / "syn"]
    for extra, match in ((["--model", tmp_path, "--n", 4], "not a lesiongen/diffusers model"),
                         (["--model", model, "--n", 0], "n must be a positive integer"),
                         (["--model", model, "--n", 4, "--guidance", -1], "guidance_scale"),
                         (["--model", model, "--n", 4, "--guidance-interval", 0.8, 0.2], "guidance_interval must satisfy"),
                         (["--model", model, "--n", 4, "--plan", "counterfactual", "--cf-values", "1", "8"], "unknown skin type '8'")):
        p = run(*common, *extra, check=False)
        assert p.returncode == 2 and match in _error_line(p), p.stderr
    assert not (tmp_path / "syn").exists()


def test_train_model_config(tmp_path):
    records = _curated(tmp_path, n=24, fmt="ham10000")
    run("caption", "--records", records, "--style", "short", "--max-tokens", 77, "--out", tmp_path / "c.jsonl", "--quiet")
    common = ["train", "--records", records, "--captions", tmp_path / "c.jsonl", "--base", "compact", "--max-steps", 1,
              "--batch-size", 4, "--checkpointing-steps", 1, "--num-validation-images", 1,
              "--validation-prompt", "dermoscopy image of a melanoma", "--no-progress"]
    from lesiongen.cli import read_model_config
    from lesiongen.core import LesionGenError
    mc = tmp_path / "model.json"
    for content, match in (("{not json", "is not valid JSON"), ("[16, 32]", "must hold a JSON object"),
                           ('{"block_out_channels": [16, 32], "atention_levels": [false, true], "heads": 2}',
                            "unknown CompactConfig field(s) 'atention_levels', 'heads'"),
                           ('{"resolution": 64}', "--resolution"), ('{"prediction_type": "epsilon"}', "--prediction-type")):
        mc.write_text(content)
        with pytest.raises(LesionGenError, match=re.escape(match)) as e:
            read_model_config(str(mc))
        assert str(mc) in str(e.value)
    with pytest.raises(LesionGenError, match="model config file not found"):
        read_model_config(str(tmp_path / "none.json"))
    p = run(*common, "--out", tmp_path / "bad", "--model-config", mc, check=False)  # and from the command line
    assert p.returncode == 2 and "--prediction-type" in _error_line(p) and str(mc) in _error_line(p), p.stderr
    mc.write_text(json.dumps({"block_out_channels": [16, 32], "attention_levels": [False, True], "attention_head_dim": 2,
                              "norm_num_groups": 8}))
    p = run("train", "--records", records, "--captions", tmp_path / "c.jsonl", "--base", "/no/sd", "--out", tmp_path / "bad",
            "--model-config", mc, check=False)
    assert p.returncode == 2 and "compact" in _error_line(p)  # a model config applies to --base compact only
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    run(*common, "--out", out, "--model-config", mc)
    assert json.loads((out / "config.json").read_text())["model_config"]["block_out_channels"] == [16, 32]
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32]


def test_patched_model_from_the_command_line(tmp_path):
    "A model config with patch_size 2 trains at 64 px on a 32x32 grid and generates 64 px images; sizes off its grid are refused"
    records = _curated(tmp_path, n=24)
    run("caption", "--records", records, "--style", "short", "--max-tokens", 77, "--out", tmp_path / "c.jsonl", "--quiet")
    mc = tmp_path / "model.json"
    mc.write_text(json.dumps({"patch_size": 2, "block_out_channels": [16, 32], "attention_levels": [False, True],
                              "attention_head_dim": 2, "norm_num_groups": 8}))
    common = ["train", "--records", records, "--captions", tmp_path / "c.jsonl", "--base", "compact", "--max-steps", 1,
              "--batch-size", 4, "--checkpointing-steps", 1, "--num-validation-images", 1, "--model-config", mc,
              "--validation-prompt", "dermoscopy image of a melanoma", "--no-progress"]
    p = run(*common, "--resolution", 66, "--out", tmp_path / "bad", check=False)
    assert p.returncode == 2 and "multiple of 4" in _error_line(p), p.stderr
    run(*common, "--resolution", 64, "--out", tmp_path / "model")
    unet = json.loads((tmp_path / "model" / "unet" / "config.json").read_text())
    assert (unet["sample_size"], unet["in_channels"]) == (32, 12)
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["patch_size"] == 2
    gen = ["generate", "--model", tmp_path / "model", "--records", records, "--plan", "balanced", "--n", 2, "--steps", 2, "--quiet"]
    p = run(*gen, "--resolution", 66, "--out", tmp_path / "syn_bad", check=False)
    assert p.returncode == 2 and "multiple of 4" in _error_line(p), p.stderr
    run(*gen, "--out", tmp_path / "syn")
    meta = pd.read_csv(tmp_path / "syn" / "metadata.csv")
    assert [Image.open(tmp_path / "syn" / f).size for f in meta["file_name"]] == [(64, 64)] * 2


# --- failures a user causes or can fix: one line, exit 2 (130 Ctrl-C, 143 SIGTERM); a bug: traceback + where to report

def _main(monkeypatch, capsys, argv, **replace):
    "Run `cli.main(argv)` in this process with sub-commands replaced (`_cmd_phantom=fn`); return status and stderr"
    import lesiongen.cli as cli
    for name, fn in replace.items(): monkeypatch.setattr(cli, name, fn)
    try: status = cli.main([str(a) for a in argv])
    except KeyboardInterrupt: pytest.fail("KeyboardInterrupt escaped cli.main")  # it would end the whole session
    return status, capsys.readouterr().err


OUT_ARGS = {  # a valid command line for each command, but for --out
    "run": ["run", "--n", 8, "--quiet"],
    "phantom": ["phantom", "--n", 8, "--quiet"],
    "curate": ["curate", "--dataset", "ham10000", "--root", "ROOT"],
    "caption": ["caption", "--records", "ROOT/records.csv"],
    "train": ["train", "--records", "ROOT/records.csv", "--captions", "ROOT/c.jsonl", "--base", "compact"],
    "generate": ["generate", "--model", "ROOT", "--n", 4],
}


@pytest.mark.parametrize("command", sorted(OUT_ARGS))
def test_out_through_a_file_is_one_line(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "notes.txt").write_text("x")
    argv = [str(a).replace("ROOT", str(tmp_path)) for a in OUT_ARGS[command]]
    status, err = _main(monkeypatch, capsys, [*argv, "--out", tmp_path / "notes.txt" / "out"])
    assert status == 2 and err.strip() == (f"lesiongen {command}: error: cannot write --out {tmp_path / 'notes.txt' / 'out'}: "
                                           f"its path runs through the file {tmp_path / 'notes.txt'}"), err
    assert not (tmp_path / "out").exists()


def test_out_through_a_file_from_the_shell(tmp_path):
    "The same through the console script: one line, no traceback"
    (tmp_path / "notes.txt").write_text("x")
    p = run("phantom", "--out", tmp_path / "notes.txt" / "ph", "--n", 8, check=False)
    assert p.returncode == 2 and "runs through the file" in _error_line(p) and len(p.stderr.strip().splitlines()) == 1


def test_out_not_writable(tmp_path, monkeypatch, capsys):
    "As root a chmod does not stop writes, so the permission check is faked"
    import lesiongen.cli as cli
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    status, err = _main(monkeypatch, capsys, ["phantom", "--n", 8, "--quiet", "--out", tmp_path / "ph"])
    assert status == 2 and err.strip() == f"lesiongen phantom: error: cannot write --out {tmp_path / 'ph'}: {tmp_path} is not writable"
    assert not (tmp_path / "ph").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_out_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir(); (tmp_path / "ro").chmod(0o555)
    p = run("phantom", "--out", tmp_path / "ro" / "ph", "--n", 8, check=False)
    assert p.returncode == 2 and "is not writable" in _error_line(p)


def test_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    "ENOSPC raised by the first fsync of a real writer (every atomic write and log append fsyncs)"
    def full(fd): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    status, err = _main(monkeypatch, capsys, ["phantom", "--n", 8, "--quiet", "--out", tmp_path / "ph"])
    assert status == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("lesiongen phantom: error: No space left on device; free some space, then "
                                            "re-run the same command to write the dataset again")


def test_system_error_with_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    def denied(a): raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "x.csv"))
    status, err = _main(monkeypatch, capsys, ["phantom", "--n", 8, "--out", tmp_path / "ph"], _cmd_phantom=denied)
    assert status == 2 and err.strip() == f"lesiongen phantom: error: Permission denied: {tmp_path / 'x.csv'}"


@pytest.mark.parametrize("argv, hint", [
    (["phantom", "--n", 8, "--out", "OUT"], "re-run the same command to write the dataset again"),
    (["generate", "--model", "M", "--n", 4, "--out", "OUT"], "re-run the same command to resume: finished images are kept"),
    (["train", "--records", "r", "--captions", "c", "--base", "compact", "--out", "OUT"],
     "re-run the same command with --resume latest to continue from the last checkpoint"),
    (["train", "--records", "r", "--captions", "c", "--base", "compact", "--out", "OUT", "--resume", "latest"],
     "re-run the same command to resume from the last checkpoint"),
])
def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys, argv, hint):
    def ctrl_c(a): raise KeyboardInterrupt
    argv = [str(a).replace("OUT", str(tmp_path / "out")) for a in argv]
    status, err = _main(monkeypatch, capsys, argv, **{f"_cmd_{argv[0]}": ctrl_c})
    assert status == 130 and err.strip() == f"lesiongen {argv[0]}: interrupted; {hint}", err


def test_sigterm_stops_like_ctrl_c(tmp_path):
    "SIGTERM (a pre-empted job) unwinds the command as Ctrl-C does, in a subprocess: the signal would end pytest"
    code = ("import signal, sys, lesiongen.cli as c\n"
            "c._cmd_phantom = lambda a: signal.raise_signal(signal.SIGTERM)\n"
            f"sys.exit(c.main(['phantom', '--n', '8', '--out', {str(tmp_path / 'ph')!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 143, (p.returncode, p.stderr)
    assert _error_line(p) == "lesiongen phantom: stopped by SIGTERM; re-run the same command to write the dataset again"


def test_internal_error_says_where_to_report(tmp_path, monkeypatch, capsys):
    def bug(a): return {}["no such key"]
    status, err = _main(monkeypatch, capsys, ["phantom", "--n", 8, "--out", tmp_path / "ph"], _cmd_phantom=bug)
    assert status == 1 and "Traceback" in err and "KeyError: 'no such key'" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lesiongen phantom: internal error in lesiongen ") and \
        last.endswith("at https://github.com/lesiongen/lesiongen/issues"), last


def test_damaged_stage_marker_named(tmp_path, monkeypatch, capsys):
    "`lesiongen run` on a folder whose stage.json was damaged (e.g. by a full disk under an older version)"
    (tmp_path / "run" / "phantom").mkdir(parents=True)
    (tmp_path / "run" / "phantom" / "stage.json").write_text('{"stage": "pha')
    status, err = _main(monkeypatch, capsys, ["run", "--n", 8, "--size", 32, "--quiet", "--out", tmp_path / "run"])
    assert status == 2 and "stage.json is damaged" in err.strip().splitlines()[-1], err


def test_caption_force_facts_needs_constrained(tmp_path):
    records = _curated(tmp_path, n=4)
    p = subprocess.run([LESIONGEN, "caption", "--records", str(records), "--style", "llm", "--llm-mode", "per-entry",
                        "--force-facts", "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "force_facts needs constrained=True" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.jsonl").exists()
