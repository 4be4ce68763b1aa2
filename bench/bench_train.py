"""Benchmark compact-model training on the CPU: img/s, peak RSS and FLOP/s per design choice, measured in one run.

Every row is one training step (forward, backward, AdamW) of a UNet2DConditionModel on a phantom batch, timed
in this process against the same baseline, so noise from other jobs on the machine affects all rows alike.
The baseline is the naive diffusers step: the text encoder (MiniLM) runs on every batch, and cross-attention
sits at every resolution level. Each following row changes one thing, and its "predicted" column is what that
change should give from its FLOP count alone (FLOPs measured with torch.utils.flop_counter), so a row whose
measured speed-up falls short of the prediction points at overhead rather than arithmetic.

With --quality-seconds > 0 the baseline and the chosen architecture are then trained for the same wall-clock
time and scored by a held-out denoising loss (fixed images, noise and timesteps). That loss is blind to the prompt
(a model that ignores its captions reaches nearly the same value), so it only shows that the speed-up does not break
denoising; whether the faster recipe follows its prompts is measured by `bench_frontier.py` (prompt adherence at equal
wall-clock).

Usage: python bench/bench_train.py [--sizes 32 64] [--batch 32] [--steps 4] [--quality-seconds 60] [--compile]
"""
import argparse, gc, logging, os, threading, time
from dataclasses import replace
from pathlib import Path
import tempfile

import psutil
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lesiongen.captions import build_caption
from lesiongen.model import CompactConfig, compact_unet, compact_noise_scheduler, compact_pipeline, encode_text, load_text_encoder
from lesiongen.phantom import PhantomConfig, sample_lesions, render_phantom


class PeakRSS:
    "Sample this process's resident set size every 10 ms; `peak` is the maximum seen, in MiB"
    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        def run():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss); time.sleep(0.01)
        self.t = threading.Thread(target=run, daemon=True); self.t.start(); return self
    def __exit__(self, *a):
        self.stop.set(); self.t.join(); self.peak /= 2**20


def phantom_batch(n: int, size: int, seed: int = 0):
    "Render `n` phantom images at `size` px in [-1, 1] and their short captions"
    truth = sample_lesions(PhantomConfig(n=n, size=size, seed=seed))
    rows = truth.to_dict("records")
    x = torch.stack([torch.from_numpy(render_phantom(r, size)).permute(2, 0, 1) for r in rows]).float() / 127.5 - 1
    return x, [build_caption(r) for r in rows]


def matmul_flops(reps: int = 3) -> float:
    "Measure this machine's dense fp32 rate (FLOP/s): the best of n×n matmuls and a 3×3 convolution (oneDNN)"
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t = time.perf_counter()
        for _ in range(reps): a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(32, 64, 32, 32)
    with torch.no_grad():
        conv(x)
        t = time.perf_counter()
        for _ in range(reps): conv(x)
    return max(best, 2 * 9 * 64 * 64 * 32 * 32 * 32 * reps / (time.perf_counter() - t))

def make_step(unet, sched, x, texts, text, mask_cached, hidden_cached, encode_every_step: bool):
    "Return one AdamW training step closure of `unet` on batch `x`"
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    tok, enc = text
    def step():
        if encode_every_step: h, m = encode_text(texts, tok, enc, max_length=77)
        else: h, m = hidden_cached, mask_cached
        noise = torch.randn_like(x)
        t = torch.randint(0, sched.config.num_train_timesteps, (x.shape[0],))
        pred = unet(sched.add_noise(x, noise, t), t, encoder_hidden_states=h, encoder_attention_mask=m).sample
        loss = F.mse_loss(pred, noise)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    return step


def count_flops(step) -> float:
    "Count the FLOPs of one call of `step` (forward + backward + text encoder if any)"
    with FlopCounterMode(display=False) as fc: step()
    return fc.get_total_flops()


