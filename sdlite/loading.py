"""Reading checkpoints: safetensors files, weight-file discovery and strict, table-driven loading.

Every checkpoint key sdlite reads passes through `canonical_key`, the one place where names from
other layouts are mapped to sdlite's canonical names (which equal diffusers'/transformers' names).
Networks are built on the meta device and receive memory-mapped tensors by assignment, so a model
is never random-initialised first and fp32 weights are not copied at all.
"""

import json
import mmap
import re
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

# Keys that carry no weights: position ids that old transformers versions saved as buffers.
IGNORED_KEY = re.compile(r"(^|\.)position_ids$")
# Attention names of VAE checkpoints saved before diffusers 0.14.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
# transformers >= 5 saves CLIP text encoders without the "text_model." prefix that published
# checkpoints (and sdlite's names) carry.
UNPREFIXED_CLIP_KEY = re.compile(r"^(embeddings|encoder|final_layer_norm)\.")


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the network's configuration."""


def read_json(path: Path) -> dict:
    """Parse a json config file, naming the file in any error."""
    if not path.is_file():
        raise FileNotFoundError(f"missing config file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid json: {e}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map a .safetensors file; tensors share the file's pages (copy-on-write).

    The format is an 8-byte little-endian header length, a json header mapping names to
    dtype/shape/data_offsets, then the raw data. Every offset is checked against the file size so a
    truncated or corrupt file fails here with its name, not later inside torch.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
        data_start = 8 + header_len
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else b""
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (data_start + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
        numel = 1
        for n in shape:
            numel *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end > size or end - begin != numel * itemsize or begin < data_start:
            raise CheckpointError(
                f"{path} is truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} "
                f"of a {size}-byte file"
            )
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif begin % itemsize:  # unaligned data cannot be viewed in place
            tensors[name] = torch.frombuffer(bytearray(buffer[begin:end]), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=begin).reshape(shape)
    return tensors


def find_weight_files(folder: Path, prefer_fp16: bool = False, allow_pickle: bool = False) -> list[Path]:
    """The weight files of one component folder: a single file, an fp16 variant or shards.

    Picks `<stem>.safetensors`, else `<stem>.fp16.safetensors` (first when `prefer_fp16`), else the
    shards listed in `<stem>[.fp16].safetensors.index.json`. Pickle files are used only with
    `allow_pickle`, since loading them can run arbitrary code.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model component folder: {folder}")
    variants = ("fp16.", "") if prefer_fp16 else ("", "fp16.")
    suffixes = ("safetensors",) + (("bin",) if allow_pickle else ())
    for suffix in suffixes:
        for variant in variants:
            for stem in WEIGHT_STEMS:
                single = folder / f"{stem}.{variant}{suffix}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}.{variant}{suffix}.index.json"
                if index.is_file():
                    shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                    if not shards:
                        raise CheckpointError(f"{index} lists no weight files")
                    return [folder / name for name in shards]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles))}); pickle files can run "
            "code when loaded, so sdlite reads them only with allow_pickle=True (--allow-pickle)"
        )
    raise FileNotFoundError(f"no weight file (*.safetensors) in {folder}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, safetensors or (opted-in) pickle."""
    if not path.is_file():
        raise FileNotFoundError(f"missing weight file: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return state.get("state_dict", state)


def canonical_key(key: str, network: str) -> str | None:
    """Map a checkpoint key of a `network` (class name) to sdlite's name for it, or None for keys
    that hold no weights."""
    if IGNORED_KEY.search(key):
        return None
    if network.startswith("CLIPText") and UNPREFIXED_CLIP_KEY.match(key):
        return "text_model." + key
    legacy = LEGACY_ATTENTION_KEY.match(key)
    if legacy:
        block, name, kind = legacy.groups()
        return f"{block}.{LEGACY_ATTENTION_NAMES[name]}.{kind}"
    return key


def canonical_state(weights: dict[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    """Rename keys to sdlite's names; legacy 1x1-conv attention weights become linear weights."""
    state = {}
    for key, tensor in weights.items():
        name = canonical_key(key, network)
        if name is None:
            continue
        if LEGACY_ATTENTION_KEY.match(key) and tensor.ndim == 4:  # (out, in, 1, 1) -> (out, in)
            tensor = tensor[:, :, 0, 0]
        state[name] = tensor
    return state


def load_network(
    network: nn.Module,
    weights: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Assign `weights` to a meta-device `network`, strictly: every key and shape must match.

    Floating-point tensors are cast to `dtype`; a tensor already in that dtype on the CPU is used
    in place (no copy). `source` names the checkpoint in error messages.
    """
    expected = network.state_dict()
    state = canonical_state(weights, type(network).__name__)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise CheckpointError(
            f"{source} does not match the {type(network).__name__} its config describes: "
            + "; ".join(details)
        )
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(got.shape)}, "
                f"the config needs {tuple(want.shape)}"
            )
        if got.is_floating_point():
            state[key] = got.to(device=device, dtype=dtype)
        else:
            state[key] = got.to(device=device)
    network.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, t in network.state_dict(keep_vars=True).items() if t.is_meta]
    leftover += [name for name, t in network.named_buffers() if t.is_meta]
    if leftover:
        raise CheckpointError(f"{source}: no value for {leftover[0]}")
    return network.eval().requires_grad_(False)


def load_component(
    network_class,
    config,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
) -> nn.Module:
    """Build `network_class(config)` without initialising it and load the weights in `folder`."""
    files = find_weight_files(folder, prefer_fp16=dtype == torch.float16, allow_pickle=allow_pickle)
    weights = {}
    for path in files:
        weights.update(read_weights(path))
    with torch.device("meta"):
        network = network_class(config)
    source = str(files[0]) if len(files) == 1 else f"the {len(files)} shards in {folder}"
    return load_network(network, weights, source, dtype, device)
