"""Running in less memory: weights kept compact at rest, networks loaded only while used, and
VAE decoding in tiles.

- `keep_at_rest(network, compute_dtype, packed)`: the network's weights stay in their storage form
  (fp16/bf16 tensors, or `PalettizedTensor`s) and each module gets its weights in `compute_dtype`
  just before its forward runs; they are dropped right after. So an fp16-at-rest model needs half
  the RAM of fp32 and a palettized one about its packed size, while the math stays fp32.
- `OnDemand`: a text encoder or VAE loaded from disk for one use and freed after (low-memory mode).
- `decode_tiled`: VAE decoding of overlapping latent tiles blended linearly, as diffusers'
  `AutoencoderKL.tiled_decode`, so the decoder's activations scale with the tile, not the image.
- `release_weights`: a network's memory-mapped weights out of resident memory between uses (they
  come back from the page cache).
- `Slices`: a large palettized convolution weight materialised a slice of output channels at a
  time (`sdlite.layers.Conv2d` runs them).
- `set_malloc_policy`: glibc's malloc keeps freed blocks for reuse (fewer page faults);
  `trim_heap` gives them back to the system (low-memory mode: between stages, UNet blocks, tiles).
"""

import gc
import math
import os
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn


class WeightsAtRest:
    """Forward hooks of one module: the stored tensors of it (or of its embedding children),
    materialised in `dtype` for the length of each call, into `scratch` from `offset` on if given.
    Owners are named by their path from the hooked module, not held: a module holding its own
    hooks' owners would be a reference cycle, which keeps the weights of a freed network (a
    low-memory text encoder) alive until Python's next garbage collection.
    `lock` is the network's: its modules share the scratch buffer and set attributes on shared
    modules, so one thread at a time runs a module with weights materialised (the server's
    workers share one model)."""

    def __init__(self, dtype: torch.dtype, lock):
        self.dtype, self.lock = dtype, lock
        # (owner's path from the hooked module, parameter name, tensor or PalettizedTensor, rows per slice or None)
        self.stored = []
        self.scratch, self.offset = None, 0

    def size(self) -> int:
        """Values the stored tensors need materialised (palettized ones decode in runs of 8)."""
        return sum(materialised_size(v, rows) for _, _, v, rows in self.stored)

    def before(self, module: nn.Module, args) -> None:
        self.lock.acquire()  # released by `after`, which runs even if the call fails
        start = self.offset
        for path, name, value, rows in self.stored:
            n = materialised_size(value, rows)
            out = None if self.scratch is None else self.scratch.region(start, n)
            if isinstance(value, torch.Tensor):
                weight = value.to(self.dtype) if out is None else out.view(value.shape).copy_(value)
            elif rows:
                weight = Slices(value, self.dtype, rows, out)
            else:
                weight = value.unpack(self.dtype, out)
            setattr(module.get_submodule(path), name, weight)
            start += n

    def stored_value(self, name: str):
        """The hooked module's own stored `name` (a tensor or PalettizedTensor), or None."""
        return next((v for path, n, v, _ in self.stored if (path, n) == ("", name)), None)

    def replace(self, name: str, value: torch.Tensor) -> None:
        """Store `value` (same shape and dtype) as the hooked module's own `name`: a LoRA merge."""
        self.stored = [(p, n, value if (p, n) == ("", name) else v, r) for p, n, v, r in self.stored]

    def after(self, module: nn.Module, args, output) -> None:
        for path, name, _, _ in self.stored:
            setattr(module.get_submodule(path), name, None)
        self.lock.release()


SLICE_VALUES = 1 << 23  # palettized weights of layers that take `Slices` and are larger: in slices


class Slices:
    """A palettized weight to be materialised `rows` output channels at a time into `out`, for
    layers that take it (`sdlite.layers.Conv2d`): iterating gives (start, stop, slice), each slice
    overwriting the one before. oneDNN makes a re-laid-out copy of a convolution's weight in each
    call, so slices cut both that copy and the materialised weight to the slice's size: SD 2.1's
    largest convolution weight (2560 -> 1280 channels, 3x3) takes 118 MB in fp32."""

    def __init__(self, value, dtype: torch.dtype, rows: int, out: torch.Tensor | None):
        self.value, self.dtype, self.rows, self.out = value, dtype, rows, out

    def __iter__(self):
        channels = self.value.shape[0]
        for start in range(0, channels, self.rows):
            stop = min(start + self.rows, channels)
            yield start, stop, self.value.unpack(self.dtype, self.out, (start, stop))


