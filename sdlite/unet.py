"""The Stable Diffusion UNet (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"), matching diffusers' UNet2DConditionModel for SD 1.x, SD 2.x and SDXL configs,
with identical weight names (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`).

SD 1.5 read as a table (channels c = block_out_channels, L = layers_per_block = 2):

    conv_in                 4 -> 320
    down_blocks.0  CrossAttnDown  320, 2 x (resnet + transformer), downsample   64 -> 32
    down_blocks.1  CrossAttnDown  640, 2 x (resnet + transformer), downsample   32 -> 16
    down_blocks.2  CrossAttnDown 1280, 2 x (resnet + transformer), downsample   16 -> 8
    down_blocks.3  Down          1280, 2 x resnet                               8
    mid_block                    1280, resnet, transformer, resnet
    up_blocks.0    Up            1280, 3 x resnet (skip concat), upsample        8 -> 16
    up_blocks.1    CrossAttnUp   1280, 3 x (resnet + transformer), upsample     16 -> 32
    up_blocks.2    CrossAttnUp    640, 3 x (resnet + transformer), upsample     32 -> 64
    up_blocks.3    CrossAttnUp    320, 3 x (resnet + transformer)               64
    conv_norm_out, act, conv_out  320 -> 4

Every resnet gets the timestep embedding; every transformer cross-attends to the text states.
SDXL adds `add_embedding` of (pooled text embeds, sinusoidal size/crop ids) to the time embedding.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import (Attention, Conv2d, Downsample2D, Linear, ProjectedContext, ResnetBlock2D, Upsample2D, activation,
                     context_rows, repeat_samples, repeats, timestep_embedding)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020, "GLU Variants Improve Transformer"): one projection to 2*inner,
    half of it gated by the GELU of the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU then the projection back; over at most `chunk_tokens` tokens at a time when set
    (`chunk_feed_forward`), since its hidden activations are the UNet's largest."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Keys "0" and "2" keep diffusers' names ff.net.0.proj / ff.net.2 (its net.1 is a dropout).
        self.net = nn.ModuleDict({"0": GEGLU(dim, mult * dim), "2": Linear(mult * dim, dim)})
        self.chunk_tokens = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens is None or x.shape[1] <= self.chunk_tokens:
            return self.net["2"](self.net["0"](x))
        return torch.cat([self.net["2"](self.net["0"](part)) for part in x.split(self.chunk_tokens, dim=1)], dim=1)


def chunk_feed_forward(unet: nn.Module, tokens: int | None) -> None:
    """Run `unet`'s feed-forward layers over at most `tokens` tokens at a time (None: all at
    once), as diffusers' `enable_forward_chunking`: the same results (up to float rounding) in
    less memory. SD 2.1 at 512 px: the GEGLU's hidden activations for 4,096 tokens take 168 MB at
    batch 2; slices of 1,024 tokens cut the peak RSS of 6-bit jit low-memory generation from
    1,465 to 1,377 MiB."""
    for module in unet.modules():
        if isinstance(module, FeedForward):
            module.chunk_tokens = tokens


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, only_cross: bool, upcast: bool):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, context_dim if only_cross else None, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (b, L, dim) tokens of b samples, for a context of b or k*b rows (`repeat_samples`)."""
        rows = context_rows(context)
        if self.only_cross:
            x = repeat_samples(x, rows)
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = repeat_samples(x, rows)  # the text makes the samples differ from here on
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, proj_in (1x1 conv, or Linear for SD 2.x/SDXL), a stack of
    BasicTransformerBlocks over the H*W tokens, proj_out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig, only_cross: bool):
        super().__init__()
        self.linear = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        proj = (lambda: Linear(channels, channels)) if self.linear else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, config.cross_attention_dim, only_cross, config.upcast_attention)
            for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C) tokens
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.view(h.shape[0], H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W); B the context's (`repeat_samples`)
        if not self.linear:
            h = self.proj_out(h)
        return repeat_samples(x, h.shape[0]) + h


