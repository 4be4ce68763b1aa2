"""Prompt adherence of trained compact models: the quality measure that recipes, samplers and speed-ups are judged by.

For each model (a finished `lesiongen train` run, or one of its checkpoints with --checkpoints, scored with its EMA
weights) and each sampler setting, this renders
  * a balanced plan (equal counts per diagnosis x Fitzpatrick type, concepts drawn from training rows of the diagnosis),
  * a skin-type counterfactual cohort (each of --cf lesions on types I-VI, one seed and one phrasing per lesion),
judges every image with the attribute judges (`lesiongen.classify`), and prints one row per (model, sampler):
img/s of sampling, relative diagnosis adherence (balanced agreement on generated / on real held-out images),
Fitzpatrick judged within +-1 of the prompt, the ITA estimator's group agreement, the share of counterfactual pairs
whose ITA falls from type i to type j > i, the diagnosis staying put across skin types, and each concept's presence
agreement. Targets of issue 7 (32 px): relative dx adherence >= 0.9, Fitzpatrick within +-1 >= 0.9, ITA order >= 0.95.

Usage: python bench/bench_adherence.py --records R --judges J --models RUN [RUN ...] [--checkpoints]
         [--samplers dpmpp:25 dpmpp:10 dpmpp_sde:25] [--guidance 3] [--intervals 0:1 0.2:0.8] [--n 420] [--cf 40] [--out DIR]
"""
import argparse, dataclasses, json, logging, math, time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from lesiongen.adherence import adherence, counterfactual_control, real_reference
from lesiongen.classify import Judges
from lesiongen.core import DERM7PT_CONCEPTS, RESEARCH_ONLY
from lesiongen.generate import SCHEDULERS, balanced_plan, counterfactual_plan, load_pipeline, make_scheduler, sample_images, upscale_images
from lesiongen.model import compact_pipeline
from lesiongen.train import TrainConfig, compact_config, list_checkpoints


def sampler_spec(flag: str,  # the command-line flag, for the message
                 value: str,  # SCHED:STEPS or SCHED:STEPS:GUIDANCE
                 parts: tuple = (2,),  # accepted field counts: (2,), (2, 3) or (3,)
                ) -> tuple:  # (scheduler, steps) or (scheduler, steps, guidance)
    "Parse a sampler given on the command line; a bad one raises ValueError naming `flag` and the expected form"
    f = value.split(":")
    ok = len(f) in parts and f[0] in SCHEDULERS and f[1].isdigit() and int(f[1]) > 0
    try: g = float(f[2]) if ok and len(f) == 3 else None
    except ValueError: ok, g = False, None
    if not ok or (g is not None and not (math.isfinite(g) and g >= 0)):
        form = {(2,): "SCHED:STEPS", (2, 3): "SCHED:STEPS[:GUIDANCE]", (3,): "SCHED:STEPS:GUIDANCE"}[parts]
        raise ValueError(f"{flag}: expected {form} with SCHED one of {SCHEDULERS}, STEPS > 0"
                         + (", GUIDANCE >= 0" if 3 in parts else "") + f"; got {value!r}")
    return (f[0], int(f[1])) + ((g,) if g is not None else ())


