"""Sampling speed of a trained compact model: img/s per sampler, step count, guidance and batch size, measured in one run.

Run it on an otherwise idle machine: every row renders the same captions and seeds, so rows compare as ratios.
Adherence of the same settings is measured by bench/bench_adherence.py (--samplers ...). Target of issue 7:
>= 20 img/s at 32 px with guidance, at adherence within 0.05 of 25-step DPM-Solver++.

Guidance limited to the middle of the noise schedule (`guidance_interval`) runs one UNet pass instead of two on the
other steps; `unet_passes` counts passes per image.

Usage: python bench/bench_sampling.py --model RUN --records records.csv [--n 128] [--threads 2]
"""
import argparse, time

import pandas as pd
import torch

from lesiongen.generate import balanced_plan, load_pipeline, make_scheduler, sample_images
from lesiongen.model import guided_steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True); p.add_argument("--records", required=True)
    p.add_argument("--n", type=int, default=128); p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    plan = balanced_plan(a.records, a.n, seed=0)
    texts, seeds = list(plan["text"]), list(plan["seed"])
    rows = []
    full = (0.0, 1.0)
    for sched, steps, guidance, batch, interval in [
            ("dpmpp", 25, 3.0, 64, full), ("dpmpp_sde", 25, 3.0, 16, full), ("dpmpp_sde", 25, 3.0, 64, full),
            ("dpmpp_sde", 10, 3.0, 64, full), ("dpmpp_sde", 10, 1.0, 64, full), ("dpmpp_sde", 10, 4.0, 64, (0.2, 0.8)),
            ("dpmpp_sde", 8, 4.0, 64, (0.2, 0.8)), ("dpmpp_sde", 6, 4.0, 64, (0.2, 0.8)), ("dpmpp_sde", 6, 4.0, 128, (0.2, 0.8))]:
        pipe.scheduler = make_scheduler(sched, pipe.scheduler, pixel_space=True)
        sample_images(pipe, texts[:8], seeds[:8], num_inference_steps=2, guidance_scale=guidance)  # warm-up
        pipe.scheduler.set_timesteps(steps)
        evals = steps + (sum(guided_steps(pipe.scheduler.timesteps, pipe.scheduler.config.num_train_timesteps, interval))
                         if guidance > 1 else 0)
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            sample_images(pipe, texts[i:i + batch], seeds[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                          guidance_interval=interval)
        dt = time.perf_counter() - t0
        rows.append(dict(sampler=sched, steps=steps, guidance=guidance, interval="{:g}-{:g}".format(*interval), batch=batch,
                         threads=torch.get_num_threads(), unet_passes=evals, img_s=round(len(texts) / dt, 2),
                         unet_evals_s=round(len(texts) * evals / dt, 1)))
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
