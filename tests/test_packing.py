"""sdlite.layers.Linear: prepacked oneDNN weights for CPU fp32 inference must give nn.Linear's
numbers, follow weight changes, and stay out of autograd and state_dict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlite.layers import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")

LAYERS = [
    (lambda: Linear(48, 80), lambda: torch.randn(2, 7, 48)),
    (lambda: Linear(48, 80, bias=False), lambda: torch.randn(3, 48)),
]


def plain(layer, x):
    return F.linear(x, layer.weight, layer.bias)


@pytest.mark.parametrize("make, data", LAYERS)
def test_packed_matches_plain_and_follows_weight_changes(make, data):
    torch.manual_seed(0)
    layer, x = make().eval(), data()
    with torch.inference_mode():
        assert torch.allclose(layer(x), plain(layer, x), atol=1e-5)
        assert layer.__dict__["_packed"][2] is not None  # the packed path ran
        layer.weight.mul_(-2)  # in place, as a LoRA merge does
        assert torch.allclose(layer(x), plain(layer, x), atol=1e-5)
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # replaced
    with torch.no_grad():
        assert torch.allclose(layer(x), plain(layer, x), atol=1e-5)
        # another size than the one it was first packed for
        y = torch.cat([x, x])
        assert torch.allclose(layer(y), plain(layer, y), atol=1e-5)


@pytest.mark.parametrize("make, data", LAYERS)
def test_autograd_and_state_dict_are_untouched(make, data):
    layer, x = make(), data()
    layer(x).sum().backward()  # grad mode with a trainable weight: the plain path, with gradients
    assert layer.weight.grad is not None
    with torch.no_grad():
        layer(x)
    assert list(layer.state_dict()) == list(nn.Linear(8, 8, bias=layer.bias is not None).state_dict())


def test_weights_materialised_per_call_are_packed_per_call():
    # sdlite.memory.keep_at_rest replaces parameters by plain tensors set just before each call:
    # they run on the packed kernels too (the same numbers as a loaded model) but nothing is kept.
    layer, x = Linear(8, 8).eval(), torch.randn(2, 8)
    with torch.no_grad():
        packed_result = layer(x)
        weight = layer.weight.detach().clone()
        del layer._parameters["weight"]
        for _ in range(3):
            layer.weight = weight.clone()
            assert torch.equal(layer(x), packed_result)
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
