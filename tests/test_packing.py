"""sdlite.layers.Linear and Conv2d: prepacked oneDNN weights for CPU fp32 inference must give
nn.Linear's and nn.Conv2d's numbers, follow weight changes, and stay out of autograd and
state_dict."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlite import memory
from sdlite import layers
from sdlite.layers import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")

LAYERS = [
    (lambda: Linear(48, 80), lambda: torch.randn(2, 7, 48)),
    (lambda: Linear(48, 80, bias=False), lambda: torch.randn(3, 48)),
    # convolutions on inputs over SMALL_INPUT pixels (smaller ones run as a GEMM, tested below)
    (lambda: layers.Conv2d(6, 10, 3, padding=1), lambda: torch.randn(2, 6, 9, 12)),
    (lambda: layers.Conv2d(6, 10, 1, bias=False), lambda: torch.randn(1, 6, 9, 11)),
    (lambda: layers.Conv2d(6, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 6, 10, 10)),
    (lambda: layers.Conv2d(6, 6, 3, stride=2), lambda: torch.randn(1, 6, 11, 10)),  # the VAE's downsampler
]


def plain(layer, x):
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, layer.weight, layer.bias)  # nn.Conv2d's own
    return F.linear(x, layer.weight, layer.bias)


@pytest.mark.parametrize("make, data", LAYERS)
def test_packed_matches_plain_and_follows_weight_changes(make, data):
    torch.manual_seed(0)
    layer, x = make().eval(), data()
    with torch.inference_mode():
        assert torch.allclose(layer(x), plain(layer, x), atol=1e-5)
        packed = layer.__dict__["_packed"][2]
        assert packed is not None and packed is not layer.weight  # the packed path ran
        layer.weight.mul_(-2)  # in place, as a LoRA merge does
        assert torch.allclose(layer(x), plain(layer, x), atol=1e-5)
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # replaced
    with torch.no_grad():
        assert torch.allclose(layer(x), plain(layer, x), atol=1e-5)
        # another size than the one it was first packed for
        y = torch.cat([x, x])
        assert torch.allclose(layer(y), plain(layer, y), atol=1e-5)


def test_the_unet_packs_its_weights_and_the_text_encoder_and_vae_do_not():
    from sdlite import StableDiffusion

    sd = StableDiffusion.from_pretrained()  # the bundled model
    sd.decode(next(sd.generate_latents("a red circle", steps=1, seed=0))[1])

    def packed(network, kind):
        return [m for m in network.modules() if isinstance(m, kind) and m.__dict__.get("_packed")]

    assert packed(sd.unet, layers.Conv2d) and packed(sd.unet, Linear)
    assert not packed(sd.vae, (layers.Conv2d, Linear)) and not packed(sd.text_encoder, Linear)


def test_a_linear_layer_that_keeps_nothing_runs_on_onednn_with_its_plain_weight(monkeypatch):
    layer, x = Linear(8, 8).eval(), torch.randn(2, 8)
    layer.prepack = False
    calls, linear = [], torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[1]) or linear(*a))
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)
    assert len(calls) == 1 and calls[0] is layer.weight and "_packed" not in layer.__dict__


@pytest.mark.parametrize("make, data", LAYERS)
def test_autograd_and_state_dict_are_untouched(make, data):
    layer, x = make(), data()
    layer(x).sum().backward()  # grad mode with a trainable weight: the plain path, with gradients
    assert layer.weight.grad is not None
    frozen, x = make().requires_grad_(False), x.requires_grad_()  # only the input is recorded
    frozen(x).sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        layer(x)
    assert list(layer.state_dict()) == list(nn.Linear(8, 8, bias=layer.bias is not None).state_dict())


def test_weights_materialised_per_call_run_on_onednn_and_nothing_is_kept():
    # sdlite.memory.keep_at_rest replaces parameters by plain tensors set just before each call:
    # they go to oneDNN unpacked (it lays them out within the call) and no packed copy is kept.
    layer, x = Linear(8, 8).eval(), torch.randn(2, 8)
    calls = []
    linear = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad():
        packed_result = layer(x)
        weight = layer.weight.detach().clone()
        del layer._parameters["weight"]
        for _ in range(3):
            layer.weight = weight.clone()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[1]) or linear(*a))
                out = layer(x)
            assert torch.allclose(out, packed_result, atol=1e-6)
            assert calls.pop() is layer.weight
    assert layer.__dict__["_packed"][0]() is None  # only the first (parameter) weight was kept


def test_a_weight_swapped_in_where_a_freed_one_was_packed_from_is_packed_again():
    # mixed_bit_recipe swaps trial weights in and out through `.data`: each trial's tensor tends to
    # be allocated where the previous (freed) one was, same address and version counter.
    torch.manual_seed(0)
    layer, x = Linear(512, 512).eval(), torch.randn(4, 512)
    original = layer.weight.data
    with torch.no_grad():
        for _ in range(4):
            layer.weight.data = torch.randn(512, 512)
            assert torch.allclose(layer(x), plain(layer, x), atol=1e-4)
            layer.weight.data = original


def mapping_resident_kib(address: int) -> int:
    """Resident KiB of the memory mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(a, 16) for a in first.split("-"))
                inside = start <= address < end
            elif inside and first == "Rss:":
                return int(line.split()[1])
    pytest.skip("no /proc/self/smaps")


