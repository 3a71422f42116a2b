"""Checkpoint key mapping: every name sdlite reads from a file that is not its own passes through here.

sdlite's canonical names are diffusers' / transformers' names. Two kinds of mapping live here:

- `canonical_key` / `canonical_state`: small renames inside diffusers-layout folders (old VAE
  attention names, CLIP saved without the `text_model.` prefix, position-id buffers).
- The original (CompVis / Stability "single-file") layout <-> diffusers, in both directions, as
  prefix tables built from a network's config plus a few pure functions for the tensors that are
  not a plain rename (OpenCLIP's fused q/k/v `in_proj_weight`, its transposed `text_projection`,
  the VAE's 1x1-conv attention). The tables follow diffusers' `single_file_utils` conversion.

    original (one file)                                 diffusers component
    model.diffusion_model.*                             unet
    first_stage_model.*                                 vae
    cond_stage_model.transformer.*   (SD 1.x, HF CLIP)  text_encoder
    cond_stage_model.model.*         (SD 2.x, OpenCLIP) text_encoder
    conditioner.embedders.0.transformer.*   (SDXL)      text_encoder
    conditioner.embedders.1.model.*  (SDXL, OpenCLIP)   text_encoder_2
"""

import re

import torch

# -- diffusers-layout folders -----------------------------------------------------------------

# Keys that carry no weights: position ids that old transformers versions saved as buffers.
IGNORED_KEY = re.compile(r"(^|\.)position_ids$")
# Attention names of VAE checkpoints saved before diffusers 0.14.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
# transformers >= 5 saves CLIP text encoders without the "text_model." prefix that published
# checkpoints (and sdlite's names) carry.
UNPREFIXED_CLIP_KEY = re.compile(r"^(embeddings|encoder|final_layer_norm)\.")


def canonical_key(key: str, network: str) -> str | None:
    """Map a checkpoint key of a `network` (class name) to sdlite's name for it, or None for keys
    that hold no weights."""
    if IGNORED_KEY.search(key):
        return None
    if network.startswith("CLIPText") and UNPREFIXED_CLIP_KEY.match(key):
        return "text_model." + key
    legacy = LEGACY_ATTENTION_KEY.match(key)
    if legacy:
        block, name, kind = legacy.groups()
        return f"{block}.{LEGACY_ATTENTION_NAMES[name]}.{kind}"
    return key


def canonical_state(weights: dict[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    """Rename keys to sdlite's names; legacy 1x1-conv attention weights become linear weights."""
    state = {}
    for key, tensor in weights.items():
        name = canonical_key(key, network)
        if name is None:
            continue
        if LEGACY_ATTENTION_KEY.match(key) and tensor.ndim == 4:  # (out, in, 1, 1) -> (out, in)
            tensor = tensor[:, :, 0, 0]
        state[name] = tensor
    return state


# -- the original single-file layout ----------------------------------------------------------

# Component -> prefix of its keys in a single file, per model family.
ORIGINAL_PREFIXES = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."},
    "sd2": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.model."},
    "sdxl": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
OPENCLIP_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.1.model.")
# Training checkpoints also carry the VAE's loss network (discriminator, LPIPS) under its prefix.
TRAINING_ONLY = ("first_stage_model.loss.",)
# Original keys inside a component's prefix that hold nothing sdlite uses.
UNUSED_ORIGINAL = re.compile(r"(^|\.)(logit_scale|attn_mask|position_ids)$")

UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
               ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]
VAE_RESNET = [("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
              ("conv_shortcut.", "nin_shortcut.")]
VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]
OPENCLIP_TOP = [("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
                ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
                ("text_model.final_layer_norm.", "ln_final."),
                ("text_projection.weight", "text_projection")]
OPENCLIP_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
                  ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def _nest(outer: list[tuple[str, str]], inner: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every (diffusers, original) prefix pair of `inner` under every pair of `outer`."""
    return [(d + di, o + oi) for d, o in outer for di, oi in inner]


def unet_table(config) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs of a UNet with this UNetConfig.

    Original numbering: input_blocks.0 is conv_in; level i's resnet/attention j is
    input_blocks.{1 + i*(L+1) + j}.{0,1} and its downsampler input_blocks.{(i+1)*(L+1)}.0.op;
    up level j's resnet k is output_blocks.{j*(L+1) + k}.0, its upsampler sits after the last
    resnet (index 1, or 2 behind an attention)."""
    layers = set(config.layers_per_block)
    if len(layers) != 1:
        raise ValueError(f"the original layout needs the same layers_per_block on every level, got "
                         f"{config.layers_per_block}")
    L, n = layers.pop(), len(config.block_out_channels)
    table = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    resnets, attentions = [], []
    for i, kind in enumerate(config.down_block_types):
        for j in range(L):
            resnets.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (L + 1) + j}.0."))
            if kind.startswith("CrossAttn"):
                attentions.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (L + 1) + j}.1."))
        if i < n - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (L + 1)}.0.op."))
    if config.mid_block_type is not None:
        resnets += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")]
        attentions.append(("mid_block.attentions.0.", "middle_block.1."))
    for j, kind in enumerate(config.up_block_types):
        attention = kind.startswith("CrossAttn")
        for k in range(L + 1):
            resnets.append((f"up_blocks.{j}.resnets.{k}.", f"output_blocks.{j * (L + 1) + k}.0."))
            if attention:
                attentions.append((f"up_blocks.{j}.attentions.{k}.", f"output_blocks.{j * (L + 1) + k}.1."))
        if j < n - 1:
            table.append((f"up_blocks.{j}.upsamplers.0.conv.", f"output_blocks.{j * (L + 1) + L}.{2 if attention else 1}.conv."))
    # Attention blocks keep their inner names (norm, proj_in, transformer_blocks.*, proj_out).
    return table + attentions + _nest(resnets, UNET_RESNET)


