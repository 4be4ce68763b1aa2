"""A 32 px base model + a 64 px residual super-resolution diffusion stage: does a cascade draw the 64 px concepts?

The single-stage 64 px recipe misses the concepts target (bench_recipe.py --preset 64). Its regeneration curves
(bench_regeneration.py) lose fine concepts at light noise, and its concept counterfactuals barely switch (dots and
globules: 7.5% of lesions). This script tests the cascade of Imagen / DeepFloyd IF instead, on the same judges:

  base   a 32 px lesiongen run (trained with `lesiongen train --resolution 32 --model-config FILE`), sampled from
         each test image's own caption at guidance 4 with `--base-sampler` (default the 64 px preset's DPM-Solver++,
         8 steps);
  SR     a 64 px diffusion UNet conditioned on the caption and on the base image, bicubic-upsampled and concatenated
         to its input. It draws only the residual over that upsample, scaled by `--residual-scale` (the residual's
         std is ~0.05 of the [-1, 1] range; x4 clips the 0.8% of residual values beyond +-0.25), so colour and
         layout come from the base and the UNet spends its capacity on fine texture. Trained here on the records' train split (64 -> 32 px by area averaging, then
         bicubic; a little Gaussian noise on the conditioning image), epsilon loss, for `--sr-steps` steps.

Rows (420 test images, their own captions, judged by 64 px judges; presence balanced agreement per concept):
  real 64 px; real -> 32 px -> bicubic; real -> 32 px -> SR (the SR stage's ceiling: a perfect base);
  base -> bicubic; base -> SR at each guidance; and each `--compare` single-stage 64 px run with the same sampler.

The script's own SR stage (`--work`) was the prototype; the package's (`--upscaler`) is the same design. Research use only, not for clinical use.

With `--upscaler RUN` the SR stage is instead a package run (`lesiongen train --base compact --resolution 64
--model-config bench/recipes/compact64_sr.json`, `CompactConfig.low_res`), sampled by `generate.upscale_images` as
`lesiongen generate --upscaler RUN` samples it.

Usage: python bench/bench_cascade.py --records R --captions C --judges J --base RUN32 (--work DIR | --upscaler RUN)
         [--compare RUN64 ...] [--base-sampler dpmpp:8] [--sr-steps 677] [--guidance 1 3] [--compile] [--n 420] [--threads 2] [--out results.csv]
"""
import argparse, json, logging, shutil, sys, time
from pathlib import Path

import numpy as np
from PIL import Image
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from lesiongen.adherence import PRESENCE, held_out_rows, judge_images, record_truth, score_labels
from lesiongen.classify import Judges, decode_images
from lesiongen.core import RESEARCH_ONLY
from lesiongen.data import read_records
from lesiongen.generate import load_pipeline, make_scheduler, upscale_images
from lesiongen.model import CompactConfig, compact_noise_scheduler, low_res_condition, sampling_scheduler, upsample
from lesiongen.train import data_root_of, encode_prompts, to_unit_range

sys.path.insert(0, str(Path(__file__).parent))
from bench_adherence import render  # noqa: E402

CONCEPTS = ("pigment_network", "streaks", "dots_and_globules", "blue_whitish_veil", "vascular_structures")
LOW, HIGH = 32, 64


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    "Gaussian blur of one image [3, H, W] with std `sigma` px (reflect padding); sigma < 0.05: unchanged"
    if sigma < 0.05: return x
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2); k = k / k.sum()
    y = F.pad(x[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]


def to_u8(x: torch.Tensor) -> torch.Tensor: return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sr_unet(channels: tuple, aug: bool = False) -> UNet2DConditionModel:
    "A pixel-space UNet with 3 + 3 input channels (noisy residual, upsampled base) and text attention at its lowest level; `aug`: told the conditioning-noise level"
    att = [False] * (len(channels) - 1) + [True]
    return UNet2DConditionModel(class_embed_type="timestep" if aug else None,
        sample_size=HIGH, in_channels=6, out_channels=3, block_out_channels=channels, layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in att),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8,
        addition_embed_type="text", addition_embed_type_num_heads=8, only_cross_attention=True)


