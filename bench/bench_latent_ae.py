"""Can a small autoencoder keep the 64 px concepts? The feasibility step of a latent compact model (issue 7).

A latent diffusion model (Stable Diffusion's design) draws in the latent space of an autoencoder and leaves the fine
texture to the decoder. At 64 px the single-stage pixel model draws a mottled texture in place of discrete dots and
globules whatever its recipe (07_generate), so a latent model is only worth building if the autoencoder itself keeps
what the judges read. This script trains a small `diffusers.AutoencoderKL` on the records' training split (L1 +
a small KL term, as SD's first stage without its perceptual and adversarial losses), reconstructs the real test
images and reads them with the 64 px judges: the concept agreement of the reconstructions is the ceiling of any
latent model on that autoencoder. It also times an encode/decode and reports PSNR and the latent's scale.

Usage: python bench/bench_latent_ae.py --records r64/curated/records.csv --judges r64/judges64 --out W [--latent-channels 4]
       [--minutes 6] [--threads 2]
Writes W/latent_ae_{C}.csv (one row per attribute: the judges' balanced agreement on the real test images and on their
reconstructions, with the autoencoder's steps, minutes, L1 and PSNR) and W/latent_ae_{C}.png (8 test images over their
reconstructions), and prints a table.
"""
from __future__ import annotations
import argparse, math, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lesiongen.adherence import adherence, held_out_rows, load_images, real_reference
from lesiongen.classify import Judges
from lesiongen.train import to_unit_range


def autoencoder(latent_channels: int, channels=(32, 64, 64)):
    "A small AutoencoderKL: len(channels)-1 halvings (64 px -> 16x16 latents with three levels), no attention"
    from diffusers import AutoencoderKL
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         latent_channels=latent_channels, norm_num_groups=16, sample_size=64, mid_block_add_attention=False)


def to_unit(x: np.ndarray) -> torch.Tensor:
    "uint8 [N, H, W, 3] (`adherence.load_images`) -> float [N, 3, H, W] in [-1, 1], as training reads images"
    return to_unit_range(torch.from_numpy(x).permute(0, 3, 1, 2))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    "float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]"
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    "Random flips and quarter turns (dermoscopy has no canonical orientation)"
    k = int(torch.randint(4, (1,), generator=g)); x = torch.rot90(x, k, (2, 3))
    return x.flip(3) if torch.rand(1, generator=g) < 0.5 else x


def train_ae(ae, images: torch.Tensor, minutes: float, batch: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
             seed: int = 0) -> dict:
    "Train `ae` on `images` ([-1, 1]) for `minutes` of wall-clock; returns steps, seconds and the last losses"
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    t0, step, l1s = time.perf_counter(), 0, []
    bar = tqdm(desc="autoencoder", unit="step")
    while time.perf_counter() - t0 < minutes * 60:
        idx = torch.randint(len(images), (batch,), generator=g)
        x = augment(images[idx], g)
        post = ae.encode(x).latent_dist
        rec = ae.decode(post.sample(generator=g)).sample
        l1 = (rec - x).abs().mean(); kl = post.kl().mean() / x[0].numel()
        loss = l1 + kl_weight * kl
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        step += 1; l1s.append(l1.item()); bar.update(); bar.set_postfix(l1=f"{np.mean(l1s[-50:]):.4f}")
    bar.close()
    return dict(steps=step, seconds=time.perf_counter() - t0, l1_last50=float(np.mean(l1s[-50:])))


@torch.no_grad()
def reconstruct(ae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    "Mean-latent reconstructions [N, 3, H, W] and latents [N, C, h, w]"
    recs, lats = [], []
    for i in range(0, len(images), batch):
        z = ae.encode(images[i:i + batch]).latent_dist.mean
        lats.append(z); recs.append(ae.decode(z).sample)
    return torch.cat(recs), torch.cat(lats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", required=True); p.add_argument("--judges", required=True); p.add_argument("--out", required=True)
    p.add_argument("--latent-channels", type=int, default=4); p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.latent_channels < 1: p.error(f"--latent-channels must be >= 1, got {a.latent_channels}")
    if not a.minutes > 0: p.error(f"--minutes must be > 0, got {a.minutes}")
    torch.set_num_threads(a.threads)
    judges = Judges.load(a.judges)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    train_df, root = held_out_rows(a.records, split="train")
    test_df, _ = held_out_rows(a.records, split="test")
    res = judges.resolution
    train = to_unit(load_images([root / f for f in train_df["file_name"]], res, progress=True))
    test_u8 = load_images([root / f for f in test_df["file_name"]], res, progress=True)
    ae = autoencoder(a.latent_channels)
    fit = train_ae(ae, train, a.minutes)
    ae.eval()
    t0 = time.perf_counter(); rec, lat = reconstruct(ae, to_unit(test_u8)); rt = time.perf_counter() - t0
    rec_u8 = to_uint8(rec)
    mse = ((rec_u8.astype(np.float64) - test_u8.astype(np.float64)) / 255) ** 2
    psnr = float(np.mean(-10 * np.log10(np.maximum(mse.reshape(len(mse), -1).mean(1), 1e-10))))
    # the reconstructions scored against the test images' true attributes, beside the judges on the originals
    rep = adherence(judges, rec_u8, test_df, real_reference(judges, a.records, split="test"), ita=False).table.set_index("attribute")
    table = pd.DataFrame({"real": rep["real_balanced_agreement"], "reconstructed": rep["balanced_agreement"]})
    table["drop"] = table["real"] - table["reconstructed"]
    lat_shape = tuple(lat.shape[1:])
    table = table.reset_index().assign(latent="x".join(map(str, lat_shape)), ae_steps=fit["steps"],
                                       ae_minutes=fit["seconds"] / 60, l1=fit["l1_last50"], psnr_db=psnr)
    table.to_csv(out / f"latent_ae_{a.latent_channels}.csv", index=False)
    # a picture: the first 8 test images (top) and their reconstructions (bottom), 2x nearest-neighbour
    from PIL import Image
    grid = np.concatenate([np.concatenate(list(test_u8[:8]), 1), np.concatenate(list(rec_u8[:8]), 1)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).quantize(256).save(
        out / f"latent_ae_{a.latent_channels}.png", optimize=True)  # 256 colours: small enough to commit
    print(f"\nautoencoder: {sum(p.numel() for p in ae.parameters()):,} parameters, latents {lat_shape} "
          f"({3 * res * res / math.prod(lat_shape):.1f}x fewer numbers than the image); trained {fit['steps']} steps in "
          f"{fit['seconds'] / 60:.1f} min (L1 {fit['l1_last50']:.4f}); {len(test_u8)} test images: PSNR {psnr:.1f} dB, "
          f"encode+decode {len(test_u8) / rt:.0f} img/s; latent std {float(lat.std()):.3f} (scaling_factor {1 / float(lat.std()):.3f})")
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