def vae_table(config) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs of an AutoencoderKL with this VAEConfig. The
    original decoder numbers its levels from the lowest resolution up: up.{n-1-i} is up_blocks.i."""
    n, L = len(config.block_out_channels), config.layers_per_block
    table = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    resnets, attentions = [], []
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.")]
        resnets += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                    (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")]
        attentions.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(n):
        resnets += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(L)]
        resnets += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(L + 1)]
        if i < n - 1:
            table += [(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."),
                      (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.")]
    return table + _nest(resnets, VAE_RESNET) + _nest(attentions, VAE_ATTENTION)


def openclip_table(num_layers: int) -> list[tuple[str, str]]:
    """(transformers name or prefix, OpenCLIP name or prefix) pairs of an OpenCLIP text tower;
    the fused q/k/v projections are handled by `openclip_to_diffusers` / `openclip_to_original`."""
    layers = [(f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}.") for i in range(num_layers)]
    return OPENCLIP_TOP + _nest(layers, OPENCLIP_LAYER)


def rename(key: str, table: list[tuple[str, str]], to_original: bool) -> str | None:
    """`key` with its longest matching prefix in `table` swapped for the other side's, or None
    when no prefix matches. Works in both directions."""
    return _rename(key, _flip(table, to_original))


def _flip(table: list[tuple[str, str]], to_original: bool) -> dict[str, str]:
    return {d: o for d, o in table} if to_original else {o: d for d, o in table}


def _rename(key: str, lookup: dict[str, str]) -> str | None:
    if key in lookup:  # a full name (OpenCLIP's positional_embedding)
        return lookup[key]
    cut = len(key)
    while (cut := key.rfind(".", 0, cut)) > 0:
        prefix = key[: cut + 1]
        if prefix in lookup:
            return lookup[prefix] + key[cut + 1:]
    return None


def rename_state(state: dict, table: list[tuple[str, str]], to_original: bool, source: str) -> dict:
    """Rename every key of `state` with `table`; a key the table does not know is an error naming it."""
    lookup = _flip(table, to_original)
    out = {}
    for key, tensor in state.items():
        name = _rename(key, lookup)
        if name is None:
            raise KeyError(f"{source}: no {'original' if to_original else 'diffusers'} name for {key!r}")
        out[name] = tensor
    return out


# The VAE's mid-block attention is a 1x1 conv in the original layout, a Linear in diffusers'.
VAE_ATTENTION_WEIGHT = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def vae_to_diffusers(state: dict, config) -> dict:
    """Original VAE keys (prefix removed) -> diffusers names and shapes."""
    out = {}
    for key, tensor in state.items():
        if VAE_ATTENTION_WEIGHT.search(key) and tensor.ndim == 4:  # (C, C, 1, 1) -> (C, C)
            tensor = tensor[:, :, 0, 0]
        out[key] = tensor
    return rename_state(out, vae_table(config), to_original=False, source="VAE")


def vae_to_original(state: dict, config) -> dict:
    out = rename_state(state, vae_table(config), to_original=True, source="VAE")
    return {k: t[:, :, None, None] if VAE_ATTENTION_WEIGHT.search(k) and t.ndim == 2 else t for k, t in out.items()}


def unet_to_diffusers(state: dict, config) -> dict:
    return rename_state(state, unet_table(config), to_original=False, source="UNet")


def unet_to_original(state: dict, config) -> dict:
    return rename_state(state, unet_table(config), to_original=True, source="UNet")


def hf_clip_to_diffusers(state: dict) -> dict:
    """An HF-layout CLIP text model inside a single file: already transformers' names."""
    return {k: t for k, t in canonical_state(state, "CLIPTextModel").items() if not UNUSED_ORIGINAL.search(k)}


def hf_clip_to_original(state: dict) -> dict:
    return dict(state)


