"""Native loops for work that torch only does in several passes: a few lines of C, compiled on
first use by the system's C compiler (`$CC`, else `cc`) into ~/.cache/sdlite/kernels and loaded
with ctypes. Where no compiler is found, `library()` is None and callers use torch ops, with the
same results; where one is found but fails, also with a warning.

`look_up`: decoding palettized weights (`sdlite.palettize.decode`). torch builds each 12-bit code
in passes over an int32 buffer and then looks it up (`index_select`); the loop here reads the
code's two bytes and writes the looked-up values in one pass. All 280 weights of SD 2.1's 6-bit
UNet: 0.21-0.24 against 0.63-0.74 s on two threads, so a 512 px jit step at 1.10x fp32's time
instead of 1.17x (README, "Compression and low memory"). Built with OpenMP, the loop runs on
torch's OpenMP threads: Python threads of its own found the other core held by those threads,
which spin for a while after each parallel op, and gained nothing in the network.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .loading import cache_folder

SOURCE = r"""
#include <stdint.h>

/* out[j] = table[code j]: code j is low[j], or with `high` low[j] | (high[j] >> shift & 15) << 8.
   The table has 256 words, or 4096 with `high`; words of 2, 4 or 8 bytes. With OpenMP the loops
   share torch's threads: the process's libgomp is torch's, loaded first. */
#define LOOK_UP(name, word)                                                                       \
    void name(const uint8_t *low, const uint8_t *high, int shift, const word *table, word *out,  \
              int64_t n)                                                                          \
    {                                                                                             \
        if (high) {                                                                               \
            _Pragma("omp parallel for schedule(static) if (n >= 65536)")                          \
            for (int64_t j = 0; j < n; j++) out[j] = table[low[j] | (high[j] >> shift & 15) << 8]; \
        } else {                                                                                  \
            _Pragma("omp parallel for schedule(static) if (n >= 65536)")                          \
            for (int64_t j = 0; j < n; j++) out[j] = table[low[j]];                               \
        }                                                                                         \
    }

LOOK_UP(look_up_2, uint16_t)
LOOK_UP(look_up_4, uint32_t)
LOOK_UP(look_up_8, uint64_t)
"""
# Without OpenMP (clang without libomp) the loops run on the calling thread.
FLAGS = (["-O3", "-shared", "-fPIC", "-fopenmp"], ["-O3", "-shared", "-fPIC"])
WORD_BYTES = (2, 4, 8)


def library():
    """The compiled kernels (a ctypes library), built once per machine and source; None where no
    C compiler works."""
    global _library
    with _lock:
        if _library is None:
            _library = build() or False
    return _library or None


def build():
    """The library cached for this source and compiler, loaded, or else `SOURCE` compiled into the
    cache; None where no compiler is found, or, with a warning, where compiling or loading fails."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    key = hashlib.sha256(f"{SOURCE}{FLAGS}{compiler}{platform.machine()}{sys.platform}".encode()).hexdigest()[:16]
    try:
        path = cache_folder("kernels") / f"kernels-{key}.so"  # RuntimeError where no home directory is known
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # not built yet, or a library that does not load (older sdlite versions cached those)
            path.unlink(missing_ok=True)
            lib = compile_and_load(compiler, path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"sdlite's C kernels could not be built with {compiler} ({detail}); "
                      "torch ops are used instead (slower)", stacklevel=3)
        return None
    for size in WORD_BYTES:
        getattr(lib, f"look_up_{size}").argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def compile_and_load(compiler: str, path: Path):
    """`SOURCE` compiled with the first `FLAGS` that give a library that loads, which is then
    cached at `path`: one that only compiles (-fopenmp where no OpenMP runtime loads) is not kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        source, built = Path(work) / "kernels.c", Path(work) / path.name
        source.write_text(SOURCE)
        for flags in FLAGS:
            done = subprocess.run([compiler, *flags, "-o", str(built), str(source)],
                                  capture_output=True, text=True, timeout=120)
            try:
                done.check_returncode()
                lib = ctypes.CDLL(str(built))
                break
            except (OSError, subprocess.CalledProcessError) as error:
                failure = error
        else:
            raise failure
        os.replace(built, path)  # atomic: another process may be building the same file
    return lib


def look_up(low: torch.Tensor, high: torch.Tensor | None, shift: int, table: torch.Tensor, out: torch.Tensor) -> bool:
    """out[j] = table[code j] as in `SOURCE` (`sdlite.palettize.look_up` is the same in torch
    ops); False, doing nothing, where the kernel does not apply (no library, not CPU tensors,
    other word sizes)."""
    size = table.element_size()
    codes = [low] + ([] if high is None else [high])
    if (table.dim() != 1 or size not in WORD_BYTES or out.dtype != table.dtype
            or any(t.dtype != torch.uint8 for t in codes)
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in codes + [table, out])):
        return False
    lib = library()
    if lib is None:
        return False
    n = len(low)
    if len(out) != n or (high is not None and len(high) != n) or len(table) < (256 if high is None else 4096):
        raise ValueError("look_up: codes, high bits and output differ in length, or the table is short")
    getattr(lib, f"look_up_{size}")(low.data_ptr(), 0 if high is None else high.data_ptr(), shift,
                                    table.data_ptr(), out.data_ptr(), n)
    return True


_library = None  # None: not built yet; False: no compiler, or building failed
_lock = threading.Lock()
