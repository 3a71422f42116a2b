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
    th, tw = -(-size[0] // m), -(-size[1] // m)
    tiles = 2 * th * tw
    base = torch.randn(3, 70, *size)  # 70 channels: a block of 64 and a rest
    x = base.to(memory_format=torch.channels_last)[1:]  # not at the start of its storage
    BT, AT = tiling.matrix("BT").float(), tiling.matrix("AT").float()
    products = [torch.randn(tiles, 24) for _ in range(t * t)]
    bias = torch.randn(24)
    out = torch.full((2, *size, 24), float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = tiles // 3  # in two ranges of tiles, as `winograd.conv` chunks them
        transformed = torch.cat([kernels.winograd_input(x, m, BT, 0, split),
                                 kernels.winograd_input(x, m, BT, split, tiles - split)], dim=1)
        for first, count in ((0, split), (split, tiles - split)):
            kernels.winograd_output([p[first:first + count] for p in products], bias, AT, out, first)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(transformed.double(), tiles_in_torch(x, m), atol=1e-4)
    P = torch.stack(products).double().view(t, t, 2, th, tw, 24)
    full = torch.einsum("pa,abnhwk,qb->nhpwqk", tiling.matrix("AT"), P, tiling.matrix("AT"))
    expected = full.reshape(2, th * m, tw * m, 24)[:, :size[0], :size[1]] + bias.double()
    assert torch.allclose(out.double(), expected, atol=1e-4)  # every output written (no NaN left)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_weight_transform_matches_torch(tiling, threads):
    torch.manual_seed(0)
    weight = torch.randn(10, 13, 3, 3)[::2]  # 5 x 13 filters: a block of 64 and a rest; not contiguous
    G = tiling.matrix("G")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        U = kernels.winograd_weight(weight, G.float())
    finally:
        torch.set_num_threads(before)
    t = tiling.m + 2
    expected = torch.einsum("ai,kcij,bj->abkc", G, weight.double(), G).reshape(t * t, 5, 13)
    assert torch.allclose(U.double(), expected, atol=1e-6)


def test_the_c_transforms_refuse_what_they_do_not_take():
    BT, AT = winograd.F2.matrix("BT").float(), winograd.F2.matrix("AT").float()
    x = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels-last"):
        kernels.winograd_input(x.contiguous(), 2, BT, 0, 4)  # NCHW
    with pytest.raises(ValueError, match="t x t"):
        kernels.winograd_input(x, 4, BT, 0, 1)
    with pytest.raises(ValueError, match="range"):
        kernels.winograd_input(x, 2, BT, 2, 3)  # 4 tiles
    with pytest.raises(ValueError, match="t x t"):
        kernels.winograd_input(x.double(), 2, BT.double(), 0, 4)
    G = winograd.F2.matrix("G").float()
    with pytest.raises(ValueError, match="3, 3"):
        kernels.winograd_weight(torch.randn(8, 8, 1, 1), G)
    with pytest.raises(ValueError, match="3, 3"):
        kernels.winograd_weight(torch.randn(72), G)
    with pytest.raises(ValueError, match="t x 3"):
        kernels.winograd_weight(torch.randn(8, 8, 3, 3), G.t())
    with pytest.raises(ValueError, match="fp32"):
        kernels.winograd_weight(torch.randn(8, 8, 3, 3).double(), G)
    out = torch.empty(1, 4, 4, 8)
    with pytest.raises(ValueError, match="products"):
        kernels.winograd_output([torch.randn(4, 8)] * 15, None, AT, out, 0)  # 16 needed
    with pytest.raises(ValueError, match="products"):
        kernels.winograd_output([torch.randn(4, 8)] * 16, None, AT, out, 1)  # tiles 1-4 of 4


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
        assert layers.packed_form(conv) == tiling  # the Winograd path ran, with this tiling
        assert (y.double() - exact(x)).abs().max() < tolerance
        conv.weight.mul_(-2)  # in place, as a LoRA merge does
        assert (conv(x).double() - exact(x)).abs().max() < 2 * tolerance
    conv.weight = nn.Parameter(torch.randn_like(conv.weight) * 0.05)  # replaced
    with torch.no_grad():
        y = torch.cat([x, x[:1]])  # another batch size than the one it was transformed for
        assert (conv(y).double() - exact(y)).abs().max() < tolerance
        assert conv.__dict__["_packed"][0]() is conv.weight and layers.packed_form(conv) == tiling
        other = winograd.F4 if tiling is winograd.F2 else winograd.F2
        z = torch.randn(1, channels[0], *(32 if other is winograd.F4 else 8,) * 2)  # the other tiling's size
        packed = conv.__dict__["_packed"][2]
        assert (conv(z).double() - exact(z)).abs().max() < tolerance
        assert conv.__dict__["_packed"][2] is packed  # the tiling first chosen is kept: nothing transformed again
        narrow = torch.randn(1, channels[0], 4, 70)  # under F2_SIDE a side, over SMALL_INPUT pixels
        assert (conv(narrow).double() - exact(narrow)).abs().max() < tolerance
        assert conv.__dict__["_packed"][2] is packed


def test_chunks_of_tiles_give_the_whole_convolution(monkeypatch):
    torch.manual_seed(0)
    conv = layers.Conv2d(128, 136, 3, padding=1).eval()
    x = torch.randn(2, 128, 13, 34)
    with torch.no_grad():
        whole = conv(x)
        monkeypatch.setattr(winograd, "CHUNK_BYTES", 36 * 136 * 4 * 5)  # 5 tiles a chunk
        assert torch.equal(conv(x), whole)


def test_where_winograd_applies():
    conv = layers.Conv2d(128, 128, 3, padding=1)
    assert winograd.tiling(conv, torch.empty(1, 128, 8, 40)) is winograd.F2
    assert winograd.tiling(conv, torch.empty(1, 128, 32, 32)) is winograd.F4
    assert winograd.tiling(conv, torch.empty(1, 128, 7, 40)) is None  # GEMM or direct below 8 a side
    assert winograd.tiling(conv, torch.empty(1, 128, 15, 40), once=True) is None  # per call: from 16
    assert winograd.tiling(conv, torch.empty(1, 128, 16, 40), once=True) is winograd.F2
    wide = layers.Conv2d(1280, 1280, 3, padding=1, device="meta")  # F(4x4) would quadruple 59 MB
    assert winograd.tiling(wide, torch.empty(1, 1280, 32, 32)) is winograd.F2
    assert winograd.tiling(layers.Conv2d(1920, 640, 3, padding=1, device="meta"), torch.empty(1, 1920, 32, 32)) is winograd.F4
    for other in (layers.Conv2d(128, 128, 3, stride=2, padding=1), layers.Conv2d(128, 128, 1),
                  layers.Conv2d(128, 128, 3), layers.Conv2d(4, 128, 3, padding=1), layers.Conv2d(128, 64, 3, padding=1)):
        assert winograd.tiling(other, torch.empty(1, other.in_channels, 32, 32)) is None


def transformed(network):
    return [m for m in network.modules() if isinstance(m, layers.Conv2d)
            and isinstance(layers.packed_form(m), winograd.Tiling)]


def test_winograd_stays_off_without_kernels_autograd_or_when_limited(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 128, 16, 16)
    conv = layers.Conv2d(128, 128, 3, padding=1).eval()
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5) and not transformed(conv)  # autograd records
    conv.weight.requires_grad_(False)
    conv(x).sum().backward()  # only the bias is trained: still autograd's
    assert conv.bias.grad is not None and not transformed(conv)
    with torch.no_grad():
        assert torch.allclose(layers.limit_winograd(conv, None)(x), expected, atol=1e-5) and not transformed(conv)
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


@pytest.mark.parametrize("not_kept", ["per call", "prepack", "at rest"])
def test_weights_not_kept_are_transformed_per_call_on_large_inputs(not_kept, winograd_calls):
    torch.manual_seed(0)
    conv = layers.Conv2d(128, 128, 3, padding=1).eval()
    weight = conv.weight.detach().clone()
    if not_kept == "per call":
        layers.limit_winograd(conv, "per call")
    elif not_kept == "prepack":
        conv.prepack = False
    else:
        del conv._parameters["weight"]
        conv.weight = weight  # materialised per call (weights at rest)
    with torch.no_grad():
        for side, tilings in ((8, []), (15, []), (16, [winograd.F2]), (32, [winograd.F4])):
            x = torch.randn(1, 128, side, side)
            assert torch.allclose(conv(x), F.conv2d(x, weight, conv.bias, padding=1), atol=1e-4)
            # under ONCE_SIDE a side: the GEMM of patches (8x8) or the direct convolution
            assert winograd_calls == tilings and not transformed(conv)
            winograd_calls.clear()


def test_limit_winograd_drops_kept_transforms_and_checks_its_argument():
    conv = layers.Conv2d(128, 128, 3, padding=1).eval()
    with torch.no_grad():
        conv(torch.randn(1, 128, 16, 16))
    assert transformed(conv)
    assert not transformed(layers.limit_winograd(conv, "per call"))
    with pytest.raises(ValueError, match="per call"):
        layers.limit_winograd(conv, True)


@pytest.mark.parametrize("low_memory, at_rest", [(True, False), (True, True), (False, True)])
def test_low_memory_mode_and_weights_at_rest_keep_no_transformed_weights(low_memory, at_rest, winograd_calls):
    from sdlite import StableDiffusion

    dtypes = dict(dtype=torch.float16, compute_dtype=torch.float32) if at_rest else {}
    sd = StableDiffusion.from_pretrained(low_memory=low_memory, **dtypes)
    latents = next(sd.generate_latents("a red circle", steps=1, seed=0, height=128, width=128))[1]
    # 16x16 latents: transformed per call, or with weights at rest (transients) not at all
    assert (winograd_calls == []) == at_rest and not transformed(sd.unet)
    winograd_calls.clear()
    sd.decode(latents)
    assert winograd.F4 in winograd_calls
