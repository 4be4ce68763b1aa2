"""Concept-contrast guidance at sampling time: does guiding away from the caption with its concepts flipped draw them?

Classifier-free guidance extrapolates from the empty caption, eps = eps("") + w (eps(c) - eps("")), so it pushes
towards everything the caption says at once. A fine concept (dots and globules, streaks) is a small part of that
direction. Guiding also away from the *same* caption with every Derm7pt concept flipped (absent <-> the training
split's commonest present value; same phrasing, `generate.counterfactual_captions`) isolates the concepts:

  base    eps("") + w (eps(c) - eps(""))                                       (the preset's sampler; 2 passes)
  flip    eps(c') + w (eps(c) - eps(c'))        c' = c, concepts flipped       (2 passes; no guidance for dx/skin)
  part    eps(p)  + w (eps(c) - eps(p))         p = the flipped concept clauses only (2 passes; p is unlike any
                                                training caption: the model never saw a partial caption)
  tri     eps("") + w (eps(c) - eps("")) + w2 (eps(c) - eps(c'))               (3 passes)

Each mode renders the balanced plan (420 images, SDE-DPM-Solver++ at the preset's steps) and is judged like
bench_recipe.py. base, flip and part are `generate.sample_images` (one negative prompt per image); tri is this
script's copy of `LesionGenPipeline.__call__`'s loop with a third branch.

Usage: python bench/bench_contrast.py --run RUN --records records.csv --judges JUDGES [--modes base:4 flip:4 tri:4:2]
         [--steps 6] [--n 420] [--out FILE.csv]
"""
import argparse, sys, time
from pathlib import Path

import pandas as pd
import torch
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).parent))
from bench_adherence import pipeline_at  # noqa: E402

from lesiongen import captions as C  # noqa: E402
from lesiongen.adherence import adherence, real_reference  # noqa: E402
from lesiongen.classify import Judges  # noqa: E402
from lesiongen.core import DERM7PT_CONCEPTS, RESEARCH_ONLY, seven_point_score  # noqa: E402
from lesiongen.data import is_missing  # noqa: E402
from lesiongen.model import unet_forward  # noqa: E402
from lesiongen.generate import (balanced_plan, counterfactual_captions, make_scheduler, sample_images,  # noqa: E402
                                training_rows)

CONCEPTS64 = ("pigment_network", "streaks", "dots_and_globules", "blue_whitish_veil", "vascular_structures")


def flip(row: dict, common: dict) -> dict:
    "The record with every annotated Derm7pt concept flipped: absent <-> `common[concept]`, the 7-point score redone"
    f = dict(row)
    for c in DERM7PT_CONCEPTS:
        if not is_missing(row.get(c)): f[c] = "absent" if row[c] != "absent" else common[c]
    if all(not is_missing(f.get(c)) for c in DERM7PT_CONCEPTS): f["seven_point_score"] = seven_point_score(f)
    return f


def negatives(plan: pd.DataFrame, records: Path) -> tuple[list[str], list[str]]:
    "Per plan row: the caption with its concepts flipped (`flip`), and those flipped concept clauses alone (`part`)"
    train = training_rows(records)
    common = {c: train.loc[train[c] != "absent", c].value_counts().index[0] for c in DERM7PT_CONCEPTS}
    flipped, part = [], []
    for r in plan.to_dict("records"):
        f = flip(r, common)
        flipped.append(counterfactual_captions([r, f])[1])
        part.append(C.join_clauses([cl for cl in C.caption_clauses(C.record_facts(f), "short", 0) if cl.key in DERM7PT_CONCEPTS]))
    return flipped, part


