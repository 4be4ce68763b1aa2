"""Sampling speed of a trained compact model: img/s per sampler, step count, guidance and batch size, measured in one run.

Run it on an otherwise idle machine: every row renders the same captions and seeds, so rows compare as ratios.
Adherence of the same settings is measured by bench/bench_adherence.py (--samplers ...). Target of issue 7:
>= 20 img/s at 32 px with guidance, at adherence within 0.05 of 25-step DPM-Solver++.

Guidance limited to the middle of the noise schedule (`guidance_interval`) runs one UNet pass instead of two on the
other steps; `unet_passes` counts passes per image.

`--compile` measures the bench presets' samplers (6 SDE steps guided in t/T [0.2, 0.6] at 32 px, 8 DPM-Solver++ steps
at 64 px; 6 SDE steps and 25 DPM-Solver++ steps guided at every step) with the eager UNet and then with the UNet
through `torch.compile` (`lesiongen generate --compile`), in one process on the same captions and seeds. Before the
compiled rows one untimed pass over the plan with each setting builds the kernels of each batch shape; its seconds
are printed as `compile_s`.

Usage: python bench/bench_sampling.py --model RUN --records records.csv [--n 128] [--threads 2] [--compile]
"""
import argparse, sys, time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_adherence import render  # noqa: E402

from lesiongen.generate import balanced_plan, load_pipeline  # noqa: E402
from lesiongen.model import guided_steps  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True); p.add_argument("--records", required=True)
    p.add_argument("--n", type=int, default=128); p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="the presets' samplers, eager and through torch.compile")
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    plan = balanced_plan(a.records, a.n, seed=0)
    full = (0.0, 1.0)
    settings = [("dpmpp", 25, 3.0, 64, full), ("dpmpp_sde", 25, 3.0, 16, full), ("dpmpp_sde", 25, 3.0, 64, full),
                ("dpmpp_sde", 10, 3.0, 64, full), ("dpmpp_sde", 10, 1.0, 64, full), ("dpmpp_sde", 10, 4.0, 64, (0.2, 0.8)),
                ("dpmpp_sde", 8, 4.0, 64, (0.2, 0.8)), ("dpmpp_sde", 6, 4.0, 64, (0.2, 0.8)), ("dpmpp_sde", 6, 4.0, 128, (0.2, 0.8))]
    if a.compile:
        settings = [("dpmpp_sde", 6, 4.0, 64, (0.2, 0.6)), ("dpmpp_sde", 6, 4.0, 64, full), ("dpmpp", 8, 4.0, 64, full),
                    ("dpmpp", 25, 4.0, 64, full)]
    rows = [speed(pipe, plan, *s, unet="eager") for s in settings]
    if a.compile:
        pipe.unet = torch.compile(pipe.unet)
        rows += [speed(pipe, plan, *s, unet="torch.compile", warm_up=True) for s in settings]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if a.compile:
        wide = table.pivot_table(index=["sampler", "steps", "interval"], columns="unet", values="img_s", sort=False)
        print("\ntorch.compile / eager, img/s:\n" + (wide["torch.compile"] / wide["eager"]).round(2).to_string())


def speed(pipe, plan, sched, steps, guidance, batch, interval, unet: str, warm_up: bool = False) -> dict:
    "img/s of one sampler setting on the plan's captions and seeds (after an untimed pass over them if `warm_up`)"
    t0 = time.perf_counter()
    if warm_up: render(pipe, plan, sched, steps, guidance, batch, interval)  # builds the compiled kernels
    else:  # a short warm-up of the eager model
        render(pipe, plan.iloc[:8], sched, 2, guidance, batch)
    compile_s = time.perf_counter() - t0 if warm_up else None
    ips = render(pipe, plan, sched, steps, guidance, batch, interval)[1]
    evals = steps + (sum(guided_steps(pipe.scheduler.timesteps, pipe.scheduler.config.num_train_timesteps, interval))
                     if guidance > 1 else 0)
    row = dict(unet=unet, sampler=sched, steps=steps, guidance=guidance, interval="{:g}-{:g}".format(*interval), batch=batch,
               threads=torch.get_num_threads(), unet_passes=evals, img_s=round(ips, 2), unet_evals_s=round(ips * evals, 1),
               compile_s=None if compile_s is None else round(compile_s, 1))
    print(row, flush=True)
    return row


if __name__ == "__main__":
    main()
