"""The compact training recipe judged by prompt adherence at equal wall-clock: the speed study of `bench_train.py`
re-run with the quality measure that a prompt-blind model fails.

Each variant gets the same training budget in minutes. Its speed is measured first with a short pilot of the raw
training step (`bench_train.make_step`: forward, backward, AdamW on a real batch), including the text encoder on
every step for the naive baseline, and the variant is then trained with `lesiongen train` for the number of steps
that speed buys in the budget (the CLI loop keeps ~0.9 of the raw step; every variant loses alike). The finished
model is scored as in `bench_adherence.py`: a balanced plan over diagnosis x skin type and a skin-type
counterfactual cohort, judged by attribute judges trained on the real training split, with the fast sampler
(SDE-DPM-Solver++, 10 steps, guidance 4 in t/T [0.2, 0.8]). Sampling img/s is measured too: the frontier is
(training speed, sampling speed) against adherence.

Variants (32 px, batch 32, the `TrainConfig.compact()` recipe otherwise):
  naive     diffusers' UNet with cross-attention at every level, channels 32-64-64, text encoder run every step
  compact   `CompactConfig()`: cached caption embeddings, cross-attention at the lowest level only
  text      compact + the attention-pooled caption embedding added to the time embedding (`addition_embed_type="text"`)
  nodrop    compact without caption dropout (the unconditional branch of guidance is then never trained)
  offset    compact with offset noise 0.1 (`TrainConfig.noise_offset`; same step cost as compact, so it gets its steps)
  text_offset  text with offset noise 0.1 (the step cost of text)
  text_offset_dx  text_offset with diagnosis-balanced batches (`balance_by=("dx",)`, α = 1)
  text_offset_balanced  text_offset with batches balanced over diagnosis x skin type (`balance_by=("dx", "fitzpatrick")`,
            α = 1): `TrainConfig.compact()`

Usage: python bench/bench_frontier.py --records R --captions C --judges J --work DIR [--minutes 10] [--parallel 2]
         [--variants naive compact ... text_offset_balanced] [--n 210] [--cf 20]
"""
import argparse, json, logging, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_adherence import pipeline_at, render  # noqa: E402
from bench_train import make_step  # noqa: E402

from lesiongen.adherence import adherence, counterfactual_control, real_reference  # noqa: E402
from lesiongen.classify import Judges  # noqa: E402
from lesiongen.core import RESEARCH_ONLY  # noqa: E402
from lesiongen.data import read_records  # noqa: E402
from lesiongen.generate import balanced_plan, counterfactual_plan  # noqa: E402
from lesiongen.llm import read_captions  # noqa: E402
from lesiongen.model import CompactConfig, compact_noise_scheduler, compact_unet, encode_text, load_text_encoder  # noqa: E402
from lesiongen.train import data_root_of, load_image  # noqa: E402

_XATTN = dict(addition_embed_type=None)  # text through cross-attention only (the recipe adds the pooled caption)
_NATURAL = ((), 0.0)  # data order: (balance_by columns, α); natural order
VARIANTS = {  # name: (model config overrides, caption dropout, text encoder on every step, noise offset, data order)
    "naive": (dict(block_out_channels=[32, 64, 64], attention_levels=[True, True, True], **_XATTN), 0.1, True, 0.0, _NATURAL),
    "compact": (_XATTN, 0.1, False, 0.0, _NATURAL),
    "text": (dict(addition_embed_type="text"), 0.1, False, 0.0, _NATURAL),
    "nodrop": (_XATTN, 0.0, False, 0.0, _NATURAL),
    "offset": (_XATTN, 0.1, False, 0.1, _NATURAL),
    "text_offset": (dict(addition_embed_type="text"), 0.1, False, 0.1, _NATURAL),
    "text_offset_dx": (dict(addition_embed_type="text"), 0.1, False, 0.1, (("dx",), 1.0)),
    "text_offset_balanced": (dict(addition_embed_type="text"), 0.1, False, 0.1, (("dx", "fitzpatrick"), 1.0)),  # `TrainConfig.compact()`
}


def real_batch(records: Path, captions: Path, n: int, size: int):
    "The first `n` training images at `size` px in [-1, 1] and their captions"
    recs = read_records(records)
    recs = recs[recs["split"] == "train"].head(n)
    caps = read_captions(captions).set_index("image_id")["text"]
    root = data_root_of(records)
    x = torch.stack([load_image(root / f, size) for f in recs["file_name"]]).float() / 127.5 - 1
    return x, [caps[i] for i in recs["image_id"]]


def pilot_rate(overrides: dict, encode: bool, x, texts, text, steps: int = 6) -> float:
    "Training img/s of the raw step of one variant on one thread (best of two rounds after a warm-up step)"
    torch.manual_seed(0)
    cfg = replace(CompactConfig(**overrides), resolution=x.shape[-1])
    unet, sched = compact_unet(cfg).train(), compact_noise_scheduler(cfg)
    h, m = encode_text(texts, *text, max_length=77)
    step = make_step(unet, sched, x, texts, text, m, h, encode)
    step()
    best = 0.0
    for _ in range(2):
        t = time.perf_counter()
        for _ in range(steps): step()
        best = max(best, steps * x.shape[0] / (time.perf_counter() - t))
    return best