def train_sr(folder: Path, images: torch.Tensor, text: dict, a) -> dict:
    "Train the SR stage (or load it when `folder` holds one); return its training record"
    done = folder / "sr.json"
    if done.is_file(): return json.loads(done.read_text())
    torch.manual_seed(a.seed)
    unet, sched = sr_unet(tuple(a.sr_channels), a.aug_max > 0 or a.blur_max > 0), compact_noise_scheduler(CompactConfig(resolution=HIGH))
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=0.01)
    t0, losses = time.perf_counter(), []
    for step in range(a.sr_steps):
        idx = torch.randint(0, len(images), (a.batch_size,))
        x0 = to_unit_range(images[idx])
        flip = torch.rand(len(idx)) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        lo = low_res_condition(x0, LOW)
        target = ((x0 - lo) * a.residual_scale).clamp(-1, 1)
        if a.blur_max > 0:  # blur augmentation (SR3, cascaded diffusion): a blur level the UNet is told, chosen again at sampling
            level = torch.rand(len(idx)) * a.blur_max
            lo = torch.stack([blur(im, float(v)) for im, v in zip(lo, level)])
            lo, labels = lo + torch.rand(len(idx), 1, 1, 1) * a.cond_noise * torch.randn_like(lo), level / a.blur_max * 1000
        elif a.aug_max > 0:  # Imagen's noise conditioning augmentation: a noise level the UNet is told, chosen again at sampling
            level = torch.rand(len(idx)) * a.aug_max
            lo, labels = lo + level[:, None, None, None] * torch.randn_like(lo), level * 1000
        else:
            lo, labels = lo + torch.rand(len(idx), 1, 1, 1) * a.cond_noise * torch.randn_like(lo), None  # robustness to the base's errors
        rows = text["index"][idx]
        rows = torch.where(torch.rand(len(idx)) < 0.1, torch.zeros_like(rows), rows)  # 10% empty captions (guidance)
        noise, t = torch.randn_like(target), torch.randint(0, sched.config.num_train_timesteps, (len(idx),))
        pred = unet(torch.cat([sched.add_noise(target, noise, t), lo], 1), t, encoder_hidden_states=text["hidden"][rows],
                    encoder_attention_mask=text["mask"][rows], class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for g in opt.param_groups: g["lr"] = a.lr * min(1.0, (step + 1) / 100)
        opt.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0: print(f"  SR step {step + 1}/{a.sr_steps}: loss {np.mean(losses[-100:]):.4f}", flush=True)
    rec = dict(steps=a.sr_steps, minutes=(time.perf_counter() - t0) / 60, channels=list(a.sr_channels), aug_max=a.aug_max, blur_max=a.blur_max,
               residual_scale=a.residual_scale, params=sum(p.numel() for p in unet.parameters()))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    (tmp / "sr.json").write_text(json.dumps(rec, indent=1))
    tmp.rename(folder)
    return rec


@torch.no_grad()
def _super_resolve(unet, lo32: torch.Tensor, emb, mask, nemb, nmask, a, guidance: float, level: float = 0.0) -> torch.Tensor:
    "64 px images in [-1, 1] from 32 px ones: the SR stage's residual (SDE-DPM-Solver++) over their bicubic upsample (noised to `level` if it was trained so)"
    train = compact_noise_scheduler(CompactConfig(resolution=HIGH))
    lo, out = upsample(lo32, HIGH), []
    aug = unet.config.class_embed_type == "timestep"
    if aug and a.blur_max > 0: lo_in = torch.stack([blur(im, level) for im in lo])
    elif aug: lo_in = lo + level * torch.randn(lo.shape, generator=torch.Generator().manual_seed(a.seed + 1))
    else: lo_in = lo
    for i in range(0, len(lo), a.sample_batch):
        sl = slice(i, i + a.sample_batch)
        sched = sampling_scheduler(train, algorithm_type="sde-dpmsolver++")
        sched.set_timesteps(a.sr_sampler_steps)
        gen = torch.Generator().manual_seed(a.seed + i)
        x = torch.randn(len(lo[sl]), 3, HIGH, HIGH, generator=gen)
        labels = torch.full((len(x),), level / a.blur_max * 1000 if a.blur_max > 0 else level * 1000) if aug else None
        for t in sched.timesteps:
            inp = torch.cat([x, lo_in[sl]], 1)
            if guidance > 1:
                u, c = unet(torch.cat([inp] * 2), t, encoder_hidden_states=torch.cat([nemb[sl], emb[sl]]),
                            encoder_attention_mask=torch.cat([nmask[sl], mask[sl]]),
                            class_labels=None if labels is None else torch.cat([labels] * 2)).sample.chunk(2)
                eps = u + guidance * (c - u)
            else:
                eps = unet(inp, t, encoder_hidden_states=emb[sl], encoder_attention_mask=mask[sl], class_labels=labels).sample
            x = sched.step(eps, t, x, generator=gen).prev_sample
        out.append(lo[sl] + x / a.residual_scale)
    return torch.cat(out)


def score(judges, u8: torch.Tensor, truth: pd.DataFrame, **row) -> dict:
    "Presence balanced agreement per concept, diagnosis balanced agreement and Fitzpatrick within one type (`score_labels`)"
    t = score_labels(truth, judge_images(judges, u8, [*CONCEPTS, "dx", "fitzpatrick"])).table.set_index("attribute")
    row.update({c: t.at[c + PRESENCE, "balanced_agreement"] for c in CONCEPTS})
    row.update(dx=t.at["dx", "balanced_agreement"], fitzpatrick_within_one=t.at["fitzpatrick", "within_one"])
    print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def render_run(run: Path, plan: pd.DataFrame, a, sampler: str = "dpmpp:8") -> tuple[torch.Tensor, float]:
    "A lesiongen run's images for the plan's `text` and `seed` with `sampler` (scheduler:steps) at guidance 4; uint8 [N, 3, R, R] and img/s"
    name, steps = sampler.split(":")
    pipe = load_pipeline(run, compile=a.compile)
    if a.compile:  # torch.compile builds its kernels at the first call of a batch shape: a pass of its own, not timed
        render(pipe, plan.iloc[:a.sample_batch], name, int(steps), 4.0, a.sample_batch)
    ims, rate = render(pipe, plan, name, int(steps), 4.0, a.sample_batch)
    return torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2).contiguous(), rate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", required=True); p.add_argument("--captions", required=True); p.add_argument("--judges", required=True)
    p.add_argument("--base", required=True, help="a 32 px lesiongen run folder (the cascade's first stage)")
    p.add_argument("--base-sampler", default="dpmpp:8", help="scheduler:steps of the base (guidance 4); the 64 px preset's is dpmpp:8")
    p.add_argument("--compare", nargs="*", default=[], help="single-stage 64 px lesiongen runs scored on the same captions")
    p.add_argument("--work", default=None, help="folder of the script's own SR stage (trained once, then reused)")
    p.add_argument("--upscaler", default=None, help="instead: a package SR stage (`lesiongen train` with low_res in --model-config), "
                   "sampled as `lesiongen generate --upscaler` does (`generate.upscale_images`)")
    p.add_argument("--sr-steps", type=int, default=677); p.add_argument("--sr-channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--residual-scale", type=float, default=4.0); p.add_argument("--cond-noise", type=float, default=0.05)
    p.add_argument("--aug-max", type=float, default=0.0, help="train with noise conditioning augmentation up to this level (0: a fixed --cond-noise, untold)")
    p.add_argument("--blur-max", type=float, default=0.0, help="train with blur augmentation of the low-res image up to this Gaussian std, px at 64 px (0: none)")
    p.add_argument("--aug-levels", type=float, nargs="+", default=[0.0], help="conditioning-noise levels (--aug-max) or blur stds (--blur-max) to sample at")
    p.add_argument("--lr", type=float, default=5e-4); p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sr-sampler-steps", type=int, default=8); p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--n", type=int, default=420, help="test images (a seeded sample)")
    p.add_argument("--sample-batch", type=int, default=70); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="time the base and the SR stage through torch.compile (a warm-up pass first)")
    p.add_argument("--threads", type=int, default=None); p.add_argument("--out", default=None, help="CSV to write")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads: torch.set_num_threads(a.threads)
    if (a.work is None) == (a.upscaler is None): raise SystemExit("pass exactly one of --work (train an SR stage here) or --upscaler RUN")
    records = Path(a.records)
    base = load_pipeline(a.base)
    if base.resolution != LOW: raise SystemExit(f"--base must be a {LOW} px run, {a.base} is {base.resolution} px")
    caps = pd.read_json(a.captions, lines=True).set_index("image_id")["text"]
    df, root = read_records(records), data_root_of(records)
    train = df[df["split"] == "train"].reset_index(drop=True)
    text = encode_prompts(list(caps[train["image_id"]]), base.tokenizer, base.text_encoder, compact=True,
                          units=base.text_units, max_clauses=base.max_text_clauses, max_length=base.config.max_text_tokens)
    if a.upscaler:
        up = load_pipeline(a.upscaler, "compact", compile=a.compile)
        if up.low_res != LOW or up.resolution != HIGH: raise SystemExit(f"--upscaler must refine {LOW} px into {HIGH} px images")
        up.scheduler = make_scheduler("dpmpp_sde", up.scheduler, pixel_space=True)
        run = json.loads((Path(a.upscaler) / "config.json").read_text())
        rec = dict(steps=run["max_train_steps"], minutes=float("nan"), params=sum(p.numel() for p in up.unet.parameters()))
        unet = up.unet
    else:
        work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
        print(f"SR stage: {len(train)} training images at {HIGH} px")
        rec = train_sr(work / "sr", decode_images(train, root, HIGH), text, a)
        print(f"SR stage: {rec['steps']} steps, {rec['minutes']:.1f} min, {rec['params'] / 1e6:.2f} M parameters")
        unet = UNet2DConditionModel.from_pretrained(work / "sr" / "unet", use_safetensors=True).eval()

    test, _ = held_out_rows(records, max_images=a.n, seed=a.seed)
    test = test.reset_index(drop=True)
    texts = list(caps[test["image_id"]])
    plan = pd.DataFrame(dict(text=texts, seed=range(a.seed, a.seed + len(test))))
    truth = record_truth(test, [*CONCEPTS, "dx", "fitzpatrick"])
    judges = Judges.load(a.judges)
    emb, mask = base.encode_prompt(texts, torch.device("cpu"))
    nemb, nmask = base.encode_prompt([""] * len(texts), torch.device("cpu"))
    real = decode_images(test, root, HIGH)
    rows = [score(judges, real, truth, source="real 64 px", stage="-")]
    lo32 = F.interpolate(to_unit_range(real), size=LOW, mode="area")
    rows.append(score(judges, to_u8(upsample(lo32, HIGH)), truth, source="real -> 32 px", stage="bicubic"))
    levels = a.aug_levels if unet.config.class_embed_type == "timestep" else [0.0]
    tag = lambda g, lv: f"SR, guidance {g:g}" + (f", aug {lv:g}" if unet.config.class_embed_type == "timestep" else "")

    def super_resolve(lo32, g, lv=0.0):  # the package stage (--upscaler), or the script's
        if not a.upscaler: return _super_resolve(unet, lo32, emb, mask, nemb, nmask, a, g, lv)
        pil = [Image.fromarray(x) for x in to_u8(lo32).permute(0, 2, 3, 1).numpy()]
        seeds = plan["seed"].tolist()[:len(pil)]
        out = [im for i in range(0, len(pil), a.sample_batch) for im in upscale_images(
            up, pil[i:i + a.sample_batch], texts[i:i + a.sample_batch], seeds[i:i + a.sample_batch], a.sr_sampler_steps, g)]
        return to_unit_range(torch.from_numpy(np.stack([np.asarray(o) for o in out])).permute(0, 3, 1, 2).contiguous())
    for g in a.guidance:
        for lv in levels:
            rows.append(score(judges, to_u8(super_resolve(lo32, g, lv)), truth,
                              source="real -> 32 px", stage=tag(g, lv)))
    b32, base_rate = render_run(Path(a.base), plan, a, a.base_sampler)
    lo32 = to_unit_range(b32)
    name = f"{Path(a.base).parent.name}/{Path(a.base).name}"
    rows.append(score(judges, to_u8(upsample(lo32, HIGH)), truth, source=f"base {name}, {a.base_sampler}", stage="bicubic", img_s=base_rate))
    if a.compile and not a.upscaler: unet = torch.compile(unet)  # load_pipeline compiled the package stage
    for g in a.guidance:
        for lv in levels:
            if a.compile: super_resolve(lo32[:a.sample_batch], g, lv)  # compiles, not timed
            t0 = time.perf_counter()
            x = super_resolve(lo32, g, lv)
            sr_rate = len(x) / (time.perf_counter() - t0)
            rows.append(score(judges, to_u8(x), truth, source=f"base {name}, {a.base_sampler}", stage=tag(g, lv),
                              img_s=1 / (1 / base_rate + 1 / sr_rate)))
    for run in map(Path, a.compare):
        ims, rate = render_run(run, plan, a)
        rows.append(score(judges, ims, truth, source=f"single-stage {run.parent.name}/{run.name}, dpmpp:8", stage="-", img_s=rate))
    t = pd.DataFrame(rows).assign(sr_steps=rec["steps"], sr_minutes=round(rec["minutes"], 1), n=len(test), compiled=a.compile)
    pd.set_option("display.width", 200)
    how = "torch.compile" if a.compile else "eager"
    print(f"\npresence balanced agreement ({len(test)} test images, their own captions; {how} sampling, img/s end to end):")
    print(t.drop(columns=["sr_steps", "sr_minutes", "n", "compiled"]).round(3).to_string(index=False))
    print(RESEARCH_ONLY)
    if a.out: t.round(4).to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
