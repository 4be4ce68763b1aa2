"""Does `torch.compile` speed up a compact model's training step on this CPU? (issue 7: training speed levers)

Sampling gains 1.6x from `torch.compile` at 64 px (`gen64_sampling_compile.csv`); training adds the backward pass.
This times the preset's 64 px UNet (or `--model-config`) on one optimizer step (forward, MSE, backward, AdamW) of
random data of the training shapes (batch 32, 24 clause positions, half of them masked), eager and compiled, after
warm-up steps that include the compilation. Both variants start from the same weights and run in this one process.

Usage: python bench/bench_train_compile.py [--model-config bench/recipes/compact64_drop.json] [--resolution 64]
       [--batch 32] [--steps 12] [--warmup 3] [--threads 2] [--out results.csv]
"""
from __future__ import annotations
import argparse, json, time
from pathlib import Path

import pandas as pd
import torch

from lesiongen.model import CompactConfig, compact_unet

HERE = Path(__file__).parent


def step_seconds(cfg: CompactConfig, compiled: bool, batch: int, steps: int, warmup: int, seed: int = 0) -> tuple[float, float]:
    "Mean seconds per training step after `warmup` steps, and the warm-up's seconds (compilation included)"
    torch.manual_seed(seed)
    unet = compact_unet(cfg).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    fwd = torch.compile(unet) if compiled else unet
    r = cfg.resolution
    x, h = torch.randn(batch, cfg.in_channels, r, r), torch.randn(batch, cfg.max_text_clauses, cfg.cross_attention_dim)
    mask = torch.ones(batch, cfg.max_text_clauses, dtype=torch.long); mask[:, cfg.max_text_clauses // 2:] = 0
    t = torch.randint(0, cfg.num_train_timesteps, (batch,))
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup: t1 = time.perf_counter()
        out = fwd(x, t, encoder_hidden_states=h, encoder_attention_mask=mask).sample
        loss = (out - x).pow(2).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return (time.perf_counter() - t1) / steps, t1 - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-config", default=str(HERE / "recipes" / "compact64_drop.json"))
    p.add_argument("--resolution", type=int, default=64); p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12); p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2); p.add_argument("--out")
    a = p.parse_args(argv)
    for name in ("batch", "steps", "threads"):
        if getattr(a, name) < 1: p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 1: p.error(f"--warmup must be >= 1 (the compiled variant compiles there), got {a.warmup}")
    if not Path(a.model_config).is_file(): p.error(f"--model-config: no such file {a.model_config!r}")
    torch.set_num_threads(a.threads)
    cfg = CompactConfig(**{**json.loads(Path(a.model_config).read_text()), "resolution": a.resolution})  # lists become tuples there
    rows = []
    for compiled in (False, True):
        s, w = step_seconds(cfg, compiled, a.batch, a.steps, a.warmup)
        rows.append(dict(unet="torch.compile" if compiled else "eager", s_per_step=s, warmup_s=w,
                         model_config=Path(a.model_config).name, resolution=a.resolution, batch=a.batch, threads=a.threads))
    table = pd.DataFrame(rows)
    table["speedup_vs_eager"] = table["s_per_step"].iloc[0] / table["s_per_step"]
    print(table.round(3).to_string(index=False))
    if a.out: table.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
