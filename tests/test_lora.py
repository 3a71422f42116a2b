"""LoRA: both file formats, linear and conv layers, UNet and text encoder(s), exact unloading.

Two references: diffusers' own `load_lora_weights` + `fuse_lora` (with peft) for a UNet LoRA, and,
for text-encoder layers, diffusers' pipeline with the same low-rank update merged into its modules
by their diffusers names (diffusers 0.42.1's kohya text-encoder conversion does not fit the
unprefixed CLIP names of transformers 5, so its own loader drops those layers).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlite import StableDiffusion
from sdlite.loading import CheckpointError

diffusers = pytest.importorskip("diffusers")

RANK, ALPHA = 4, 2.0
# diffusers module names a test LoRA adapts: attention projections, a 1x1-conv proj_in (SD 1.x),
# a 3x3 resnet conv, the time embedding, text encoder attention and MLP.
SD1_UNET = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
            "up_blocks.2.attentions.2.transformer_blocks.0.attn1.to_out.0",
            "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
            "down_blocks.1.attentions.0.proj_in",
            "up_blocks.0.resnets.1.conv1",
            "time_embedding.linear_1"]
SD1_TEXT = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
PROMPT = "a red circle"
ARGS = dict(steps=3, seed=5, sampler="dpmpp_2m", height=64, width=64, cfg=7.5, n_images=1)


def low_rank(module: torch.nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a Linear or Conv2d, big enough to change the image."""
    g = torch.Generator().manual_seed(seed)
    w = module.weight
    if w.ndim == 4:
        down = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g) * 0.3
        up = torch.randn(w.shape[0], RANK, 1, 1, generator=g) * 0.3
    else:
        down = torch.randn(RANK, w.shape[1], generator=g) * 0.3
        up = torch.randn(w.shape[0], RANK, generator=g) * 0.3
    return down, up


def submodule(network, name):
    """A module by its diffusers / transformers name (transformers 5 drops `text_model.` in CLIPTextModel)."""
    try:
        return network.get_submodule(name)
    except AttributeError:
        return network.get_submodule(name.removeprefix("text_model."))


def build_lora(reference, targets: dict) -> dict:
    """{(network, diffusers name): (down, up)} for `targets` = {network: [names]}."""
    return {(net, name): low_rank(submodule(getattr(reference, net), name), seed)
            for seed, (net, name) in enumerate((n, m) for n, names in targets.items() for m in names)}


KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def write_kohya(layers: dict, path, prefixes=KOHYA, rename=lambda net, name: name):
    state = {}
    for (net, name), (down, up) in layers.items():
        key = prefixes[net] + rename(net, name).replace(".", "_")
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    save_file(state, path)
    return path


def write_peft(layers: dict, path):
    """diffusers / PEFT format: no alpha (scale 1), so the up matrix carries alpha / rank."""
    state = {}
    for (net, name), (down, up) in layers.items():
        state |= {f"{net}.{name}.lora_A.weight": down, f"{net}.{name}.lora_B.weight": up * (ALPHA / RANK)}
    save_file(state, path)
    return path


def merge_into_reference(reference, layers: dict, weight: float) -> None:
    with torch.no_grad():
        for (net, name), (down, up) in layers.items():
            module = submodule(getattr(reference, net), name)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            module.weight += weight * (ALPHA / RANK) * delta


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture(scope="module")
def sd1(family_model):
    folder, _ = family_model("sd1")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return folder, reference, build_lora(reference, {"unet": SD1_UNET, "text_encoder": SD1_TEXT})


