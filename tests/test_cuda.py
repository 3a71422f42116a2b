"""sdlite on a CUDA GPU, against diffusers and transformers there: the networks, text to image and
image to image in fp32 and fp16, low-memory mode, palettized and fp16-at-rest weights, CUDA graphs
(also across LoRA merges) and the command line. Skipped without a GPU (CI has none); on a machine
with one, `python -m pytest tests/test_cuda.py` (or `bash benchmarks/cuda.sh OUT_DIR`).

The truth is the reference in fp32 on the CPU. Tolerances:
- fp32 on the GPU (TF32 off): networks within 1e-4 of the truth's max abs value, as on the CPU;
  images within 2/255, text to image and image to image, with and without noise at each step.
- fp16 on the GPU: no further from the truth than twice the reference's own fp16 error (relative
  L2 for networks, max per-pixel difference for images), with a floor of 1e-3 and 2/255 for when
  the reference happens to land very close. The fp16 images' truth starts from the same fp16 noise.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MODEL_KINDS
from test_cli import ok, sdlite
from test_networks import assert_close, build_ours, clip_state_dict, token_ids, unet_inputs
from test_pipeline import HEIGHT, PROMPT, WIDTH, max_pixel_diff, source_image, use_sampler

from reference_models import CROSS_ATTENTION_DIM, build_components, load_reference_pipeline
from sdlite import StableDiffusion
from sdlite.clip import CLIPTextModel
from sdlite.config import CLIPConfig, UNetConfig, VAEConfig
from sdlite.memory import decode_tiled
from sdlite.palettize import compress
from sdlite.unet import UNet2DConditionModel
from sdlite.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
DEVICE = "cuda"
SETTINGS = dict(n_images=2, steps=6, cfg=7.5, seed=1234, height=HEIGHT, width=WIDTH)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: cuDNN's convolutions otherwise run in TF32 (10-bit mantissas)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    out, truth = out.detach().cpu().double(), truth.double()
    return ((out - truth).norm() / truth.norm()).item()


def network_outputs(components: dict, device: str, dtype: torch.dtype, ours: bool) -> dict:
    """The text encoder's, UNet's and VAE decoder's outputs for fixed inputs, from the reference's
    modules or from sdlite's built from their weights, run on `device` in `dtype`."""
    text, unet, vae = (copy.deepcopy(components[k]) for k in ("text_encoder", "unet", "vae"))
    if ours:
        text = build_ours(CLIPTextModel, CLIPConfig.from_json(text.config.to_dict()), clip_state_dict(text))
        unet = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(unet.config)), unet.state_dict())
        vae = build_ours(AutoencoderKL, VAEConfig.from_json(dict(vae.config)), vae.state_dict())
    text, unet, vae = (m.to(device, dtype) for m in (text, unet, vae))
    x, context = (t.to(device, dtype) for t in unet_inputs(2, 8, 8, CROSS_ATTENTION_DIM))
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        hidden = text(token_ids().to(device)).last_hidden_state
        noise = unet(x, 500, context)
        pixels = vae.decode(z)
    if not ours:
        noise, pixels = noise.sample, pixels.sample
    return {"text encoder": hidden.float().cpu(), "unet": noise.float().cpu(), "vae decoder": pixels.float().cpu()}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_networks_on_cuda_match_the_reference(kind):
    components = build_components(kind)
    truth = network_outputs(components, "cpu", torch.float32, ours=False)
    for name, out in network_outputs(components, DEVICE, torch.float32, ours=True).items():
        assert_close(out, truth[name])
    ours = network_outputs(components, DEVICE, torch.float16, ours=True)
    theirs = network_outputs(components, DEVICE, torch.float16, ours=False)
    for name in truth:
        error, reference_error = relative_error(ours[name], truth[name]), relative_error(theirs[name], truth[name])
        print(f"fp16 {kind} {name}: sdlite {error:.2e}, reference {reference_error:.2e}")
        assert error <= max(2 * reference_error, 1e-3), name


def reference_images(folder, device: str, dtype: torch.dtype, sampler: str, img2img: bool = False,
                     latents: torch.Tensor | None = None) -> list:
    pipe = load_reference_pipeline(folder, img2img).to(device, dtype)
    use_sampler(pipe, sampler)
    s = SETTINGS
    generator = torch.Generator("cpu").manual_seed(s["seed"])
    common = dict(negative_prompt="blurry", num_images_per_prompt=s["n_images"], num_inference_steps=s["steps"],
                  guidance_scale=s["cfg"], generator=generator)
    if img2img:
        return pipe(PROMPT, image=source_image(), strength=0.6, **common).images
    return pipe(PROMPT, height=s["height"], width=s["width"], latents=latents, **common).images


def as_array(images: list) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def sdlite_pipeline(folder, device: str, dtype: torch.dtype, **load) -> StableDiffusion:
    sd = StableDiffusion.from_pretrained(folder, device=device, dtype=dtype, **load)
    assert sd.device.type == device
    return sd


