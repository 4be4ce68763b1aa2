"""Sampling speed of a trained compact model: img/s per sampler, step count, guidance and batch size, measured in one run.

Run it on an otherwise idle machine: every row renders the same captions and seeds, so rows compare as ratios.
Adherence of the same settings is measured by bench/bench_adherence.py (--samplers ...). Target of issue 7:
>= 20 img/s at 32 px with guidance, at adherence within 0.05 of 25-step DPM-Solver++.

Usage: python bench/bench_sampling.py --model RUN --records records.csv [--n 128] [--threads 2]
"""
import argparse, time

import pandas as pd
import torch

from lesiongen.generate import balanced_plan, load_pipeline, make_scheduler, sample_images


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
    for sched, steps, guidance, batch in [("dpmpp_sde", 25, 3.0, 16), ("dpmpp_sde", 25, 3.0, 64), ("dpmpp", 25, 3.0, 64),
                                          ("dpmpp_sde", 15, 3.0, 64), ("dpmpp_sde", 10, 3.0, 64), ("dpmpp_sde", 10, 1.0, 64)]:
        pipe.scheduler = make_scheduler(sched, pipe.scheduler, pixel_space=True)
        sample_images(pipe, texts[:8], seeds[:8], num_inference_steps=2, guidance_scale=guidance)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            sample_images(pipe, texts[i:i + batch], seeds[i:i + batch], num_inference_steps=steps, guidance_scale=guidance)
        dt = time.perf_counter() - t0
        rows.append(dict(sampler=sched, steps=steps, guidance=guidance, batch=batch, threads=torch.get_num_threads(),
                         img_s=round(len(texts) / dt, 2), unet_evals_s=round(len(texts) * steps * (2 if guidance > 1 else 1) / dt, 1)))
        print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