def transformer_stack(channels: int, level: int, n: int, c: UNetConfig) -> nn.ModuleList:
    """The `n` cross-attention transformers of a block at `level` (down-order index)."""
    return nn.ModuleList(
        Transformer2DModel(channels, c.num_attention_heads[level], c.transformer_layers_per_block[level], c,
                           c.only_cross_attention[level])
        for _ in range(n)
    )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D. Returns the output and the skip
    tensors (one per resnet, plus the downsampled output)."""

    def __init__(self, cin: int, cout: int, level: int, config: UNetConfig, add_downsample: bool):
        super().__init__()
        c, n = config, config.layers_per_block[level]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, c.time_embed_dim, c.norm_num_groups, c.norm_eps, c.act_fn)
            for i in range(n)
        )
        cross = c.down_block_types[level] == "CrossAttnDownBlock2D"
        self.attentions = transformer_stack(cout, level, n, c) if cross else None
        self.downsamplers = nn.ModuleList([Downsample2D(cout, c.downsample_padding)]) if add_downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: each resnet first concatenates a skip tensor from the
    matching down block (channels: prev + skip -> cout)."""

    def __init__(self, prev: int, cout: int, cskip_last: int, level: int, config: UNetConfig, add_upsample: bool):
        super().__init__()
        c = config
        rlevel = len(c.block_out_channels) - 1 - level  # index into the per-level (down order) tuples
        n = c.layers_per_block[rlevel] + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev if i == 0 else cout) + (cskip_last if i == n - 1 else cout), cout,
                          c.time_embed_dim, c.norm_num_groups, c.norm_eps, c.act_fn)
            for i in range(n)
        )
        cross = c.up_block_types[level] == "CrossAttnUpBlock2D"
        self.attentions = transformer_stack(cout, rlevel, n, c) if cross else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_upsample else None

    def forward(self, x, temb, context, skips: list, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, repeat_samples(skips.pop(), x.shape[0])], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet at the lowest resolution."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        c, ch = config, config.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(ch, ch, c.time_embed_dim, c.norm_num_groups, c.norm_eps, c.act_fn) for _ in range(2)
        )
        self.attentions = nn.ModuleList(
            [Transformer2DModel(ch, c.num_attention_heads[-1], c.transformer_layers_per_block[-1], c, False)]
        )

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class TimestepEmbedding(nn.Module):
    """MLP on a sinusoidal embedding: linear_1, act, linear_2."""

    def __init__(self, cin: int, dim: int, act: str):
        super().__init__()
        self.linear_1 = Linear(cin, dim)
        self.act = activation(act)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.block_out_channels
        n = len(ch)
        self.conv_in = Conv2d(c.in_channels, ch[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim, c.act_fn)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim, c.act_fn)
        # Down: level i maps ch[i-1] -> ch[i]; all but the last halve the resolution.
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], i, c, add_downsample=i < n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(c) if c.mid_block_type is not None else None
        # Up: deepest first; level j outputs rch[j], its last resnet takes the skip from rch[j+1].
        rch = ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rch[max(j - 1, 0)], rch[j], rch[min(j + 1, n - 1)], j, c, add_upsample=j < n - 1)
            for j in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_act = activation(c.act_fn)
        self.conv_out = Conv2d(ch[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)
        self.cuda_graphs = None  # a sdlite.graphs.CUDAGraphs, set by the pipeline on CUDA

    def time_embed(self, timestep, B: int, dtype: torch.dtype, device, added_cond: dict | None) -> torch.Tensor:
        """(B, time_embed_dim) conditioning vector from the timestep (and SDXL's added_cond); (1, ...)
        when one timestep serves the whole batch."""
        c = self.config
        t = torch.as_tensor(timestep, device=device)
        if t.numel() not in (1, B):
            raise ValueError(f"timestep: one value, or one per text context ({B}), not {t.numel()}")
        # One timestep for the whole batch stays (1, D) and broadcasts in the resnets: the same
        # numbers, and the batch size is not baked into a traced graph (OpenVINO reshapes it).
        t = t.reshape(-1) if t.numel() == 1 else t.expand(B)
        emb = self.time_embedding(timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos,
                                                     c.freq_shift).to(dtype))
        if c.addition_embed_type == "text_time":
            if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this UNet (SDXL) needs added_cond={'text_embeds': (B, D), 'time_ids': (B, 6)}")
            text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
            time_embeds = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                             c.freq_shift).reshape(text_embeds.shape[0], -1)  # (B, 6*256)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                added_cond: dict | None = None) -> torch.Tensor:
        """sample (B, C, H, W) latents, any H and W; timestep a number or (B,) tensor, may be
        fractional; encoder_hidden_states (B, T, cross_attention_dim), or a `ProjectedContext` of them
        to reuse from step to step. Returns (B, out_channels, H, W). The sample may also have B/k
        rows that all k texts share, as torch.cat([sample] * k) would give them (classifier-free
        guidance): with one timestep and no per-sample conditioning (SDXL's), layers run on them
        once until the text reaches them (`layers.repeat_samples`).
        With `cuda_graphs` set (sdlite.graphs), CUDA calls in inference mode replay CUDA graphs."""
        if self.cuda_graphs is None or not sample.is_cuda or not torch.is_inference_mode_enabled():
            return self.run(sample, timestep, encoder_hidden_states, added_cond)
        names = sorted(added_cond or {})  # SDXL's added conditioning: more inputs of the graph

        def call(x, t, context, *added):
            return self.run(x, t, context, dict(zip(names, added)) or None)

        t = torch.as_tensor(timestep, device=sample.device)  # the graph reads it from the GPU
        if isinstance(encoder_hidden_states, ProjectedContext):  # the graph records the projections
            encoder_hidden_states = encoder_hidden_states.states
        return self.cuda_graphs(call, sample, t, encoder_hidden_states, *(added_cond[k] for k in names))

    def run(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
            added_cond: dict | None = None) -> torch.Tensor:
        """`forward`'s work, call by call."""
        context = encoder_hidden_states
        rows = context_rows(context)
        repeats(sample.shape[0], rows)  # bad batches fail here, not in the first cross-attention
        emb = self.time_embed(timestep, rows, sample.dtype, sample.device, added_cond)
        if emb.shape[0] != 1:  # conditioning per sample: the samples differ from the first layer on
            sample = repeat_samples(sample, rows)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, context)
            skips += s
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            # Upsample to the next skip's size, so odd latent sizes (e.g. 5x8) line up.
            size = skips[-1].shape[2:] if block.upsamplers is not None else None
            x = block(x, emb, context, block_skips, size)
        # (repeated here only where the text reached no layer)
        return repeat_samples(self.conv_out(self.conv_act(self.conv_norm_out(x))), rows)