def train_variant(name: str, work: Path, records: Path, captions: Path, steps: int, size: int) -> float:
    "Train one variant with `lesiongen train` on one thread; returns wall-clock minutes (0 if it was already trained)"
    overrides, dropout, _, offset, (balance_by, power) = VARIANTS[name]
    run = work / name
    if (run / "model_index.json").is_file(): return 0.0
    mc = work / f"{name}.json"
    mc.write_text(json.dumps(overrides))
    args = [str(Path(sys.executable).parent / "lesiongen"), "train", "--records", str(records), "--captions", str(captions),
            "--base", "compact", "--out", str(run), "--resolution", str(size), "--max-steps", str(steps),
            "--caption-dropout", str(dropout), "--noise-offset", str(offset), *(["--balance-by", *balance_by] if balance_by else []), "--balance-power", str(power), "--num-threads", "1", "--no-progress", "--model-config", str(mc),
            "--checkpointing-steps", str(max(steps // 2, 1)), "--validation-steps", str(10 * steps)]
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log: subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT)
    return (time.perf_counter() - t0) / 60


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", required=True); p.add_argument("--captions", required=True)
    p.add_argument("--judges", required=True); p.add_argument("--work", required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per variant (one thread each)")
    p.add_argument("--parallel", type=int, default=2, help="variants trained at once, one thread each")
    p.add_argument("--size", type=int, default=32); p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=210, help="images of the balanced plan")
    p.add_argument("--cf", type=int, default=20, help="lesions of the skin-type counterfactual cohort (x6 images)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lesiongen.model").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    work, records, captions = Path(a.work), Path(a.records), Path(a.captions)
    work.mkdir(parents=True, exist_ok=True)
    pilot_file = work / "pilot.json"
    rates = json.loads(pilot_file.read_text()) if pilot_file.is_file() else {}
    x, texts = real_batch(records, captions, a.batch, a.size)
    text = load_text_encoder("minilm")
    for v in a.variants:  # variants that differ only in the loss (dropout, offset) share one architecture's step cost
        same = [u for u in rates if VARIANTS[u][0] == VARIANTS[v][0] and VARIANTS[u][2] == VARIANTS[v][2]]
        if v not in rates: rates[v] = rates[same[0]] if same else pilot_rate(VARIANTS[v][0], VARIANTS[v][2], x, texts, text)
    pilot_file.write_text(json.dumps(rates, indent=1))
    steps = {v: max(int(a.minutes * 60 * rates[v] / a.batch), 1) for v in a.variants}
    print("pilot (raw step, 1 thread):", {v: f"{rates[v]:.1f} img/s -> {steps[v]} steps" for v in a.variants}, flush=True)
    with ThreadPoolExecutor(a.parallel) as ex:
        minutes = dict(zip(a.variants, ex.map(lambda v: train_variant(v, work, records, captions, steps[v], a.size), a.variants)))
    judges = Judges.load(a.judges)
    ref = real_reference(judges, records, split="test")
    plan = balanced_plan(records, a.n, seed=0)
    cf = counterfactual_plan(records, a.cf, attribute="fitzpatrick", seed=1)
    rows = []
    for v in a.variants:
        pipe = pipeline_at(work / v, None)
        imgs, ips = render(pipe, plan, "dpmpp_sde", 10, 4.0, 64, guidance_interval=(0.2, 0.8))
        t = adherence(judges, imgs, plan, ref).table.set_index("attribute")
        cc = counterfactual_control(judges, render(pipe, cf, "dpmpp_sde", 10, 4.0, 64, guidance_interval=(0.2, 0.8))[0], cf).iloc[0]
        concepts = [k for k in t.index if k.endswith(":presence")]
        rows.append(dict(variant=v, train_img_s=rates[v], steps=steps[v], train_min=minutes[v] or None, sample_img_s=ips,
                         dx_rel=t.loc["dx", "relative_balanced"], fitz_within1=t.loc["fitzpatrick", "within_one"],
                         cf_ita_order=cc["ita_order_pairs"],
                         concept_rel_mean=t.loc[concepts, "relative_balanced"].mean() if concepts else None))
        print(pd.DataFrame(rows).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    if (work / "frontier.csv").is_file():  # keep the rows of variants scored by an earlier call
        old = pd.read_csv(work / "frontier.csv")
        table = pd.concat([old[~old["variant"].isin(table["variant"])], table], ignore_index=True)
    table.to_csv(work / "frontier.csv", index=False)
    print(f"\nequal wall-clock: {a.minutes:g} min of training per variant on one thread; {len(plan)} balanced + {len(cf)} "
          "counterfactual images each; SDE-DPM-Solver++ 10 steps, guidance 4 in t/T [0.2, 0.8]")
    print(table.round(3).to_string(index=False))
    print(RESEARCH_ONLY)


if __name__ == "__main__":
    main()
