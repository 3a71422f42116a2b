"""Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
2016) for 3x3 convolutions in CPU fp32 inference.

F(m x m, 3 x 3) computes an m x m block of outputs from a t x t tile of input (t = m + 2) as t*t
independent products: each transformed tile times the transformed weight, which over all tiles
of an image is one GEMM per position in the tile. F(4x4, 3x3) multiplies 36 times for 16 outputs
where the direct convolution multiplies 144 times (4x fewer); F(2x2, 3x3) 16 for 4 (2.25x
fewer). The transforms are additions and small constant scalings (sdlite.kernels, one pass over
the input and one over the output), cheap beside the GEMMs, which run on oneDNN.

Rounding: F(2x2) was at least as accurate as oneDNN's direct convolution (largest error to an
fp64 convolution 2-3e-6 against 2-7e-6 on random 320-2560-channel layers), F(4x4) about ten
times less so (4-7e-5), still far below what an 8-bit image shows.

Which tiling, measured on 2 threads of an AMD EPYC (ms a call at batch 2, direct / F(2x2) /
F(4x4)): 320 channels at 32 x 32, 15.8 / 10.1 / 7.2; 640 at 16 x 16, 16.0 / 10.5 / 7.6; 1280 at
8 x 8, 25.6 / 10.0 / 10.4; 1280 at 4 x 4, 7.9 / 4.0 / 10.1 ("direct" on 8 x 8 and 4 x 4:
sdlite's GEMM of patches, `sdlite.layers.Conv2d`). The transformed weights take 16/9 (F(2x2)) or
36/9 (F(4x4)) of the weight's memory, and making them is most of a first call's extra time, so
the choice weighs that too. Whole SD 2.1 UNet calls at 256 px (first call, later calls, peak
RSS; one process each): direct 3.40 s, 1.95 s, 3.9 GB; F(4x4) from 32 pixels a side and F(2x2)
from 8 (`F4_SIDE`, `F2_SIDE`) 4.19 s, 1.51 s, 4.8 GB; F(4x4) from 16, 4.48 s, 1.49 s, 5.3 GB;
also F(2x2) at 4x4, 9.38 s, 1.45 s, 6.1 GB. What F(4x4) saves over F(2x2) per byte of extra
weight grows with the input's pixels, not its channels; but its memory grows with the channels,
and SDXL's 1280-channel layers at 1024 px (32 x 32 inputs there), 0.97 GB of weights, would take
3.9 GB transformed: layers of over `F4_MAX_WEIGHT` values take F(2x2) at any size (1.7 GB
there). Layers under `MIN_CHANNELS` in or out stay direct: 64 channels at 64 x 64 took 1.4 / 1.6
/ 1.8 ms, 128 at 16 x 16 0.4 / 0.5 / 0.8 (batch 1), but 128 at 128 x 128 20.9 / 17.2 / 13.7.

Weights that are not kept transformed (`sdlite.layers.Conv2d`: the VAE's, used once per image;
weights materialised per call from their form at rest, though sdlite.pipeline keeps a UNet with
such weights off Winograd for memory; low-memory mode's UNet) are transformed in each call, which
pays from `ONCE_SIDE` pixels a side. At batch 2, transform included, against
the direct convolution on a weight materialised for the call (ms): 1280 channels at 8 x 8 26.8
against 26.0, at 16 x 16 50.8 against 74.2 (F(2x2)); 640 at 32 x 32 35.6 against 65.9 (F(4x4));
against a prepacked weight, 640 at 16 x 16 14.5 against 15.9, 1280 at 16 x 16 48.6 against 63.4,
640 at 32 x 32 34.7 against 64.2. SD 2.1's VAE's first decode of 256 px took 1.83 against 3.05 s
(peak RSS 898 against 858 MB), of 512 px 6.88 against 12.47 s (1,784 against 1,968 MB: the
chunks of tiles, `CHUNK_BYTES`, are smaller than some of the direct convolution's buffers).
"""

from dataclasses import dataclass

import torch

from . import kernels


@dataclass(frozen=True)
class Tiling:
    """F(m x m, 3 x 3): input transform BT (t x t), weight transform G (t x 3), output transform
    AT (m x t)."""

    m: int
    BT: tuple
    G: tuple
    AT: tuple

    def matrix(self, name: str) -> torch.Tensor:
        return torch.tensor(getattr(self, name), dtype=torch.float64)


