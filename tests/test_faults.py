"""Crash safety of training and generation: `lesiongen train` and `lesiongen generate` are interrupted (SIGKILL right
after a checkpoint or a chunk of images is published, Ctrl-C, and SIGKILL at seeded moments spread over the measured
remaining work) and resumed with the same command;
they must end bit-identical to an uninterrupted run: the same files byte for byte, hence the same weights, EMA,
optimizer state, loss history and images, with no temp file left and every loss row and image exactly once.

Both runs use the same relative `--out` from different working folders, so that `config.json` (which records `out`)
is comparable too: no file is excluded from the comparison. The stages' own files that would differ between two
runs hold no timings (train and generate write none; `lesiongen run`'s `stage.json` does, and is not used here)."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from faults import leftover_temps, lesiongen_cmd, run_with_kills, tree_digest

TINY_MODEL = '{"block_out_channels": [16, 32], "attention_levels": [false, true], "layers_per_block": 1, ' \
             '"attention_head_dim": 2, "norm_num_groups": 8}'  # `model.CompactConfig.tiny()`'s architecture
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "A curated, captioned 40-image phantom set (29 training images at 32 px) and the tiny model architecture"
    from lesiongen.data import curate
    from lesiongen.llm import caption_records
    from lesiongen.phantom import PhantomConfig, write_phantom
    root = tmp_path_factory.mktemp("faults")
    write_phantom(root / "raw", PhantomConfig(n=40, size=32, seed=0), progress=False)
    curate("ham10000", root / "raw", root / "cur")
    caption_records(root / "cur" / "records.csv", root / "cur" / "captions.jsonl", style="short", progress=False)
    (root / "model.json").write_text(TINY_MODEL)
    return dict(records=str(root / "cur" / "records.csv"), captions=str(root / "cur" / "captions.jsonl"),
                model_config=str(root / "model.json"), root=root)


def train_args(data, steps: int = 16) -> list[str]:
    "`lesiongen train` of the tiny compact model: a checkpoint and a 2-step validation image every 2 steps, 2 kept"
    return ["train", "--records", data["records"], "--captions", data["captions"], "--base", "compact",
            "--model-config", data["model_config"], "--out", "run", "--max-steps", str(steps), "--batch-size", "4",
            "--checkpointing-steps", "2", "--checkpoints-total-limit", "2", "--num-validation-images", "1",
            "--validation-prompt", "dermoscopy image of a melanoma", "--validation-inference-steps", "2",
            "--num-threads", "1", "--no-progress"]


def run_in_process(args: list[str], cwd: Path, monkeypatch) -> None:
    "The uninterrupted reference: `lesiongen ARGS` through `cli.main` in this process (one torch thread), in `cwd`"
    from lesiongen.cli import main
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    assert main(args) == 0
    monkeypatch.undo()


def count_lines(f: Path) -> int:
    return max(0, f.read_text().count("\n") - 1) if f.is_file() else 0


def count_files(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


class Watch:
    "Start `cmd` in `cwd`; `until(ready, sig)` waits for `ready(n)` (n: progress count) and sends `sig`; it times the progress"
    def __init__(self, cmd, cwd: Path, progress):
        cwd.mkdir(parents=True, exist_ok=True)
        self.progress, self.t0 = progress, time.monotonic()
        # SIGINT back to its default in the child: under a background job (`cmd &`, nohup) it is inherited as ignored,
        # and Python then never installs the handler that turns Ctrl-C into KeyboardInterrupt
        self.p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.times: dict[int, float] = {}  # progress count -> seconds after the start when it was first seen

    def until(self, target: int, sig: int) -> subprocess.CompletedProcess:
        deadline = self.t0 + 300
        while self.p.poll() is None and time.monotonic() < deadline:
            n = self.progress()
            self.times.setdefault(n, time.monotonic() - self.t0)
            if n >= target: break
            time.sleep(0.01)
        assert self.p.poll() is None, "the command ended before it could be interrupted"
        self.p.send_signal(sig)
        out, err = self.p.communicate(timeout=120)
        return subprocess.CompletedProcess(self.p.args, self.p.returncode, out, err)

    def window(self, remaining: float) -> tuple[float, float]:
        "Kill moments for a resumed run: from a bit before its work starts to half-way through `remaining` units of work"
        ts = sorted((n, t) for n, t in self.times.items() if n > 0)
        start, rate = ts[0][1], (ts[-1][1] - ts[0][1]) / max(1, ts[-1][0] - ts[0][0])
        return 0.8 * start, start + 0.5 * remaining * rate


def assert_identical(ref: Path, got: Path) -> None:
    "`got` holds the files of `ref` byte for byte and no temp file"
    assert leftover_temps(got) == [] and leftover_temps(ref) == []
    a, b = tree_digest(ref), tree_digest(got)
    assert sorted(a) == sorted(b), f"files differ: only in ref {sorted(a.keys() - b.keys())}, only after kills {sorted(b.keys() - a.keys())}"
    assert not (differ := [k for k in a if a[k] != b[k]]), f"differ after kills: {differ}"


def test_train_survives_kill9_and_ctrl_c(data, tmp_path, monkeypatch, one_thread):
    ref, got = tmp_path / "ref", tmp_path / "killed"
    run_in_process(train_args(data) + ["--resume", "latest"], ref, monkeypatch)
    cmd = lesiongen_cmd(*train_args(data))

    # kill -9 the moment checkpoint-6 is published: whatever step 6 writes besides (its validation grid) must be done
    w = Watch(cmd, got, lambda: count_lines(got / "run" / "loss.csv") + 100 * (got / "run" / "checkpoint-6").is_dir())
    assert w.until(100, signal.SIGKILL).returncode == -signal.SIGKILL

    # Ctrl-C in the middle of the resumed training: it stops cleanly, in one line saying how to resume
    p = Watch(cmd + ["--resume", "latest"], got, lambda: count_lines(got / "run" / "loss.csv")).until(10, signal.SIGINT)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == "lesiongen train: interrupted; re-run the same command to resume from the last checkpoint"
    assert leftover_temps(got) == [] and not (got / "run" / "model_index.json").exists()

    # SIGKILLs at seeded moments while the resumed runs train, checkpoint, validate or save, then a run to the end
    lo, hi = w.window(remaining=16 - 8)
    rep = run_with_kills(cmd + ["--resume", "latest"], kills=2, seed=0, min_s=lo, max_s=hi, cwd=got, env=ENV)
    assert rep.returncodes[-1] == 0, rep.stderr_tail
    assert rep.kills >= 1 and rep.resumes_ok == rep.kills, rep
    # the last run resumed mid-way, or a kill fell after the final weights were published and it had nothing to do
    assert re.search(r"finished 16 steps \(resumed at step \d+\)|already holds the final weights of step 16",
                     rep.stderr_tail), rep.stderr_tail

    run, base = got / "run", ref / "run"
    steps = [int(l.split(",")[0]) for l in (run / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 17))  # every step once: no duplicate, no gap
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-14", "checkpoint-16"]
    for f in ("model", "ema", "optimizer"):  # the tensors themselves, for a readable failure
        a, b = load_file(base / "checkpoint-16" / f"{f}.safetensors"), load_file(run / "checkpoint-16" / f"{f}.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f
    assert_identical(base, run)  # weights, EMA, optimizer, RNG states, loss.csv, grids, final pipeline, config


def test_generate_survives_kill9(data, tmp_path, monkeypatch, one_thread):
    from lesiongen.model import CompactConfig, compact_pipeline
    torch.manual_seed(0)
    compact_pipeline(CompactConfig.tiny()).save_pretrained(tmp_path / "model", safe_serialization=True)
    n, ref, got = 32, tmp_path / "ref", tmp_path / "killed"
    args = ["generate", "--model", str(tmp_path / "model"), "--records", data["records"], "--plan", "empirical",
            "--n", str(n), "--steps", "4", "--batch-size", "4", "--num-threads", "1", "--quiet", "--out", "syn"]
    run_in_process(args, ref, monkeypatch)
    cmd = lesiongen_cmd(*args)

    w = Watch(cmd, got, lambda: count_files(got / "syn" / "images", "*.png"))  # kill -9 after 2 chunks of 4
    p = w.until(8, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    lo, hi = w.window(remaining=n - 8)
    rep = run_with_kills(cmd, kills=1, seed=0, min_s=lo, max_s=hi, cwd=got, env=ENV)
    assert rep.returncodes[-1] == 0, rep.stderr_tail
    assert rep.kills == 1 and rep.resumes_ok == 1, rep  # killed once more, and the run after that kill went on
    meta = pd.read_csv(got / "syn" / "metadata.csv")
    assert len(meta) == n and meta["file_name"].is_unique
    assert sorted(p.name for p in (got / "syn" / "images").iterdir()) == sorted(Path(f).name for f in meta["file_name"])
    assert_identical(ref / "syn", got / "syn")
