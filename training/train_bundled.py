"""Train sdlite's bundled model: a ~7M-parameter Stable Diffusion that draws coloured shapes.

    OMP_WAIT_POLICY=ACTIVE python training/train_bundled.py   # the committed model, ~58 min (training/README.md)
    python training/train_bundled.py --stages unet,save   # reuse the VAE and latents in --work

Stages, each reading what the previous one wrote to --work (default artifacts/bundled_run):
  tokenizer  BPE vocabulary trained on the caption corpus (CLIP format, ~600 tokens)
  vae        AutoencoderKL 64x64x3 -> 16x16x4, then a colour-fidelity check of its reconstructions
  latents    the training set encoded once (posterior mean and std), the latent scaling factor, and
             how much of each latent pixel the shape covers
  unet       CLIP text encoder + UNet2DConditionModel trained together from scratch, v-prediction
             on a zero-terminal-SNR schedule, high timesteps oversampled, the loss weighted towards
             the shape's pixels, EMA weights
  decoder    (not run by default) the VAE decoder alone fine-tuned on the stored latents
  save       fp16 safetensors in the diffusers folder layout -> sdlite/data/bundled, plus sdlite.json
  eval       training/evaluate.py on the saved folder
The model classes are diffusers' and transformers' (the reference implementation; a training-only
dependency); the saved folder loads in diffusers.StableDiffusionPipeline and in sdlite.
Why the schedule: with SD's scaled_linear betas, x_T still carries ~7% of the image, and an earlier
try learned to read the colours from that residue instead of from the text (see training/README.md).
Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed")
makes x_T pure noise, so at high t the text is the only source of colour.
"""

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from bpe import train_bpe, write_clip_vocab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "sdlite" / "data" / "bundled"
RESOLUTION = 64
MAX_LENGTH = 16  # the context (tokenizer and text encoder): the longest caption takes 14 tokens
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

# Architecture. SD 1.x layout (quick_gelu CLIP, conv-projection transformers, int head count) scaled down.
VAE_CONFIG = dict(
    block_out_channels=(16, 32, 64),  # 3 levels: 64x64 -> 16x16 latents (downsampling factor 4)
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=RESOLUTION,
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_attention_heads=4,
    num_hidden_layers=3,
    projection_dim=128,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 96, 128),  # latents 16x16 -> 8x8 -> 4x4; the 16x16 level draws the shape
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3,  # cross-attention at every level: text sets colour and layout
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=128,
    attention_head_dim=4,  # SD 1.x meaning: number of heads
    norm_num_groups=32,
    use_linear_projection=False,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,  # what StableDiffusionPipeline expects; unused with "trailing" spacing
)
# CFG 3, chosen on validation seeds apart from the evaluation's (training/README.md): at 5 the
# colours slip (held-out backgrounds 88%) for no gain in shapes.
DEFAULTS = {"name": "sdlite-shapes-64", "steps": 20, "cfg": 3.0, "sampler": "ddim"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list:
    from PIL import Image

    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(i) for i in a]


# ---------------------------------------------------------------------------------------------
# Stages