F2 = Tiling(2, BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
            G=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
            AT=((1, 1, 1, 0), (0, 1, -1, -1)))
F4 = Tiling(4, BT=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                   (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
            G=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
               (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
            AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)))
MIN_CHANNELS = 128
CHUNK_BYTES = 64 << 20  # at most, of a chunk's transformed tiles and of its products (`conv`)
F4_SIDE, F2_SIDE = 32, 8  # F(4x4) on inputs at least this many pixels a side, F(2x2) from 8
ONCE_SIDE = 16  # weights transformed for one call only: on inputs at least this many pixels a side
F4_MAX_WEIGHT = 12_000_000  # values: F(4x4) only up to SD's 640-channel layers (SDXL's 1280: F(2x2))


def tiling(conv, x: torch.Tensor, kept: Tiling | None = None, once: bool = False) -> Tiling | None:
    """The tiling the call of `conv` (an `sdlite.layers.Conv2d`) on `x` runs with, or None: a 3x3
    convolution keeping the input's size (`Conv2d.same_size_3x3`), at least `MIN_CHANNELS` in
    and out, on an input at least `F2_SIDE` pixels a side (`ONCE_SIDE` if the weights are
    transformed `once`, for this call only), with the C kernels built; F(4x4) from `F4_SIDE` for
    weights of at most `F4_MAX_WEIGHT` values. `kept`, the tiling the layer's weights were
    transformed for, is kept at any size: one transformed copy a layer, never made again because
    sizes alternate. (CPU fp32 inference is the caller's to check: `sdlite.layers.runs_on_onednn`.)"""
    if not (x.dim() == 4 and conv.same_size_3x3() and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS):
        return None
    side = min(x.shape[-2:])
    if (kept is None and side < (ONCE_SIDE if once else F2_SIDE)) or kernels.library() is None:
        return None
    if kept is not None:
        return kept
    weights = conv.in_channels * conv.out_channels * 9
    return F4 if side >= F4_SIDE and weights <= F4_MAX_WEIGHT else F2


def transform_weight(weight: torch.Tensor, tiling: Tiling, pack: bool = True) -> list[torch.Tensor]:
    """The t*t transformed weights G w G^T of a (K, C, 3, 3) weight, (K, C) matrices for oneDNN's
    GEMM, prepacked unless `pack` is False (weights used once: the GEMM lays them out itself)."""
    matrices = kernels.winograd_weight(weight, _float(tiling, "G")).unbind()
    return [torch.ops.mkldnn._reorder_linear_weight(m, None) for m in matrices] if pack else list(matrices)


def conv(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, tiling: Tiling) -> torch.Tensor:
    """The 3x3 convolution (stride 1, zero padding 1) of `x` (N, C, H, W) by `transform_weight`'s
    weights: channels-last (N, K, H, W). The tiles go through in chunks whose transformed tiles
    and products take at most `CHUNK_BYTES` each (on large images they would be 2.25-4x the input
    and output)."""
    N, C, H, W = x.shape
    K = weights[0].shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    m, t = tiling.m, tiling.m + 2
    BT, AT = _float(tiling, "BT"), _float(tiling, "AT")
    out = torch.empty(N, H, W, K, dtype=torch.float32, device="cpu")
    tiles = kernels.tile_count(N, H, W, m)
    chunk = max(1, CHUNK_BYTES // (t * t * max(C, K) * 4))
    for first in range(0, tiles, chunk):
        count = min(chunk, tiles - first)
        products = [torch.ops.mkldnn._linear_pointwise(v, w, None, "none", [], "")
                    for v, w in zip(kernels.winograd_input(x, m, BT, first, count), weights)]
        kernels.winograd_output(products, bias, AT, out, first)
        del products  # before the next chunk's are made
    return out.permute(0, 3, 1, 2)


_matrices = {}


def _float(tiling: Tiling, name: str) -> torch.Tensor:
    """The fp32 transform matrix `name` of `tiling`, made once."""
    key = (tiling.m, name)
    if key not in _matrices:
        _matrices[key] = tiling.matrix(name).float()
    return _matrices[key]