@pytest.mark.skipif(memory.c_library() is None, reason="madvise needs Linux")
def test_packing_hands_back_the_pages_of_a_memory_mapped_weight(tmp_path):
    # Once packed, the mapped weight is not read: its pages leave resident memory (the page cache
    # keeps them) and read back the same.
    from safetensors.torch import save_file

    from sdlite.loading import read_safetensors

    torch.manual_seed(0)
    values = torch.randn(1024, 2048)  # 8 MiB
    save_file({"weight": values}, str(tmp_path / "w.safetensors"))
    layer = Linear(2048, 1024, bias=False).eval()
    layer.weight = nn.Parameter(read_safetensors(tmp_path / "w.safetensors")["weight"], requires_grad=False)
    x = torch.randn(3, 2048)
    with torch.no_grad():
        expected = F.linear(x, layer.weight)  # reads every page of the mapped weight
    assert mapping_resident_kib(layer.weight.data_ptr()) >= 8 << 10
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-4)
    assert mapping_resident_kib(layer.weight.data_ptr()) < 64
    assert torch.equal(layer.weight, values)


@pytest.mark.parametrize("cpuinfo, mkl, expected", [
    ("vendor_id\t: GenuineIntel\nflags\t: avx512f\n", True, True),
    ("vendor_id\t: AuthenticAMD\nflags\t: avx512f\n", True, False),
    ("vendor_id\t: GenuineIntel\n", False, False),  # a torch built without MKL
    (None, True, False),  # no /proc/cpuinfo
])
def test_mkl_at_full_speed_reads_the_cpu_vendor(cpuinfo, mkl, expected, monkeypatch):
    """Long attention stays on PyTorch's flash attention only where MKL runs at full speed."""
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(layers, "open", fake_open, raising=False)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    assert layers.mkl_at_full_speed() is expected


@pytest.mark.parametrize("batch, queries, keys, heads", [(2, 70, 64, 2), (1, 33, 100, 4)])
def test_onednn_attention_matches_sdpa(batch, queries, keys, heads, monkeypatch):
    """Long self-attention runs as blocked oneDNN GEMMs (blocks of 7 queries here, the last one
    shorter); it must give SDPA's numbers, and fall back to SDPA where autograd records."""
    monkeypatch.setattr(layers, "LONG_KEYS", 64)
    monkeypatch.setattr(layers, "SCORES_BLOCK", 7 * keys)
    blocks = []
    gemm = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, *a: blocks.append(len(x)) or gemm(x, *a))
    g = torch.Generator().manual_seed(0)
    C = 8 * heads
    q, k, v = torch.randn(batch, queries, C, generator=g), *(torch.randn(batch, keys, C, generator=g) for _ in "kv")
    expected = F.scaled_dot_product_attention(*(t.view(batch, -1, heads, 8).transpose(1, 2) for t in (q, k, v)))
    expected = expected.transpose(1, 2).reshape(batch, queries, C)
    with torch.no_grad():
        assert torch.allclose(layers.attention(q, k, v, heads), expected, atol=1e-5)
    assert blocks and max(blocks) == 7 and len(blocks) == 2 * batch * heads * -(-queries // 7)
    blocks.clear()
    for i in range(3):  # any input that autograd records (e.g. a trained text encoder's keys)
        inputs = [q, k, v]
        inputs[i] = inputs[i].clone().requires_grad_()
        out = layers.attention(*inputs, heads)
        out.sum().backward()
        assert not blocks and inputs[i].grad is not None and torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_small_input_3x3_convolutions_run_as_a_gemm(bias, monkeypatch):
    """3x3 convolutions on inputs of at most SMALL_INPUT pixels: the GEMM of their patches gives
    the convolution's numbers, for weights kept as parameters or materialised per call, transposed
    where the patches are at most FEW_ROWS rows; larger inputs, other shapes and autograd take the
    plain convolution."""
    gemms = []
    gemm = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, *a: gemms.append((x.shape, w.shape))
                        or gemm(x, w, *a))
    torch.manual_seed(0)
    conv = layers.Conv2d(6, 5, 3, padding=1, bias=bias).eval()
    strided = layers.Conv2d(6, 5, 3, stride=2, padding=1, bias=bias).eval()
    small, large = torch.randn(2, 6, 4, 5), torch.randn(1, 6, 9, 9)  # 20 and 81 pixels
    with torch.no_grad():
        expected = F.conv2d(small, conv.weight, conv.bias, padding=1)
        assert torch.allclose(conv(small), expected, atol=1e-5)
        assert gemms.pop() == ((5, 6 * 9), (2 * 20, 6 * 9))  # 40 rows: the weight by the patches
        monkeypatch.setattr(layers, "FEW_ROWS", 39)
        assert torch.allclose(conv(small), expected, atol=1e-5)
        assert gemms == [((2 * 20, 6 * 9), (5, 6 * 9))]
        last = small.to(memory_format=torch.channels_last)  # patches follow the input's strides
        assert torch.allclose(conv(last), F.conv2d(small, conv.weight, conv.bias, padding=1), atol=1e-5)
        gemms.pop()
        weight = conv.weight.detach().clone()
        del conv._parameters["weight"]
        conv.weight = weight  # materialised per call (weights at rest)
        assert torch.allclose(conv(small), F.conv2d(small, weight, conv.bias, padding=1), atol=1e-5)
        assert len(gemms) == 2
        for layer, x in ((conv, large), (strided, small)):
            assert torch.allclose(layer(x), F.conv2d(x, layer.weight, layer.bias, layer.stride, 1), atol=1e-5)
    out = strided(small) + layers.Conv2d(6, 5, 3, padding=1, bias=bias)(small).mean()  # autograd records
    out.sum().backward()
    assert len(gemms) == 2