def stage_tokenizer(args, work: Path) -> None:
    rng = random.Random(args.seed)
    captions = [shapes.random_example(rng, 8)[1] for _ in range(5000)]
    merges = train_bpe(captions)
    folder = work / "tokenizer"
    vocab = write_clip_vocab(folder, merges)
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2))
    config = dict(SPECIAL, model_max_length=MAX_LENGTH, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    log(f"tokenizer: {len(merges)} merges, {len(vocab)} tokens")


def stage_vae(args, work: Path) -> None:
    from diffusers import AutoencoderKL

    seed_all(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    if args.vae_init is not None:  # continue training an earlier run's VAE
        vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae_init).state_dict())
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params")
    images, _, _ = shapes.make_dataset(args.vae_images, args.seed + 1, RESOLUTION)
    x_all = to_tensor(images)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.vae_lr, total_steps=args.vae_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.time()
    for step in range(args.vae_steps):
        x = x_all[torch.randint(0, len(x_all), (args.vae_batch,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = reconstruction_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(mse.item())
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} mse {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    vae.save_pretrained(work / "vae")
    (work / "vae_losses.json").write_text(json.dumps(losses))
    # Colour fidelity: the classifier must read reconstructions of unseen pictures as well as originals.
    fidelity = vae_fidelity(vae, args.seed)
    (work / "vae_fidelity.json").write_text(json.dumps(fidelity, indent=2))
    log(f"vae done in {time.time() - t0:.0f}s; classifier on reconstructions: {fidelity}")


def stage_latents(args, work: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    t0 = time.time()
    images, _, scenes = shapes.make_dataset(args.train_images, args.seed + 3, RESOLUTION)
    means, stds = [], []
    with torch.no_grad():
        for b in to_tensor(images).split(256):
            post = vae.encode(b).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.std())
    coverage = foreground_coverage(images, scenes, mean.shape[-1])
    torch.save({"mean": mean, "std": std, "scenes": scenes, "scaling_factor": scaling, "coverage": coverage},
               work / "latents.pt")
    log(f"latents: {tuple(mean.shape)} in {time.time() - t0:.0f}s, scaling_factor {scaling:.4f}")


def foreground_coverage(images: np.ndarray, scenes: list, size: int) -> torch.Tensor:
    """(N, 1, size, size): the share of each latent pixel's image area covered by the shape. A
    pixel is c * fg + (1 - c) * bg (anti-aliased rendering), so c is its projection on fg - bg."""
    fg = np.array([shapes.COLORS[s.fg] for s in scenes], np.float32)[:, None, None]  # (N, 1, 1, 3)
    bg = np.array([shapes.COLORS[s.bg] for s in scenes], np.float32)[:, None, None]
    d = fg - bg
    c = ((images.astype(np.float32) - bg) * d).sum(-1) / (d * d).sum(-1)  # (N, H, W)
    c = torch.from_numpy(c.clip(0, 1))[:, None]
    return F.adaptive_avg_pool2d(c, size)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weighted MSE + L1. The shape covers 3-17% of the picture, so its pixels (those unlike the
    corner pixel) weigh 5x; otherwise the loss is all background and the shape's colour comes out wrong."""
    weight = 1.0 + 4.0 * ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.2).float()  # (B, 1, H, W)
    err = rec - x
    return (weight * (err**2 + 0.5 * err.abs())).mean()


def stage_decoder(args, work: Path) -> None:
    """Fine-tune only the VAE decoder on the stored latents: sharper edges without moving the latent
    space the UNet learns (the encoder stays frozen), so it can run after or beside the UNet stage."""
    from diffusers import AutoencoderKL

    seed_all(args.seed + 10)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    data = torch.load(work / "latents.pt", weights_only=False)
    images, _, _ = shapes.make_dataset(args.train_images, args.seed + 3, RESOLUTION)  # the latents' pictures
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.decoder_lr, total_steps=args.decoder_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed + 10)
    losses, t0 = [], time.time()
    for step in range(args.decoder_steps):
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=g)
        x = to_tensor(images[idx.numpy()])
        z = data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=g)
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(F.mse_loss(rec, x).item())
        if step % 50 == 0 or step == args.decoder_steps - 1:
            log(f"decoder step {step} mse {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    vae.save_pretrained(work / "vae")
    (work / "decoder_losses.json").write_text(json.dumps(losses))
    log(f"decoder done; classifier on reconstructions: {vae_fidelity(vae, args.seed)}")


def vae_fidelity(vae, seed: int) -> dict:
    """The classifier's scores on reconstructions of 512 unseen pictures."""
    test, _, scenes = shapes.make_dataset(512, seed + 2, RESOLUTION)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in to_tensor(test).split(64)])
    return shapes.score([shapes.classify(im) for im in to_images(rec)], scenes)


