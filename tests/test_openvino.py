"""sdlite.openvino: the OpenVINO UNet gives sdlite's image, and its conversion is cached on disk."""

import numpy as np
import pytest

pytest.importorskip("openvino")

from sdlite import StableDiffusion  # noqa: E402
from sdlite.openvino import OpenVINOUNet, use_openvino  # noqa: E402


def test_openvino_unet_matches_torch_and_is_cached(reference_model, tmp_path):
    path = reference_model("sd2", "epsilon")
    settings = dict(prompt="a red circle", steps=3, seed=1, sampler="ddim", n_images=2)
    torch_image = StableDiffusion.from_pretrained(path).text_to_image(**settings)
    sd = use_openvino(StableDiffusion.from_pretrained(path), cache_dir=tmp_path)
    assert isinstance(sd.unet, OpenVINOUNet) and sd.unet.converted
    ov_image = sd.text_to_image(**settings)
    for a, b in zip(torch_image, ov_image):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    again = use_openvino(StableDiffusion.from_pretrained(path), cache_dir=tmp_path)
    assert not again.unet.converted  # read back from the cache
    with pytest.raises(ValueError, match="converted for"):
        again.text_to_image("x", steps=1, height=128, width=128)


def test_openvino_takes_the_tokenizers_context_length(tmp_path):
    """The bundled model's context is 16 tokens, not CLIP's 77."""
    settings = dict(prompt="a red circle on a blue background", steps=3, seed=1)
    sd = StableDiffusion.from_pretrained()
    assert sd.tokenizer.max_length == 16
    torch_image = sd.text_to_image(**settings)[0]
    ov_image = use_openvino(StableDiffusion.from_pretrained(), cache_dir=tmp_path).text_to_image(**settings)[0]
    assert np.abs(np.asarray(torch_image, dtype=int) - np.asarray(ov_image, dtype=int)).max() <= 2


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_counts_as_unset(tmp_path, monkeypatch, xdg):
    """The XDG spec: a relative path there is invalid; the cache goes under ~/.cache instead of
    the working directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sd = use_openvino(StableDiffusion.from_pretrained())
    assert sd.unet.ir_path.is_relative_to(tmp_path / "home" / ".cache" / "sdlite" / "openvino")
    assert not (tmp_path / "sdlite").exists() and not (tmp_path / "relative").exists()
