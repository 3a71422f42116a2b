"""Winograd convolutions (sdlite.winograd, its C transforms in sdlite.kernels, and where
sdlite.layers.Conv2d uses them): the convolution's numbers to fp32 rounding, for any input size,
following weight changes, and only where they apply."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlite import kernels, layers, winograd

pytestmark = [pytest.mark.skipif(kernels.library() is None, reason="no C compiler builds sdlite's kernels here"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")]
TILINGS = [winograd.F2, winograd.F4]


def tiles_in_torch(x, m):
    """winograd_input's (t*t, tiles, C) in torch ops (fp64)."""
    N, C, H, W = x.shape
    t, th, tw = m + 2, -(-H // m), -(-W // m)
    padded = F.pad(x.double(), (1, tw * m + 1 - W, 1, th * m + 1 - H))
    d = padded.unfold(2, t, m).unfold(3, t, m)  # (N, C, th, tw, t, t)
    BT = winograd.F2.matrix("BT") if m == 2 else winograd.F4.matrix("BT")
    return torch.einsum("ai,nchwij,bj->abnhwc", BT, d, BT).reshape(t * t, N * th * tw, C)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("size", [(4, 4), (5, 9), (16, 13)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_transforms_match_torch(tiling, size, threads):
    torch.manual_seed(0)
    m, t = tiling.m, tiling.m + 2
    base = torch.randn(3, 70, *size)  # 70 channels: a block of 64 and a rest
    x = base.to(memory_format=torch.channels_last)[1:]  # not at the start of its storage
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tiles = kernels.winograd_input(x, m, winograd.F2.matrix("BT").float() if m == 2 else winograd.F4.matrix("BT").float())
        expected = tiles_in_torch(x, m)
        assert torch.allclose(tiles.double(), expected, atol=1e-4)
        products = [torch.randn(tiles.shape[1], 24) for _ in range(t * t)]
        bias = torch.randn(24)
        y = kernels.winograd_output(products, bias, (2, *size), tiling.matrix("AT").float())
    finally:
        torch.set_num_threads(before)
    th, tw = -(-size[0] // m), -(-size[1] // m)
    P = torch.stack(products).double().view(t, t, 2, th, tw, 24)
    full = torch.einsum("pa,abnhwk,qb->nkhpwq", tiling.matrix("AT"), P, tiling.matrix("AT"))
    expected = full.reshape(2, 24, th * m, tw * m)[:, :, :size[0], :size[1]] + bias.double()[:, None, None]
    assert y.shape == (2, 24, *size) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y.double(), expected, atol=1e-4)


def test_the_c_transforms_refuse_what_they_do_not_take():
    BT, AT = winograd.F2.matrix("BT").float(), winograd.F2.matrix("AT").float()
    with pytest.raises(ValueError, match="channels-last"):
        kernels.winograd_input(torch.randn(1, 8, 4, 4), 2, BT)  # NCHW
    with pytest.raises(ValueError, match="t x t"):
        kernels.winograd_input(torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last), 4, BT)
    with pytest.raises(ValueError, match="products"):
        kernels.winograd_output([torch.randn(4, 8)] * 15, None, (1, 4, 4), AT)  # 16 needed


# (in, out, size): the largest error to fp64 for random unit-scale inputs, layers initialised as torch does
@pytest.mark.parametrize("channels, size, tiling, tolerance", [
    ((128, 136), (8, 8), winograd.F2, 1e-5), ((144, 128), (13, 9), winograd.F2, 1e-5),
    ((128, 136), (32, 32), winograd.F4, 1e-4), ((144, 128), (35, 33), winograd.F4, 1e-4)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_runs_winograd_to_fp32_rounding(channels, size, tiling, tolerance, bias):
    torch.manual_seed(0)
    conv = layers.Conv2d(*channels, 3, padding=1, bias=bias).eval()
    x = torch.randn(2, channels[0], *size)

    def exact(x):
        b = None if conv.bias is None else conv.bias.double()
        return F.conv2d(x.double(), conv.weight.double(), b, padding=1)

    with torch.inference_mode():
        y = conv(x)
        assert conv.__dict__["_packed"][1][-1] == tiling  # the Winograd path ran, with this tiling
        assert (y.double() - exact(x)).abs().max() < tolerance
        conv.weight.mul_(-2)  # in place, as a LoRA merge does
        assert (conv(x).double() - exact(x)).abs().max() < 2 * tolerance
    conv.weight = nn.Parameter(torch.randn_like(conv.weight) * 0.05)  # replaced
    with torch.no_grad():
        y = torch.cat([x, x[:1]])  # another batch size than the one it was transformed for
        assert (conv(y).double() - exact(y)).abs().max() < tolerance


def test_where_winograd_applies():
    conv = layers.Conv2d(128, 128, 3, padding=1)
    assert winograd.tiling(conv, torch.empty(1, 128, 8, 40)) is winograd.F2
    assert winograd.tiling(conv, torch.empty(1, 128, 32, 32)) is winograd.F4
    assert winograd.tiling(conv, torch.empty(1, 128, 7, 40)) is None  # GEMM or direct below 8 a side
    wide = layers.Conv2d(1280, 1280, 3, padding=1, device="meta")  # F(4x4) would quadruple 59 MB
    assert winograd.tiling(wide, torch.empty(1, 1280, 32, 32)) is winograd.F2
    assert winograd.tiling(layers.Conv2d(1920, 640, 3, padding=1, device="meta"), torch.empty(1, 1920, 32, 32)) is winograd.F4
    for other in (layers.Conv2d(128, 128, 3, stride=2, padding=1), layers.Conv2d(128, 128, 1),
                  layers.Conv2d(128, 128, 3), layers.Conv2d(4, 128, 3, padding=1), layers.Conv2d(128, 64, 3, padding=1)):
        assert winograd.tiling(other, torch.empty(1, other.in_channels, 32, 32)) is None


def transformed(network):
    return [m for m in network.modules() if isinstance(m, layers.Conv2d) and m.__dict__.get("_packed")
            and isinstance(m.__dict__["_packed"][1][-1], winograd.Tiling)]


def test_winograd_stays_off_without_kernels_autograd_or_kept_weights(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 128, 16, 16)
    conv = layers.Conv2d(128, 128, 3, padding=1).eval()
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5) and not transformed(conv)  # autograd records
    with torch.no_grad():
        assert torch.allclose(layers.direct_convolutions(conv)(x), expected, atol=1e-5) and not transformed(conv)
        conv.winograd = True
        weight = conv.weight.detach().clone()
        del conv._parameters["weight"]
        conv.weight = weight  # materialised per call (weights at rest)
        assert torch.allclose(conv(x), expected, atol=1e-5) and not transformed(conv)
        monkeypatch.setattr(kernels, "library", lambda: None)  # no C compiler
        fresh = layers.Conv2d(128, 128, 3, padding=1).eval()
        assert torch.allclose(fresh(x), F.conv2d(x, fresh.weight, fresh.bias, padding=1), atol=1e-5)
        assert not transformed(fresh)


@pytest.fixture
def winograd_calls(monkeypatch):
    """The tilings of Winograd convolutions run, with the bundled model's narrow layers taking them."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 16)
    calls = []
    conv = winograd.conv
    monkeypatch.setattr(winograd, "conv", lambda x, w, b, tiling: calls.append(tiling) or conv(x, w, b, tiling))
    return calls


def test_the_unet_keeps_its_transformed_weights_and_the_vae_transforms_per_call(winograd_calls):
    from sdlite import StableDiffusion

    sd = StableDiffusion.from_pretrained()  # the bundled model: 64x64 images, 8x8 latents
    latents = next(sd.generate_latents("a red circle", steps=1, seed=0))[1]
    assert winograd_calls and transformed(sd.unet)
    winograd_calls.clear()
    sd.decode(latents)
    assert winograd.F4 in winograd_calls and not transformed(sd.vae)  # the VAE runs once per image


def test_low_memory_mode_keeps_convolutions_direct(winograd_calls):
    from sdlite import StableDiffusion

    sd = StableDiffusion.from_pretrained(low_memory=True)
    sd.decode(next(sd.generate_latents("a red circle", steps=1, seed=0))[1])
    assert not winograd_calls and not transformed(sd.unet)
