"""SDXL: two text encoders, pooled projection and size micro-conditioning, against diffusers'
StableDiffusionXLPipeline on a tiny SDXL-like model (reference_models.build_family_model("sdxl"))."""

import numpy as np
import pytest
import torch

from sdlite import StableDiffusion

diffusers = pytest.importorskip("diffusers")
from test_pipeline import REFERENCE_SCHEDULERS, max_pixel_diff, source_image, use_sampler  # noqa: E402

PROMPT = "a red circle on a blue background, digital art"


@pytest.fixture(scope="module")
def sdxl(family_model):
    folder, single = family_model("sdxl")
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return StableDiffusion.from_pretrained(folder), reference, folder, single


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_text_to_image_matches_diffusers(sdxl, sampler):
    sd, reference, _, _ = sdxl
    use_sampler(reference, sampler)
    negatives = [("", None), ("blurry, low quality", "blurry, low quality")] if sampler == "euler" else [("", None)]
    for ours_negative, their_negative in negatives:  # "" is diffusers' zeroed negative (force_zeros_for_empty_prompt)
        ours = sd.text_to_image(PROMPT, negative_prompt=ours_negative, n_images=2, steps=5, cfg=6.0, seed=7,
                                sampler=sampler, height=64, width=48)
        theirs = reference(PROMPT, negative_prompt=their_negative, num_images_per_prompt=2, num_inference_steps=5,
                           guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(7), height=64,
                           width=48).images
        assert ours[0].size == (48, 64)
        assert max_pixel_diff(ours, theirs) <= 2


def test_image_to_image_matches_diffusers(sdxl):
    sd, _, folder, _ = sdxl
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    image = source_image()
    ours = sd.image_to_image(image, PROMPT, strength=0.6, steps=6, cfg=5.0, seed=2, sampler="euler")
    theirs = reference(PROMPT, image=image, strength=0.6, num_inference_steps=6, guidance_scale=5.0,
                       generator=torch.Generator("cpu").manual_seed(2)).images
    assert max_pixel_diff(ours, theirs) <= 2


def test_single_file_sdxl_matches_folder_and_diffusers(sdxl):
    sd, _, folder, single = sdxl
    from_file = StableDiffusion.from_pretrained(single)
    assert from_file.default_size == (1024, 1024)  # the SDXL reference config's sample size
    assert from_file.vae.config.scaling_factor == 0.13025
    args = dict(n_images=1, steps=4, cfg=6.0, seed=11, sampler="euler", height=64, width=64)
    ours = from_file.text_to_image(PROMPT, **args)
    assert max_pixel_diff(ours, sd.text_to_image(PROMPT, **args)) <= 1  # weights equal; see test_single_file
    reference = diffusers.StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder),
                                                                      local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                       generator=torch.Generator("cpu").manual_seed(11)).images
    assert max_pixel_diff(ours, theirs) <= 2


def test_sdxl_defaults_and_fp16_vae(sdxl):
    _, _, folder, _ = sdxl
    sd = StableDiffusion.from_pretrained(folder, dtype=torch.float16)
    assert sd.vae_dtype == torch.float32  # force_upcast: the VAE stays in fp32
    assert sd.text_encoder_2.config.with_projection
    assert sd.default_size == (64, 64)  # sample_size 8 x the VAE's factor 8
    latents = None
    for _, latents in sd.generate_latents(PROMPT, steps=2, seed=0, cfg=1.0):
        pass
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    assert np.asarray(sd.decode(latents)[0]).shape == (64, 64, 3)
