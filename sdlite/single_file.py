"""Single-file checkpoints (the original Stable Diffusion layout): read, detect, convert.

A single file holds the UNet, VAE and text encoder(s) under their original prefixes
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` / `conditioner.embedders.*`)
and no configs. `read_single_file` finds the family from which text encoder is present, checks it
against the tensor shapes, starts from the family's reference config (sdlite/data/configs) and
sets everything shapes tell: channels, levels, layers per block, transformer depth, cross-attention
width, linear vs conv projection, text encoder width / depth / vocabulary. What shapes cannot tell
follows the family's rule:

- attention heads: SD 1.x has 8 heads in every UNet block; SD 2.x and SDXL have 64-wide heads
  (channels // 64); every CLIP text encoder has 64-wide heads (hidden_size // 64);
- SD 2.x's text encoder is OpenCLIP-H without its last layer (23 of 24): a file's 24th resblock
  is dropped (files with 23 keep them all; see `keys.SD2_TEXT_LAYERS`);
- prediction type: epsilon, unless the caller says otherwise or the file carries a `v_pred` marker
  key (a `ztsnr` key also turns on the zero-terminal-SNR schedule with trailing timesteps, sampled
  with Euler by default). SD 2.x with v-prediction uses the 768-v reference config (768 px), else
  the 512 px base config.

All key renaming is in `sdlite.keys`. `save_single_file` / `save_diffusers_folder` convert between
this layout and a diffusers folder, tensor for tensor.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import keys
from .config import CLIPConfig, UNetConfig, VAEConfig
from .loading import RECIPE_NAME, CheckpointError, find_weight_files, read_json, read_weights

CONFIGS = Path(__file__).parent / "data" / "configs"
CLIP_VOCAB = Path(__file__).parent / "data" / "clip"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# The keys that mark each family's text encoder(s), checked in this order.
FAMILY_MARKERS = {
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    "sd2": ("cond_stage_model.model.",),
    "sd1": ("cond_stage_model.transformer.",),
}
EXPECTED_KEYS = ("model.diffusion_model.* (UNet), first_stage_model.* (VAE) and cond_stage_model.* or "
                 "conditioner.embedders.* (text encoders)")
NETWORK_NAMES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                 "text_encoder_2": "CLIPTextModel"}
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}


@dataclass
class SingleFile:
    """A single-file checkpoint split into diffusers-layout parts."""

    family: str  # "sd1", "sd2" or "sdxl"
    reference: str  # the folder under sdlite/data/configs the configs start from
    configs: dict  # component -> config json dict (diffusers / transformers format), incl. "scheduler"
    weights: dict  # component -> {diffusers name: tensor}

    def folder(self, component: str) -> Path:
        """The reference folder of a tokenizer (vocabulary: sdlite's packaged CLIP vocabulary)."""
        return CONFIGS / self.reference / component


def read_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a single file: .safetensors, or a pickle (.ckpt/.pt/.pth/.bin) when allowed."""
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle file, which can run code when loaded; sdlite reads it only with "
            "allow_pickle=True (--allow-pickle), and only with torch.load(weights_only=True)"
        )
    if path.suffix not in PICKLE_SUFFIXES + (".safetensors",):
        raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r} (.safetensors or .ckpt)")
    return read_weights(path)


def detect_family(state: dict, source: str) -> str:
    """Which family a single file belongs to, from its keys, confirmed by its tensor shapes."""
    if not any(k.startswith("model.diffusion_model.") for k in state) or not any(
            k.startswith("first_stage_model.") for k in state):
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        raise CheckpointError(f"{source} is not a Stable Diffusion checkpoint: expected keys {EXPECTED_KEYS}; "
                              f"found {sample}")
    family = next((f for f, marks in FAMILY_MARKERS.items()
                   if all(any(k.startswith(m) for k in state) for m in marks)), None)
    unet = "model.diffusion_model."
    attn2 = next((k for k in state if k.startswith(unet) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in state if k.startswith(unet) and k.endswith(".proj_in.weight")), None)
    if family is None or attn2 is None or proj_in is None:
        raise CheckpointError(f"{source}: unknown architecture (sdlite reads SD 1.x, SD 2.x and SDXL base "
                              "checkpoints; this file has no known text encoder or no cross-attention)")
    context, linear = state[attn2].shape[1], state[proj_in].ndim == 2
    widths = {"sd1": state.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                               state.get("cond_stage_model.transformer.embeddings.token_embedding.weight")),
              "sd2": state.get("cond_stage_model.model.token_embedding.weight")}
    if family == "sdxl":
        w0 = state.get("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight")
        w1 = state.get("conditioner.embedders.1.model.token_embedding.weight")
        width = None if w0 is None or w1 is None else w0.shape[1] + w1.shape[1]
        fits = width == context and linear and any(k.startswith(unet + "label_emb.") for k in state)
    else:
        width = None if widths[family] is None else widths[family].shape[1]
        fits = width == context and linear == (family == "sd2")
    if not fits:
        raise CheckpointError(
            f"{source}: unknown architecture: {FAMILY_NAMES[family]} text encoder keys, but the UNet "
            f"(cross-attention width {context}, {'linear' if linear else 'conv'} projections) does not fit "
            f"a text encoder of width {width}")
    if family != "sdxl" and any(k.startswith(unet + "label_emb.") for k in state):
        raise CheckpointError(f"{source}: unknown architecture: an {FAMILY_NAMES[family]} UNet with a class "
                              "embedding (label_emb: unCLIP and other image-conditioned models are not supported)")
    first, last = state.get(unet + "input_blocks.0.0.weight"), state.get(unet + "out.2.weight")
    if first is None or last is None:
        raise CheckpointError(f"{source}: not a complete {FAMILY_NAMES[family]} checkpoint: the UNet has no "
                              "input_blocks.0.0.weight or out.2.weight")
    in_ch, out_ch = first.shape[1], last.shape[0]
    if in_ch != out_ch:
        raise CheckpointError(f"{source}: unknown architecture: a UNet with {in_ch} input and {out_ch} output "
                              "channels (inpainting and other conditioned models are not supported)")
    return family


def _indices(state: dict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def unet_config(u: dict, base: dict, family: str, pooled_dim: int | None, source: str) -> dict:
    """A diffusers UNet config for original UNet tensors `u` (prefix removed)."""
    inputs = _indices(u, r"input_blocks\.(\d+)\.")
    downs = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in u]
    L = downs[0] - 1 if downs else len(inputs) - 1
    n = len(inputs) // (L + 1)
    if n * (L + 1) != len(inputs) or len(_indices(u, r"output_blocks\.(\d+)\.")) != n * (L + 1):
        raise CheckpointError(f"{source}: unknown architecture: {len(inputs)} input blocks do not form "
                              "levels of equal depth")
    first = [1 + i * (L + 1) for i in range(n)]
    channels = [u[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] for k in first]
    down_attn = [f"input_blocks.{k}.1.proj_in.weight" in u for k in first]
    up_attn = [f"output_blocks.{j * (L + 1)}.1.proj_in.weight" in u for j in range(n)]
    depth = [len(_indices(u, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")) or 1 for k in first]
    proj_in = next(k for k in u if k.endswith(".proj_in.weight"))
    attn2 = next(k for k in u if k.endswith("attn2.to_k.weight"))
    if family == "sd1":
        heads = 8
    else:
        if any(c % 64 for c in channels):
            raise CheckpointError(f"{source}: block channels {channels} are not multiples of the 64-wide "
                                  f"attention heads {FAMILY_NAMES[family]} uses")
        heads = [c // 64 for c in channels]
    config = dict(
        base,
        in_channels=u["input_blocks.0.0.weight"].shape[1],
        out_channels=u["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=L,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        mid_block_type="UNetMidBlock2DCrossAttn" if "middle_block.1.proj_in.weight" in u else None,
        transformer_layers_per_block=depth if len(set(depth)) > 1 else depth[0],
        attention_head_dim=heads,
        num_attention_heads=None,
        cross_attention_dim=u[attn2].shape[1],
        use_linear_projection=u[proj_in].ndim == 2,
    )
    if "label_emb.0.0.weight" in u:
        in_dim = u["label_emb.0.0.weight"].shape[1]
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=in_dim,
                      addition_time_embed_dim=(in_dim - pooled_dim) // 6)
    return config


def vae_config(v: dict, base: dict) -> dict:
    n = len(_indices(v, r"encoder\.down\.(\d+)\."))
    return dict(
        base,
        in_channels=v["encoder.conv_in.weight"].shape[1],
        out_channels=v["decoder.conv_out.weight"].shape[0],
        latent_channels=v["decoder.conv_in.weight"].shape[1],
        block_out_channels=[v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n)],
        layers_per_block=len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        use_quant_conv="quant_conv.weight" in v,
        use_post_quant_conv="post_quant_conv.weight" in v,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in v,
    )


def clip_config(t: dict, base: dict, openclip: bool, sd2: bool, source: str) -> dict:
    """A transformers CLIPTextConfig for HF-layout or OpenCLIP text tensors `t` (prefix removed);
    `sd2`: SD 2.x's text encoder, without the projection and the 24th layer if present."""
    if openclip:
        embedding, positions = t["token_embedding.weight"], t["positional_embedding"]
        layers = len(_indices(t, r"transformer\.resblocks\.(\d+)\."))
        fc1 = t["transformer.resblocks.0.mlp.c_fc.weight"]
        projection = t["text_projection"].shape[1] if "text_projection" in t else None
    else:
        t = keys.canonical_state(t, "CLIPTextModel")
        embedding = t["text_model.embeddings.token_embedding.weight"]
        positions = t["text_model.embeddings.position_embedding.weight"]
        layers = len(_indices(t, r"text_model\.encoder\.layers\.(\d+)\."))
        fc1 = t["text_model.encoder.layers.0.mlp.fc1.weight"]
        projection = t["text_projection.weight"].shape[0] if "text_projection.weight" in t else None
    vocab, width = embedding.shape
    if width % 64:
        raise CheckpointError(f"{source}: text encoder width {width} is not a multiple of its 64-wide heads")
    config = dict(base, vocab_size=vocab, hidden_size=width, max_position_embeddings=positions.shape[0],
                  intermediate_size=fc1.shape[0], num_attention_heads=width // 64,
                  num_hidden_layers=layers - 1 if sd2 and layers == keys.SD2_TEXT_LAYERS + 1 else layers)
    if projection is not None and not sd2:
        config["projection_dim"] = projection
    return config


def reference_folder(family: str, prediction_type: str) -> str:
    if family == "sd2":
        return "sd-2.1-768-v" if prediction_type == "v_prediction" else "sd-2.1-base"
    return {"sd1": "sd-1.5", "sdxl": "sdxl-base-1.0"}[family]


def describe(state: dict, family: str, prediction_type: str | None, source: str) -> SingleFile:
    """Configs and diffusers-named weights of a single file's tensors."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if prediction_type is None:
        prediction_type = "v_prediction" if "v_pred" in state else "epsilon"
    reference = reference_folder(family, prediction_type)
    base = {c: read_json(CONFIGS / reference / name) for c, name in (
        ("unet", "unet/config.json"), ("vae", "vae/config.json"), ("text_encoder", "text_encoder/config.json"),
        ("scheduler", "scheduler/scheduler_config.json"), ("model_index", "model_index.json"))}
    parts = keys.split_original(state, family)
    try:
        configs = {"text_encoder": clip_config(parts["text_encoder"], base["text_encoder"],
                                               openclip=family == "sd2", sd2=family == "sd2", source=source)}
        pooled = None
        if family == "sdxl":
            base2 = read_json(CONFIGS / reference / "text_encoder_2" / "config.json")
            configs["text_encoder_2"] = clip_config(parts["text_encoder_2"], base2, True, False, source)
            pooled = configs["text_encoder_2"]["projection_dim"]
        configs["unet"] = unet_config(parts["unet"], base["unet"], family, pooled, source)
        configs["vae"] = vae_config(parts["vae"], base["vae"])
    except KeyError as e:
        raise CheckpointError(f"{source}: not a complete {FAMILY_NAMES[family]} checkpoint: missing {e}") from None
    scheduler = dict(base["scheduler"], prediction_type=prediction_type)
    if "ztsnr" in state:  # Euler, since PNDM (SD 1.x's) has no zero-SNR support and DDIM cannot take epsilon there
        scheduler.update(_class_name="EulerDiscreteScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    configs |= {"scheduler": scheduler, "model_index": base["model_index"]}
    typed = network_configs(configs)
    try:
        weights = keys.original_to_diffusers(state, family, typed)
    except KeyError as e:
        raise CheckpointError(f"{source}: {e.args[0]}") from None
    return SingleFile(family, reference, configs, weights)


def network_configs(configs: dict) -> dict:
    """Typed sdlite configs of the networks among `configs` (json dicts)."""
    typed = {"unet": UNetConfig.from_json(configs["unet"]), "vae": VAEConfig.from_json(configs["vae"]),
             "text_encoder": CLIPConfig.from_json(configs["text_encoder"], with_projection=False)}
    if "text_encoder_2" in configs:
        typed["text_encoder_2"] = CLIPConfig.from_json(configs["text_encoder_2"], with_projection=True)
    return typed


def read_single_file(path: str | Path, allow_pickle: bool = False, prediction_type: str | None = None) -> SingleFile:
    """Read and describe a single-file checkpoint (see the module docstring for the rules)."""
    path = Path(path)
    state = read_checkpoint(path, allow_pickle)
    return describe(state, detect_family(state, str(path)), prediction_type, str(path))


# -- conversion ---------------------------------------------------------------------------------

def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    # Cloned: safetensors refuses views that share memory (split q/k/v, memory-mapped files).
    save_file({k: t.detach().clone().contiguous() for k, t in tensors.items()}, path)


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder: SDXL with a second text encoder; SD 2.x with a gelu
    (OpenCLIP) text encoder; else SD 1.x."""
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    return "sd2" if read_json(folder / "text_encoder" / "config.json").get("hidden_act") == "gelu" else "sd1"


def save_single_file(folder: str | Path, out: str | Path, allow_pickle: bool = False) -> str:
    """Write a diffusers-layout folder as one original-layout .safetensors file; returns the family."""
    folder, out = Path(folder), Path(out)
    family = folder_family(folder)
    components = list(keys.ORIGINAL_PREFIXES[family])
    if any((folder / c / RECIPE_NAME).is_file() for c in components):
        raise CheckpointError(f"{folder} is palettized (sdlite compress); convert the original model")
    configs = {c: read_json(folder / c / "config.json") for c in components}
    for c in (c for c in components if c.startswith("text_encoder")):  # a single file has no tokenizer:
        text = CLIPConfig.from_json(configs[c])  # its readers take CLIP's
        if (text.max_position_embeddings, text.vocab_size) != (77, 49408):
            raise CheckpointError(f"{folder}: its {c} takes {text.max_position_embeddings} tokens of a "
                                  f"{text.vocab_size}-token vocabulary, but a single file carries no tokenizer "
                                  "and is read with CLIP's (77 tokens of 49408): keep this model as a folder")
    weights = {}
    for c in components:
        raw = {}
        for file in find_weight_files(folder / c, allow_pickle=allow_pickle):
            raw.update(read_weights(file))
        weights[c] = keys.canonical_state(raw, NETWORK_NAMES[c])  # e.g. pre-0.14 VAE attention names
    state = keys.diffusers_to_original(weights, family, network_configs(configs))
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else {}
    # The marker keys that fine-tunes carry and readers (sdlite's, the web UIs') honour.
    if scheduler.get("prediction_type") == "v_prediction":
        state["v_pred"] = torch.zeros(0)
    if scheduler.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.zeros(0)
    _save(state, out)
    return family


def save_diffusers_folder(path: str | Path, out: str | Path, allow_pickle: bool = False,
                          prediction_type: str | None = None) -> str:
    """Write a single-file checkpoint as a diffusers-layout folder; returns the family."""
    path, out = Path(path), Path(out)
    model = read_single_file(path, allow_pickle, prediction_type)
    out.mkdir(parents=True, exist_ok=True)
    for component, tensors in model.weights.items():
        (out / component).mkdir(exist_ok=True)
        (out / component / "config.json").write_text(json.dumps(model.configs[component], indent=2))
        _save(tensors, out / component / f"{WEIGHT_NAMES[component]}.safetensors")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.configs["scheduler"], indent=2))
    (out / "model_index.json").write_text(json.dumps(model.configs["model_index"], indent=2))
    for tokenizer in ("tokenizer", "tokenizer_2"):
        source = model.folder(tokenizer)
        if source.is_dir():
            shutil.copytree(source, out / tokenizer, dirs_exist_ok=True)
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(CLIP_VOCAB / name, out / tokenizer / name)
    return model.family
