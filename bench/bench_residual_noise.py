"""Residual noise of generated images per sampler: the high-frequency energy of generated images next to real ones.

A deterministic sampler (DPM-Solver++, DDIM) follows one ODE trajectory from the initial noise, and every error of
the model's clean-image estimate along it stays in the image; an SDE sampler adds fresh noise at each step, which the
model removes again. A briefly trained epsilon-prediction pixel model with the cosine schedule leaves visible noise
with the ODE solvers (04_model, `sampling_scheduler`), and judges read that noise as fine texture (streaks, dots and
globules) that the caption never asked for. This measures it: the mean absolute Laplacian (3x3, grey levels in
[0, 1]) of each image (`adherence.high_frequency`), its median over the plan, and its ratio to the median of real
test images of the same side (`adherence.residual_noise`).
It also writes a figure: one row of real test images, then one row per sampler with the same captions and seeds.

Usage: python bench/bench_residual_noise.py --model RUN --records records.csv --out bench/results/NAME
                                            [--samplers dpmpp:8 dpmpp:25 dpmpp_sde:8 dpmpp_sde:25] [--n 128] [--guidance 4]
"""
import argparse, io, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_adherence import render, sampler_spec  # noqa: E402

from lesiongen.adherence import held_out_rows, high_frequency, load_images, residual_noise  # noqa: E402
from lesiongen.core import RESEARCH_ONLY  # noqa: E402
from lesiongen.generate import balanced_plan, load_pipeline, native_resolution  # noqa: E402


def real_images(records: Path, n: int, side: int) -> np.ndarray:
    "The first `n` test-split images of `records` at `side` px, read as the judges read them (`adherence.load_images`)"
    df, root = held_out_rows(records, "test")
    return load_images([root / f for f in df["file_name"].head(n)], side)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True); p.add_argument("--records", required=True)
    p.add_argument("--out", required=True, help="output stem: writes STEM.csv and STEM.png")
    p.add_argument("--samplers", nargs="+", default=["dpmpp:8", "dpmpp:25", "dpmpp_sde:8", "dpmpp_sde:25"])
    p.add_argument("--n", type=int, default=128); p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--show", type=int, default=8, help="images per row of the figure")
    p.add_argument("--threads", type=int, default=2); p.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    try: samplers = [sampler_spec("--samplers", s) for s in a.samplers]
    except ValueError as e: p.error(str(e))
    if not Path(a.model, "model_index.json").is_file(): p.error(f"--model: {a.model} is not a model folder (no model_index.json)")
    torch.set_num_threads(a.threads)
    side = native_resolution(a.model)
    plan = balanced_plan(a.records, a.n, seed=0)
    real = real_images(Path(a.records), a.n, side)
    real_hf = np.median(high_frequency(real))
    pipe, rows, shown = load_pipeline(a.model), [], {"real test images": real[:a.show]}
    rows.append(dict(images="real test images", sampler="", median_high_frequency=real_hf, relative_to_real=1.0, img_s=None))
    for name, steps in samplers:
        ims, ips = render(pipe, plan, name, steps, a.guidance, a.batch)
        rows.append(dict(images="generated", sampler=f"{name}:{steps}", median_high_frequency=np.median(high_frequency(ims)),
                         relative_to_real=residual_noise(ims, real), img_s=ips))
        shown[f"{name}, {steps} steps"] = ims[:a.show]
    table = pd.DataFrame(rows)
    print(f"model {a.model}, {len(plan)} balanced-plan captions, guidance {a.guidance}; real: {len(real)} test images")
    print(table.round(4).to_string(index=False))
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    table.assign(model=a.model, n=len(plan), guidance=a.guidance).to_csv(out.with_suffix(".csv"), index=False)
    fig, axes = plt.subplots(len(shown), 1, figsize=(1.1 * a.show, 1.25 * len(shown)))
    for ax, (label, ims) in zip(axes, shown.items()):
        ax.imshow(np.concatenate([np.asarray(im) for im in ims], 1), interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left"); ax.axis("off")
    fig.suptitle(f"{Path(a.model).name}: same captions and seeds per generated row (synthetic, research use only)", fontsize=8)
    fig.tight_layout(); buf = io.BytesIO(); fig.savefig(buf, dpi=90); plt.close(fig)
    Image.open(buf).convert("RGB").quantize(256).save(out.with_suffix(".png"), optimize=True)  # a 256-colour PNG: a third of the bytes
    print(RESEARCH_ONLY)


if __name__ == "__main__":
    main()
