"""Typed configs for sdlite's networks, built from a checkpoint's config.json.

`CLIPConfig` mirrors transformers' CLIPTextConfig, `UNetConfig` diffusers' UNet2DConditionModel and
`VAEConfig` diffusers' AutoencoderKL. `from_json` takes the parsed json dict, ignores keys we do not
need, normalises diffusers' int-or-list fields to per-block tuples, and raises `ValueError` naming
the field for any value sdlite does not implement (rather than silently building a different net).
"""

from dataclasses import dataclass


def _unsupported(field: str, value, supported) -> ValueError:
    return ValueError(f"unsupported {field}={value!r} (sdlite supports {supported})")


def _per_block(value, n: int, field: str) -> tuple:
    """diffusers allows an int (same for every block) or a per-block list for many fields."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{field} has {len(value)} entries but there are {n} blocks")
        return tuple(value)
    return (value,) * n


def _lists(d: dict, *fields: str) -> list[tuple]:
    """Fields a config must have, each a list (one entry per block), as tuples."""
    for field in fields:
        if not isinstance(d.get(field), (list, tuple)):
            raise ValueError(f"the config needs {field}, a list per block; got {d.get(field)!r}")
    return [tuple(d[field]) for field in fields]


def _require(d: dict, field: str, allowed: tuple) -> None:
    """Raise unless d[field] (absent counts as None) is one of `allowed`."""
    value = d.get(field)
    if value not in allowed:
        raise _unsupported(field, value, " or ".join(repr(a) for a in allowed))


ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408  # token embedding rows
    hidden_size: int = 768  # width D of the transformer
    intermediate_size: int = 3072  # MLP hidden width
    num_attention_heads: int = 12  # heads per self-attention
    num_hidden_layers: int = 12  # encoder layers
    max_position_embeddings: int = 77  # learned positions = longest token sequence
    hidden_act: str = "quick_gelu"  # MLP activation: "quick_gelu" (SD 1.x) or "gelu" (SD 2.x, SDXL bigG)
    layer_norm_eps: float = 1e-5  # eps of every LayerNorm
    projection_dim: int = 768  # width of text_projection (only used with a projection)
    eos_token_id: int = 49407  # pooled output is taken at the first eos token (argmax id if this is 2)
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL text_encoder_2): adds text_projection

    @classmethod
    def from_json(cls, d: dict, with_projection: bool | None = None) -> "CLIPConfig":
        """From a transformers CLIPTextConfig json. `with_projection` defaults to whether
        "architectures" names CLIPTextModelWithProjection."""
        if d.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise _unsupported("hidden_act", d["hidden_act"], "'quick_gelu' or 'gelu'")
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                 "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "eos_token_id")
        config = cls(**{k: d[k] for k in names if d.get(k) is not None}, with_projection=with_projection)
        if config.num_attention_heads < 1 or config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size={config.hidden_size} is not divisible by "
                             f"num_attention_heads={config.num_attention_heads}")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # prediction channels out
    sample_size: int = 64  # default latent size (pixels / 8) the model was trained at
    block_out_channels: tuple = (320, 640, 1280, 1280)  # channels of each resolution level
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # one per level
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # one per level, deepest first
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # or None: no mid block
    layers_per_block: tuple = (2, 2, 2, 2)  # resnets per down block (up blocks have one more)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)  # BasicTransformerBlocks per attention, per level
    num_attention_heads: tuple = (8, 8, 8, 8)  # heads per level (diffusers' misnamed attention_head_dim)
    cross_attention_dim: int = 768  # width of encoder_hidden_states
    only_cross_attention: tuple = (False,) * 4  # per level: attn1 attends to the text instead of itself
    use_linear_projection: bool = False  # proj_in/proj_out: Linear (SD 2.x, SDXL) or 1x1 conv (SD 1.x)
    upcast_attention: bool = False  # compute attention in fp32 when running in fp16/bf16
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # eps of the resnet and output GroupNorms
    act_fn: str = "silu"  # resnet / time embedding activation
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin] instead of [sin, cos]
    freq_shift: int = 0  # downscale_freq_shift of the timestep embedding frequencies
    downsample_padding: int = 1  # padding of the stride-2 downsample conv (0: pad right/bottom by 1)
    conv_in_kernel: int = 3  # kernel size of conv_in
    conv_out_kernel: int = 3  # kernel size of conv_out
    addition_embed_type: str | None = None  # "text_time" (SDXL: pooled text + size/crop ids) or None
    addition_time_embed_dim: int | None = None  # sinusoidal width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # add_embedding input width (SDXL: 2816)

    @classmethod
    def from_json(cls, d: dict) -> "UNetConfig":
        """From a diffusers UNet2DConditionModel config.json dict."""
        down, up, channels = _lists(d, "down_block_types", "up_block_types", "block_out_channels")
        n = len(channels)
        for field, types, allowed in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
            if len(types) != n:
                raise ValueError(f"{field} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise _unsupported(field, t, " / ".join(allowed))
        if "mid_block_type" in d:  # absent means diffusers' default, UNetMidBlock2DCrossAttn
            _require(d, "mid_block_type", MID_BLOCKS)
        for field in ("class_embed_type", "num_class_embeds", "time_cond_proj_dim", "encoder_hid_dim",
                      "encoder_hid_dim_type", "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act",
                      "cross_attention_norm", "reverse_transformer_layers_per_block"):
            _require(d, field, (None,))
        for field, ok in (("attention_type", "default"), ("time_embedding_type", "positional"),
                          ("resnet_time_scale_shift", "default"), ("center_input_sample", False),
                          ("dual_cross_attention", False), ("resnet_skip_time_act", False),
                          ("mid_block_scale_factor", 1), ("resnet_out_scale_factor", 1)):
            if d.get(field, ok) != ok:
                raise _unsupported(field, d[field], repr(ok))
        _require(d, "addition_embed_type", (None, "text_time"))
        if d.get("act_fn", "silu") not in ACTIVATIONS:
            raise _unsupported("act_fn", d["act_fn"], "/".join(ACTIVATIONS))
        if isinstance(d.get("cross_attention_dim", 768), (list, tuple)):
            raise _unsupported("cross_attention_dim", d["cross_attention_dim"], "a single int")
        # diffusers quirk: in SD configs `attention_head_dim` is really the number of heads.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        config = cls(
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_per_block(d.get("layers_per_block", 2), n, "layers_per_block"),
            transformer_layers_per_block=_per_block(d.get("transformer_layers_per_block", 1), n,
                                                    "transformer_layers_per_block"),
            num_attention_heads=_per_block(heads, n, "attention_head_dim"),
            only_cross_attention=_per_block(d.get("only_cross_attention", False), n, "only_cross_attention"),
            **{k: d[k] for k in ("in_channels", "out_channels", "sample_size", "mid_block_type", "cross_attention_dim",
                                 "use_linear_projection", "upcast_attention", "norm_num_groups", "norm_eps", "act_fn",
                                 "flip_sin_to_cos", "freq_shift", "downsample_padding", "conv_in_kernel",
                                 "conv_out_kernel", "addition_embed_type", "addition_time_embed_dim",
                                 "projection_class_embeddings_input_dim") if k in d},
        )
        for c, h in zip(config.block_out_channels, config.num_attention_heads):
            if not isinstance(h, int) or h < 1:
                raise ValueError(f"attention heads must be positive integers, got {h!r} (attention_head_dim)")
            if c % h:
                raise ValueError(f"block channels {c} not divisible by attention heads {h} (attention_head_dim)")
        if config.addition_embed_type == "text_time" and None in (
                config.addition_time_embed_dim, config.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        return config

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def downscale_factor(self) -> int:
        """Latent H and W are padded/upsampled to multiples of this inside the net (any size works)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        """Needs added_cond={"text_embeds", "time_ids"} in forward."""
        return self.addition_embed_type == "text_time"


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded image channels
    latent_channels: int = 4  # channels of the latent z
    block_out_channels: tuple = (128, 256, 512, 512)  # channels per level (encoder order)
    layers_per_block: int = 2  # resnets per encoder block (decoder blocks have one more)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    act_fn: str = "silu"  # activation everywhere
    sample_size: int = 512  # pixel size the VAE was trained at
    scaling_factor: float = 0.18215  # latents fed to the UNet are z * scaling_factor (SDXL: 0.13025)
    shift_factor: float | None = None  # latents are (z - shift) * scale when set (not used by SD 1/2/XL)
    force_upcast: bool = True  # the VAE overflows in fp16: SDXL decodes it in fp32
    use_quant_conv: bool = True  # 1x1 conv on the encoder moments
    use_post_quant_conv: bool = True  # 1x1 conv on z before decoding
    mid_block_add_attention: bool = True  # self-attention in the encoder/decoder mid blocks

    @classmethod
    def from_json(cls, d: dict) -> "VAEConfig":
        """From a diffusers AutoencoderKL config.json dict."""
        for field, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for t in d.get(field, ()):
                if t != ok:
                    raise _unsupported(field, t, repr(ok))
        (channels,) = _lists(d, "block_out_channels")
        n = len(channels)
        for field in ("down_block_types", "up_block_types"):
            if field in d and len(d[field]) != n:
                raise ValueError(f"{field} has {len(d[field])} entries but block_out_channels has {n}")
        if d.get("act_fn", "silu") not in ACTIVATIONS:
            raise _unsupported("act_fn", d["act_fn"], "/".join(ACTIVATIONS))
        for field in ("latents_mean", "latents_std"):
            _require(d, field, (None,))
        if not isinstance(d.get("layers_per_block", 2), int):
            raise _unsupported("layers_per_block", d["layers_per_block"], "an int")
        names = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "act_fn",
                 "sample_size", "scaling_factor", "shift_factor", "force_upcast", "use_quant_conv",
                 "use_post_quant_conv", "mid_block_add_attention")
        return cls(block_out_channels=channels, **{k: d[k] for k in names if k in d})

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along H and W (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)
