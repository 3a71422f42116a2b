"""Palettization: weights stored as a small look-up table (LUT) plus bit-packed indices.

Each large weight tensor (more than `MIN_ELEMENTS` values) is clustered with 1-D k-means into
2**bits values; the tensor is stored as the LUT (fp16, one per group of output channels) and its
indices, packed `bits` to a value into uint8 bytes. Smaller tensors stay fp16. This is the
palettization of Apple's Core ML Stable Diffusion (`coremltools` `palettize_weights`, kmeans mode),
including its mixed-bit recipes: each layer's sensitivity is measured as the PSNR of the UNet's
output after one denoising step when only that layer is palettized, then per-layer bit widths are
chosen that meet a target PSNR with the fewest bytes.

A palettized model is a diffusers-layout folder whose component folders (unet/, vae/, ...) hold
`palettized.safetensors` (`<key>.lut`, `<key>.indices` and the fp16 tensors) and `palettization.json`,
the recipe that tells the loader which keys are palettized, their bits, groups and shapes. At run
time a weight is rebuilt just before its layer runs and dropped after ("jit", RAM near the packed
size; see `memory.keep_at_rest`), or unpacked once at load ("fast").

Index packing (recipe version 2): the indices are stored as codes that one table look-up decodes.
For 1, 2, 4 and 8 bits a code is a byte holding 8/bits consecutive indices from its low bits up.
For 6 bits a code is 12 bits holding two consecutive indices (the first in its low 6 bits); the
low bytes of all m codes come first, then m/2 bytes of high 4 bits: byte j holds those of code j
in its low half and of code j + m/2 in its high half. Every code is then read with whole-array
operations, with no 3-byte strides. The indices are padded with zeros to a multiple of 8.
Decoding is one table look-up per code: a C loop where a C compiler is available
(`sdlite.kernels`), else torch ops.
"""

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels
from .layers import ProjectedContext
from .loading import (RECIPE_NAME, CheckpointError, canonical_state, find_weight_files, read_json, read_safetensors,
                      read_weights)

BITS = (1, 2, 4, 6, 8)
MIN_ELEMENTS = 100_000  # tensors up to this size stay fp16, as in Core ML's palettization
WEIGHTS_NAME = "palettized.safetensors"
FORMAT = "sdlite-palettized"
VERSION = 2  # 2: 6-bit codes split into a low-byte and a high-nibble plane
# Component folder -> network class name, for `canonical_state` (weights are saved under sdlite's names).
COMPONENTS = {
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
}
HISTOGRAM_BINS = 1 << 14


class RecipeError(CheckpointError):
    """A palettization recipe that is malformed or does not match its weights."""


# -- k-means ----------------------------------------------------------------------------------


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 100, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """k sorted centroids of 1-D `values` by Lloyd's algorithm on a histogram.

    In one dimension the clusters of sorted centroids are intervals split at the midpoints, so each
    Lloyd iteration is a `searchsorted` of the histogram's bin centres and two sums over `bins`
    numbers, whatever the tensor's size. Centroids start at the quantiles of density^(1/3), the
    asymptotically optimal level density for squared error (Panter & Dite 1951), so few iterations
    are needed; a cluster left empty is moved to the bin that adds the most error.
    """
    x = values.detach().float().flatten()
    lo, hi = x.min().item(), x.max().item()
    if hi <= lo:  # a constant tensor
        return torch.full((k,), lo)
    counts = torch.histc(x, bins, lo, hi).double()
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * ((hi - lo) / bins)
    density = counts.pow(1 / 3).cumsum(0)
    c = centres[torch.searchsorted(density / density[-1], (torch.arange(k, dtype=torch.float64) + 0.5) / k)
                .clamp(max=bins - 1)]
    mass = counts * centres
    for _ in range(iterations):
        cluster = torch.searchsorted((c[1:] + c[:-1]) / 2, centres)  # (bins,) cluster of each bin
        n = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster, counts)
        s = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster, mass)
        new = torch.where(n > 0, s / n.clamp(min=1e-12), c)
        for empty in (n == 0).nonzero().flatten().tolist():  # reseed where the error is largest
            error = counts * (centres - new[cluster]) ** 2
            worst = int(error.argmax())
            if error[worst] <= 0:
                break
            new[empty] = centres[worst]
            cluster[worst] = empty
        new = new.sort().values
        converged = (new - c).abs().max().item() <= 1e-9 * (hi - lo)
        c = new
        if converged:
            break
    return c.float()