def sdlite_images(sd: StableDiffusion, sampler: str, img2img: bool = False) -> list:
    if img2img:
        settings = {k: v for k, v in SETTINGS.items() if k not in ("height", "width")}
        return sd.image_to_image(source_image(), PROMPT, strength=0.6, negative_prompt="blurry", sampler=sampler,
                                 **settings)
    return sd.text_to_image(PROMPT, negative_prompt="blurry", sampler=sampler, **SETTINGS)


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
@pytest.mark.parametrize("kind", MODEL_KINDS, ids=lambda k: "-".join(k))
def test_fp32_images_on_cuda_match_diffusers(reference_model, kind, sampler, img2img):
    folder = reference_model(*kind)
    truth = reference_images(folder, "cpu", torch.float32, sampler, img2img)
    ours = sdlite_images(sdlite_pipeline(folder, DEVICE, torch.float32), sampler, img2img)
    assert max_pixel_diff(ours, truth) <= 2


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("kind", MODEL_KINDS, ids=lambda k: "-".join(k))
def test_fp16_images_on_cuda_are_as_close_as_diffusers(reference_model, kind, sampler):
    """Both engines draw the initial noise in the model's dtype, and torch's fp16 draws are not the
    fp32 draws rounded (not in torch 2.11, at least), so the truth starts from the fp16 noise."""
    folder = reference_model(*kind)
    s = SETTINGS
    shape = (s["n_images"], 4, s["height"] // 8, s["width"] // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s["seed"]), dtype=torch.float16)
    truth = reference_images(folder, "cpu", torch.float32, sampler, latents=noise.float())
    ours = max_pixel_diff(sdlite_images(sdlite_pipeline(folder, DEVICE, torch.float16), sampler), truth)
    theirs = max_pixel_diff(reference_images(folder, DEVICE, torch.float16, sampler), truth)
    print(f"fp16 {kind} {sampler}: sdlite {ours}/255, diffusers {theirs}/255 from the truth")
    assert ours <= max(2 * theirs, 2)


def test_low_memory_palettized_and_weights_at_rest_on_cuda(reference_model, tmp_path):
    folder = reference_model("sd2", "epsilon")

    def pixels(path, dtype=torch.float16, **load):
        sd = sdlite_pipeline(path, DEVICE, dtype, **load)
        return as_array(sdlite_images(sd, "ddim"))

    plain = pixels(folder)
    assert np.abs(pixels(folder, low_memory=True) - plain).max() <= 1
    z = torch.randn(2, 4, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():  # low-memory mode's tiled decoding, in 6 tiles here
        tiled = {device: decode_tiled(sdlite_pipeline(folder, device, torch.float32).vae, z.to(device), 4, 2).cpu()
                 for device in ("cpu", DEVICE)}
    assert_close(tiled[DEVICE], tiled["cpu"])
    compress(folder, tmp_path / "8bit", bits=8, min_elements=1000, log=None)
    fast = pixels(tmp_path / "8bit", palettized_mode="fast")
    assert np.abs(pixels(tmp_path / "8bit", palettized_mode="jit", low_memory=True) - fast).max() <= 1
    assert np.abs(fast - plain).mean() < 3  # 8 bits: close to the unpalettized model
    fp32 = pixels(folder, torch.float32)
    at_rest = pixels(folder, torch.float16, compute_dtype=torch.float32)
    assert np.abs(at_rest - fp32).mean() < 1


def test_cuda_graphs_replay_the_plain_calls(reference_model, family_model):
    """SD 2 and SDXL (its added conditioning is more inputs), a graph for each batch size, the same
    images as without graphs."""
    for folder in (reference_model("sd2", "epsilon"), family_model("sdxl")[0]):
        graphed = sdlite_pipeline(folder, DEVICE, torch.float16)
        plain = sdlite_pipeline(folder, DEVICE, torch.float16, cuda_graphs=False)
        assert plain.unet.cuda_graphs is None
        for n_images in (1, 2):
            args = dict(steps=3, seed=0, cfg=5.0, n_images=n_images, height=64, width=64)
            replayed = as_array(graphed.text_to_image(PROMPT, **args))
            assert np.abs(replayed - as_array(plain.text_to_image(PROMPT, **args))).max() <= 1
        assert len(graphed.unet.cuda_graphs.graphs) == 2


def test_cuda_graphs_follow_lora_merges(family_model, tmp_path):
    from test_lora import ARGS, SD1_TEXT, SD1_UNET, build_lora, write_kohya

    folder, _ = family_model("sd1")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    layers = build_lora(reference, {"unet": SD1_UNET, "text_encoder": SD1_TEXT})
    path = write_kohya(layers, tmp_path / "lora.safetensors")
    graphed, plain = (sdlite_pipeline(folder, DEVICE, torch.float16, cuda_graphs=g) for g in (True, False))

    def images(sd):
        return as_array(sd.text_to_image("a red circle", **ARGS))

    before = images(graphed)
    for sd in (graphed, plain):
        sd.load_lora(path, 0.8)
    with_lora = images(graphed)
    assert np.abs(with_lora - before).max() > 20  # the LoRA's weights are the ones replayed
    assert np.abs(with_lora - images(plain)).max() <= 1
    for sd in (graphed, plain):
        sd.unload_loras()
    assert np.abs(images(graphed) - before).max() <= 1


def test_cli_generates_on_cuda(tmp_path):
    """The bundled model in fp16 on the GPU draws the picture it draws in fp16 on the CPU (the same
    fp16 noise; see test_fp16_images_on_cuda_are_as_close_as_diffusers)."""
    for name, device in (("cpu", "cpu"), ("gpu", DEVICE)):
        ok(sdlite("generate", "a red circle on a blue background", "--steps", 4, "--seed", 3, "-o", f"{name}.png",
                  "--device", device, "--dtype", "float16", cwd=tmp_path))
    cpu, gpu = (np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) for name in ("cpu", "gpu"))
    assert np.abs(cpu - gpu).mean() < 1
