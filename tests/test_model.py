"""pytest checks of lesiongen.model as 05_train and 06_generate use it: LoRA files that diffusers reads and writes,
errors that name their argument, and the compact pipeline (seeds, save/load round trip, safetensors only).
Everything is tiny, offline and CPU-only."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lesiongen import model as M
from lesiongen.core import LesionGenError

PROMPTS = ["dermoscopy image of a melanoma, atypical pigment network", "dermoscopy image of a melanocytic nevus"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture of conftest.py


def _train_lora_steps(pipe, steps=2, rank=4, seed=0):
    "Two optimizer steps of the noise-prediction loss on random 32 px images (the real loop is 05_train's)"
    g = torch.Generator().manual_seed(seed)
    unet = M.add_lora(pipe.unet, rank=rank)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    ddpm = M.noise_scheduler(pipe.scheduler)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    unet.train()
    for _ in range(steps):
        images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample(g) * pipe.vae.config.scaling_factor
            enc = pipe.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (2,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(ddpm.add_noise(latents, noise, t), t, enc).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters() if not p.requires_grad)  # base frozen
    return unet.eval()


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, enc = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 500, enc).sample


def test_public_names():
    for name in ("PAPER_LORA_TARGETS", "lora_config", "add_lora", "lora_state_dict", "save_lora", "load_lora",
                 "load_stable_diffusion", "tiny_components", "tiny_stable_diffusion", "CompactConfig",
                 "compact_unet", "load_text_encoder", "encode_text", "LesionGenPipeline", "LesionGenPipelineOutput",
                 "compact_pipeline"):
        assert hasattr(M, name), name
    assert M.PAPER_LORA_TARGETS == ("to_k", "to_q", "to_v", "to_out.0")


def test_lora_roundtrip_with_diffusers(tmp_path):
    unet = _train_lora_steps(M.tiny_stable_diffusion())
    sd = M.lora_state_dict(unet)
    assert sd and all(".lora.down." in k or ".lora.up." in k for k in sd)
    f = M.save_lora(unet, tmp_path / "lesiongen")
    assert f.name == "pytorch_lora_weights.safetensors" and os.listdir(f.parent) == [f.name]

    fresh = M.tiny_stable_diffusion()
    base = _unet_out(fresh)
    fresh.load_lora_weights(str(f.parent))  # diffusers' own loader
    with_lora = _unet_out(fresh)
    assert not torch.allclose(with_lora, base)
    fresh.set_progress_bar_config(disable=True)
    img = fresh(PROMPTS[0], num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()

    # the exact file diffusers' train_text_to_image_lora.py writes, loaded by lesiongen
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(tmp_path / "diffusers"),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), safe_serialization=True)
    pipe = M.load_lora(M.tiny_stable_diffusion(), tmp_path / "diffusers")
    torch.testing.assert_close(_unet_out(pipe), with_lora, rtol=1e-5, atol=1e-5)

    # peft key names (`lora_A`/`lora_B`) with the `unet.` prefix, given as a file path
    from safetensors.torch import save_file
    peft_sd = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    assert any(".lora_A." in k for k in peft_sd)
    save_file(peft_sd, str(tmp_path / "peft.safetensors"), metadata={"format": "pt"})
    pipe = M.load_lora(M.tiny_stable_diffusion(), tmp_path / "peft.safetensors", adapter_name="derm")
    torch.testing.assert_close(_unet_out(pipe), with_lora, rtol=1e-5, atol=1e-5)


def test_lora_alpha_survives(tmp_path):
    unet = M.add_lora(M.tiny_stable_diffusion().unet, rank=4, alpha=2)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    M.save_lora(unet, tmp_path)
    pipe = M.load_lora(M.tiny_stable_diffusion(), tmp_path)
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 500, enc).sample, unet(x, 500, enc).sample, rtol=1e-5, atol=1e-5)


def test_load_stable_diffusion_local_folder(tmp_path):
    M.tiny_stable_diffusion().save_pretrained(tmp_path / "sd")
    pipe = M.load_stable_diffusion(tmp_path / "sd")
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LesionGenError, match="safetensors"):
        M.load_stable_diffusion(tmp_path / "sd")


def test_errors_name_their_argument(tmp_path):
    for bad in (0, -1):
        with pytest.raises(LesionGenError, match=f"rank={bad}"):
            M.lora_config(bad)
        with pytest.raises(LesionGenError, match=f"rank={bad}"):
            M.add_lora(M.tiny_stable_diffusion().unet, rank=bad)
    missing = str(tmp_path / "no-such-sd")
    with pytest.raises(LesionGenError, match="no-such-sd"):
        M.load_stable_diffusion(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LesionGenError, match="model_index.json"):
        M.load_stable_diffusion(tmp_path / "empty")
    with pytest.raises(LesionGenError, match="resolution=30"):
        M.CompactConfig(resolution=30)  # 3 levels: sides must be multiples of 4
    with pytest.raises(LesionGenError, match="nope"):
        M.load_lora(M.tiny_stable_diffusion(), tmp_path / "nope")
    with pytest.raises(LesionGenError, match="add_lora"):
        M.lora_state_dict(M.tiny_stable_diffusion().unet)


@pytest.fixture(scope="module")
def minilm():
    return M.load_text_encoder("minilm")


def test_compact_model(minilm, tmp_path):
    tok, enc = minilm
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    cfg = M.CompactConfig.tiny()
    emb, mask = M.encode_text(PROMPTS, tok, enc, max_length=cfg.max_text_tokens)
    assert emb.shape == (2, cfg.max_text_tokens, 384) and emb.dtype == torch.float32 and mask.shape == (2, 77)

    torch.manual_seed(0)
    pipe = M.compact_pipeline(cfg, text_encoder=(tok, enc))
    pipe.set_progress_bar_config(disable=True)
    ddpm = M.compact_noise_scheduler(cfg)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([3, 700])
    pred = pipe.unet(ddpm.add_noise(x0, noise, t), t, emb, encoder_attention_mask=mask).sample
    torch.nn.functional.mse_loss(pred, noise).backward()
    assert all(p.grad is not None for p in pipe.unet.parameters())
    pipe.unet.zero_grad(set_to_none=True)

    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]
    a = pipe(PROMPTS, num_inference_steps=2, generator=gens(), output_type="np")
    b = pipe(PROMPTS, num_inference_steps=2, generator=gens(), output_type="np")
    assert a.images.shape == (2, 32, 32, 3) and a.images.dtype == np.float32
    assert a.seeds == [7, 8] and a.prompts == PROMPTS
    np.testing.assert_array_equal(a.images, b.images)
    c = pipe(PROMPTS, num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (9, 10)],
             output_type="np")
    assert not np.array_equal(a.images, c.images)

    pipe.save_pretrained(tmp_path / "pipe")
    files = [p.relative_to(tmp_path / "pipe").as_posix() for p in (tmp_path / "pipe").rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"} <= set(files)
    re = M.LesionGenPipeline.from_pretrained(tmp_path / "pipe")
    re.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(re(PROMPTS, num_inference_steps=2, generator=gens(), output_type="np").images,
                                  a.images)


def test_offline_loading_in_a_fresh_process(minilm, tmp_path):
    "A saved compact pipeline loads with every hub call made impossible; a missing local SD path fails before the hub"
    tok, enc = minilm
    torch.manual_seed(0)
    M.compact_pipeline(M.CompactConfig.tiny(), text_encoder=(tok, enc)).save_pretrained(tmp_path / "pipe")
    code = ("import huggingface_hub, diffusers.pipelines.pipeline_utils as pu\n"
            "def boom(*a, **k): raise SystemExit('hub contacted')\n"
            "huggingface_hub.snapshot_download = pu.snapshot_download = boom\n"
            "from lesiongen.model import LesionGenPipeline, load_stable_diffusion\n"
            "from lesiongen.core import LesionGenError\n"
            f"p = LesionGenPipeline.from_pretrained({str(tmp_path / 'pipe')!r}); p.set_progress_bar_config(disable=True)\n"
            "print(p('melanoma', num_inference_steps=1, output_type='np').images.shape)\n"
            f"try: load_stable_diffusion({str(tmp_path / 'runs' / 'sd')!r})\n"
            "except LesionGenError as e: print('missing:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 32, 32, 3)" in out.stdout and "missing:" in out.stdout and "runs/sd" in out.stdout, out.stdout


# ---------------------------------------------------------------- pickle-free loading

def _pickled_copy(src: Path, dst: Path, name: str = "pytorch_model.bin") -> Path:
    "Copy the transformers folder `src` to `dst` with its model.safetensors stored as a pickle `name` instead"
    import shutil
    from safetensors.torch import load_file
    shutil.copytree(src, dst)
    torch.save(load_file(str(dst / "model.safetensors")), dst / name)
    (dst / "model.safetensors").unlink()
    return dst


def _tiny_encoder_folder(folder: Path) -> Path:
    "A tiny BERT encoder with the MiniLM tokenizer, saved with safetensors"
    from transformers import AutoTokenizer, BertConfig, BertModel
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, max_position_embeddings=32)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(M.minilm_path())).save_pretrained(folder)
    return folder


def test_pickle_weights_are_refused(minilm, tmp_path, monkeypatch):
    "Every loader refuses a folder whose weights are pickles only, in one line naming the folder and the file"
    def refused(fn, *contains):
        with pytest.raises(LesionGenError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg and all(c in msg for c in contains), msg
        return msg

    sd = tmp_path / "sd"
    M.tiny_stable_diffusion().save_pretrained(sd, safe_serialization=False)  # unet, vae as .bin
    refused(lambda: M.load_stable_diffusion(sd), f"'{sd}' holds pickle weights only (unet/diffusion_pytorch_model.bin)")

    enc = _tiny_encoder_folder(tmp_path / "enc")
    tok, model = M.load_text_encoder(enc)  # the same encoder as safetensors loads
    assert model.config.hidden_size == 8
    bad_enc = _pickled_copy(enc, tmp_path / "enc_bin")
    refused(lambda: M.load_text_encoder(bad_enc), f"'{bad_enc}' holds pickle weights only (pytorch_model.bin)")

    torch.manual_seed(0)
    pipe = M.compact_pipeline(M.CompactConfig.tiny(), text_encoder=minilm)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False)
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.bin").is_file()
    refused(lambda: M.LesionGenPipeline.from_pretrained(tmp_path / "pipe"), "pipe' holds pickle weights only (unet/")
    refused(lambda: M.LesionGenPipeline.from_pretrained(tmp_path / "pipe", use_safetensors=False), "use_safetensors")

    unet = M.add_lora(M.tiny_stable_diffusion().unet, rank=2)
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=M.lora_state_dict(unet),
                                              safe_serialization=False)
    assert os.listdir(tmp_path / "lora") == ["pytorch_lora_weights.bin"]
    refused(lambda: M.load_lora(M.tiny_stable_diffusion(), tmp_path / "lora"), "pickle weights only (pytorch_lora_weights.bin)")
    refused(lambda: M.load_lora(M.tiny_stable_diffusion(), tmp_path / "lora" / "pytorch_lora_weights.bin"), "not .safetensors")

    # without the folder check, `use_safetensors=True` in every from_pretrained still refuses the pickles
    monkeypatch.setattr(M, "_refuse_pickles", lambda folder, what="model": None)
    refused(lambda: M.load_stable_diffusion(sd), "safetensors weights are required")
    refused(lambda: M.load_text_encoder(bad_enc), "safetensors weights are required")
    refused(lambda: M.LesionGenPipeline.from_pretrained(tmp_path / "pipe"), "safetensors weights are required")
