"""Where along the noise schedule a trained model loses what real images show (`lesiongen.adherence.regeneration`).

Each real held-out image (test split) is noised to a point of the sampler's schedule (img2img `strength`: 0 is the
real image, 1 pure noise), finished by the model with its own caption and the preset sampler, and judged against the
image's true attributes. A concept kept from strength 0.25 but lost from 0.75 is one the model cannot draw from its
caption; one lost already from 0.125 is one it cannot even keep. Prints balanced agreement per attribute (rows) and
strength (columns, with the timestep the sampler starts from) for each model, and writes one tidy CSV.

Usage: python bench/bench_regeneration.py --records R --captions C --judges J --models RUN [RUN ...]
         [--sampler dpmpp:8] [--guidance 4] [--strengths 0.125 0.25 0.5 0.75 1] [--n 400] [--out results.csv]
"""
import argparse, logging, time
from pathlib import Path

import pandas as pd
import torch

from lesiongen.adherence import regeneration
from lesiongen.classify import Judges
from lesiongen.core import RESEARCH_ONLY
from lesiongen.generate import load_pipeline, make_scheduler


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", required=True); p.add_argument("--captions", required=True)
    p.add_argument("--judges", required=True)
    p.add_argument("--models", nargs="+", required=True, help="lesiongen train run folders")
    p.add_argument("--sampler", default="dpmpp:8", help="scheduler:steps of the full schedule (strength 1)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--strengths", nargs="+", type=float, default=[0.125, 0.25, 0.375, 0.5, 0.75, 1.0])
    p.add_argument("--n", type=int, default=400, help="real test images (a seeded sample)")
    p.add_argument("--batch", type=int, default=50); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None); p.add_argument("--out", default=None, help="CSV to write")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads: torch.set_num_threads(a.threads)
    judges = Judges.load(a.judges)
    sched, steps = a.sampler.split(":")
    tables = []
    for run in map(Path, a.models):
        pipe = load_pipeline(run)
        pipe.scheduler = make_scheduler(sched, pipe.scheduler, pixel_space=True)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        t = regeneration(judges, pipe, a.records, a.captions, a.strengths, max_images=a.n, num_inference_steps=int(steps),
                         guidance_scale=a.guidance, batch_size=a.batch, seed=a.seed, progress=True)
        t = t.assign(model=f"{run.parent.name}/{run.name}", sampler=a.sampler, guidance=a.guidance)
        tables.append(t)
        wide = t.pivot_table(index="attribute", columns=["strength", "timestep"], values="balanced_agreement", sort=False)
        print(f"\n{run} ({a.sampler}, guidance {a.guidance:g}; {time.perf_counter() - t0:.0f} s): balanced agreement with the "
              f"real images' attributes, by strength (timestep the sampler starts from)")
        print(wide.round(3).to_string())
    table = pd.concat(tables, ignore_index=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(a.out, index=False)
    print(RESEARCH_ONLY)


if __name__ == "__main__":
    main()
