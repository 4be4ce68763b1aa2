"""Issue 11's experiment in one command: real vs synthetic vs mixed vs no-generator baselines on phantom Derm7pt at
64 px, 3 seeds, tested on the same real test split, with fairness by Fitzpatrick group, a dose-response sweep,
fidelity, memorization and adherence; prints each claim next to its target and the time of every stage.

Stages (each reused when its output exists, so `--work DIR` resumes):
  data       phantom Derm7pt, 3,000 cases at 64 px -> curate -> captions          (bench_recipe.build_data)
  generator  the 64 px compact recipe (bench/recipes/compact64.json, offset noise, 1,800 steps: <= 30 min; the
             results in 10_evaluate were made when that file read captions as tokens)
  synthetic  `lesiongen generate` balanced (--n-balanced, equal per diagnosis x Fitzpatrick type) and targeted
             (--n-targeted, every diagnosis on Fitzpatrick V and VI: the worst groups of the real-only classifier)
  judges     attribute judges on the real training split (domain features for fidelity, and adherence)
  filter     judge-filtered copies of both sets (`evaluate.filter_synthetic`: images whose judged diagnosis is the
             prompted one), compared with the unfiltered sets as sets of their own
  evaluate   `lesiongen.evaluate.evaluate` (3 seeds; ratios the balanced set can fill)

Reuse existing artefacts with --records, --generator, --balanced, --targeted, --judges (their stage time is then not
measured). Two processes can share the evaluate stage: `--shard 0 2` and `--shard 1 2` (run both; the last to
finish writes the report; run once more without --shard to print the table).

Usage: python bench/bench_evaluate.py --work /tmp/exp64 [--threads 1] [--shard I N]
Targets: synthetic-only balanced accuracy >= 0.9 x real-only; real + synthetic >= real-only; the worst Fitzpatrick
group's balanced accuracy with synthetic data above real-only and both baselines; FID of identical sets ~ 0
(tests/test_evaluate.py); memorization rate reported. Whole preset <= 90 min.
"""
import argparse, json, logging, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipe import PRESETS, build_data, cli  # noqa: E402

from lesiongen.classify import JudgeConfig, train_judges  # noqa: E402
from lesiongen.core import RESEARCH_ONLY  # noqa: E402
from lesiongen.evaluate import ExperimentConfig, collect_results, evaluate, filter_synthetic  # noqa: E402

TARGETED = {f"fitzpatrick={f},dx={d}": 1 for f in (5, 6) for d in ("bcc", "bkl", "df", "mel", "misc", "nv", "vasc")}


def stage(name: str, times: dict, done: bool, fn) -> None:
    "Run `fn` unless `done`, recording its wall-clock minutes"
    if done: times[name] = "reused"; return
    t0 = time.time(); fn(); times[name] = round((time.time() - t0) / 60, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--records", type=Path); ap.add_argument("--generator", type=Path)
    ap.add_argument("--balanced", type=Path); ap.add_argument("--targeted", type=Path); ap.add_argument("--judges", type=Path)
    ap.add_argument("--n", type=int, default=3000, help="phantom cases")
    ap.add_argument("--n-balanced", type=int, default=1260); ap.add_argument("--n-targeted", type=int, default=630)
    ap.add_argument("--seeds", type=int, default=3); ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=25); ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    work, times, t_all = a.work, {}, time.time()
    work.mkdir(parents=True, exist_ok=True)
    records = a.records
    if records is None:
        t0 = time.time(); records, _ = build_data(work, a.n); times["data"] = round((time.time() - t0) / 60, 1)
    gen = a.generator or work / "generator"
    p = PRESETS["64"]
    stage("generator", times, a.generator is not None or (gen / "model_index.json").is_file(), lambda: cli(
        "train", "--records", str(records), "--captions", str(Path(records).with_name("captions.jsonl")), "--out", str(gen),
        "--base", "compact", "--resolution", "64", "--model-config", str(p["model_config"]), *p["train_args"], "--quiet"))
    sets = {"balanced": (a.balanced or work / "syn_balanced", a.n_balanced, []),
            "targeted": (a.targeted or work / "syn_targeted", a.n_targeted, ["--weights", str(work / "targeted_weights.json")])}
    (work / "targeted_weights.json").write_text(json.dumps(TARGETED, indent=1))
    for plan, (d, n, extra) in sets.items():
        stage(f"generate {plan}", times, (d / "metadata.csv").is_file() and not any(d.glob(".*tmp*")), lambda: cli(
            "generate", "--model", str(gen), "--records", str(records), "--plan", plan, "--n", str(n), "--out", str(d),
            "--seed", "1" if plan == "balanced" else "2", "--num-threads", str(a.threads), "--quiet", *extra))
    judges = a.judges or work / "judges"
    stage("judges", times, (judges / "judges.json").is_file(), lambda: train_judges(
        records, judges, JudgeConfig(resolution=64, hidden_sizes=(16, 32, 64), depths=(1, 1, 1), num_threads=a.threads, progress=False)))
    judged = {}
    for plan, (d, _, _) in sets.items():
        judged[plan] = work / f"syn_{plan}_judged"
        stage(f"filter {plan}", times, (judged[plan] / "metadata.csv").is_file(),
              lambda d=d, plan=plan: filter_synthetic(d, judges, judged[plan]))
    cfg = ExperimentConfig(classifier=JudgeConfig(attributes=("dx",), resolution=64, epochs=a.epochs, patience=a.patience,
                                                  num_threads=a.threads, progress=False),
                           seeds=tuple(range(a.seeds)), ratios=(0.0, 0.5, 1.0, 2.0, 5.0, 10.0), progress=True)
    t0 = time.time()
    results = evaluate(records, [sets["balanced"][0], sets["targeted"][0], judged["balanced"], judged["targeted"]], work / "eval", cfg, judges=judges, shard=tuple(a.shard))
    times["evaluate (this process)"] = round((time.time() - t0) / 60, 1)
    print("\n| stage | minutes |\n|---|---|")
    for k, v in times.items(): print(f"| {k} | {v} |")
    print(f"| total (this process) | {round((time.time() - t_all) / 60, 1)} |")
    if results is None:
        print("\nother shards are still training: run again when they finish"); return 0
    res = collect_results(work / "eval")
    print("\n" + res.table(("accuracy", "balanced_accuracy", "macro_f1", "auroc")).to_string())
    print("\nworst Fitzpatrick group (balanced accuracy):\n" + res.worst("fitzpatrick_group").to_string(index=False))
    print("\nclaims:")
    for c in results["claims"]:
        print(f"- {'HOLDS' if c['holds'] else 'does not hold'}{'' if c['clear'] else ' (intervals overlap)'}: {c['claim']}")
    for n, s in results["synthetic"].items():
        o, m = s["fidelity"]["judge"]["overall"], s["memorization"]
        print(f"- {n}: FID {o['fid']:.3g} (judge features), precision {o['precision']:.2f}, recall {o['recall']:.2f}, "
              f"replication rate {m['replication_rate']:.1%} (real-test reference {m['reference_rate']:.1%})")
    cpu = sum(r["seconds"] for r in json.loads((work / "eval" / "results.json").read_text())["runs"]) / 60
    print(f"\nclassifier training: {cpu:.0f} min of run time over {len(res.runs)} runs\nreport: {work / 'eval' / 'report.html'}\n{RESEARCH_ONLY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
