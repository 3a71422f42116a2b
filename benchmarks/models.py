"""Random-weight Stable Diffusion checkpoints for benchmarking, written in the diffusers layout.

The shapes come from sdlite's own networks built on the meta device from the configs in
`benchmarks/configs/` (copies of real checkpoints' json files, no weights), so no download is
needed and diffusers, transformers and sdlite all load the result. Each tensor is drawn from its
own seeded generator and streamed straight into a .safetensors file, so building the 5 GB
SD 2.1 (14 GB SDXL) checkpoint holds one tensor in memory at a time.

Values are chosen to keep activations finite and of order one (so no engine meets NaNs or
denormals that would distort its timings): norm weights 1 and biases 0, embeddings N(0, 0.02),
other weights N(0, 1/fan_in), other biases N(0, 0.02).
"""

import json
import shutil
import struct
import zlib
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
CLIP_VOCAB = Path(__file__).resolve().parents[1] / "sdlite" / "data" / "clip"
TINY_VAE = dict(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, layers_per_block=1, sample_size=64)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
# name -> (reference config folder, overrides per component json) ; the "tiny" models are for quick mode.
MODELS = {
    "sd-2.1-base": ("sd-2.1-base", {}),
    "sd-1.5": ("sd-1.5", {}),
    "sd-2.1-768-v": ("sd-2.1-768-v", {}),
    "sdxl-base-1.0": ("sdxl-base-1.0", {}),
    "tiny": (
        "sd-2.1-base",
        {
            "unet": dict(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=32,
                         norm_num_groups=8, sample_size=8,
                         down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            "text_encoder": TINY_TEXT,
            "vae": TINY_VAE,
        },
    ),
    "tiny-xl": (
        "sdxl-base-1.0",
        {
            "unet": dict(block_out_channels=[32, 64], attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
                         cross_attention_dim=64, norm_num_groups=8, sample_size=8, addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=32 + 6 * 8,
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                         up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]),
            "text_encoder": TINY_TEXT,
            "text_encoder_2": TINY_TEXT,
            "vae": TINY_VAE,
        },
    ),
}
# component folder -> (weight file name, sdlite network class name, config class name)
COMPONENTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "UNet2DConditionModel", "UNetConfig"),
    "vae": ("diffusion_pytorch_model.safetensors", "AutoencoderKL", "VAEConfig"),
    "text_encoder": ("model.safetensors", "CLIPTextModel", "CLIPConfig"),
    "text_encoder_2": ("model.safetensors", "CLIPTextModel", "CLIPConfig"),  # SDXL only
}
FORMAT_VERSION = 1  # bump when the weights' values or layout change, to rebuild cached models


def default_cache() -> Path:
    return Path.home() / ".cache" / "sdlite-bench"


def component_shapes(component: str, config: dict) -> dict:
    """{name: (shape, dtype)} of sdlite's network for a component json, built on the meta device."""
    import torch

    from sdlite import clip, config as configs, unet, vae

    _, network_name, config_name = COMPONENTS[component]
    module = {"unet": unet, "vae": vae, "text_encoder": clip, "text_encoder_2": clip}[component]
    network_class = getattr(module, network_name)
    with torch.device("meta"):
        network = network_class(getattr(configs, config_name).from_json(config))
    return {k: (tuple(v.shape), v.dtype) for k, v in network.state_dict().items()}


def random_tensor(name: str, shape: tuple, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name and len(shape) == 1
    if is_norm:
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if "embedding" in name and len(shape) == 2 and "time" not in name:  # token / position tables
        return torch.randn(shape, generator=generator) * 0.02
    if len(shape) >= 2:
        fan_in = 1
        for n in shape[1:]:
            fan_in *= n
        return torch.randn(shape, generator=generator) * fan_in**-0.5
    return torch.randn(shape, generator=generator) * 0.02


def write_random_safetensors(path: Path, shapes: dict, seed: int) -> None:
    """Stream random fp32 tensors of `shapes` into a safetensors file, one tensor in memory at a time."""
    import torch

    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        if dtype != torch.float32:
            raise ValueError(f"{name}: only fp32 parameters are expected, got {dtype}")
        size = 4
        for n in shape:
            size *= n
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, _) in shapes.items():
            f.write(random_tensor(name, shape, seed).contiguous().numpy().tobytes())
    tmp.replace(path)


def build_model(name: str, cache: Path | None = None, seed: int = 0) -> Path:
    """The folder of random-weight model `name` (a key of MODELS), built on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)}")
    cache = default_cache() if cache is None else Path(cache)
    folder = cache / f"{name}-v{FORMAT_VERSION}-seed{seed}"
    if (folder / "complete").is_file():
        return folder
    reference, overrides = MODELS[name]
    source = CONFIGS / reference
    shutil.rmtree(folder, ignore_errors=True)
    for file in source.rglob("*"):  # file by file: the copy must be writable even if the source is not
        if file.is_file():
            (folder / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, folder / file.relative_to(source))
    for tokenizer in ("tokenizer", "tokenizer_2"):
        for file in ("vocab.json", "merges.txt") if (folder / tokenizer).is_dir() else ():
            shutil.copy(CLIP_VOCAB / file, folder / tokenizer / file)
    for component, (weights, _, _) in COMPONENTS.items():
        if not (folder / component).is_dir():
            continue
        config_path = folder / component / "config.json"
        config = json.loads(config_path.read_text())
        config.update(overrides.get(component, {}))
        config_path.write_text(json.dumps(config, indent=2))
        write_random_safetensors(folder / component / weights, component_shapes(component, config), seed)
    (folder / "complete").write_text("ok\n")
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build a random-weight benchmark model.")
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    print(build_model(args.model, args.cache))