def pipeline_at(run: Path, checkpoint: Path|None):
    "The run's final pipeline, or a pipeline holding a checkpoint's EMA weights (its raw weights without EMA)"
    if checkpoint is None: return load_pipeline(run)
    saved = json.loads((run / "config.json").read_text())
    cfg = TrainConfig(**{f.name: saved[f.name] for f in dataclasses.fields(TrainConfig) if f.name in saved})
    pipe = compact_pipeline(compact_config(cfg))
    f = checkpoint / "ema.safetensors"
    weights = load_file(f if f.is_file() else checkpoint / "model.safetensors")
    missing, unexpected = pipe.unet.load_state_dict(weights, strict=False)
    assert not unexpected and not [m for m in missing if m in dict(pipe.unet.named_parameters())], (missing, unexpected)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, plan: pd.DataFrame, scheduler: str, steps: int, guidance: float, batch: int,
           guidance_interval: tuple = (0.0, 1.0), upscaler=None, upscaler_sampler: tuple = ("dpmpp_sde", 8, 3.0),
           ) -> tuple[list, float]:
    "Render the plan's captions with their seeds (then refine them with `upscaler`, a super-resolution stage); return the images and img/s (wall-clock of sampling only)"
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, pixel_space=True)
    if upscaler is not None: upscaler.scheduler = make_scheduler(upscaler_sampler[0], upscaler.scheduler, pixel_space=True)
    images, t0 = [], time.perf_counter()
    for i in range(0, len(plan), batch):
        part = plan.iloc[i:i + batch]
        ims = sample_images(pipe, list(part["text"]), list(part["seed"]), num_inference_steps=steps, guidance_scale=guidance,
                            guidance_interval=guidance_interval)
        if upscaler is not None:  # as `lesiongen generate --upscaler` does
            ims = upscale_images(upscaler, ims, list(part["text"]), list(part["seed"]), upscaler_sampler[1], upscaler_sampler[2])
        images += ims
    return images, len(plan) / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", required=True); p.add_argument("--judges", required=True)
    p.add_argument("--models", nargs="+", required=True, help="lesiongen train run folders")
    p.add_argument("--checkpoints", action="store_true", help="also score every checkpoint-{step} (EMA weights)")
    p.add_argument("--samplers", nargs="+", default=["dpmpp:25"], help="scheduler:steps, e.g. dpmpp:25 dpmpp_sde:10")
    p.add_argument("--guidance", nargs="+", type=float, default=[3.0])
    p.add_argument("--intervals", nargs="+", default=["0:1"],
                   help="guidance intervals lo:hi (shares of the noise schedule), e.g. 0:1 0.2:0.8")
    p.add_argument("--n", type=int, default=420, help="images of the balanced plan")
    p.add_argument("--cf", type=int, default=40, help="lesions of the skin-type counterfactual cohort (x6 images)")
    p.add_argument("--batch", type=int, default=64); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None); p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads: torch.set_num_threads(a.threads)
    judges = Judges.load(a.judges)
    ref = real_reference(judges, a.records, split="test")
    print("judges on real held-out images (test split):")
    print(ref.table[["attribute", "n", "agreement", "balanced_agreement"]].round(3).to_string(index=False))
    plan = balanced_plan(a.records, a.n, seed=a.seed)
    cf = counterfactual_plan(a.records, a.cf, attribute="fitzpatrick", seed=a.seed + 1)
    rows = []
    runs = list(map(Path, a.models))
    names = [r.name for r in runs]  # two runs of one folder name (e.g. each experiment's pre32) are told apart by their parent
    labels = {r: r.name if names.count(r.name) == 1 else f"{r.parent.name}-{r.name}" for r in runs}
    for run in runs:
        points = [(c, int(c.name.split("-")[1])) for c in list_checkpoints(run)] if a.checkpoints else []
        if (run / "model_index.json").is_file(): points.append((None, "final"))
        for ckpt, step in points:
            pipe = pipeline_at(run, ckpt)
            for spec in a.samplers:
                sched, steps = spec.split(":")
                for g, iv in [(g, tuple(map(float, iv.split(":")))) for g in a.guidance for iv in a.intervals]:
                    imgs, ips = render(pipe, plan, sched, int(steps), g, a.batch, iv)
                    rep = adherence(judges, imgs, plan, ref)
                    cimgs, _ = render(pipe, cf, sched, int(steps), g, a.batch, iv)
                    cc = counterfactual_control(judges, cimgs, cf).iloc[0]
                    t, summary = rep.table.set_index("attribute"), rep.summary()
                    row = dict(model=labels[run], step=step, sampler=spec, guidance=g, interval="{:g}-{:g}".format(*iv), img_s=round(ips, 1),
                               dx_rel=t.loc["dx", "relative_balanced"], dx_bal=t.loc["dx", "balanced_agreement"],
                               fitz_within1=t.loc["fitzpatrick", "within_one"], fitz_bal=t.loc["fitzpatrick", "balanced_agreement"],
                               ita_in_group=summary.get("ita_in_group"), ita_within1=summary.get("ita_within_one"),
                               cf_ita_order=cc["ita_order_pairs"], cf_dx_stays=cc.get("stays[dx]"))
                    row.update({f"{c}_pres": t.loc[c + ":presence", "relative_balanced"] for c in DERM7PT_CONCEPTS
                                if c + ":presence" in t.index})
                    rows.append(row)
                    print(pd.DataFrame([row]).round(3).to_string(index=False), flush=True)
                    if a.out:
                        d = Path(a.out) / f"{labels[run]}-{step}-{spec.replace(':', '')}-g{g}-i{iv[0]:g}-{iv[1]:g}"
                        d.mkdir(parents=True, exist_ok=True); rep.save(d)
    table = pd.DataFrame(rows)
    print("\n" + table.round(3).to_string(index=False))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(a.out) / "bench_adherence.csv", index=False)
    print(RESEARCH_ONLY)


if __name__ == "__main__":
    main()