# SD 2.x uses 23 of OpenCLIP-H's 24 layers. Its published files carry all 24; diffusers' own
# converter (`convert_openclip_text_enc_state_dict`) writes only the 23, and diffusers'
# from_single_file skips `resblocks.23` alone. So a file's last layer is dropped only when the
# file has all 24.
SD2_TEXT_LAYERS = 23
IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
QKV_PROJ = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def openclip_to_diffusers(state: dict, num_layers: int, with_projection: bool) -> dict:
    """An OpenCLIP text tower (prefix removed) -> transformers CLIPTextModel[WithProjection] names.

    `in_proj_weight` (3D, D) is split into q, k, v (D, D) each; `text_projection` (D, P), used as
    x @ P, becomes the Linear weight (P, D). Layers from `num_layers` on are dropped (SD 2.x uses
    the penultimate layer: 23 of OpenCLIP-H's 24), and so is the projection unless wanted."""
    out, rest = {}, {}
    for key, tensor in state.items():
        layer = re.match(r"^transformer\.resblocks\.(\d+)\.", key)
        if UNUSED_ORIGINAL.search(key) or (layer and int(layer.group(1)) >= num_layers):
            continue
        if key == "text_projection" and not with_projection:
            continue
        fused = IN_PROJ.match(key)
        if fused:
            i, kind = fused.groups()
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.T
        else:
            rest[key] = tensor
    return out | rename_state(rest, openclip_table(num_layers), to_original=False, source="OpenCLIP text encoder")


def openclip_to_original(state: dict, num_layers: int) -> dict:
    """transformers names -> OpenCLIP (prefix not added); inverse of `openclip_to_diffusers`."""
    out, qkv = {}, {}
    for key, tensor in state.items():
        split = QKV_PROJ.match(key)
        if split:
            i, name, kind = split.groups()
            qkv.setdefault((int(i), kind), {})[name] = tensor
        elif key == "text_projection.weight":
            out[key] = tensor.T  # renamed to "text_projection" with the rest
        else:
            out[key] = tensor
    out = rename_state(out, openclip_table(num_layers), to_original=True, source="text encoder")
    for (i, kind), parts in sorted(qkv.items()):
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


def identity_openclip_layer(index: int, width: int, mlp_width: int, dtype: torch.dtype) -> dict:
    """An all-zero OpenCLIP residual block: both branches add zero, so it passes its input through.
    Written as SD 2.x's unused 24th layer after a model's 23, so files sdlite writes have the layer
    count other tools expect, and reading them back drops it again."""
    zeros = {
        "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "mlp.c_fc.weight": (mlp_width, width), "mlp.c_fc.bias": (mlp_width,),
        "mlp.c_proj.weight": (width, mlp_width), "mlp.c_proj.bias": (width,),
    }
    return {f"transformer.resblocks.{index}.{k}": torch.zeros(shape, dtype=dtype) for k, shape in zeros.items()}


def split_original(state: dict, family: str) -> dict[str, dict]:
    """Group a single file's tensors by component (prefixes removed); other keys (EMA copies,
    schedule buffers such as `alphas_cumprod`, the VAE's training loss) are left out."""
    parts = {component: {} for component in ORIGINAL_PREFIXES[family]}
    for key, tensor in state.items():
        if key.startswith(TRAINING_ONLY):
            continue
        for component, prefix in ORIGINAL_PREFIXES[family].items():
            if key.startswith(prefix):
                parts[component][key[len(prefix):]] = tensor
                break
    return parts


def original_to_diffusers(state: dict, family: str, configs: dict) -> dict[str, dict]:
    """A single file's tensors -> {component: diffusers-named tensors}. `configs` maps components
    to their sdlite configs (UNetConfig, VAEConfig, CLIPConfig)."""
    parts = split_original(state, family)
    out = {"unet": unet_to_diffusers(parts["unet"], configs["unet"]),
           "vae": vae_to_diffusers(parts["vae"], configs["vae"])}
    for component in ("text_encoder", "text_encoder_2"):
        if component not in parts:
            continue
        config = configs[component]
        if ORIGINAL_PREFIXES[family][component] in OPENCLIP_PREFIXES:
            out[component] = openclip_to_diffusers(parts[component], config.num_hidden_layers, config.with_projection)
        else:
            out[component] = hf_clip_to_diffusers(parts[component])
    return out


def diffusers_to_original(components: dict[str, dict], family: str, configs: dict) -> dict:
    """{component: diffusers-named tensors} -> one single-file state dict; inverse of
    `original_to_diffusers`. SD 2.x's 23-layer text encoder gets an identity 24th layer (see
    `identity_openclip_layer`)."""
    out = {}
    for component, prefix in ORIGINAL_PREFIXES[family].items():
        state, config = components[component], configs[component]
        if component == "unet":
            mapped = unet_to_original(state, config)
        elif component == "vae":
            mapped = vae_to_original(state, config)
        elif prefix in OPENCLIP_PREFIXES:
            mapped = openclip_to_original(canonical_state(state, "CLIPTextModel"), config.num_hidden_layers)
            if family == "sd2" and config.num_hidden_layers == SD2_TEXT_LAYERS:
                dtype = state[next(iter(state))].dtype
                mapped |= identity_openclip_layer(config.num_hidden_layers, config.hidden_size,
                                                  config.intermediate_size, dtype)
        else:
            mapped = hf_clip_to_original(canonical_state(state, "CLIPTextModel"))
        out |= {prefix + k: t for k, t in mapped.items()}
    return out
