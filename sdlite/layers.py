"""Building blocks shared by the UNet, the VAE and the text encoders: a Linear layer that runs
CPU inference on oneDNN (prepacked weights, or plain ones in networks run once per image,
`unpacked`), a Conv2d that also takes large weights kept at rest in slices, multi-head attention
(SDPA, or oneDNN GEMMs for long sequences on CPUs where MKL is slow), the text context a
generation keeps (`ProjectedContext`) and the latents its texts share (`repeat_samples`), the
resnet, down- and upsampling blocks, the sinusoidal timestep embedding and the activation table.
Weight names follow diffusers'.

Convolutions run on prepacked weights as well, and their activations stay channels-last from
one to the next, which oneDNN takes without re-laying them out: an SD 2.1 UNet call at 256 px
took 1.46 against 1.51 s (Intel Xeon, in-process A/B), for 0.2 s more in the first call. (Packed
convolutions whose outputs were copied back to NCHW had been slower on an AMD EPYC.) The VAE
keeps plain ones (`unpacked`; sdlite.vae says why). Most 3x3 convolutions run neither
way: those of at least 128 channels in and out on inputs at least 8 pixels a side use
Winograd's algorithm (`sdlite.winograd`, where sdlite's C kernels are built; the weights
transformed once and kept, or per call from 16 pixels a side), those on inputs of at most 64
pixels below that (such as 4x4) one GEMM (`Conv2d`)."""

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, winograd
from .memory import Slices, release_pages


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) that runs CPU fp32 inference on oneDNN, with a
    prepacked copy of its weight: oneDNN otherwise re-lays-out the weight on every call. The copy
    is made on first use and made again if the weight is replaced or changed in place (not
    through `.data`, nor when the weight is itself an inference tensor); weights
    materialised per call, and those of layers with `prepack` False, are not packed
    (`onednn_weight`). With autograd recording, on other devices or dtypes it is plain nn.Linear.

    Networks run once per image (the text encoders, the VAE) set `prepack` False (`unpacked`):
    oneDNN on the plain weight still beats PyTorch's BLAS, which takes its AVX2 path on AMD CPUs.
    SD 2.1's text encoder on two prompts (AMD EPYC, 2 threads): 0.55 s a first call and 0.50-0.53
    s later ones, against 0.68-0.97 and 0.58-0.75 s with nn.Linear, and 1.29 and 0.49-0.50 s packed."""

    prepack = True  # False: nothing kept packed (networks run once per image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = onednn_weight(self, x, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))
        if weight is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, self.bias, "none", [], "")


def runs_on_onednn(*tensors: torch.Tensor) -> bool:
    """Whether a call on `tensors` (its input and weights) may use oneDNN's own ops (packed linear
    weights, `onednn_attention`, `Conv2d`'s GEMM and Winograd's GEMMs), which autograd does not
    see through: CPU fp32 tensors, oneDNN available, nothing for autograd to record, not tracing
    or compiling (exporters and compilers see the plain ops)."""
    # Tracing and compiling are asked first: torch.compile does not trace mkldnn.is_available
    # (a graph break in every layer).
    return (not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and kernels.cpu_fp32(*tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and torch.backends.mkldnn.is_available())


def layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """The weight and, where there is one, the bias: what `runs_on_onednn` asks about with the input
    (a bias that autograd records keeps the layer on torch's ops)."""
    return [layer.weight] + ([] if layer.bias is None else [layer.bias])


def materialised(layer: nn.Module) -> bool:
    """Whether `layer.weight` is made for each call (sdlite.memory's weights at rest), not its
    parameter."""
    return layer._parameters.get("weight") is not layer.weight


def onednn_weight(layer: nn.Module, x: torch.Tensor, pack, form=None):
    """The weight oneDNN takes for `layer`'s call on input `x`: `pack(weight)`, kept; or None
    where oneDNN does not apply (autograd, non-CPU, non-fp32, no oneDNN, tracing or compiling).
    `form` names what `pack` makes, where a layer has more than one (`Conv2d`): one is kept.

    A parameter's prepacked copy is kept and made again when the parameter is replaced or its
    version counter moves (in-place changes, but not through `.data`; an inference tensor has none). A
    weight that is not a parameter is materialised per call (sdlite.memory's weights at rest) and
    goes to oneDNN as it is: laying it out within the call is faster than packing it first (SD
    2.1's linear shapes at 512 px, the weight rewritten before each call: 287 against 332 ms for
    one of each), and the copy would be used once. So does the weight of a layer whose `prepack`
    is False."""
    w = layer.weight
    if not runs_on_onednn(x, *layer_tensors(layer)):
        return None
    if materialised(layer) or not layer.prepack:
        return w
    try:
        key = (w.data_ptr(), w._version, form)
    except RuntimeError:  # an inference tensor has no version counter
        key = (w.data_ptr(), None, form)
    # (weak reference to the weight, its key, packed weight, the weight's storage); not a buffer,
    # so no state_dict entry. The weight must be the same tensor, at the same address, unmodified.
    # Holding the storage keeps its address from going to another tensor while the copy is kept:
    # a weight swapped in through `.data` could otherwise land where a freed one was packed from.
    state = layer.__dict__.get("_packed")
    if state is not None and state[0]() is w and state[1] == key:
        return state[2]
    layer.__dict__["_packed"] = None  # free the old copy first
    with torch.no_grad():
        packed = pack(w.detach())
    layer.__dict__["_packed"] = (weakref.ref(w), key, packed, w.untyped_storage())
    release_pages([w])  # the packed copy is what runs from now on
    return packed


def packed_form(layer: nn.Module):
    """The `form` of the copy `onednn_weight` keeps for `layer` (None: none kept, or unnamed)."""
    state = layer.__dict__.get("_packed")
    return None if state is None else state[1][-1]


SMALL_INPUT = 64  # 3x3 convolutions on inputs of at most this many pixels run as one GEMM (`Conv2d`)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) that also takes its weight as `Slices` of output
    channels (large palettized weights kept at rest, `sdlite.memory`): the slices' convolutions,
    concatenated.

    For CPU fp32 inference, a 3x3 convolution (stride 1, zero padding 1) of at least
    `winograd.MIN_CHANNELS` channels in and out on an input at least `winograd.F2_SIDE` pixels a
    side runs, where sdlite's C kernels are built, with Winograd's algorithm (`sdlite.winograd`:
    2.2-4x fewer multiplications). Its weights are transformed at the first call and kept (the
    tiling chosen then is kept for any other size). Weights that are not kept, because `prepack`
    is False, `winograd` is "per call" or the weight is materialised per call (kept at rest),
    are transformed in each call that is large enough to pay for it (`winograd.ONCE_SIDE`) and
    dropped; `winograd` None keeps the layer off it. Otherwise, on an input of at most `SMALL_INPUT`
    pixels it runs as one oneDNN GEMM of the input's 3x3 patches by the weight
    viewed as a matrix (`patches_by_weight`, transposed for few patches). On small inputs oneDNN's
    direct convolution spends its time laying out the weight: SD 2.1's 1280-channel convolutions
    at batch 2 took 3.9 against 7.8 ms on 4x4 inputs and 12.9 against 16.5 ms on 8x8 (an earlier
    AMD EPYC); on 16x16 the GEMM was 1.6x slower. (Prepacking the matrix saved another 5-15% a
    call but cost about 0.6 s in the first UNet call.)

    Other convolutions run on a prepacked copy of the weight (`onednn_weight`), as `Linear`
    does, and give channels-last outputs, which the next convolution takes without a re-layout;
    unless `prepack` is False."""

    takes_slices = True
    prepack = True  # False: nothing kept packed or transformed (the VAE's, run once per image)
    winograd = "kept"  # or "per call" (weights transformed in each call), or None (`limit_winograd`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if isinstance(w, Slices):
            x = x.contiguous()  # NCHW, as for other weights materialised per call (below)
            return torch.cat([self._conv_forward(x, part, None if b is None else b[start:stop])
                              for start, stop, part in w], dim=1)
        if self.winograd and runs_on_onednn(x, *layer_tensors(self)):
            keeps = self.prepack and self.winograd == "kept" and not materialised(self)
            kept = packed_form(self) if keeps else None
            tiling = winograd.tiling(self, x, kept if isinstance(kept, winograd.Tiling) else None, once=not keeps)
            if tiling is not None and keeps:
                weights = onednn_weight(self, x, lambda w: winograd.transform_weight(w, tiling), form=tiling)
                return winograd.conv(x, weights, b, tiling)
            if tiling is not None:
                return winograd.conv(x, winograd.transform_weight(w, tiling, pack=False), b, tiling)
        if self.runs_as_gemm(x):
            B, C, H, W = x.shape
            # The 3x3 patches gathered in one copy straight into the GEMM's (B*H*W, C*9) rows, in
            # the weight's (C, 3, 3) order: 1.9% faster a UNet call than unfold and a transpose.
            padded = F.pad(x, (1, 1, 1, 1))
            sB, sC, sH, sW = padded.stride()
            patches = padded.as_strided((B, H, W, C, 3, 3), (sB, sH, sW, sC, sH, sW)).reshape(B * H * W, C * 9)
            y = patches_by_weight(patches, w.reshape(len(w), -1), b)
            return y.view(B, H, W, -1).permute(0, 3, 1, 2)  # channels-last, as the packed convolutions
        if not self.prepack or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        weight = onednn_weight(self, x, lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, x.shape))
        if weight is None:
            return super().forward(x)
        if weight is w:  # materialised for this call (at rest): oneDNN lays such weights out
            return super().forward(x.contiguous())  # faster for NCHW inputs (1280 channels: 63 vs 88 ms)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, b, self.padding, self.stride, self.dilation,
                                                       self.groups, "none", [], "")

    def runs_as_gemm(self, x: torch.Tensor) -> bool:
        """Whether this call runs as one GEMM: CPU fp32 inference (nothing for autograd to record)
        on an input of at most `SMALL_INPUT` pixels, a 3x3 convolution, stride 1, zero padding 1."""
        return (x.dim() == 4 and x.shape[-2] * x.shape[-1] <= SMALL_INPUT and runs_on_onednn(x, *layer_tensors(self))
                and self.same_size_3x3())

    def same_size_3x3(self) -> bool:
        """A 3x3 convolution, stride 1, zero padding 1, no dilation or groups: the output the input's
        size (what the GEMM of patches and Winograd's algorithm compute)."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros")


FEW_ROWS = 64  # a GEMM of patches with at most this many rows runs transposed (`patches_by_weight`)


def patches_by_weight(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """patches @ weight^T + bias as a contiguous (rows, output channels) matrix, on oneDNN, for a
    plain (output channels, C*9) weight that is not kept packed. oneDNN lays out its second
    operand in every call; with at most `FEW_ROWS` rows the product runs transposed, weight @
    patches^T, so that operand is the few patches, not the weight. SD 2.1's 1280-channel
    convolutions at 4x4, batch 2 (32 rows; 2 threads, AMD EPYC): 4.9 against 6.4 ms, 9.8 against
    12.6 ms with 2560 channels in. The gain shrinks with the rows: 10% at 64, none at 128 (and
    linear layers' smaller weights lost from 154 rows), hence the limit."""
    gemm = torch.ops.mkldnn._linear_pointwise
    if len(patches) > FEW_ROWS:
        return gemm(patches, weight, bias, "none", [], "")
    product = gemm(weight, patches, None, "none", [], "").t()
    # contiguous rows, which the caller views as (B, H, W, channels): an add to the transposed
    # product would keep its strides
    out = product.new_empty(product.shape)
    return out.copy_(product) if bias is None else torch.add(product, bias, out=out)


def unpacked(network: nn.Module) -> nn.Module:
    """`network` with `prepack` False in its `Linear` and `Conv2d` layers: nothing kept packed or
    transformed, for networks run once per image (the text encoders, the VAE)."""
    for module in network.modules():
        if isinstance(module, (Linear, Conv2d)):
            module.prepack = False
    return network


def limit_winograd(network: nn.Module, use: str | None) -> nn.Module:
    """`network` with its convolutions' `Conv2d.winograd` set to `use`: "per call" (the transformed
    weights, 1.8-4x the weights' memory, made for each call and dropped; calls under
    `winograd.ONCE_SIDE` pixels a side still keep a packed copy of the weight, its own size) or
    None (not at all). Transformed weights kept so far are dropped."""
    if use not in ("kept", "per call", None):
        raise ValueError(f"Winograd's algorithm is used 'kept', 'per call' or None, not {use!r}")
    for module in network.modules():
        if isinstance(module, Conv2d):
            module.winograd = use
            if use != "kept" and isinstance(packed_form(module), winograd.Tiling):
                module.__dict__["_packed"] = None
    return network


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
    if k.shape[1] >= LONG_KEYS and runs_on_onednn(q, k, v):
        return onednn_attention(q, k, v, heads).to(dtype)
    q = q.view(B, Lq, heads, -1).transpose(1, 2)  # (B, nh, Lq, hs)
    k = k.view(B, k.shape[1], heads, -1).transpose(1, 2)  # (B, nh, Lk, hs)
    v = v.view(B, v.shape[1], heads, -1).transpose(1, 2)  # (B, nh, Lk, hs)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Lq, hs)
    return out.transpose(1, 2).reshape(B, Lq, C).to(dtype)


def mkl_at_full_speed() -> bool:
    """Whether PyTorch's BLAS is MKL on an Intel CPU, where it runs its AVX-512 code; on AMD CPUs
    MKL takes its AVX2 path."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        intel = False
    return intel and torch.backends.mkl.is_available()


# Attention over this many keys or more runs on `onednn_attention` (CPU fp32 inference), except
# where MKL runs at full speed: there PyTorch's flash attention, which multiplies with MKL, was
# 20-38% faster than oneDNN (Xeon, 2 cores: 120 against 149 ms for the VAE's attention over 4,096
# pixels, 186 against 231 ms for SD 2.1's 4,096-token self-attention at batch 2).
LONG_KEYS = math.inf if mkl_at_full_speed() else 1024
SCORES_BLOCK = 1 << 21  # attention scores computed at a time: 8 MiB in fp32


def onednn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`attention` for CPU fp32 inference as two oneDNN GEMMs per head, over blocks of queries
    whose scores (`SCORES_BLOCK` values) stay in the cache between the GEMMs and the softmax.
    PyTorch's CPU flash attention multiplies with its BLAS, which takes its AVX2 path on AMD:
    there, on SD 2.1's 4,096-token self-attention (512 px, batch 2, 5 heads) this took 190 ms against
    297 ms, on its 1,024-token one 25 against 37.5 ms. With 77 keys (cross-attention) or 256
    tokens it was no faster or slower, hence `LONG_KEYS`."""
    B, Lq, C = q.shape
    hs = C // heads
    q = q * hs**-0.5
    out = torch.empty_like(q)
    rows = max(1, SCORES_BLOCK // k.shape[1])
    gemm = torch.ops.mkldnn._linear_pointwise  # x @ w^T (+ bias)
    for b in range(B):
        for h in range(heads):
            cols = slice(h * hs, (h + 1) * hs)
            keys, values_t = k[b, :, cols].contiguous(), v[b, :, cols].t().contiguous()
            for start in range(0, Lq, rows):
                block = slice(start, start + rows)
                scores = gemm(q[b, block, cols].contiguous(), keys, None, "none", [], "")
                out[b, block, cols] = gemm(scores.softmax(-1), values_t, None, "none", [], "")
    return out


class Attention(nn.Module):
    """diffusers' `Attention` on token sequences: to_q / to_k / to_v, then to_out.0.
    Self-attention when `context` is None, else cross-attention to `context` (B, Lk, context_dim)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        context_dim = dim if context_dim is None else context_dim
        self.to_q = Linear(dim, dim, bias=bias)
        self.to_k = Linear(context_dim, dim, bias=bias)
        self.to_v = Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(dim, dim)])  # index 0 as in diffusers (1 was dropout)

    def forward(self, x: torch.Tensor, context: "torch.Tensor | ProjectedContext | None" = None) -> torch.Tensor:
        if isinstance(context, ProjectedContext):
            k, v = context.keys_values(self)
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads, self.upcast))


class ProjectedContext:
    """A generation's text context (B, T, D) that keeps each cross-attention layer's keys and
    values of it: made at the layer's first call, reused at every later step, since neither the
    context nor the weights change within a generation. SD 2.1's 16 cross-attention layers spend
    38 ms a UNet call on them at batch 2 (AMD EPYC, 2 cores), 2% of a call at 256 px; SDXL's 70
    layers with 2048-wide text 105 GFLOP a call. Keeping them costs their size: 15 MB for SD 2.1 at
    batch 2, 100 MB for SDXL (fp32), more for more images. Weights changed between the steps of a
    generation (a LoRA merged while it runs) reach these projections in the next generation only."""

    def __init__(self, states: torch.Tensor):
        self.states = states
        self.projections = {}  # Attention -> (keys, values)

    def keys_values(self, layer: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.projections:
            self.projections[layer] = layer.to_k(self.states), layer.to_v(self.states)
        return self.projections[layer]


def context_rows(context: "torch.Tensor | ProjectedContext") -> int:
    """The batch size of a text context (B, T, D), plain or projected."""
    return (context.states if isinstance(context, ProjectedContext) else context).shape[0]


def repeat_samples(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with its samples repeated up to `rows`, as torch.cat([x] * k). A UNet may take fewer
    samples than text contexts: classifier-free guidance denoises the same latents with two
    texts, and the layers before the text first reaches them (SD 2.1: the first resnet and
    self-attention) run once per sample instead of once per text."""
    copies = repeats(x.shape[0], rows)
    return x if copies == 1 else torch.cat([x] * copies)  # (`repeat` gives NCHW for channels-last inputs)


def repeats(samples: int, rows: int) -> int:
    """How many times `samples` samples repeat to `rows` text contexts (`repeat_samples`); a clear
    error where they do not."""
    if samples < 1 or rows % samples:
        raise ValueError(f"{samples} samples for {rows} text contexts: give as many, or a number that divides them")
    return rows // samples


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
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(temb_dim, cout) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None
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
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `size`, for odd latent sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