def test_lora_changes_the_image_and_matches_diffusers(sd1, tmp_path):
    folder, reference, layers = sd1
    path = write_kohya(layers, tmp_path / "lora.safetensors")
    sd = StableDiffusion.from_pretrained(folder)
    base = pixels(sd.text_to_image(PROMPT, **ARGS))
    assert sd.load_lora(path, weight=0.8) == len(layers)
    ours = pixels(sd.text_to_image(PROMPT, **ARGS))
    assert np.abs(ours - base).max() > 20  # the LoRA does something
    merge_into_reference(reference, layers, 0.8)
    theirs = pixels(reference(PROMPT, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                              generator=torch.Generator("cpu").manual_seed(5)).images)
    assert np.abs(ours - theirs).max() <= 2
    # from_pretrained(loras=...) is the same as load_lora after loading
    again = StableDiffusion.from_pretrained(folder, loras=[(path, 0.8)])
    for a, b in zip(again.unet.state_dict().values(), sd.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_unet_lora_matches_diffusers_load_lora_weights(sd1, tmp_path):
    pytest.importorskip("peft")
    folder, _, _ = sd1
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    path = write_kohya(build_lora(reference, {"unet": SD1_UNET}), tmp_path / "unet_lora.safetensors")
    sd = StableDiffusion.from_pretrained(folder)
    sd.load_lora(path, weight=0.8)
    ours = pixels(sd.text_to_image(PROMPT, **ARGS))
    reference.load_lora_weights(str(tmp_path), weight_name=path.name)
    reference.fuse_lora(lora_scale=0.8)
    theirs = pixels(reference(PROMPT, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                              generator=torch.Generator("cpu").manual_seed(5)).images)
    assert np.abs(ours - theirs).max() <= 2


def test_kohya_and_peft_formats_merge_the_same(sd1, tmp_path):
    folder, _, layers = sd1
    kohya, peft = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(folder)
    kohya.load_lora(write_kohya(layers, tmp_path / "k.safetensors"), 0.5)
    peft.load_lora(write_peft(layers, tmp_path / "p.safetensors"), 0.5)
    for net in ("unet", "text_encoder"):
        a, b = getattr(kohya, net).state_dict(), getattr(peft, net).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_unload_restores_the_base_weights_exactly(sd1, tmp_path):
    folder, _, layers = sd1
    sd = StableDiffusion.from_pretrained(folder)
    before = {net: {k: v.clone() for k, v in getattr(sd, net).state_dict().items()} for net in ("unet", "text_encoder")}
    sd.load_lora(write_kohya(layers, tmp_path / "a.safetensors"), 0.7)
    sd.load_lora(write_peft(layers, tmp_path / "b.safetensors"), -1.3)
    changed = sd.unet.get_submodule(SD1_UNET[0]).weight
    assert not torch.equal(changed, before["unet"][SD1_UNET[0] + ".weight"])
    sd.unload_loras()
    for net, state in before.items():
        now = getattr(sd, net).state_dict()
        assert all(torch.equal(now[k], v) for k, v in state.items()), net  # bit for bit


def test_sdxl_kohya_names_in_the_original_layout(family_model, tmp_path):
    """kohya's SDXL LoRAs name UNet layers in the original layout and the encoders te1 / te2."""
    folder, _ = family_model("sdxl")
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    targets = {"unet": ["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
                        "up_blocks.0.attentions.1.proj_out", "up_blocks.1.resnets.0.conv_shortcut",
                        "add_embedding.linear_1", "down_blocks.0.downsamplers.0.conv"],
               "text_encoder": ["text_model.encoder.layers.1.self_attn.v_proj"],
               "text_encoder_2": ["text_model.encoder.layers.2.mlp.fc2", "text_projection"]}
    layers = build_lora(reference, targets)
    from sdlite import keys
    from sdlite.config import UNetConfig

    table = keys.unet_table(UNetConfig.from_json(dict(reference.unet.config)))
    original = {"unet": lambda name: keys.rename(name + ".weight", table, True).removesuffix(".weight")}
    kohya_path = write_kohya(layers, tmp_path / "xl.safetensors",
                             {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                             rename=lambda net, name: original.get(net, lambda n: n)(name))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in load_file(kohya_path)
    kohya, peft = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(folder)
    assert kohya.load_lora(kohya_path) == len(layers)
    peft.load_lora(write_peft(layers, tmp_path / "xl_peft.safetensors"))
    for net in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(kohya, net).state_dict(), getattr(peft, net).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), net
    merge_into_reference(reference, layers, 1.0)
    for net in ("unet", "text_encoder_2"):
        mine, theirs = getattr(kohya, net), getattr(reference, net)
        for name in targets[net]:
            assert torch.allclose(mine.get_submodule(name).weight, submodule(theirs, name).weight, atol=1e-6)


def test_a_lora_that_does_not_fit_names_the_layer(sd1, tmp_path):
    folder, _, layers = sd1
    sd = StableDiffusion.from_pretrained(folder)
    before = sd.unet.get_submodule(SD1_UNET[0]).weight.clone()
    down, up = layers[("unet", SD1_UNET[0])]
    wrong = dict(layers) | {("unet", SD1_UNET[0]): (torch.zeros(RANK, down.shape[1] + 1), up)}
    with pytest.raises(CheckpointError, match=r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
                                              r".*does not fit"):
        sd.load_lora(write_kohya(wrong, tmp_path / "wrong.safetensors"))
    assert torch.equal(sd.unet.get_submodule(SD1_UNET[0]).weight, before)  # nothing merged
    missing = {("unet", "down_blocks.7.attentions.0.proj_in"): (down, up)}
    with pytest.raises(CheckpointError, match=r"lora_unet_down_blocks_7_attentions_0_proj_in.*no linear or conv"):
        sd.load_lora(write_kohya(missing, tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="lora_te2_.*text_encoder_2, which this model does not have"):
        sd.load_lora(write_kohya({("text_encoder_2", SD1_TEXT[0]): layers[("text_encoder", SD1_TEXT[0])]},
                                 tmp_path / "te2.safetensors", {"text_encoder_2": "lora_te2_"}))
    save_file({"something.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not LoRA down/up/alpha weights"):
        sd.load_lora(tmp_path / "other.safetensors")


def test_lora_merges_drop_recorded_cuda_graphs(sd1, tmp_path):
    """Recorded CUDA graphs read the weights they were recorded with (see tests/test_cuda.py)."""
    from sdlite.graphs import CUDAGraphs

    folder, _, layers = sd1
    path = write_kohya(layers, tmp_path / "lora.safetensors")
    sd = StableDiffusion.from_pretrained(folder)
    sd.unet.cuda_graphs = CUDAGraphs()
    for change in (lambda: sd.load_lora(path), sd.unload_loras):
        sd.unet.cuda_graphs.graphs["a recorded signature"] = None
        change()
        assert not sd.unet.cuda_graphs.graphs


def test_lora_merges_into_fp16_weights_kept_at_rest(sd1, tmp_path):
    """fp16 at rest, fp32 compute: the merge goes into the stored fp16 tensors, as with fp16 parameters."""
    folder, _, layers = sd1
    path = write_kohya(layers, tmp_path / "lora.safetensors")
    plain = StableDiffusion.from_pretrained(folder, dtype=torch.float16)
    at_rest = StableDiffusion.from_pretrained(folder, dtype=torch.float16, compute_dtype=torch.float32)
    base = pixels(at_rest.text_to_image(PROMPT, **ARGS))
    assert plain.load_lora(path, 0.8) == at_rest.load_lora(path, 0.8) == len(layers)
    for net, name in layers:
        stored = submodule(getattr(at_rest, net), name).weights_at_rest.stored_value("weight")
        assert torch.equal(stored, submodule(getattr(plain, net), name).weight)
    assert np.abs(pixels(at_rest.text_to_image(PROMPT, **ARGS)) - base).max() > 20
    at_rest.unload_loras()
    assert np.array_equal(pixels(at_rest.text_to_image(PROMPT, **ARGS)), base)


def test_lora_into_palettized_jit_weights_says_to_use_fast_mode(sd1, tmp_path):
    from sdlite.palettize import compress

    folder, _, layers = sd1
    compress(folder, tmp_path / "pal", bits=8, min_elements=1000, log=None)
    path = write_kohya(layers, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match='palettized_mode="fast"'):
        StableDiffusion.from_pretrained(tmp_path / "pal", palettized_mode="jit").load_lora(path)
    assert StableDiffusion.from_pretrained(tmp_path / "pal", palettized_mode="fast").load_lora(path) == len(layers)
