"""StableDiffusion: load a checkpoint folder, encode prompts, run the denoising loop, decode images.

The loop is a generator (`generate_latents`) that yields the latents after every step, so callers
own progress bars, snapshots and early stopping. Randomness follows diffusers exactly: one CPU
`torch.Generator` seeded with `seed` draws the VAE posterior sample (img2img), then the initial
noise, then any ancestral noise — so a seed gives the reference implementation's image.
"""

import functools
import itertools
import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .clip import CLIPTextModel
from .config import CLIPConfig, UNetConfig, VAEConfig
from .graphs import CUDAGraphs
from .layers import ProjectedContext, limit_winograd
from .loading import CheckpointError, load_component, load_network, read_json
from .memory import (OnDemand, decode_tiled, device_memory, keep_at_rest, network_device, network_dtype,
                     release_weights, set_malloc_policy, trim_heap, using)
from .samplers import SAMPLERS, default_sampler, make_plan
from .schedules import ScheduleConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, chunk_feed_forward
from .vae import AutoencoderKL

BUNDLED_MODEL = Path(__file__).parent / "data" / "bundled"
# img2img inputs are cut to this multiple, as the common Stable Diffusion front ends do.
IMAGE_MULTIPLE = 64


@dataclass(frozen=True)
class Defaults:
    """Generation settings used when the caller gives none; a model folder's sdlite.json may override."""

    steps: int = 50  # diffusers' default
    cfg: float = 7.5
    sampler: str | None = None  # None: follow the checkpoint's scheduler class
    name: str | None = None  # None: the folder's name