def slice_rows(module: nn.Module, value) -> int | None:
    """Output channels per slice for `value` (a tensor or PalettizedTensor) stored for `module`,
    or None to materialise it whole: palettized weights over `SLICE_VALUES` values of layers
    that take `Slices`, in slices that start on a whole code."""
    if isinstance(value, torch.Tensor) or not getattr(module, "takes_slices", False) or value.numel <= SLICE_VALUES:
        return None
    row, per = value.numel // value.shape[0], value.values_per_code
    step = per // math.gcd(row, per)  # rows a slice's start moves by to stay on a whole code
    return max(step, SLICE_VALUES // row // step * step)


def materialised_size(value, rows: int | None = None) -> int:
    """Values a stored tensor or PalettizedTensor takes materialised (palettized: in whole codes,
    `rows` output channels of it if given)."""
    if isinstance(value, torch.Tensor):
        return value.numel()
    return value.padded_numel if rows is None else value.decoded_numel(rows)


class Scratch:
    """One buffer per network that its modules' weights are materialised into, call after call.
    Allocating them afresh instead costs a page fault per 4 KiB when glibc serves large blocks by
    mmap (low-memory mode), or keeps freed blocks in the heap otherwise. Allocated on first use."""

    def __init__(self, numel: int, dtype: torch.dtype, device):
        self.numel, self.dtype, self.device, self.tensor = numel, dtype, device, None

    def region(self, start: int, n: int) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        return self.tensor[start:start + n]


def keep_at_rest(network: nn.Module, compute_dtype: torch.dtype, packed: dict | None = None) -> nn.Module:
    """Keep `network`'s floating-point parameters not in `compute_dtype`, and the `packed`
    (key -> PalettizedTensor) weights, out of the parameters: each module materialises its own in
    `compute_dtype` for the length of its forward call, into one `Scratch` buffer the network's
    modules share (a module's region starts after those of the modules it runs inside).
    Embeddings are materialised for their parent's call instead, since parents read them directly
    (CLIP's `position_embedding.weight`), into a tensor of their own: the token embedding is
    the largest tensor of a text encoder and is used once per prompt."""
    by_module: dict[str, dict] = {}
    for key, value in (packed or {}).items():
        module_name, _, name = key.rpartition(".")
        by_module.setdefault(module_name, {})[name] = value
    modules = dict(network.named_modules())
    hosts: dict[str, WeightsAtRest] = {}
    lock = threading.RLock()  # re-entrant: a module's call holds it while its children run
    device = None
    for module_name, module in modules.items():
        stored = by_module.get(module_name, {})
        for name, p in list(module.named_parameters(recurse=False)):
            device = p.device
            if p.is_floating_point() and p.dtype != compute_dtype:
                stored[name] = p.data
                del module._parameters[name]
        embedding = isinstance(module, nn.Embedding) and module_name
        host, path = module_name.rpartition(".")[::2] if embedding else (module_name, "")
        for name, value in stored.items():
            device = value.device if isinstance(value, torch.Tensor) else value.indices.device
            setattr(module, name, None)
            rows = slice_rows(module, value) if name == "weight" else None
            hosts.setdefault(host, WeightsAtRest(compute_dtype, lock)).stored.append((path, name, value, rows))
    shared = {name: hooks for name, hooks in hosts.items() if all(path == "" for path, _, _, _ in hooks.stored)}
    sizes = {name: hooks.size() for name, hooks in shared.items()}
    scratch_size = 0
    for name, hooks in shared.items():
        parts = name.split(".") if name else []
        outer = [""] + [".".join(parts[:i]) for i in range(1, len(parts))] if name else []  # its ancestors
        hooks.offset = sum(sizes.get(a, 0) for a in outer)
        scratch_size = max(scratch_size, hooks.offset + sizes[name])
    scratch = Scratch(scratch_size, compute_dtype, device)
    for host, hooks in hosts.items():
        if host in shared:
            hooks.scratch = scratch
        modules[host].register_forward_pre_hook(hooks.before)
        modules[host].register_forward_hook(hooks.after, always_call=True)
        modules[host].weights_at_rest = hooks  # for merging LoRAs into the stored weights (sdlite.lora)
    network.compute_dtype, network.compute_device = compute_dtype, device
    network.stored_tensors = [v if isinstance(v, torch.Tensor) else v.indices
                              for hooks in hosts.values() for _, _, v, _ in hooks.stored]  # for release_weights
    return network


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device`: a GPU's own, or the machine's RAM for the CPU; None where
    unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        pages = os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else -1
        return os.sysconf("SC_PAGE_SIZE") * pages if pages > 0 else None
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def network_device(network) -> torch.device:
    """The device a network computes on: set by `keep_at_rest` / `OnDemand`, else its parameters'."""
    device = getattr(network, "compute_device", None)
    return torch.device(device) if device is not None else next(network.parameters()).device


def network_dtype(network) -> torch.dtype:
    """The dtype a network computes in: set by `keep_at_rest` / `OnDemand`, else its parameters'."""
    dtype = getattr(network, "compute_dtype", None)
    return dtype if dtype is not None else next(network.parameters()).dtype


class OnDemand:
    """A network that is loaded (by `load()`) for each use and freed after: `with using(x) as net`."""

    def __init__(self, load: Callable[[], nn.Module], config, compute_dtype: torch.dtype, device="cpu"):
        self.load, self.config, self.compute_dtype, self.compute_device = load, config, compute_dtype, device


@contextmanager
def using(network):
    """The network itself, or an `OnDemand` network loaded for the block and freed at its end. A
    network marked `release_after_use` gives its memory-mapped weights' pages back at the end."""
    if not isinstance(network, OnDemand):
        try:
            yield network
        finally:
            if getattr(network, "release_after_use", False):
                release_weights(network)
        return
    trim_heap()  # what the heap keeps from the stages before goes back to the system first
    loaded = network.load()
    try:
        yield loaded
    finally:
        del loaded
        gc.collect()  # free the weights (and unmap their files) now, before the next stage
        trim_heap()


MADV_DONTNEED = 4  # madvise advice (Linux), not named by Python's mmap


def page_range(t: torch.Tensor) -> tuple[int, int]:
    """The addresses of the whole pages inside `t`'s data (start >= end: none)."""
    page = 4096
    return -(-t.data_ptr() // page) * page, (t.data_ptr() + t.numel() * t.element_size()) // page * page


def note_file_mapping(mapped) -> None:
    """Remember the address range of `mapped`, a writable `mmap.mmap` of a weights file whose
    tensors view it (`sdlite.loading`), while the mapping object lives and is open: file-backed
    memory `release_pages` may release without reading /proc/self/maps (about 1 ms a read, once
    for each weight packed in a UNet's first call: 0.25 s of SD 2.1's at 256 px)."""
    import ctypes

    view = ctypes.c_char.from_buffer(mapped)
    start = ctypes.addressof(view)
    del view
    key = id(mapped)
    # The entry goes with the object; until then a dead reference marks it stale (`release_pages`).
    _mapped_files[key] = (weakref.ref(mapped, lambda _: _mapped_files.pop(key, None)), start, start + len(mapped))


_mapped_files = {}  # id of a mapping -> (weak reference to it, start, end) (`note_file_mapping`)


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings (Linux; else none)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":  # an inode: backed by a file
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def release_pages(tensors) -> None:
    """Take the pages of memory-mapped weights out of this process's resident memory with
    madvise(MADV_DONTNEED): the kernel's page cache keeps them, and they fault back in from it
    when next read. Only tensors that are views of a file and were never modified in place (their
    version counter is 0) are released: for others DONTNEED would revert a change or, for
    anonymous memory, zero them. A write through `.data` does not count, so sdlite never writes
    into weights; cast or merged weights (LoRA merges replace tensors) are not file-backed. The
    files sdlite maps itself are known (`note_file_mapping`); for other tensors (torch.load's
    mappings of .ckpt files) /proc/self/maps is read, once a call.
    (MADV_PAGEOUT, used before, also evicted the pages from the page cache: slower, and the next
    process had to read them from disk again.)"""
    libc = c_library()
    if libc is None:
        return
    # The mappings held for the loop: none is unmapped before it ends (sdlite closes none).
    noted = [(m, lo, hi) for ref, lo, hi in list(_mapped_files.values()) if (m := ref()) is not None and not m.closed]
    others = None
    for t in tensors:
        try:
            if t.device.type != "cpu" or t._version:
                continue
        except RuntimeError:  # an inference tensor has no version counter: it was made, not mapped
            continue
        start, end = page_range(t)
        if end <= start:
            continue
        if not any(lo <= start and end <= hi for _, lo, hi in noted):
            others = file_mappings() if others is None else others
            if not any(lo <= start and end <= hi for lo, hi in others):
                continue
        libc.madvise(start, end - start, MADV_DONTNEED)


def release_weights(network: nn.Module) -> None:
    """`release_pages` of `network`'s parameters, buffers and the weights it keeps at rest, so a
    text encoder or VAE costs RAM only while it works."""
    release_pages(list(network.parameters()) + list(network.buffers()) + getattr(network, "stored_tensors", []))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def set_malloc_policy() -> None:
    """Keep freed blocks of up to 256 MiB in glibc's heap for reuse, process-wide (a no-op off
    glibc). oneDNN allocates and frees a weight-sized buffer in every convolution call, and with
    glibc's defaults each one is a fresh mmap whose pages fault in again: SD 2.1's 1280-channel
    3x3 convolutions on 4x4 latents took 26 ms per call, 10 ms with this; its UNet step at 256 px,
    2.4 s -> 2.0 s. (glibc releases that refuse thresholds over 32 MiB get 32 MiB.)

    Low-memory mode uses it too. It used to give every block over 1 MiB straight back to the
    system instead, and paid a page fault per 4 KiB of every large activation: SD 2.1, 6-bit jit,
    512 px, 13.7 million faults and 9.5 s a step at 1,296 MiB peak RSS, against 0.3 million faults
    and 6.0 s at 1,465 MiB with this policy. What the heap keeps is bounded by the largest
    activations, which low-memory mode cuts by running the feed-forward layers in slices of tokens
    (`sdlite.unet.chunk_feed_forward`): 1,377 MiB, 6.0 s. Without that, trimming the heap after
    every step (1,444 MiB, 5.7 s) or lower thresholds (32 MiB for both: 1,498 MiB, 6.7 s; 64 MiB
    and trimming: 1,400 MiB, 6.2 s) did less.
    PyTorch's THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for tensors of 2 MiB and more, set
    before the process's first allocation) made the default fp32 path at 256 px slower (end to end
    32.8 vs 29.4 s, first UNet step 3.7 vs 2.3 s, peak RSS +230 MB, one run each): sdlite leaves it
    to the user."""
    libc = c_library()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    if not libc.mallopt(M_MMAP_THRESHOLD, 256 << 20):
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def trim_heap() -> None:
    """Give the free memory in glibc's heap back to the system (`malloc_trim`; a no-op off glibc).
    With `set_malloc_policy` the heap keeps every page it has used, and from stage to stage (text
    encoder, UNet steps, VAE) and from step to step its free blocks grow: SD 2.1, 6-bit jit, 512
    px, one process, anonymous memory 663 MiB after the first UNet step and 784 MiB from the fifth
    on; 1,278 MiB while decoding in another. Low-memory mode trims around its on-demand networks,
    after each VAE tile and, when the UNet keeps its weights at rest, after its mid block and each
    up block (with fp32 weights those trims cost 7-17% of a step at 256 px and lowered no peak).
    Peak RSS of that generation (4 steps, processes in turn): 1,369 and 1,419 MiB with neither
    trims nor `Slices`; with slices, 1,380 and 1,422 trimming after each UNet call (peak in the
    first call), 1,237 and 1,384 after each of its nine blocks (peak in the VAE decode; steps 3-5%
    slower), 1,259 after the mid and up blocks; with the tiles trimmed too, 1,262 and 1,263
    (benchmarks/compression.py)."""
    libc = c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def c_library():
    """The C library (ctypes) on Linux, else None."""
    global _libc_handle
    if _libc_handle is None:
        import ctypes
        import sys

        _libc_handle = False
        if sys.platform.startswith("linux"):
            _libc_handle = ctypes.CDLL(None, use_errno=True)
            _libc_handle.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc_handle or None


_libc_handle = None


def decode_tiled(vae: nn.Module, z: torch.Tensor, tile: int = 32, overlap: int = 8) -> torch.Tensor:
    """Decode latents z (B, C, h, w) in overlapping `tile` x `tile` latent tiles.

    Tiles start every `tile - overlap` latents; neighbouring tiles' outputs are blended linearly
    across the overlap (diffusers' `blend_v` / `blend_h`). Images that fit one tile decode whole,
    exactly as `vae.decode`. The decoder's mid-block attention sees one tile at a time, so large
    images differ slightly from a whole decode (as with diffusers' tiled decoding).
    """
    B, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae.decode(z)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    stride = tile - overlap
    f = vae.config.downscale_factor
    out, weight = None, torch.zeros(1, 1, h * f, w * f, dtype=z.dtype, device=z.device)
    ramp = torch.linspace(0, 1, overlap * f + 2, dtype=z.dtype, device=z.device)[1:-1]  # strictly inside (0, 1)
    for top in range(0, max(h - overlap, 1), stride):
        for left in range(0, max(w - overlap, 1), stride):
            bottom, right = min(top + tile, h), min(left + tile, w)
            pixels = vae.decode(z[:, :, top:bottom, left:right])  # (B, 3, th*f, tw*f)
            if out is None:
                out = torch.zeros(B, pixels.shape[1], h * f, w * f, dtype=pixels.dtype, device=z.device)
            mask = torch.ones(1, 1, *pixels.shape[2:], dtype=pixels.dtype, device=z.device)
            n = overlap * f
            if top > 0 and n:
                mask[:, :, :n] *= ramp[:, None]
            if bottom < h and n:
                mask[:, :, -n:] *= ramp.flip(0)[:, None]
            if left > 0 and n:
                mask[:, :, :, :n] *= ramp
            if right < w and n:
                mask[:, :, :, -n:] *= ramp.flip(0)
            out[:, :, top * f:bottom * f, left * f:right * f] += pixels * mask
            weight[:, :, top * f:bottom * f, left * f:right * f] += mask
            trim_heap()  # the tile's activations go back to the system before the next tile
    return out / weight
