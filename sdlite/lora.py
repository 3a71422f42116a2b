"""LoRA files (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), merged
into the weights: W <- W + weight * (alpha / rank) * up @ down.

Two file formats are read:

- kohya / web UI: `lora_unet_<module>`, `lora_te_<module>` (SDXL: `lora_te1_`, `lora_te2_`), each
  with `.lora_down.weight` (rank, in[, kh, kw]), `.lora_up.weight` (out, rank[, 1, 1]) and an
  optional `.alpha`. `<module>` is the module path with "." written "_", in diffusers' names
  (kohya's SD 1.x / 2.x) or in the original layout's (kohya's SDXL: `input_blocks_4_1_...`).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `text_encoder.` and
  `text_encoder_2.`), with an optional `<module>.alpha`; without one, alpha = rank (scale 1), as
  PEFT's default.

Linear and conv layers are supported (conv: the up and down kernels are multiplied as matrices and
reshaped to the layer's kernel). The pipeline keeps each layer's weight tensor from before the
first merge, so `unload_loras` restores the base weights bit for bit. Weights kept at rest in
fp16 / bf16 (`memory.keep_at_rest`) are merged in that dtype; palettized weights rebuilt per
call ("jit") cannot take a merge.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import keys
from .loading import CheckpointError, read_weights

# file prefix -> the pipeline attribute of the network it adapts
KOHYA_NETWORKS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_NETWORKS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# (down, up) suffix pairs of the formats, after the module name
SUFFIXES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
            (".lora.down.weight", ".lora.up.weight"))
KOHYA_PREFIX = re.compile(r"^(lora_unet_|lora_te1_|lora_te2_|lora_te_)")


@dataclass
class LoraLayer:
    network: str  # pipeline attribute: "unet", "text_encoder" or "text_encoder_2"
    name: str  # the layer's name in the file (without the down/up suffix)
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: alpha = rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """(alpha / rank) * up @ down in fp32, shaped like the layer's weight."""
        rank = self.down.shape[0]
        scale = 1.0 if self.alpha is None else self.alpha / rank
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in * kh * kw)
        if product.numel() != shape.numel() or product.shape[0] != shape[0]:
            raise ValueError(f"LoRA of shape {tuple(product.shape)}")
        return (scale * product).reshape(shape)