class StableDiffusion:
    """A loaded Stable Diffusion model (SD 1.x / 2.x / SDXL) and the ways to generate images with it."""

    def __init__(self, tokenizer, text_encoder, unet, vae, schedule: ScheduleConfig, defaults: Defaults, path: Path,
                 tokenizer_2=None, text_encoder_2=None, force_zeros_for_empty_prompt: bool = False):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2  # SDXL's second tokenizer and text encoder (with projection)
        self.text_encoder_2 = text_encoder_2
        # SDXL: an empty negative prompt is all-zero conditioning, as diffusers does by default.
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._lora_base = {}  # (network, parameter) -> the weight before any LoRA was merged
        self.long_prompts = False  # chunked, weighted prompts (sdlite.prompts); off: diffusers' encoding
        self.unet = unet
        self.vae = vae
        self.schedule = schedule
        self.path = path
        self.name = defaults.name or path.name
        self.default_steps = defaults.steps
        self.default_cfg = defaults.cfg
        self.default_sampler = defaults.sampler or default_sampler(schedule)
        factor = vae.config.downscale_factor
        self.default_size = (unet.config.sample_size * factor, unet.config.sample_size * factor)
        self.vae_tile_size = None  # decode in tiles of this many latents (None: whole); low_memory sets 32
        self.low_memory = False

    @functools.cached_property
    def refused_samplers(self) -> dict[str, str]:
        """Sampler -> why this model's schedule refuses it (PNDM with zero terminal SNR), at the
        default steps."""
        refused = {}
        for name in SAMPLERS:
            try:
                make_plan(name, self.schedule, self.default_steps)
            except ValueError as e:
                refused[name] = str(e)
        return refused

    @property
    def sampler_names(self) -> tuple[str, ...]:
        """The samplers this model's schedule takes."""
        return tuple(name for name in SAMPLERS if name not in self.refused_samplers)

    @property
    def device(self) -> torch.device:
        return network_device(self.unet)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in (weights may be kept in another, see `compute_dtype`)."""
        return network_dtype(self.unet)

    @property
    def vae_dtype(self) -> torch.dtype:
        return network_dtype(self.vae)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        prediction_type: str | None = None,
        loras: list | tuple = (),
        long_prompts: bool = False,
        compute_dtype: torch.dtype | None = None,
        low_memory: bool = False,
        palettized_mode: str = "jit",
        cuda_graphs: bool = True,
    ) -> "StableDiffusion":
        """Load a diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
        scheduler/) or a single-file checkpoint (.safetensors, or .ckpt with `allow_pickle`); with
        no path, the model bundled with sdlite. `allow_pickle` permits pickle weights, which can run
        code when read: use it only for files you trust. `prediction_type` ("epsilon" or
        "v_prediction") overrides the checkpoint's (single files: see sdlite.single_file for the
        default). `loras` is a list of (path, weight) merged after loading (see `load_lora`);
        `long_prompts` reads prompts over 77 tokens and (word:1.3) emphasis (see sdlite.prompts).

        Memory: weights are kept in `dtype` and computed in `compute_dtype` (default `dtype`), layer
        by layer, e.g. dtype=torch.float16, compute_dtype=torch.float32 halves the RAM of fp32 on
        the CPU. `low_memory` loads the text encoder only to encode and the VAE only to decode (in
        tiles of `vae_tile_size` latents). Palettized folders (`sdlite compress`) rebuild each
        weight just before use (`palettized_mode="jit"`) or unpack them all at load ("fast").
        A UNet whose weights are kept at rest runs its convolutions without Winograd's algorithm
        (`sdlite.winograd`; its transient transformed weights would cost memory); otherwise
        low-memory mode has them transform their weights for it in each call, not keep them at
        1.8-4x their size (`sdlite.layers.limit_winograd`). Low-memory mode also runs the UNet's
        feed-forward layers over 1,024 tokens at a time (`sdlite.unet.chunk_feed_forward`) and
        gives the heap's free memory back to the system after each VAE tile, around each on-demand
        network and, for a UNet whose weights are kept at rest (palettized jit, fp16 at rest),
        after its mid block and each of its up blocks (`sdlite.memory.trim_heap`).
        On the CPU, loading sets the process's malloc policy
        (`sdlite.memory.set_malloc_policy`: large freed blocks are kept for reuse), and the text
        encoders and the VAE give their memory-mapped weights' pages back after each use
        (`sdlite.memory.release_weights`); in low-memory mode the UNet does too while the VAE
        decodes.
        On CUDA, the UNet's calls replay CUDA graphs (`sdlite.graphs`: one launch instead of one per
        kernel; the first call of each batch and size records one) unless `cuda_graphs` is False or
        its weights are kept at rest."""
        path = BUNDLED_MODEL if path is None else Path(path)
        source = open_checkpoint(path, device, allow_pickle, prediction_type, palettized_mode)
        configs = source.configs
        unet_config = UNetConfig.from_json(configs["unet"])
        vae_config = VAEConfig.from_json(configs["vae"])
        schedule = ScheduleConfig.from_json(configs["scheduler"])
        compute_dtype = dtype if compute_dtype is None else compute_dtype
        # SDXL's VAE overflows in fp16 (black images): computed in fp32 where flagged force_upcast,
        # as diffusers' SDXL pipeline does. Its SD 1.x/2.x pipelines ignore the flag (set in those
        # VAEs' configs too) and decode in fp16, which those VAEs survive.
        upcast = vae_config.force_upcast and unet_config.is_sdxl and compute_dtype == torch.float16
        vae_compute = torch.float32 if upcast else compute_dtype
        vae_dtype = vae_compute if dtype == compute_dtype else dtype

        def held(component, network_class, config, dtype, compute, on_demand=False):
            """The network, or with `on_demand` (low_memory) a loader called at each use."""
            def load():
                return source.load(component, network_class, config, dtype, compute)

            return OnDemand(load, config, compute, device) if on_demand else load()

        text_config = CLIPConfig.from_json(configs["text_encoder"])
        text_encoder = held("text_encoder", CLIPTextModel, text_config, dtype, compute_dtype, low_memory)
        second = {}
        if "text_encoder_2" in configs:
            config_2 = CLIPConfig.from_json(configs["text_encoder_2"], with_projection=True)
            second = dict(text_encoder_2=held("text_encoder_2", CLIPTextModel, config_2, dtype, compute_dtype, low_memory),
                          tokenizer_2=load_tokenizer(source.tokenizer_folder("tokenizer_2"), config_2))
        sd = cls(
            tokenizer=load_tokenizer(source.tokenizer_folder("tokenizer"), text_config),
            text_encoder=text_encoder,
            unet=held("unet", UNet2DConditionModel, unet_config, dtype, compute_dtype),
            vae=held("vae", AutoencoderKL, vae_config, vae_dtype, vae_compute, low_memory),
            schedule=schedule,
            defaults=source.defaults,
            path=path,
            force_zeros_for_empty_prompt=configs["model_index"].get("force_zeros_for_empty_prompt", False),
            **second,
        )
        for lora in loras:
            lora_path, weight = (lora, 1.0) if isinstance(lora, (str, Path)) else lora
            sd.load_lora(lora_path, weight, allow_pickle)
        sd.long_prompts = long_prompts
        sd.low_memory = low_memory
        unet_at_rest = hasattr(sd.unet, "stored_tensors")  # palettized jit or fp16 at rest
        # Weights kept at rest are chosen for memory, and Winograd's transient transformed weights
        # cost it: 6-bit jit at 512 px peaked at 1,383-1,458 against 1,356-1,364 MiB with
        # low_memory, at 2,812-2,892 against 2,372-2,512 MiB without (for steps 4-10% faster).
        # Low-memory mode makes them for each call instead of keeping them (1.8-4x the weights).
        if unet_at_rest or low_memory:
            limit_winograd(sd.unet, None if unet_at_rest else "per call")
        if low_memory:
            sd.vae_tile_size = 32
            chunk_feed_forward(sd.unet, 1024)
            # Trimming pays where the weights are compact (kept at rest), so the heap is much of the
            # RSS; with fp32 weights it cost 7-17% of a step at 256 px and lowered no peak.
            blocks = [sd.unet.mid_block, *sd.unet.up_blocks] if unet_at_rest else []
            for block in blocks:  # where the largest transients are
                if block is not None:  # (a UNet without a mid block)
                    block.register_forward_hook(lambda *_: trim_heap())
        if cuda_graphs and sd.device.type == "cuda" and not unet_at_rest:
            sd.unet.cuda_graphs = CUDAGraphs()
        if sd.device.type == "cpu":
            set_malloc_policy()
            # used once per image: resident only while they run
            for network in (sd.text_encoder, sd.text_encoder_2, sd.vae):
                if isinstance(network, torch.nn.Module):
                    network.release_after_use = True
        return sd

    # -- LoRA -----------------------------------------------------------------------------------

    def load_lora(self, path: str | Path, weight: float = 1.0, allow_pickle: bool = False) -> int:
        """Merge a LoRA file (kohya / web UI or diffusers / PEFT format) into the UNet and text
        encoder(s), scaled by `weight`; returns the number of layers changed. A LoRA that does not
        fit raises CheckpointError naming the layer and changes nothing. See sdlite.lora."""
        from .lora import merge_lora

        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"LoRA weight must be a finite number, got {weight!r}")
        return merge_lora(self, path, weight, allow_pickle)

    def unload_loras(self) -> None:
        """Restore the weights from before the first `load_lora`, bit for bit."""
        from .lora import unload_loras

        unload_loras(self)

    # -- text ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompt: str, negative_prompt: str, n_images: int, guided: bool) -> torch.Tensor:
        """Text conditioning for a batch: (2N, T, D) as [negative]*N + [prompt]*N when guided."""
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(text, str):
                raise ValueError(f"{name} must be a string, got {type(text).__name__}")
        prompts = [negative_prompt, prompt] if guided else [prompt]
        if self.long_prompts:
            states, _ = self._encode_long(self.text_encoder, self.tokenizer, prompts, penultimate=False)
            return states.repeat_interleave(n_images, dim=0)
        ids = torch.tensor(self.tokenizer(prompts), device=self.device)
        with using(self.text_encoder) as text_encoder:
            states = text_encoder(ids).last_hidden_state  # (1 or 2, T, D)
        return states.repeat_interleave(n_images, dim=0)

    def _encode(self, encoder, tokenizer, prompts: list[str]):
        """CLIPOutput of `encoder` for `prompts`."""
        return self._encode_ids(encoder, tokenizer(prompts))

    def _encode_long(self, encoder, tokenizer, prompts: list[str], penultimate: bool):
        """Chunked, weighted states (P, 77 k, D) and first-chunk pooled outputs (P, D') of
        `prompts` (see sdlite.prompts)."""
        from .prompts import batch_chunks, reweight

        rows, weights, k = batch_chunks(tokenizer, prompts)
        out = self._encode_ids(encoder, rows)
        states = out.penultimate_hidden_state if penultimate else out.last_hidden_state  # (P k, 77, D)
        states = reweight(states, torch.tensor(weights, dtype=states.dtype, device=states.device))
        pooled = out.pooled_output if out.text_embeds is None else out.text_embeds  # (P k, D')
        return states.reshape(len(prompts), -1, states.shape[-1]), pooled[::k]

    def _encode_ids(self, encoder, ids: list[list[int]]):
        """CLIPOutput of `encoder` for rows of token ids."""
        ids = torch.tensor(ids, device=self.device)
        with using(encoder) as network:
            return network(ids)

    @torch.inference_mode()
    def encode_prompt_sdxl(self, prompt: str, negative_prompt: str, n_images: int, guided: bool,
                           size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """SDXL conditioning, as diffusers' StableDiffusionXLPipeline: the penultimate hidden states
        of both text encoders concatenated (2N, T, D1 + D2), and added_cond = the second encoder's
        projected pooled output (2N, P) with the micro-conditioning time ids (2N, 6) = original
        size, crop top-left (0, 0), target size, all (height, width) of the image. With
        `force_zeros_for_empty_prompt`, an empty negative prompt is all-zero conditioning
        (diffusers' behaviour when no negative prompt is given)."""
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(text, str):
                raise ValueError(f"{name} must be a string, got {type(text).__name__}")
        zero_negative = guided and negative_prompt == "" and self.force_zeros_for_empty_prompt
        prompts = [negative_prompt, prompt] if guided and not zero_negative else [prompt]
        if self.long_prompts:
            first, _ = self._encode_long(self.text_encoder, self.tokenizer, prompts, penultimate=True)
            second, pooled = self._encode_long(self.text_encoder_2, self.tokenizer_2, prompts, penultimate=True)
            states = torch.cat([first, second], dim=-1)
        else:
            first = self._encode(self.text_encoder, self.tokenizer, prompts)
            second = self._encode(self.text_encoder_2, self.tokenizer_2, prompts)
            states = torch.cat([first.penultimate_hidden_state, second.penultimate_hidden_state], dim=-1)
            pooled = second.text_embeds  # (1 or 2, P)
        if zero_negative:
            states = torch.cat([torch.zeros_like(states), states])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=states.dtype, device=self.device)
        added = {"text_embeds": pooled.repeat_interleave(n_images, dim=0),
                 "time_ids": time_ids.repeat(len(states) * n_images, 1)}
        return states.repeat_interleave(n_images, dim=0), added

    def _conditioning(self, prompt, negative_prompt, n_images, guided, size):
        """(text states, UNet added_cond or None) for a batch."""
        if self.text_encoder_2 is None:
            return self.encode_prompt(prompt, negative_prompt, n_images, guided), None
        return self.encode_prompt_sdxl(prompt, negative_prompt, n_images, guided, size)

    # -- denoising ----------------------------------------------------------------------------

    def num_denoising_steps(self, steps: int | None = None, strength: float = 1.0, sampler: str | None = None) -> int:
        """How many steps `generate_latents` (strength 1) or its img2img variant will yield."""
        return self._plan(sampler, steps, strength).num_steps

    def _plan(self, sampler, steps, strength):
        sampler = self.default_sampler if sampler is None else sampler
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return make_plan(sampler, self.schedule, steps, strength)

    def _latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        factor = self.vae.config.downscale_factor
        smallest = max(8, factor)
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest or value % 8:
                raise ValueError(f"{name} must be a multiple of 8, at least {smallest}; got {value!r}")
        return height // factor, width // factor

    def check_memory(self, height: int, width: int) -> None:
        """Refuse a size whose single largest activation could not fit in the device's memory: the
        VAE decoder's last level for a whole image, or, decoding in tiles, the UNet's first level
        at batch 2. Sizes that pass may still not fit; these surely do not."""
        memory = device_memory(self.device)
        pixels = height * width
        tiles = self.vae_tile_size is not None
        if tiles:
            widest = 2 * self.unet.config.block_out_channels[0] * pixels // self.vae.config.downscale_factor**2
            widest *= self.dtype.itemsize
        else:
            widest = self.vae.config.block_out_channels[0] * pixels * self.vae_dtype.itemsize
        if memory is not None and widest > memory:
            hint = "" if tiles else " (low_memory=True / --low-memory decodes in tiles)"
            raise ValueError(f"{width}x{height} is too large for this device: one activation alone takes "
                             f"{size_text(widest)} of its {size_text(memory)}{hint}")

    def _denoise(self, x, plan, conditioning, cfg, generator) -> Iterator[tuple[int, torch.Tensor]]:
        guided = cfg > 1
        context, added = conditioning
        context = ProjectedContext(context)  # the same text at every step: its projections are kept

        def model(x_in: torch.Tensor, t) -> torch.Tensor:
            if not guided:
                return self.unet(x_in, t, context, added)
            # both texts denoise the same latents: the UNet repeats them where the text reaches them
            uncond, cond = self.unet(x_in, t, context, added).chunk(2)
            return uncond + cfg * (cond - uncond)

        steps = plan.sample(model, x, generator=generator)
        for i in itertools.count():
            with torch.inference_mode():  # per step: the caller's code between steps runs as it would
                x = next(steps, None)
                if x is None:
                    return
                latents = plan.to_latents(x, i)
            yield i, latents.clone()  # an ordinary tensor of the caller's: changing it leaves the sampler as it is

    def _setup(self, prompt, negative_prompt, n_images, steps, cfg, seed, sampler, strength, size):
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
        cfg = self.default_cfg if cfg is None else cfg
        if not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
            raise ValueError(f"cfg must be a finite number, got {cfg!r}")
        plan = self._plan(sampler, steps, strength)
        context = self._conditioning(prompt, negative_prompt, n_images, cfg > 1, size)
        seed = random.randrange(2**32) if seed is None else seed
        generator = torch.Generator("cpu").manual_seed(seed)
        return plan, context, cfg, generator

    def _noise(self, shape, generator) -> torch.Tensor:
        # Drawn on the CPU in the model's dtype, as diffusers' randn_tensor does.
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    def generate_latents(
        self,
        prompt: str,
        negative_prompt: str = "",
        n_images: int = 1,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Text to image: a generator of (step index, latents) after every denoising step.

        Settings are checked and the prompt encoded when this is called, so bad input raises here,
        not at the first `next()`.

        cfg <= 1 turns classifier-free guidance off (one UNet pass per step), as in diffusers.
        """
        latent_h, latent_w = self._latent_size(height, width)
        factor = self.vae.config.downscale_factor
        self.check_memory(latent_h * factor, latent_w * factor)
        plan, context, cfg, generator = self._setup(prompt, negative_prompt, n_images, steps, cfg, seed, sampler, 1.0,
                                                    (latent_h * factor, latent_w * factor))
        channels = self.unet.config.in_channels
        x = self._noise((n_images, channels, latent_h, latent_w), generator) * plan.init_noise_sigma
        return self._denoise(x, plan, context, cfg, generator)

    def generate_latents_from_image(
        self,
        image: Image.Image,
        prompt: str,
        strength: float = 0.8,
        negative_prompt: str = "",
        n_images: int = 1,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Image to image: encode `image`, noise it for `strength` (0 keeps it; 1 starts from the
        schedule's first noise level, which may keep a trace of it, as in diffusers) and return a
        generator that denoises the remaining steps, yielding (step index, latents). Bad input
        raises when this is called, as for `generate_latents`.

        The image is used at its own size (or resized to height x width when given); sides that
        are not multiples of 64 are cut down to one, with a warning.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        pixels = image_to_tensor(self.fit_image(image, height, width)).to(self.device)
        plan, context, cfg, generator = self._setup(
            prompt, negative_prompt, n_images, steps, cfg, seed, sampler, strength, tuple(pixels.shape[-2:])
        )
        if plan.num_steps == 0:  # nothing to denoise: no encoding either
            if strength > 0:
                total = self.default_steps if steps is None else steps
                warnings.warn(f"strength {strength} runs no step of {total}: the image comes back unchanged",
                              stacklevel=2)
            return iter(())
        with torch.inference_mode():
            with using(self.vae) as vae:
                posterior = vae.encode(pixels.to(self.vae_dtype))
            x0 = posterior.sample(generator).to(self.dtype) * self.vae.config.scaling_factor
        x0 = x0.repeat(n_images, 1, 1, 1)
        noise = self._noise(x0.shape, generator)
        return self._denoise(plan.add_noise(x0, noise), plan, context, cfg, generator)

    def fit_image(self, image: Image.Image, height: int | None = None, width: int | None = None) -> Image.Image:
        """The RGB image img2img works on: its own size, or height x width where given, cut down
        to multiples of 64 (with a warning); resized once, so a replay of the recorded size gives
        the same pixels."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
        if height is not None or width is not None:
            self._latent_size(height, width)  # the sides given (the other is the model's default here)
        w = image.width if width is None else width
        h = image.height if height is None else height
        new_w, new_h = w - w % IMAGE_MULTIPLE, h - h % IMAGE_MULTIPLE
        if new_w == 0 or new_h == 0:
            raise ValueError(f"image is {w}x{h}; img2img needs at least {IMAGE_MULTIPLE}x{IMAGE_MULTIPLE} pixels")
        if (new_w, new_h) != (w, h):
            size = "image" if (w, h) == image.size else "size asked"
            warnings.warn(f"{size} is {w}x{h}, not a multiple of {IMAGE_MULTIPLE}: resized to {new_w}x{new_h}",
                          stacklevel=3)
        self.check_memory(new_h, new_w)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.LANCZOS)
        return image.convert("RGB")

    # -- images -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> list[Image.Image]:
        """Latents (N, C, h, w) to N PIL images, decoding at most `batch_size` at a time."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = batch_size or len(latents)
        images = []
        if self.low_memory:  # the UNet's mapped weights leave RAM while the VAE works
            release_weights(self.unet)
        with using(self.vae) as vae:
            for chunk in latents.split(batch_size):
                z = chunk.to(self.vae_dtype) / self.vae.config.scaling_factor
                pixels = vae.decode(z) if self.vae_tile_size is None else decode_tiled(vae, z, self.vae_tile_size)
                pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
                images += [Image.fromarray(a) for a in (pixels * 255).round().astype(np.uint8)]
        return images

    def text_to_image(self, prompt: str, *, decode_batch_size: int | None = None, **kwargs) -> list[Image.Image]:
        """Generate images from text; keywords as for `generate_latents`."""
        latents = None
        for _, latents in self.generate_latents(prompt, **kwargs):
            pass
        return self.decode(latents, decode_batch_size)

    def image_to_image(
        self, image: Image.Image, prompt: str, strength: float = 0.8, *, decode_batch_size: int | None = None, **kwargs
    ) -> list[Image.Image]:
        """Transform an image guided by text; keywords as for `generate_latents_from_image`."""
        image = self.fit_image(image, kwargs.pop("height", None), kwargs.pop("width", None))
        latents = None
        for _, latents in self.generate_latents_from_image(image, prompt, strength, **kwargs):
            pass
        if latents is None:  # no step ran (strength 0, or too small for the steps): the image unchanged
            return [image.copy() for _ in range(kwargs.get("n_images", 1))]
        return self.decode(latents, decode_batch_size)


@dataclass
class CheckpointSource:
    """Where a model's parts come from: its component configs, its tokenizer folders, its default
    settings, and `load(component, network_class, config, dtype, compute_dtype)` for its networks."""

    configs: dict
    tokenizer_folder: Callable[[str], Path]
    defaults: Defaults
    load: Callable[..., torch.nn.Module]


def open_checkpoint(path: Path, device, allow_pickle: bool, prediction_type: str | None,
                    palettized_mode: str) -> CheckpointSource:
    """A single-file checkpoint or a diffusers-layout folder, with what `from_pretrained` needs of it."""
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path} (nor a single-file checkpoint of that name)")
    if path.is_file():
        from .single_file import read_single_file

        checkpoint = read_single_file(path, allow_pickle=allow_pickle, prediction_type=prediction_type)

        def load_from_file(component, network_class, config, dtype, compute):
            with torch.device("meta"):
                network = network_class(config)
            network = load_network(network, checkpoint.weights[component], f"{path} ({component})", dtype, device)
            return keep_at_rest(network, compute) if compute != dtype else network

        return CheckpointSource(checkpoint.configs, checkpoint.folder, Defaults(name=path.stem), load_from_file)

    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers-layout model folder (no model_index.json)")
    configs = {"model_index": read_json(path / "model_index.json"),
               "scheduler": read_json(path / "scheduler" / "scheduler_config.json")}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if component == "text_encoder_2" and not (path / component).is_dir():
            continue
        configs[component] = read_json(path / component / "config.json")
    if prediction_type is not None:
        configs["scheduler"] = dict(configs["scheduler"], prediction_type=prediction_type)

    def load_from_folder(component, network_class, config, dtype, compute):
        return load_component(network_class, config, path / component, dtype, device=device,
                              allow_pickle=allow_pickle, compute_dtype=compute, palettized_mode=palettized_mode)

    return CheckpointSource(configs, path.joinpath, read_defaults(path / "sdlite.json"), load_from_folder)


def load_tokenizer(folder: Path, text_config: CLIPConfig) -> CLIPTokenizer:
    """The tokenizer in `folder`, checked against the embedding table of the encoder it feeds."""
    tokenizer = CLIPTokenizer.from_folder(folder, text_config.max_position_embeddings)
    largest = max(tokenizer.vocab.values())
    if largest >= text_config.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has ids up to {largest} but the text encoder has only "
            f"{text_config.vocab_size} token embeddings; the folder needs the vocab.json and merges.txt "
            "the model was trained with"
        )
    return tokenizer


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (1, 3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def read_defaults(path: Path) -> Defaults:
    """The optional sdlite.json of a model folder: default steps, cfg, sampler and display name."""
    if not path.is_file():
        return Defaults()
    settings = read_json(path)
    fields = {k: settings[k] for k in ("steps", "cfg", "sampler", "name") if k in settings}
    return Defaults(**fields)
