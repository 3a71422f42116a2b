"""Tiny random-weight Stable Diffusion models built with the reference libraries.

`build_reference_model` writes a complete diffusers-layout folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/, safetensors weights) exactly as `save_pretrained` does, so
sdlite is tested against the real on-disk format. The shapes follow the real architectures scaled
down: "sd1" is SD 1.x (quick_gelu CLIP, conv projection, int head count, "<|endoftext|>" padding),
"sd2" is SD 2.x (gelu CLIP, linear projection, per-block head counts, upcast attention, "!" padding).
"""

import json
import shutil
from pathlib import Path

import torch

CLIP_VOCAB = Path(__file__).resolve().parents[1] / "sdlite" / "data" / "clip"

TEXT_ENCODER = {
    "sd1": dict(hidden_act="quick_gelu", pad_token_id=1),
    "sd2": dict(hidden_act="gelu", pad_token_id=1),
}
UNET = {
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        use_linear_projection=False,
    ),
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
}
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}
SCHEDULER = {
    "sd1": ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)),
    "sd2": ("DDIMScheduler", dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
}
CROSS_ATTENTION_DIM = 32


def build_components(kind: str, prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """The reference pipeline's components for a tiny `kind` ("sd1" or "sd2") model."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=8,
        **UNET[kind],
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=CROSS_ATTENTION_DIM,
            max_position_embeddings=77,
            vocab_size=49408,
            bos_token_id=49406,
            eos_token_id=49407,
            **TEXT_ENCODER[kind],
        )
    )
    # Random init leaves some parameters at exact zeros/ones; perturb everything so that a
    # mis-wired weight cannot hide.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler_class, scheduler_args = SCHEDULER[kind]
    scheduler = getattr(diffusers, scheduler_class)(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        **scheduler_args,
    )
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), scheduler=scheduler)


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """The tokenizer folder of a real checkpoint: CLIP vocabulary plus its special-token configs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_VOCAB / name, folder / name)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_reference_model(path: Path, kind: str, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny `kind` model to `path` in the diffusers layout and return the path."""
    import diffusers
    from transformers import CLIPTokenizer

    path = Path(path)
    write_tokenizer(path / "tokenizer", PAD_TOKEN[kind])
    pipe = diffusers.StableDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **build_components(kind, prediction_type, seed),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def load_reference_pipeline(path: Path, img2img: bool = False):
    """The diffusers pipeline for a folder written by `build_reference_model`, fp32 on the CPU."""
    import diffusers

    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- tiny models that follow each family's rules, for single-file checkpoints -------------------
# A single file has no configs: sdlite reads the shapes and applies the family's rules for what
# shapes cannot tell (SD 1.x: 8 heads per UNet block; SD 2.x / SDXL: 64-wide heads; CLIP: 64-wide
# heads; 32 GroupNorm groups), so these models keep to them. "sdxl" has a 64-wide first and a
# 128-wide second text encoder (projection 64), so the UNet's context is 192 wide. "sdxl" is also the tiny SDXL model of
# the SDXL pipeline parity tests.
FAMILY_REFERENCE = {"sd1": "sd-1.5", "sd2": "sd-2.1-base", "sdxl": "sdxl-base-1.0"}
FAMILY_UNET = {
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64),
    "sd2": dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, use_linear_projection=True),
    "sdxl": dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=64 + 128, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=64 + 6 * 8),
}


def family_text_config(hidden_act: str, **overrides):
    from transformers import CLIPTextConfig

    settings = dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2,
                    projection_dim=64, max_position_embeddings=77, vocab_size=49408, bos_token_id=49406,
                    eos_token_id=49407, pad_token_id=1, hidden_act=hidden_act)
    return CLIPTextConfig(**(settings | overrides))


def build_family_model(path: Path, kind: str, seed: int = 0) -> Path:
    """Write a tiny `kind` ("sd1", "sd2", "sdxl") model that follows its family's rules to `path`
    in the diffusers layout (scheduler: the family's reference config) and return the path."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    reference = CLIP_VOCAB.parent / "configs" / FAMILY_REFERENCE[kind]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=8, norm_num_groups=32, **FAMILY_UNET[kind])
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32, layers_per_block=1,
        sample_size=64, scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
    )
    components = dict(unet=unet, vae=vae)
    if kind == "sdxl":
        components["text_encoder"] = CLIPTextModel(family_text_config("quick_gelu"))
        # Wider than the first encoder: diffusers' from_single_file tells the two apart by width.
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            family_text_config("gelu", hidden_size=128, intermediate_size=256, num_attention_heads=2,
                               num_hidden_layers=3))
    else:
        components["text_encoder"] = CLIPTextModel(family_text_config("quick_gelu" if kind == "sd1" else "gelu"))
    with torch.no_grad():
        for module in components.values():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler_config = json.loads((reference / "scheduler" / "scheduler_config.json").read_text())
    components["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    write_tokenizer(path / "tokenizer", "<|endoftext|>" if kind != "sd2" else "!")
    components["tokenizer"] = CLIPTokenizer.from_pretrained(path / "tokenizer")
    if kind == "sdxl":
        write_tokenizer(path / "tokenizer_2", "!")
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(path / "tokenizer_2")
        pipe = diffusers.StableDiffusionXLPipeline(**components)
    else:
        pipe = diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False, **components)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