def read_lora(path: str | Path, allow_pickle: bool = False) -> list[LoraLayer]:
    """The layers of a LoRA file, in either format; unknown keys are an error naming the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise CheckpointError(f"{path} is not a .safetensors file; pickle files can run code when loaded, so "
                              "sdlite reads them only with allow_pickle=True (--allow-pickle)")
    state = dict(read_weights(path))
    layers = []
    for key in sorted(state):
        for down_suffix, up_suffix in SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            name = key[: -len(down_suffix)]
            up = state.pop(name + up_suffix, None)
            if up is None:
                raise CheckpointError(f"{path}: {key!r} has no matching {name + up_suffix!r}")
            alpha = state.pop(name + ".alpha", None)
            network = _network(name)
            if network is None:
                raise CheckpointError(f"{path}: LoRA layer {name!r} is for no network sdlite knows "
                                      f"(expected a prefix {', '.join(list(KOHYA_NETWORKS) + list(PEFT_NETWORKS))})")
            layers.append(LoraLayer(network, name, state.pop(key), up, None if alpha is None else float(alpha)))
            break
    if state:
        raise CheckpointError(f"{path}: {len(state)} keys are not LoRA down/up/alpha weights "
                              f"(first: {next(iter(state))!r}); LoHa, LoKr and other variants are not supported")
    if not layers:
        raise CheckpointError(f"{path} holds no LoRA layers")
    return layers


def _network(name: str) -> str | None:
    for prefixes in (KOHYA_NETWORKS, PEFT_NETWORKS):
        for prefix, network in prefixes.items():
            if name.startswith(prefix):
                return network
    return None


def module_names(network: nn.Module, unet_config=None) -> dict[str, str]:
    """Every name a LoRA file may give a Linear / Conv2d of `network` -> its module name: the
    module path, with "_" for "." (kohya), in diffusers' names and (UNet) the original layout's;
    text encoders also without the `text_model.` prefix."""
    table = keys.unet_table(unet_config) if unet_config is not None else None
    names = {}
    for name, module in network.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        aliases = {name}
        if table is not None:
            original = keys.rename(name + ".weight", table, to_original=True)
            if original is not None:
                aliases.add(original.removesuffix(".weight"))
        if name.startswith("text_model."):
            aliases.add(name.removeprefix("text_model."))
        for alias in aliases:
            names[alias] = names[alias.replace(".", "_")] = name
    return names


def merge_lora(pipeline, path: str | Path, weight: float = 1.0, allow_pickle: bool = False) -> int:
    """Merge a LoRA file into `pipeline`'s networks; returns the number of layers changed.

    Everything is checked before any weight changes, so a LoRA that does not fit leaves the model
    as it was; the error names the layer."""
    layers = read_lora(path, allow_pickle)
    lookups, updates = {}, []
    for layer in layers:
        network = getattr(pipeline, layer.network, None)
        if network is None:
            raise CheckpointError(f"{path}: LoRA layer {layer.name!r} is for {layer.network}, which this model "
                                  "does not have")
        if not isinstance(network, nn.Module):
            raise CheckpointError(f"{path}: cannot merge a LoRA into {layer.network} while it is loaded on demand "
                                  "(low_memory); load the model without it")
        if layer.network not in lookups:
            lookups[layer.network] = module_names(network, network.config if layer.network == "unet" else None)
        local = KOHYA_PREFIX.sub("", layer.name) if KOHYA_PREFIX.match(layer.name) else layer.name.split(".", 1)[1]
        module = lookups[layer.network].get(local)
        if module is None:
            raise CheckpointError(f"{path}: LoRA layer {layer.name!r} does not fit this model: {layer.network} has "
                                  f"no linear or conv layer {local!r}")
        current = weight_tensor(network.get_submodule(module))
        if current is None:
            raise CheckpointError(f"{path}: cannot merge LoRA layer {layer.name!r} into {layer.network}.{module}, "
                                  "whose palettized weight is rebuilt at each call; load the model with "
                                  "palettized_mode=\"fast\" (--palettized-mode fast)")
        try:
            delta = layer.delta(current.shape)
        except ValueError as e:
            raise CheckpointError(f"{path}: LoRA layer {layer.name!r} does not fit this model: {e} for "
                                  f"{layer.network}.{module}.weight of shape {tuple(current.shape)}") from None
        updates.append((layer.network, module, delta))
    with torch.no_grad():
        for network, module, delta in updates:
            target = getattr(pipeline, network).get_submodule(module)
            current = weight_tensor(target)
            pipeline._lora_base.setdefault((network, module), current)
            # A new tensor: the one kept in _lora_base is never written to.
            set_weight_tensor(target, (current.float() + weight * delta.to(current.device)).to(current.dtype))
    forget_cuda_graphs(pipeline)
    return len(updates)


def weight_tensor(module: nn.Module) -> torch.Tensor | None:
    """The tensor `module` keeps its weight in: its parameter's data, or the tensor it keeps at rest
    (fp16 / bf16 at rest, `memory.keep_at_rest`); None for a palettized weight kept packed."""
    if isinstance(module.weight, nn.Parameter):
        return module.weight.data
    stored = module.weights_at_rest.stored_value("weight")
    return stored if isinstance(stored, torch.Tensor) else None


def set_weight_tensor(module: nn.Module, tensor: torch.Tensor) -> None:
    """Make `tensor` the one `module` keeps its weight in (see `weight_tensor`)."""
    if isinstance(module.weight, nn.Parameter):
        module.weight.data = tensor
    else:
        module.weights_at_rest.replace("weight", tensor)


def unload_loras(pipeline) -> None:
    """Put back every weight as it was before the first LoRA was merged (the same tensors)."""
    with torch.no_grad():
        for (network, module), base in pipeline._lora_base.items():
            set_weight_tensor(getattr(pipeline, network).get_submodule(module), base)
    pipeline._lora_base.clear()
    forget_cuda_graphs(pipeline)


def forget_cuda_graphs(pipeline) -> None:
    """The UNet's recorded CUDA graphs read the weights they were recorded with: record anew."""
    graphs = getattr(pipeline.unet, "cuda_graphs", None)  # (an OpenVINO UNet has none)
    if graphs is not None:
        graphs.clear()
