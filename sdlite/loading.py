"""Reading checkpoints: safetensors files, weight-file discovery and strict, table-driven loading.

Every checkpoint key sdlite reads passes through `sdlite.keys`, the one place where names from
other layouts are mapped to sdlite's canonical names (which equal diffusers'/transformers' names).
Networks are built on the meta device and receive memory-mapped tensors by assignment, so a model
is never random-initialised first and fp32 weights are not copied at all.
"""

import json
import math
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from .keys import canonical_state
from .memory import note_file_mapping

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
READ_CHUNK = 1 << 22  # values per read when a tensor is cast while loading
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
RECIPE_NAME = "palettization.json"  # a component folder with this recipe holds palettized weights (sdlite.palettize)


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the network's configuration."""


def cache_folder(name: str) -> Path:
    """sdlite's cache folder `name` (for compiled kernels, converted models): under
    $XDG_CACHE_HOME, else ~/.cache. An empty or relative $XDG_CACHE_HOME counts as unset, as the
    XDG Base Directory spec says (a relative one would put the cache in the working directory).
    RuntimeError where no home directory is known."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "sdlite" / name


def read_json(path: Path) -> dict:
    """Parse a json config file, naming the file in any error."""
    if not path.is_file():
        raise FileNotFoundError(f"missing config file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid json: {e}") from None


def read_safetensors(path: Path, cast_to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a .safetensors file. Tensors kept in their stored dtype are memory-mapped views of the
    file (copy-on-write, no copy made); floating-point tensors of another dtype than `cast_to` are
    read one at a time and cast, so peak memory stays near the size of the cast weights.

    The format is an 8-byte little-endian header length, a json header mapping names to
    dtype/shape/data_offsets, then the raw data. Every offset is checked against the file size so a
    truncated or corrupt file fails here with its name, not later inside torch; so are tensors
    whose bytes overlap (views of the same bytes would change together).
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
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is not a safetensors file (its header is not a json object)")
        data_start = 8 + header_len
        mapped = b""
        if size > data_start:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            note_file_mapping(mapped)
        header.pop("__metadata__", None)
        tensors, spans = {}, []
        for name, entry in header.items():
            try:
                kind, shape = entry["dtype"], [int(n) for n in entry["shape"]]
                begin, end = (data_start + int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
            if kind not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {kind!r}, which sdlite does not read")
            if any(n < 0 for n in shape):
                raise CheckpointError(f"{path}: tensor {name!r} has a negative size in its shape {shape}")
            dtype = SAFETENSORS_DTYPES[kind]
            numel = math.prod(shape)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end > size or end - begin != numel * itemsize or begin < data_start:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} "
                    f"of a {size}-byte file"
                )
            spans.append((begin, end, name))
            if cast_to is not None and dtype.is_floating_point and dtype != cast_to:
                tensors[name] = read_cast(f.fileno(), begin, numel, dtype, cast_to).reshape(shape)
            elif numel == 0 or begin % itemsize:  # unaligned data cannot be viewed in place
                tensors[name] = read_cast(f.fileno(), begin, numel, dtype, dtype).reshape(shape)
            else:
                tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=numel, offset=begin).reshape(shape)
    spans = sorted(span for span in spans if span[1] > span[0])
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path} is corrupt: tensors {first!r} and {second!r} overlap in the file")
    return tensors


def read_cast(fd: int, offset: int, numel: int, dtype: torch.dtype, cast_to: torch.dtype) -> torch.Tensor:
    """Read `numel` values of `dtype` at `offset` into a new 1-D `cast_to` tensor, a chunk at a time
    so that no full-size temporary copy is made."""
    out = torch.empty(numel, dtype=cast_to)
    itemsize = out.new_empty((), dtype=dtype).element_size()
    for start in range(0, numel, READ_CHUNK):
        count = min(READ_CHUNK, numel - start)
        raw = bytearray(count * itemsize)
        if os.preadv(fd, [raw], offset + start * itemsize) != len(raw):
            raise CheckpointError("weight file shrank while being read")
        out[start : start + count] = torch.frombuffer(raw, dtype=dtype)
    return out


def find_weight_files(folder: Path, prefer_fp16: bool = False, allow_pickle: bool = False) -> list[Path]:
    """The weight files of one component folder: a single file, an fp16 variant or shards.

    Picks `<stem>.safetensors`, else `<stem>.fp16.safetensors` (first when `prefer_fp16`), else the
    shards listed in `<stem>.safetensors.index.json`, or for fp16 in
    `<stem>.safetensors.index.fp16.json` (diffusers' and transformers' name) or
    `<stem>.fp16.safetensors.index.json`. Pickle files are used only with `allow_pickle`, since
    loading them can run arbitrary code.
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
                for index in (folder / f"{stem}.{suffix}.index.{variant}json",
                              folder / f"{stem}.{variant}{suffix}.index.json"):
                    if index.is_file():
                        return [folder / name for name in read_index(index)]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles))}); pickle files can run "
            "code when loaded, so sdlite reads them only with allow_pickle=True (--allow-pickle)"
        )
    raise FileNotFoundError(f"no weight file (*.safetensors) in {folder}")


def read_index(index: Path) -> list[str]:
    """The shard file names an index json lists in its "weight_map" (tensor name -> file name)."""
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index} is not a shard index: expected a json object whose "weight_map" maps '
                              "tensor names to file names")
    if not weight_map:
        raise CheckpointError(f"{index} lists no weight files")
    return sorted(set(weight_map.values()))


def read_weights(path: Path, cast_to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, safetensors or (opted-in) pickle; see `read_safetensors`
    for `cast_to`."""
    if not path.is_file():
        raise FileNotFoundError(f"missing weight file: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path, cast_to)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if isinstance(state, dict):
        state = state.get("state_dict", state)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict (a {type(state).__name__})")
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
    compute_dtype: torch.dtype | None = None,
    palettized_mode: str = "jit",
) -> nn.Module:
    """Build `network_class(config)` without initialising it and load the weights in `folder`.

    Weights are stored in `dtype` and computed in `compute_dtype` (default: `dtype`); when they
    differ, each layer's weights are cast just before it runs (`memory.keep_at_rest`). A folder
    with a `palettization.json` recipe holds palettized weights (`sdlite.palettize`), unpacked
    per layer ("jit") or once now ("fast") as `palettized_mode` says.
    """
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    if (folder / RECIPE_NAME).is_file():
        from .palettize import load_palettized

        return load_palettized(network_class, config, folder, dtype, device, compute_dtype, palettized_mode)
    files = find_weight_files(folder, prefer_fp16=dtype == torch.float16, allow_pickle=allow_pickle)
    weights = {}
    for path in files:
        weights.update(read_weights(path, cast_to=dtype))
    with torch.device("meta"):
        network = network_class(config)
    source = str(files[0]) if len(files) == 1 else f"the {len(files)} shards in {folder}"
    network = load_network(network, weights, source, dtype, device)
    if compute_dtype != dtype:
        from .memory import keep_at_rest

        keep_at_rest(network, compute_dtype)
    return network