@torch.no_grad()
def sample_tri(pipe, texts: list, negs: list, seeds: list, steps: int, w: float, w2: float) -> list:
    "Render `texts` with three-way guidance: `LesionGenPipeline.__call__`'s loop with a third (flipped) branch"
    b = len(texts)
    pe, pm = pipe.encode_prompt(texts, "cpu")
    ue, um = pipe.encode_prompt([""], "cpu")
    fe, fm = pipe.encode_prompt(negs, "cpu")
    emb, mask = torch.cat([ue.expand(b, -1, -1), fe, pe]), torch.cat([um.expand(b, -1), fm, pm])
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    size = pipe.resolution
    pipe.scheduler.set_timesteps(steps)
    x = randn_tensor((b, 3, size, size), generator=gens, dtype=torch.float32) * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        out = unet_forward(pipe.unet, pipe.scheduler.scale_model_input(torch.cat([x] * 3), t), t, pipe.patch_size,
                           encoder_hidden_states=emb, encoder_attention_mask=mask)
        u, f, c = out.chunk(3)
        x = pipe.scheduler.step(u + w * (c - u) + w2 * (c - f), t, x, generator=gens).prev_sample
    return pipe.image_processor.postprocess(x.clamp(-1, 1), output_type="pil")


def sample(pipe, texts: list, negs: list, seeds: list, steps: int, w: float, w2: float|None, mode: str) -> list:
    "Render `texts` under `mode`'s guidance (module docstring); two-pass modes are `sample_images` with per-image negatives"
    pipe.scheduler = make_scheduler("dpmpp_sde", pipe.scheduler, pixel_space=True)
    if mode == "tri": return sample_tri(pipe, texts, negs, seeds, steps, w, w2)
    return sample_images(pipe, texts, seeds, num_inference_steps=steps, guidance_scale=w,
                         negative_prompt="" if mode == "base" else negs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True); p.add_argument("--records", required=True); p.add_argument("--judges", required=True)
    p.add_argument("--modes", nargs="+", default=["base:4", "flip:4", "part:4", "tri:4:1", "tri:4:2"],
                   help="mode:w[:w2] with mode base, flip, part or tri (tri needs w2)")
    p.add_argument("--steps", type=int, default=6); p.add_argument("--n", type=int, default=420)
    p.add_argument("--batch", type=int, default=64); p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="CSV of the table")
    a = p.parse_args(argv)
    modes = []
    for m in a.modes:
        name, *ws = m.split(":")
        if name not in ("base", "flip", "part", "tri") or not ws or len(ws) != (2 if name == "tri" else 1):
            p.error(f"--modes: expected base:W, flip:W, part:W or tri:W:W2, got {m!r}")
        try: modes.append((m, name, float(ws[0]), float(ws[1]) if name == "tri" else None))
        except ValueError: p.error(f"--modes: guidance weights must be numbers, got {m!r}")
    torch.set_num_threads(a.threads)
    records = Path(a.records)
    judges = Judges.load(a.judges); ref = real_reference(judges, records, split="test")
    plan = balanced_plan(records, a.n, seed=0)
    flipped, part = negatives(plan, records)
    print(f"caption:  {plan['text'].iloc[0]}\nflipped:  {flipped[0]}\npart:     {part[0]}")
    pipe = pipeline_at(Path(a.run), None); pipe.set_progress_bar_config(disable=True)
    rows = []
    for label, mode, w, w2 in modes:
        negs = part if mode == "part" else flipped
        imgs, t0 = [], time.perf_counter()
        for i in range(0, len(plan), a.batch):
            chunk = plan.iloc[i:i + a.batch]
            imgs += sample(pipe, chunk["text"].tolist(), negs[i:i + a.batch], chunk["seed"].tolist(), a.steps, w, w2, mode)
        ips = len(plan) / (time.perf_counter() - t0)
        t = adherence(judges, imgs, plan, ref).table.set_index("attribute")
        row = {"mode": label, "steps": a.steps, "img_s": ips, "dx_rel": t.loc["dx", "relative_balanced"],
               "fitz_within1": t.loc["fitzpatrick", "within_one"]}
        row.update({c: t.loc[c + ":presence", "balanced_agreement"] for c in CONCEPTS64 if c + ":presence" in t.index})
        rows.append(row)
        print(pd.DataFrame([row]).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print("\nconcept columns: balanced agreement of the judged presence with the prompt\n" + table.round(3).to_string(index=False))
    if a.out: table.to_csv(a.out, index=False)
    print(RESEARCH_ONLY)


if __name__ == "__main__":
    main()
