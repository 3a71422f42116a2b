"""Building blocks shared by the UNet and the VAE: multi-head attention (SDPA), the sinusoidal
timestep embedding, and the activation table. Weight names follow diffusers' `Attention`."""

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(hs)) v, on (B, L, heads*hs)
    inputs; returns (B, Lq, heads*hs). `upcast` runs it in fp32 for fp16/bf16 inputs (diffusers'
    `upcast_attention`, needed by SD 2.1-768 in half precision)."""
    B, Lq, C = q.shape
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    q = q.view(B, Lq, heads, -1).transpose(1, 2)  # (B, nh, Lq, hs)
    k = k.view(B, k.shape[1], heads, -1).transpose(1, 2)  # (B, nh, Lk, hs)
    v = v.view(B, v.shape[1], heads, -1).transpose(1, 2)  # (B, nh, Lk, hs)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Lq, hs)
    return out.transpose(1, 2).reshape(B, Lq, C).to(dtype)


class Attention(nn.Module):
    """diffusers' `Attention` on token sequences: to_q / to_k / to_v, then to_out.0.
    Self-attention when `context` is None, else cross-attention to `context` (B, Lk, context_dim)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0 as in diffusers (1 was dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[0](out)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in fp32, as diffusers' `get_timestep_embedding`
    (DDPM / "Attention Is All You Need" positional encoding). Timesteps may be fractional."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D ("default" time embedding): GroupNorm-act-conv twice, the time
    embedding added in between, 1x1 conv shortcut when the channel count changes."""

    def __init__(self, cin: int, cout: int, temb_dim: int | None, groups: int, eps: float, act: str = "silu"):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.act = activation(act)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(self.act(temb))[:, :, None, None]  # temb (B, T) -> (B, C, 1, 1)
        h = self.conv2(self.act(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 (the VAE) pads only right and bottom, as diffusers does."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `size`, for odd latent sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
