"""The KL autoencoder of latent diffusion (Rombach et al. 2022), matching diffusers' AutoencoderKL
and its weight names (`encoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`).

Encoder: conv_in, down blocks (resnets, stride-2 conv), mid block (resnet, self-attention,
resnet), GroupNorm-act-conv_out to 2*latent channels (mean, logvar), quant_conv.
Decoder: post_quant_conv, conv_in, mid block, up blocks (resnets, x2 nearest + conv), conv_out.
No latent scaling happens here: the pipeline multiplies/divides by `config.scaling_factor`.
"""

import torch
from torch import nn

from .config import VAEConfig
from .layers import Attention, Conv2d, Downsample2D, ResnetBlock2D, Upsample2D, activation, unpacked

EPS = 1e-6  # every GroupNorm in the VAE


class DiagonalGaussian:
    """diffusers' DiagonalGaussianDistribution over the latents, from the (B, 2*C, h, w) moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn as diffusers' randn_tensor does (on the generator's
        device, in the latents' dtype), so the same seed gives the same latents."""
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class VAEAttention(Attention):
    """Single-head self-attention over the H*W pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, bias=True, upcast=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); x may be channels-last
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, (attention), resnet."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        g, act = config.norm_num_groups, config.act_fn
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, g, EPS, act) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(channels, g)]) if config.mid_block_add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """DownEncoderBlock2D."""

    def __init__(self, cin: int, cout: int, config: VAEConfig, add_downsample: bool):
        super().__init__()
        g, act = config.norm_num_groups, config.act_fn
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, None, g, EPS, act) for i in range(config.layers_per_block)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    """UpDecoderBlock2D: one more resnet than the encoder blocks."""

    def __init__(self, cin: int, cout: int, config: VAEConfig, add_upsample: bool):
        super().__init__()
        g, act = config.norm_num_groups, config.act_fn
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, None, g, EPS, act) for i in range(config.layers_per_block + 1)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, n = config.block_out_channels, len(config.block_out_channels)
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], config, add_downsample=i < n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[-1], eps=EPS)
        self.conv_act = activation(config.act_fn)
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        rch, n = config.block_out_channels[::-1], len(config.block_out_channels)
        self.conv_in = Conv2d(config.latent_channels, rch[0], 3, padding=1)
        self.mid_block = MidBlock(rch[0], config)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(rch[max(j - 1, 0)], rch[j], config, add_upsample=j < n - 1) for j in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, rch[-1], eps=EPS)
        self.conv_act = activation(config.act_fn)
        self.conv_out = Conv2d(rch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(lc, lc, 1) if config.use_post_quant_conv else None
        # A VAE runs once per image: packing its weights made SD 2.1's first decode at 256 px
        # slower (2.24 against 2.15 s) and its peak RSS 360 MB higher, for 4.5% on later decodes.
        unpacked(self)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of downscale_factor -> latent distribution."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w), unscaled -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