def assign(values: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-centroid indices (uint8) of `values`, and the centroids moved to the exact means of
    their members (one last Lloyd step on the real values)."""
    x = values.detach().float().flatten()
    c = centroids.sort().values
    index = torch.searchsorted((c[1:] + c[:-1]) / 2, x)
    n = torch.bincount(index, minlength=len(c))
    s = torch.bincount(index, weights=x, minlength=len(c))
    return index.to(torch.uint8), torch.where(n > 0, s / n.clamp(min=1), c.double()).float()


# -- bit packing ------------------------------------------------------------------------------


def pack_bits(index: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 indices (< 2**bits) -> packed uint8 bytes, ceil(n / 8) * bits of them."""
    if bits == 8:
        return index.to(torch.uint8).clone()
    n = index.numel()
    v = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.int32)
    v[:n] = index.flatten()
    if bits == 6:
        codes = v[0::2] | (v[1::2] << 6)  # (m,) 12-bit codes
        half = len(codes) // 2
        high = (codes[:half] >> 8) | ((codes[half:] >> 8) << 4)
        return torch.cat([codes & 255, high]).to(torch.uint8)
    per = 8 // bits
    return (v.view(-1, per) << (bits * torch.arange(per, dtype=torch.int32))).sum(1).to(torch.uint8)