def time_step(step, batch: int, steps: int, warmup: int = 1) -> tuple[float, float]:
    "Return (img/s, peak RSS MiB) of `steps` calls of `step` after `warmup` calls"
    for _ in range(warmup): step()
    with PeakRSS() as mem:
        t = time.perf_counter()
        for _ in range(steps): step()
        dt = time.perf_counter() - t
    return batch * steps / dt, mem.peak


def heldout_loss(unet, sched, x, h, m, seed: int = 123) -> float:
    "Denoising MSE of `unet` on fixed held-out images, noise and timesteps (lower is better)"
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g)
    t = torch.linspace(50, sched.config.num_train_timesteps - 50, x.shape[0]).long()
    with torch.no_grad():
        return F.mse_loss(unet(sched.add_noise(x, noise, t), t, encoder_hidden_states=h, encoder_attention_mask=m).sample, noise).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sides, px")
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row and round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all rows; each row reports its fastest round")
    p.add_argument("--sample-images", type=int, default=16, help="images per sampling measurement")
    p.add_argument("--quality-seconds", type=float, default=60, help="wall-clock training per architecture for the quality check; 0: skip")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the chosen UNet (slow to compile)")
    a = p.parse_args()
    logging.getLogger("lesiongen.model").setLevel(logging.ERROR)  # phantom captions exceed 77 tokens: truncation is expected
    torch.manual_seed(0)
    threads0 = torch.get_num_threads()
    peak = matmul_flops()
    torch.set_num_threads(1); peak1 = matmul_flops(); torch.set_num_threads(threads0)
    text = load_text_encoder("minilm")
    base = CompactConfig(block_out_channels=(32, 64, 64), attention_levels=(True, True, True))
    lowest = replace(base, attention_levels=(False, False, True))
    default = CompactConfig()
    print(f"compact training benchmark: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads0} threads, "
          f"batch {a.batch}, best of {a.rounds} rounds of {a.steps} steps per row; measured fp32 peak (best of matmul / conv) {peak / 1e9:.1f} GFLOP/s "
          f"({threads0} threads), {peak1 / 1e9:.1f} GFLOP/s (1 thread)")
    print("predicted = speed-up from FLOPs alone (baseline FLOPs / row FLOPs); % peak = achieved FLOP/s / measured dense fp32 peak at the row's threads")
    print(f"{'px':>3} | {'variant':<52} | {'params':>6} | {'GFLOP/step':>10} | {'img/s':>6} | {'x base':>6} | "
          f"{'predicted':>9} | {'% peak':>6} | {'RSS MiB':>7}")
    print("-" * 130)
    for size in a.sizes:
        x, texts = phantom_batch(a.batch * 2, size)
        x_train, t_train = x[:a.batch], texts[:a.batch]
        h_all, m_all = encode_text(texts, *text, max_length=77)
        h, m = h_all[:a.batch], m_all[:a.batch]
        variants = [("baseline: encoder every step, attention at all levels", base, True, a.batch, threads0, False),
                    ("+ cached text embeddings", base, False, a.batch, threads0, False),
                    ("+ attention at the two lowest levels", replace(base, attention_levels=(False, True, True)), False, a.batch, threads0, False),
                    ("+ attention at the lowest level only (CompactConfig)", lowest, False, a.batch, threads0, False),
                    ("  ... with 1 torch thread", lowest, False, a.batch, 1, False),
                    (f"  ... with batch {2 * a.batch}", lowest, False, 2 * a.batch, threads0, False)]
        if a.compile: variants.append(("  ... with torch.compile", lowest, False, a.batch, threads0, True))
        built = []
        for name, cfg, encode, batch, threads, compile_ in variants:
            torch.manual_seed(0)
            unet = compact_unet(replace(cfg, resolution=size)).train()
            sched = compact_noise_scheduler(cfg)
            xb, tb, hb, mb = x[:batch], texts[:batch], h_all[:batch], m_all[:batch]
            flops = count_flops(make_step(unet, sched, xb, tb, text, mb, hb, encode)) / batch * a.batch  # per a.batch images
            n_params = sum(p.numel() for p in unet.parameters()) / 1e6
            if compile_: unet = torch.compile(unet)
            step = make_step(unet, sched, xb, tb, text, mb, hb, encode)
            torch.set_num_threads(threads); step(); torch.set_num_threads(threads0)  # warm-up (and compile)
            built.append(dict(name=name, step=step, batch=batch, threads=threads, flops=flops, params=n_params, rate=0.0, rss=0.0))
        for _ in range(a.rounds):  # round-robin, so a burst of load elsewhere hits one round of every row, not one row
            for v in built:
                torch.set_num_threads(v["threads"])
                rate, rss = time_step(v["step"], v["batch"], a.steps, warmup=0)
                v["rate"], v["rss"] = max(v["rate"], rate), max(v["rss"], rss)
            torch.set_num_threads(threads0)
        b0 = built[0]
        for v in built:
            pk = peak1 if v["threads"] == 1 else peak
            print(f"{size:>3} | {v['name']:<52} | {v['params']:>5.2f}M | {v['flops'] / 1e9:>10.1f} | {v['rate']:>6.1f} | "
                  f"{v['rate'] / b0['rate']:>5.2f}x | {b0['flops'] / v['flops']:>8.2f}x | {100 * v['rate'] * v['flops'] / a.batch / pk:>5.1f}% | {v['rss']:>7.0f}")
        del built; gc.collect()

    # sampling
    print()
    print(f"{'px':>3} | {'sampling (SDE-DPM-Solver++, 25 steps, guidance 3)':<52} | {'img/s':>6}")
    print("-" * 70)
    for size in a.sizes:
        for cfg, name in ((base, "attention at all levels"), (lowest, "attention at the lowest level")):
            pipe = compact_pipeline(replace(cfg, resolution=size), text_encoder=text); pipe.set_progress_bar_config(disable=True)
            for steps in (25,):
                gens = [torch.Generator().manual_seed(s) for s in range(a.sample_images)]
                pipe(["dermoscopy image of a melanoma"] * 2, num_inference_steps=2, generator=gens[:2])
                t = time.perf_counter()
                pipe(["dermoscopy image of a melanoma"] * a.sample_images, num_inference_steps=steps, generator=gens, output_type="np")
                print(f"{size:>3} | {name + f', {steps} steps':<52} | {a.sample_images / (time.perf_counter() - t):>6.1f}")

    if a.quality_seconds > 0:
        size = a.sizes[0]
        x, texts = phantom_batch(512 + 64, size, seed=1)
        h, m = encode_text(texts, *text, max_length=77)
        print()
        print(f"quality at equal wall-clock ({a.quality_seconds:.0f} s of training each, {size} px, batch {a.batch}, "
              f"held-out denoising MSE on 64 images, lower is better)")
        print(f"{'variant':<52} | {'steps':>5} | {'images':>6} | {'held-out MSE':>12}")
        print("-" * 85)
        for name, cfg, encode in (("baseline (encoder every step, attention everywhere)", base, True),
                                  ("cached embeddings, attention at the lowest level", lowest, False)):
            torch.manual_seed(0)
            ccfg = replace(cfg, resolution=size)
            unet, sched = compact_unet(ccfg).train(), compact_noise_scheduler(ccfg)
            opt = torch.optim.AdamW(unet.parameters(), lr=5e-4)
            g, n, t0 = torch.Generator().manual_seed(0), 0, time.perf_counter()
            while time.perf_counter() - t0 < a.quality_seconds:
                idx = torch.randint(0, 512, (a.batch,), generator=g)
                hb, mb = encode_text([texts[i] for i in idx], *text, max_length=77) if encode else (h[idx], m[idx])
                noise = torch.randn(x[idx].shape)
                t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,))
                loss = F.mse_loss(unet(sched.add_noise(x[idx], noise, t), t, encoder_hidden_states=hb, encoder_attention_mask=mb).sample, noise)
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); n += 1
            unet.eval()
            print(f"{name:<52} | {n:>5} | {n * a.batch:>6} | {heldout_loss(unet, sched, x[512:], h[512:], m[512:]):>12.4f}")


if __name__ == "__main__":
    main()