class CaptionTokens:
    """Caption -> padded token ids, cached (captions repeat a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                ids = self.tokenizer(c, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
                self.cache[c] = torch.tensor(ids)
        return torch.stack([self.cache[c] for c in captions])


def sample_timesteps(n: int, g: torch.Generator, high_fraction: float, band_fraction: float) -> torch.Tensor:
    """Uniform over [0, 1000), mixed with [700, 1000) (colour and layout are decided there) and with
    [450, 900): there the position is already in x_t but the shape is not yet, so only the caption
    can tell a square from a circle (training/diagnose_shape.py)."""
    t = torch.randint(0, 1000, (n,), generator=g)
    high = torch.randint(700, 1000, (n,), generator=g)
    band = torch.randint(450, 900, (n,), generator=g)
    u = torch.rand(n, generator=g)
    return torch.where(u < high_fraction, high, torch.where(u < high_fraction + band_fraction, band, t))


def bounding_box(coverage: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) coverage -> 1 inside the shape's bounding box, else 0. The box holds both the
    shape and the background corners another shape would fill: where shapes differ."""
    rows = coverage.amax(dim=-1, keepdim=True) > 0.05  # (B, 1, H, 1)
    cols = coverage.amax(dim=-2, keepdim=True) > 0.05  # (B, 1, 1, W)
    return (rows & cols).float()


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab[SPECIAL["bos_token"]],
        eos_token_id=vocab[SPECIAL["eos_token"]],
        pad_token_id=vocab[SPECIAL["pad_token"]],
        **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def stage_unet(args, work: Path) -> None:
    import copy

    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    seed_all(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    data = torch.load(work / "latents.pt", weights_only=False)
    mean, std, scenes, scaling = data["mean"], data["std"], data["scenes"], data["scaling_factor"]
    box = bounding_box(data["coverage"])  # (N, 1, 16, 16), once for the whole run
    text_encoder = build_text_encoder(tokenizer)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    if args.unet_init is not None:  # continue from an earlier run's EMA weights (fresh optimizer)
        models.load_state_dict(torch.load(args.unet_init, weights_only=False)["ema"])
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M params")
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod  # (1000,), last entry exactly 0 (zero terminal SNR)
    tokens = CaptionTokens(tokenizer)
    params, ema_params = list(models.parameters()), list(ema.parameters())
    # fused, with foreach clipping and EMA: 26 -> 14 ms of a step for the optimizer's part
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
    g = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    # Squares are the hardest shape (their corners against a circle's): --square-weight draws them more often.
    draw_weight = torch.tensor([args.square_weight if s.shape == "square" else 1.0 for s in scenes])
    losses, t0, step, progress = [], time.time(), 0, 0.0
    while progress < 1.0:
        # Progress through the run drives a warm-up + cosine learning rate. With --time-limit the
        # run also ends on the wall clock; the log names the step count to pass as --steps to redo it.
        progress = step / args.steps
        if args.time_limit:
            progress = max(progress, (time.time() - t0) / (args.time_limit * 60))
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.multinomial(draw_weight, args.batch, replacement=True, generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling  # (B, 4, 16, 16)
        captions = ["" if rng.random() < args.uncond else scenes[i].caption(rng.choice(shapes.TEMPLATES)) for i in idx.tolist()]
        t = sample_timesteps(args.batch, g, args.high_t, args.band_t)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0  # v-prediction target (Salimans & Ho 2022)
        cond = text_encoder(tokens(captions))[0]  # (B, 16, 128)
        # The shape's box covers 5-20% of the latent; weighting it keeps the loss from being all background.
        weight = 1 + (args.fg_weight - 1) * box[idx]  # (B, 1, 16, 16)
        loss = (weight * (unet(xt, t, cond).sample - v) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 50 == 1:
            log(f"unet step {step} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            torch.save({"ema": ema.state_dict(), "step": step}, work / "unet_ema.pt")
            (work / "unet_losses.json").write_text(json.dumps(losses))
            if args.mid_eval:
                save_folder(work, work / "checkpoint", scaling)
                log(f"mid-training eval at step {step}: {quick_eval(work / 'checkpoint', n=48)}")
    torch.save({"ema": ema.state_dict(), "step": step}, work / "unet_ema.pt")
    (work / "unet_losses.json").write_text(json.dumps(losses))
    log(f"unet: {step} steps, final loss {np.mean(losses[-50:]):.4f}")
    log(f"unet done in {time.time() - t0:.0f}s")


def save_folder(work: Path, out: Path, scaling: float | None = None, dtype=torch.float32) -> None:
    """Assemble the diffusers folder from the work directory's VAE, tokenizer and EMA weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    if scaling is None:
        scaling = torch.load(work / "latents.pt", weights_only=False)["scaling_factor"]
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.register_to_config(scaling_factor=scaling)
    text_encoder = build_text_encoder(tokenizer)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    models.load_state_dict(torch.load(work / "unet_ema.pt", weights_only=False)["ema"])
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; ship the CLIP-format files sdlite reads instead.
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(work / "tokenizer", out / "tokenizer")
    (out / "sdlite.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")


def quick_eval(folder: Path, n: int = 48) -> dict:
    import evaluate

    r = evaluate.evaluate(folder, engine="diffusers", limit=n, quiet=True)
    return {k: r[k] for k in ("train", "held_out", "per_color_fg") if k in r}


def stage_save(args, work: Path) -> None:
    if BUNDLED.exists():
        shutil.rmtree(BUNDLED)
    save_folder(work, BUNDLED, dtype=torch.float16)
    size = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    log(f"saved {BUNDLED} ({size / 1e6:.2f} MB)")
    plot_losses(work)


def plot_losses(work: Path) -> None:
    """training/loss_curve.png: VAE MSE and UNet v-loss (moving average over 50 steps), drawn with PIL."""
    from PIL import Image, ImageDraw

    panels = []
    for name, file in (("VAE reconstruction MSE", "vae_losses.json"), ("UNet + text encoder v-loss", "unet_losses.json")):
        if (work / file).exists():
            y = np.array(json.loads((work / file).read_text()))
            k = min(50, len(y))
            panels.append((name, np.convolve(y, np.ones(k) / k, mode="valid")))
    w, h, pad = 480, 300, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(img)
    for i, (name, y) in enumerate(panels):
        x0 = i * w
        ly = np.log10(y)
        lo, hi = ly.min(), ly.max()
        pts = [(x0 + pad + (w - 2 * pad) * j / max(1, len(y) - 1), h - pad - (h - 2 * pad) * (v - lo) / max(1e-9, hi - lo)) for j, v in enumerate(ly)]
        d.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="gray")
        d.line(pts, fill="blue", width=2)
        d.text((x0 + pad, 10), f"{name} (log scale)", fill="black")
        d.text((x0 + 2, pad - 5), f"{10 ** hi:.3f}", fill="black")
        d.text((x0 + 2, h - pad - 5), f"{10 ** lo:.3f}", fill="black")
        d.text((x0 + pad, h - pad + 8), f"step 0 .. {len(y) + 49}", fill="black")
    img.save(Path(__file__).resolve().parent / "loss_curve.png")


def stage_eval(args, work: Path) -> None:
    import evaluate

    evaluate.main(["--engine", args.engine])


STAGES = {
    "tokenizer": stage_tokenizer,
    "vae": stage_vae,
    "latents": stage_latents,
    "unet": stage_unet,
    "decoder": stage_decoder,
    "save": stage_save,
    "eval": stage_eval,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(s for s in STAGES if s != "decoder"),
                   help="comma-separated subset of " + ",".join(STAGES) + " (default: all but decoder)")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bundled_run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vae-images", type=int, default=8192)
    p.add_argument("--vae-steps", type=int, default=1300)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-init", type=Path, help="start the VAE from this saved VAE folder instead of random weights")
    p.add_argument("--decoder-steps", type=int, default=600)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--train-images", type=int, default=16384)
    p.add_argument("--steps", type=int, default=6000, help="UNet + text encoder optimizer steps (or fewer: --time-limit)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--unet-init", type=Path, help="start text encoder + UNet from this unet_ema.pt instead of random weights")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond", type=float, default=0.1, help="fraction of empty captions (for classifier-free guidance)")
    p.add_argument("--high-t", type=float, default=0.1, help="fraction of timesteps drawn from [700, 1000)")
    p.add_argument("--band-t", type=float, default=0.4, help="fraction of timesteps drawn from [450, 900)")
    p.add_argument("--square-weight", type=float, default=2.0, help="how much more often squares are drawn than other shapes")
    p.add_argument("--fg-weight", type=float, default=4.0, help="loss weight of the latent pixels in the shape's bounding box (others: 1)")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--mid-eval", action="store_true", help="quick 48-image evaluation at each checkpoint")
    p.add_argument("--time-limit", type=float, default=50, help="stop the UNet stage after this many minutes (0: never)")
    p.add_argument("--engine", default="sdlite", choices=["sdlite", "diffusers"], help="engine of the final evaluation")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Denormal gradients made UNet steps ~1.4x slower. Set before the first parallel operation, so
    # that OpenMP's worker threads inherit it.
    torch.set_flush_denormal(True)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for name in args.stages.split(","):
        ts = time.time()
        log(f"== stage {name}")
        STAGES[name](args, args.work)
        log(f"== stage {name} took {time.time() - ts:.0f}s")
    log(f"all stages took {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