def code_indices(bits: int) -> torch.Tensor:
    """(codes, indices per code) uint8: the indices each code holds (see the module's docstring)."""
    per, code_bits = (2, 12) if bits == 6 else (8 // bits, 8)
    codes = torch.arange(1 << code_bits)[:, None]
    return ((codes >> (bits * torch.arange(per))) & ((1 << bits) - 1)).to(torch.uint8)


CODE_BLOCK = 1 << 19  # codes decoded at a time by torch ops: their int32 copy (2 MiB) stays in the cache


def decode(packed: torch.Tensor, bits: int, table: torch.Tensor, out: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Codes `first`, `first` + 1, ... of `packed` (as many as `out` takes) looked up in `table`
    (codes, values per code), written to `out`; returns `out`."""
    per = table.shape[1]
    table, rows = as_words(table), as_words(out.view(-1, per))
    stop = first + len(rows)
    if bits != 6:
        look_up(packed[first:stop], None, 0, table, rows)
        return out
    m = packed.numel() * 2 // 3
    half = m // 2
    low, high = packed[:m], packed[m:]
    if first < half:  # codes j < m/2: low nibbles of byte j
        end = min(stop, half)
        look_up(low[first:end], high[first:end], 0, table, rows[:end - first])
    if stop > half:  # the rest: high nibbles of byte j - m/2
        start = max(first, half)
        look_up(low[start:stop], high[start - half:stop - half], 4, table, rows[start - first:])
    return out


def look_up(low: torch.Tensor, high: torch.Tensor | None, shift: int, table: torch.Tensor, out: torch.Tensor) -> None:
    """out[j] = table[code j]: code j is low[j] (a byte), or with `high` the 12-bit code
    low[j] + 256 * (high[j] >> shift & 15). By sdlite's C kernel where it applies
    (`sdlite.kernels`), else by torch ops, `CODE_BLOCK` codes at a time."""
    if kernels.look_up(low, high, shift, table, out):
        return
    codes = torch.empty(min(CODE_BLOCK, len(low)), dtype=torch.int32, device=low.device)
    for start in range(0, len(low), CODE_BLOCK):
        end = min(start + CODE_BLOCK, len(low))
        block = codes[:end - start].copy_(low[start:end])
        if high is not None:
            block.bitwise_or_(high[start:end].to(torch.int32).bitwise_right_shift_(shift)
                              .bitwise_and_(15).bitwise_left_shift_(8))
        torch.index_select(table, 0, block, out=out[start:end])


WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_words(rows: torch.Tensor) -> torch.Tensor:
    """(n, k) rows of 2, 4 or 8 bytes viewed as n integers (the same bits), else unchanged:
    index_select copies one word a row 2.5x faster than a row of k values."""
    word = WORDS.get(rows.shape[1] * rows.element_size())
    return rows if word is None else rows.view(word).view(-1)


def packed_size(n: int, bits: int) -> int:
    return n if bits == 8 else math.ceil(n / 8) * bits


# -- palettized tensors -----------------------------------------------------------------------


@dataclass
class PalettizedTensor:
    """A weight as LUT + packed indices. Groups split the output channels (dim 0) evenly; group g
    of the flattened weight uses lut[g]."""

    lut: torch.Tensor  # (groups, 2**bits), fp16
    indices: torch.Tensor  # (packed_size(numel, bits),) uint8
    shape: tuple[int, ...]
    bits: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.indices.numel() + self.lut.numel() * self.lut.element_size()

    @property
    def padded_numel(self) -> int:
        """How many values the packed bytes decode to: `numel` rounded up to a whole run of 8."""
        return self.numel if self.bits == 8 else math.ceil(self.numel / 8) * 8

    @property
    def values_per_code(self) -> int:
        return 2 if self.bits == 6 else 8 // self.bits

    def decoded_numel(self, rows: int) -> int:
        """How many values decoding `rows` output channels writes: their values in whole codes."""
        per = self.values_per_code
        return math.ceil(rows * (self.numel // self.shape[0]) / per) * per

    def unpack(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The dense weight in `dtype`, or only its output channels (dim 0) `rows` = (start, stop),
        which must start on a whole code (see `values_per_code`); written into `out` if given (a
        contiguous tensor of `dtype` on the indices' device with at least `padded_numel` values;
        the result is a view of it)."""
        groups, k = self.lut.shape
        start, stop = rows or (0, self.shape[0])
        row = self.numel // self.shape[0]
        per = self.values_per_code
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"rows {start}:{stop} are not output channels of a weight of shape {self.shape}")
        if start * row % per:
            raise ValueError(f"rows from {start} do not start on a whole code of {per} values")
        n, size = (stop - start) * row, self.decoded_numel(stop - start)
        if out is None:
            out = torch.empty(size, dtype=dtype, device=self.indices.device)
        flat = out.view(-1)[:size]
        first = start * row // per  # the first code
        if groups == 1:  # one look-up per code of a table of the values each code holds
            table = self.__dict__.get("_table")
            if table is None or table.dtype != dtype or table.device != flat.device:
                table = self.lut[0].to(flat.device, dtype)[code_indices(self.bits).to(flat.device).long()]
                self.__dict__["_table"] = table  # (codes, values per code); 32 KiB at most in fp32
            decode(self.indices, self.bits, table, flat, first)
        else:
            index = torch.empty(len(flat), dtype=torch.uint8, device=flat.device)
            index = decode(self.indices, self.bits, code_indices(self.bits).to(flat.device), index, first)
            # offset each row's indices to its group's LUT in the flattened LUTs
            group = torch.arange(start, stop, dtype=torch.int32, device=flat.device) // (self.shape[0] // groups)
            index = (index[:n].view(stop - start, row).to(torch.int32) + group[:, None] * k).view(-1)
            torch.index_select(self.lut.to(dtype).view(-1), 0, index, out=flat[:n])
        return flat[:n].view(stop - start, *self.shape[1:])

    def to(self, device) -> "PalettizedTensor":
        return PalettizedTensor(self.lut.to(device), self.indices.to(device), self.shape, self.bits)


def palettize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> PalettizedTensor:
    """Cluster `weight` into 2**bits values: one LUT for the tensor, or one per `group_size`
    output channels (dim 0)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    channels = weight.shape[0]
    group_size = channels if group_size is None else group_size
    if channels % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {channels} output channels")
    groups = weight.detach().float().reshape(channels // group_size, -1)
    index = torch.empty(groups.shape, dtype=torch.uint8)
    lut = torch.empty(len(groups), 2**bits)
    for g, values in enumerate(groups):
        index[g], lut[g] = assign(values, kmeans_1d(values, 2**bits))
    return PalettizedTensor(lut.half(), pack_bits(index.flatten(), bits), tuple(weight.shape), bits)


def is_palettizable(key: str, tensor: torch.Tensor, min_elements: int = MIN_ELEMENTS) -> bool:
    return tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() > min_elements


# -- recipe and weight files ------------------------------------------------------------------


def save_palettized(folder: Path, dense: dict[str, torch.Tensor], packed: dict[str, PalettizedTensor],
                    group_size: int | None = None, extra: dict | None = None) -> None:
    """Write `palettized.safetensors` and the `palettization.json` recipe into a component folder."""
    from safetensors.torch import save_file

    tensors = {key: t.detach().half().contiguous() for key, t in dense.items()}
    for key, p in packed.items():
        tensors[f"{key}.lut"] = p.lut.contiguous()
        tensors[f"{key}.indices"] = p.indices.contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME))
    recipe = {
        "format": FORMAT,
        "version": VERSION,
        "weights": WEIGHTS_NAME,
        "group_size": group_size,
        "average_bits": average_bits(dense, packed),
        **(extra or {}),
        "tensors": {key: {"bits": p.bits, "shape": list(p.shape), "groups": p.lut.shape[0]}
                    for key, p in packed.items()},
    }
    (folder / RECIPE_NAME).write_text(json.dumps(recipe, indent=1))


def average_bits(dense: dict, packed: dict) -> float:
    """Bits per weight of the palettized tensors (indices only)."""
    n = sum(p.numel for p in packed.values())
    return sum(p.numel * p.bits for p in packed.values()) / n if n else 16.0


def read_palettized(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, PalettizedTensor], str]:
    """The fp16 tensors and the palettized ones of a component folder, checked against its recipe.
    Returns (dense, packed, source name for errors)."""
    recipe_path = folder / RECIPE_NAME
    recipe = read_json(recipe_path)
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise RecipeError(f"{recipe_path} is not an sdlite palettization recipe (no \"format\": \"{FORMAT}\")")
    if recipe.get("version") != VERSION:
        raise RecipeError(f"{recipe_path} has version {recipe.get('version')!r}; this sdlite reads version "
                          f"{VERSION}: re-run `sdlite compress`")
    name, entries = recipe.get("weights"), recipe.get("tensors")
    if not isinstance(name, str) or "/" in name or not isinstance(entries, dict):
        raise RecipeError(f"{recipe_path}: \"weights\" must name a file in {folder} and \"tensors\" map keys to entries")
    weights_path = folder / name
    if not weights_path.is_file():
        raise FileNotFoundError(f"{recipe_path} names {name}, which is missing from {folder}")
    tensors = read_safetensors(weights_path)
    packed = {}
    for key, entry in entries.items():
        try:
            bits, shape, groups = int(entry["bits"]), tuple(int(n) for n in entry["shape"]), int(entry["groups"])
        except (KeyError, TypeError, ValueError):
            raise RecipeError(f"{recipe_path}: malformed entry for {key!r} (needs bits, shape, groups)") from None
        lut, indices = tensors.pop(f"{key}.lut", None), tensors.pop(f"{key}.indices", None)
        if lut is None or indices is None:
            raise RecipeError(f"{recipe_path} lists {key!r}, but {weights_path} has no {key}.lut / {key}.indices: "
                              "the recipe and the weights do not belong together")
        problem = None
        if bits not in BITS:
            problem = f"bits {bits} (expected one of {BITS})"
        elif tuple(lut.shape) != (groups, 2**bits):
            problem = f"LUT shape {tuple(lut.shape)} (the recipe's {bits} bits x {groups} groups need {(groups, 2**bits)})"
        elif indices.dtype != torch.uint8 or indices.numel() != packed_size(math.prod(shape), bits):
            problem = (f"{indices.numel()} index bytes ({bits}-bit indices of shape {shape} need "
                       f"{packed_size(math.prod(shape), bits)})")
        elif not shape or shape[0] % groups:
            problem = f"{groups} groups for shape {shape}"
        if problem:
            raise RecipeError(f"{recipe_path} does not match {weights_path} at {key!r}: {problem}")
        packed[key] = PalettizedTensor(lut, indices, shape, bits)
    stray = [k for k in tensors if k.endswith((".lut", ".indices"))]
    if stray:
        raise RecipeError(f"{weights_path} holds {stray[0]}, which {recipe_path} does not list: "
                          "the recipe and the weights do not belong together")
    return tensors, packed, str(weights_path)


def load_palettized(network_class, config, folder: Path, dtype: torch.dtype, device, compute_dtype: torch.dtype,
                    mode: str):
    """Build `network_class(config)` from a palettized component folder: "fast" unpacks every
    weight now; "jit" keeps them packed and rebuilds each just before its layer runs."""
    from .loading import load_network
    from .memory import keep_at_rest

    if mode not in ("jit", "fast"):
        raise ValueError(f"palettized_mode must be 'jit' or 'fast', got {mode!r}")
    dense, packed, source = read_palettized(folder)
    with torch.device("meta"):
        network = network_class(config)
    expected = network.state_dict()
    for key, p in packed.items():
        if key not in expected:
            raise RecipeError(f"{source}: palettized tensor {key!r} is not in the {type(network).__name__} "
                              "its config describes")
        if tuple(expected[key].shape) != p.shape:
            raise RecipeError(f"{source}: palettized tensor {key!r} has shape {p.shape}, the config needs "
                              f"{tuple(expected[key].shape)}")
    if mode == "fast":
        dense.update({key: p.unpack(dtype) for key, p in packed.items()})
        network = load_network(network, dense, source, dtype, device)
        return keep_at_rest(network, compute_dtype) if compute_dtype != dtype else network
    for key in packed:  # the packed weights are no parameters: the strict loading checks the rest
        module_name, _, name = key.rpartition(".")
        del network.get_submodule(module_name)._parameters[name]
    network = load_network(network, dense, source, dtype, device)
    return keep_at_rest(network, compute_dtype, {k: p.to(device) for k, p in packed.items()})


# -- compressing a model folder ---------------------------------------------------------------


def component_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """A component's weights under sdlite's canonical names (memory-mapped)."""
    weights = {}
    for path in find_weight_files(folder / component):
        weights.update(read_weights(path))
    return canonical_state(weights, COMPONENTS[component])


def group_size_for(tensor: torch.Tensor, group_size: int | None) -> int | None:
    """The group size used for `tensor`: None (one LUT) where `group_size` does not divide its channels."""
    return group_size if group_size is not None and tensor.shape[0] % group_size == 0 else None


def palettize_cached(key: str, tensor: torch.Tensor, bits: int, group_size: int | None, cache: dict | None):
    """`palettize`, remembered in `cache` (if given) under (key, bits, group size)."""
    size = group_size_for(tensor, group_size)
    if cache is None:
        return palettize(tensor, bits, size)
    if (key, bits, size) not in cache:
        cache[key, bits, size] = palettize(tensor, bits, size)
    return cache[key, bits, size]


def compress_component(weights: dict[str, torch.Tensor], bits: int | dict[str, int], group_size: int | None = None,
                       min_elements: int = MIN_ELEMENTS, cache: dict | None = None) -> tuple[dict, dict]:
    """Split a state dict into fp16 tensors and palettized ones; `bits` is one width for all, or a
    per-key recipe (keys it lacks stay fp16). `cache` reuses palettized tensors across calls."""
    dense, packed = {}, {}
    for key, tensor in weights.items():
        b = bits.get(key) if isinstance(bits, dict) else bits
        if b is not None and is_palettizable(key, tensor, min_elements):
            packed[key] = palettize_cached(key, tensor, b, group_size, cache)
        else:
            dense[key] = tensor
    return dense, packed


def compress(source: str | Path, out: str | Path, bits: int | None = None, mixed_bit: float | None = None,
             group_size: int | None = None, min_elements: int = MIN_ELEMENTS, log=print, unet_cache: dict | None = None,
             **mixed_options) -> dict:
    """Write a palettized copy of the model folder `source` to `out`.

    Every component is palettized at `bits`; with `mixed_bit` (a target PSNR in dB) the UNet gets a
    per-layer recipe from `mixed_bit_recipe` instead (the other components stay at `bits`, default 8).
    Returns a summary: bytes on disk, average bits, and the recipe's measured PSNR. `unet_cache`
    (a dict) keeps the UNet's palettized tensors for later calls, e.g. 8, 6, 4 bits then mixed.
    The copy is written next to `out` and renamed to it when complete, so a failure leaves nothing.
    """
    source, out = Path(source), Path(out)
    log = log or (lambda *args: None)
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a diffusers-layout model folder (no model_index.json)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another output folder")
    if mixed_bit is None and bits is None:
        raise ValueError("give bits (one of 1, 2, 4, 6, 8) or a mixed-bit target PSNR")
    if bits is not None and bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if any((source / component / RECIPE_NAME).is_file() for component in COMPONENTS):
        raise ValueError(f"{source} is already palettized; compress the original model")
    bits = 8 if bits is None else bits
    summary = {"source": str(source), "bits": bits, "mixed_bit_target_db": mixed_bit}
    unet_bits: int | dict = bits
    if mixed_bit is not None:
        from .pipeline import StableDiffusion

        sd = StableDiffusion.from_pretrained(source)
        unet_bits, report = mixed_bit_recipe(sd, mixed_bit, group_size=group_size, min_elements=min_elements,
                                             log=log, cache=unet_cache, **mixed_options)
        summary.update(report)
        del sd
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    work.mkdir()
    try:
        for item in source.iterdir():  # configs, tokenizer, scheduler: copied as they are
            if item.is_file():
                shutil.copy(item, work / item.name)
            elif item.name not in COMPONENTS:
                shutil.copytree(item, work / item.name)
        for component in COMPONENTS:
            if not (source / component).is_dir():
                continue
            start = time.perf_counter()
            (work / component).mkdir()
            for item in (source / component).glob("*.json"):
                if not item.name.endswith(".index.json"):
                    shutil.copy(item, work / component / item.name)
            weights = component_weights(source, component)
            dense, packed = compress_component(weights, unet_bits if component == "unet" else bits, group_size,
                                               min_elements, unet_cache if component == "unet" else None)
            extra = {"psnr_db": summary.get("psnr_db")} if component == "unet" and mixed_bit is not None else {}
            save_palettized(work / component, dense, packed, group_size, extra)
            summary[component] = {"average_bits": average_bits(dense, packed), "palettized": len(packed),
                                  "fp16": len(dense)}
            log(f"{component}: {len(packed)} tensors palettized (average {average_bits(dense, packed):.2f} bits), "
                f"{len(dense)} kept fp16, {time.perf_counter() - start:.1f} s")
        summary["bytes"] = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
        os.replace(work, out)  # (an empty `out` is replaced too)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


# -- mixed-bit recipes ------------------------------------------------------------------------

PROMPTS = ("a photo of an astronaut riding a horse on mars", "a red circle on a blue background",
           "a watercolour painting of a lighthouse at dusk")


def psnr(reference: torch.Tensor, x: torch.Tensor) -> float:
    """10 log10(peak^2 / MSE) with peak = max |reference|."""
    mse = (reference.double() - x.double()).pow(2).mean().item()
    peak = reference.abs().max().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


class _Captured(Exception):
    """Stops a generation once the UNet call wanted has been recorded."""


def unet_inputs(sd, prompts=PROMPTS, latent_size: int | None = None, steps: int = 4) -> list[tuple]:
    """(latents, timestep, text states, SDXL's added_cond or None) UNet inputs of real generations:
    for the i-th prompt (seed i) the input of step i of a `steps`-step run, so the inputs span the
    noise levels."""
    inputs = []

    def record(module, args):
        x, t, context, added = (*args, None)[:4]
        if isinstance(context, ProjectedContext):  # its projections were made with the weights as they are
            context = context.states
        calls.append((x.clone(), t.clone() if isinstance(t, torch.Tensor) else t, context.clone(), added))
        if len(calls) > wanted:
            raise _Captured

    size = None if latent_size is None else latent_size * sd.vae.config.downscale_factor
    hook = sd.unet.register_forward_pre_hook(record)
    try:
        for i, prompt in enumerate(prompts):
            calls, wanted = [], i % steps
            try:
                for _ in sd.generate_latents(prompt, steps=steps, seed=i, height=size, width=size):
                    pass
            except _Captured:
                pass
            inputs.append(calls[wanted])
    finally:
        hook.remove()
    return inputs


def mixed_bit_recipe(sd, target_db: float | str, candidates=(2, 4, 6, 8), group_size: int | None = None,
                     min_elements: int = MIN_ELEMENTS, latent_size: int | None = None, n_inputs: int = 3,
                     log=print, cache: dict | None = None) -> tuple[dict[str, int], dict]:
    """Per-layer bit widths for `sd.unet` meeting `target_db` PSNR of the UNet output, after Apple's
    mixed-bit palettization (ml-stable-diffusion `mixed_bit_compression_pre_analysis.py`).

    1. For every palettizable layer and bit width, palettize only that layer and record the output
       noise (MSE against the fp32 output) on the first denoising step of `n_inputs` prompts/seeds.
    2. Noise from different layers adds up roughly independently, so start every layer at the
       widest width and greedily narrow the layer that saves the most bytes per unit of added noise
       while the summed noise stays within the target's budget.
    3. Palettize with the recipe and measure the real PSNR; if it misses the target, shrink the
       budget by the miss and choose again, then bisect between the budgets that met and missed
       it (6 tries in all), keeping the fewest bits that met it (none met: the widest everywhere).

    `target_db` may also be "N-bit": the PSNR that uniform N-bit palettization reaches, to find a
    recipe of that quality in fewer bits. `latent_size` (default: the model's) sets the inputs'
    size: smaller is faster to measure.
    `cache` (a dict) reuses palettized tensors, see `compress`.
    """
    log = log or (lambda *args: None)
    unet = sd.unet
    inputs = unet_inputs(sd, PROMPTS[:n_inputs], latent_size)
    with torch.inference_mode():
        reference = torch.cat([unet(*call) for call in inputs])
    peak = reference.abs().max().item()
    params = dict(unet.named_parameters())
    keys = [k for k, p in params.items() if is_palettizable(k, p, min_elements)]
    candidates = sorted(candidates)
    start = time.perf_counter()

    def output_with(replacements: dict[str, torch.Tensor]) -> torch.Tensor:
        saved = {k: params[k].data for k in replacements}
        try:
            for k, w in replacements.items():
                params[k].data = w
            with torch.inference_mode():
                return torch.cat([unet(*call) for call in inputs])
        finally:
            for k, w in saved.items():
                params[k].data = w

    def mse(out):
        return (out.double() - reference.double()).pow(2).mean().item()

    cache = {} if cache is None else cache
    noise = {}

    def weight(key, b):
        return palettize_cached(key, params[key], b, group_size, cache).unpack(params[key].dtype)

    for i, key in enumerate(keys):
        for b in candidates:
            noise[key, b] = mse(output_with({key: weight(key, b)}))
        if (i + 1) % 25 == 0:
            log(f"sensitivity: {i + 1}/{len(keys)} layers, {time.perf_counter() - start:.0f} s")

    def choose(budget: float) -> dict[str, int]:
        chosen = {k: candidates[-1] for k in keys}
        total = sum(noise[k, chosen[k]] for k in keys)
        while True:
            best, best_score = None, -1.0
            for k in keys:
                i = candidates.index(chosen[k])
                if i == 0:
                    continue
                lower = candidates[i - 1]
                added = noise[k, lower] - noise[k, chosen[k]]
                if total + added > budget:
                    continue
                score = params[k].numel() * (chosen[k] - lower) / max(added, 1e-30)
                if score > best_score:
                    best, best_score = k, score
            if best is None:
                return chosen
            lower = candidates[candidates.index(chosen[best]) - 1]
            total += noise[best, lower] - noise[best, chosen[best]]
            chosen[best] = lower

    def recipe_psnr(recipe: dict[str, int]) -> float:
        return psnr(reference, output_with({k: weight(k, b) for k, b in recipe.items()}))

    uniform = {b: recipe_psnr(dict.fromkeys(keys, b)) for b in candidates}
    log("uniform palettization, UNet output PSNR: " + ", ".join(f"{b} bits {p:.1f} dB" for b, p in uniform.items()))
    if isinstance(target_db, str):
        target_db = uniform[int(target_db.removesuffix("-bit"))]
    n = sum(params[k].numel() for k in keys)

    def average_bits(recipe: dict[str, int]) -> float:
        return sum(params[k].numel() * b for k, b in recipe.items()) / n

    # The summed noise is only an estimate: search the budget for the smallest recipe whose real
    # PSNR meets the target. A miss shrinks the budget by the miss (the sum under-estimated the
    # noise by that much); once one budget passes and another missed, bisect between them.
    budget = peak**2 / 10 ** (target_db / 10)
    passed, missed = None, None  # the largest budget that met the target, the smallest that missed
    best = None  # (recipe, PSNR): the fewest bits that met the target
    for _ in range(6):
        recipe = choose(budget)
        achieved = recipe_psnr(recipe)
        if achieved >= target_db:
            passed = budget
            if best is None or average_bits(recipe) < average_bits(best[0]):
                best = (recipe, achieved)
            if missed is None:
                break
        else:
            missed = budget
        budget = budget * 10 ** ((achieved - target_db) / 10) if passed is None else math.sqrt(passed * missed)
    if best is None:  # nothing met the target: the widest candidate everywhere comes closest
        recipe = dict.fromkeys(keys, candidates[-1])
        best = (recipe, recipe_psnr(recipe))
    recipe, achieved = best
    avg = average_bits(recipe)
    counts = {b: sum(1 for v in recipe.values() if v == b) for b in candidates}
    log(f"mixed-bit recipe: {avg:.2f} bits on average over {len(keys)} layers "
        f"({', '.join(f'{c} at {b} bits' for b, c in counts.items())}), UNet output PSNR {achieved:.1f} dB "
        f"(target {target_db:.1f} dB), {time.perf_counter() - start:.0f} s")
    return recipe, {"unet_average_bits": avg, "psnr_db": achieved, "target_db": target_db,
                    "layers_by_bits": counts, "uniform_psnr_db": uniform}
