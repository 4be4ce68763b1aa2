"""The package works from its wheel: `python -m build` makes an sdist and a wheel (built from that sdist), the wheel
holds the run-time resources (the CLIP tokenizer) and the nbdev index, and, installed alone into a fresh venv and run
from a folder outside the source tree, it runs the main job: phantom -> curate -> caption (77 CLIP tokens) -> run ->
train -> generate.

The fresh venv sees the dependencies already installed here (torch, diffusers, ...: reinstalling them per test would
take minutes) through a `.pth` line naming this venv's site-packages. Paths listed in a `.pth` file are added to
`sys.path` without processing the `.pth` files inside them, so the editable install of lesiongen (a `.pth` file and its
import hook) stays invisible; the test checks that `lesiongen` is imported from the new venv."""
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "README.md")


def sh(*args, cwd, env=None, timeout=600):
    "Run a command; fail with its output when it fails"
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    "Build the sdist, then the wheel from the sdist (as `python -m build` does), with the build tools installed here"
    out = tmp_path_factory.mktemp("dist")
    t0 = time.perf_counter()
    sh(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO, cwd=out)
    wheels, sdists = sorted(out.glob("lesiongen-*.whl")), sorted(out.glob("lesiongen-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    print(f"built {wheels[0].name} and {sdists[0].name} in {time.perf_counter() - t0:.1f} s")
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    "A fresh venv holding only the wheel, seeing this venv's dependencies but not its editable lesiongen"
    root = tmp_path_factory.mktemp("venv")
    sh(sys.executable, "-m", "venv", "--without-pip", root / "v", cwd=root)
    py = root / "v" / "bin" / "python"
    # pip of this venv installs into the new one (`--python`); no index, no dependencies: the wheel alone
    sh(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--quiet", dists[0], cwd=root)
    site = Path(sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_lesiongen_test_deps.pth").write_text("".join(f"{p}\n" for p in here))  # after the install: pip never sees them
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LESIONGEN_CLIP_TOKENIZER", "VIRTUAL_ENV")}
    env.update(PATH=f"{root / 'v' / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MPLBACKEND="Agg")
    return dict(python=py, bin=root / "v" / "bin", site=site, env=env, work=tmp_path_factory.mktemp("work"))


def test_dists_hold_the_resources(dists):
    wheel, sdist = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in TOKENIZER_FILES:
        assert f"lesiongen/resources/clip_tokenizer/{f}" in names, f
    assert {"lesiongen/_modidx.py", "lesiongen/cli.py", "lesiongen/captions.py"} <= names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "lesiongen = lesiongen.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not any(n.startswith(("tests/", "nbs/")) for n in names)
    with tarfile.open(sdist) as tar:
        members = set(tar.getnames())
    top = sdist.name[:-len(".tar.gz")]
    for f in TOKENIZER_FILES:
        assert f"{top}/lesiongen/resources/clip_tokenizer/{f}" in members, f
    assert {f"{top}/settings.ini", f"{top}/setup.py", f"{top}/lesiongen/_modidx.py"} <= members


def test_installed_wheel_is_what_runs(venv):
    code = ("import sys, lesiongen, lesiongen.captions as C; print(lesiongen.__file__); "
            "print(str(C.clip_tokenizer_dir())); print(any('__editable__' in m for m in sys.modules))")
    out = sh(venv["python"], "-c", code, cwd=venv["work"], env=venv["env"]).stdout.split("\n")
    assert Path(out[0]).is_relative_to(venv["site"]), out[0]
    assert Path(out[1]).is_relative_to(venv["site"] / "lesiongen" / "resources"), out[1]
    assert out[2] == "False"
    assert (venv["bin"] / "lesiongen").is_file()


def test_main_job_from_the_wheel(venv):
    "phantom -> curate -> caption --max-tokens 77 -> run -> train -> generate, in a folder outside the source tree"
    w, env, t0 = venv["work"], venv["env"], time.perf_counter()
    assert not w.resolve().is_relative_to(REPO)

    def lg(*args):
        return sh(venv["bin"] / "lesiongen", *args, cwd=w, env=env)

    lg("phantom", "--out", "D", "--n", 30, "--size", 32, "--format", "derm7pt", "--quiet")
    lg("curate", "--dataset", "derm7pt", "--root", "D", "--out", "C")
    lg("caption", "--records", "C/records.csv", "--out", "C/captions.jsonl", "--max-tokens", 77, "--quiet")
    caps = [json.loads(l) for l in (w / "C" / "captions.jsonl").read_text().splitlines() if l.strip()]
    assert len(caps) == 30
    # counted with the tokenizer the installed package ships; the dev install's copy must agree token for token
    count = ("import json, sys; from lesiongen.captions import load_tokenizer, count_tokens; "
             "print(json.dumps(count_tokens([json.loads(l)['text'] for l in open('C/captions.jsonl') if l.strip()], load_tokenizer('clip'))))")
    n_tok = json.loads(sh(venv["python"], "-c", count, cwd=w, env=env).stdout)
    from lesiongen.captions import count_tokens, load_tokenizer
    assert n_tok == count_tokens([c["text"] for c in caps], load_tokenizer("clip"))
    assert max(n_tok) <= 77 and min(n_tok) >= 10, n_tok  # CLIP tokens: a diagnosis + skin type phrase is ~20

    # the main job end to end (data -> curate -> captions -> train -> generate -> evaluate -> report), at test size;
    # `--preset quick` is the same pipeline at the README's size (about 7 minutes: bench/bench_run.py)
    lg("run", "--preset", "tiny", "--out", "R", "--quiet")
    assert (w / "R" / "curated" / "records.csv").is_file() and (w / "R" / "captions" / "captions.jsonl").is_file()
    results = json.loads(next((w / "R").rglob("results.json")).read_text())
    assert results["research_use"] and results["claims"] and next((w / "R").rglob("report.html")).is_file()

    from lesiongen.model import CompactConfig
    from dataclasses import asdict
    tiny = {k: v for k, v in asdict(CompactConfig.tiny()).items() if k not in ("resolution", "prediction_type")}
    (w / "tiny.json").write_text(json.dumps(tiny))
    lg("train", "--records", "C/records.csv", "--captions", "C/captions.jsonl", "--base", "compact", "--out", "M",
       "--model-config", "tiny.json", "--max-steps", 2, "--batch-size", 4, "--checkpointing-steps", 2,
       "--num-validation-images", 1, "--validation-prompt", "dermoscopy image of a melanoma",
       "--validation-inference-steps", 2, "--no-progress")
    assert (w / "M" / "model_index.json").is_file() and (w / "M" / "README.md").read_text().startswith("---\n")
    lg("generate", "--model", "M", "--records", "C/records.csv", "--plan", "balanced", "--n", 6, "--out", "S",
       "--steps", 2, "--batch-size", 6, "--quiet")
    assert len(list((w / "S" / "images").glob("*.png"))) == 6 and (w / "S" / "README.md").is_file()
    print(f"main job from the wheel: {time.perf_counter() - t0:.1f} s")
