"""Native loops for work that torch only does in several passes: a few lines of C, compiled on
first use by the system's C compiler (`$CC`, else `cc`) into ~/.cache/sdlite/kernels and loaded
with ctypes. Where no compiler is found, `library()` is None and callers use torch ops (the
look-ups, with the same results) or the convolutions they had before (direct, or GEMMs on small
inputs, instead of Winograd's: the same to float rounding); where one is found but fails, also
with a warning.

`look_up`: decoding palettized weights (`sdlite.palettize.decode`). torch builds each 12-bit code
in passes over an int32 buffer and then looks it up (`index_select`); the loop here reads the
code's two bytes and writes the looked-up values in one pass. All 280 weights of SD 2.1's 6-bit
UNet: 0.21-0.24 against 0.63-0.74 s on two threads, so a 512 px jit step at 1.10x fp32's time
instead of 1.17x (README, "Compression and low memory"; measured before fp32 convolutions ran
Winograd's algorithm, which weights rebuilt per call do not). Built with OpenMP, the loop runs on
torch's OpenMP threads: Python threads of its own found the other core held by those threads,
which spin for a while after each parallel op, and gained nothing in the network.

`winograd_input`, `winograd_output`: Winograd's input and output transforms (`sdlite.winograd`),
one pass over the input gathering and transforming its tiles, one over the GEMMs' products
transforming them into the channels-last output with the bias added. In torch ops (an unfold, a
small matrix product, a stack and a permuted copy) they had taken as long as the GEMMs on large
images: 57 against 24 ms for a 256-channel convolution on 128 x 128 pixels. `winograd_weight`:
the weights' transform G w G^T in one pass, made at a UNet's first call and in every call where
weights are not kept transformed (the VAE's, low-memory mode's): a torch matrix product of
kron(G, G) by the 9 taps had taken 21.6 against 18.2 ms for a 2560-to-1280-channel layer, and
with it SD 2.1's VAE decode at 256 px took 1.73 against 1.62 s and a UNet call with per-call
transforms 1.67 against 1.62 s (alternating in one process, medians of 4, AMD EPYC).
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
#include <string.h>

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

#define CB 64  /* channels (or filters) transformed at a time (on the stack) */

/* Winograd weight transform of n 3x3 filters w (n, 3, 3) (n = out x in channels; t <= 8):
   U[a*t+b][j] = sum_ik G[a][i] w[j][i][k] G[b][k], U (t*t, n). */
void winograd_weight(const float *w, int64_t n, int t, const float *G, float *U)
{
    #pragma omp parallel for schedule(static)
    for (int64_t j0 = 0; j0 < n; j0 += CB) {
        int jb = n - j0 < CB ? (int)(n - j0) : CB;
        float d[9][CB], r[8][3][CB];
        for (int j = 0; j < jb; j++)
            for (int i = 0; i < 9; i++) d[i][j] = w[(j0 + j) * 9 + i];
        for (int a = 0; a < t; a++)
            for (int k = 0; k < 3; k++) {
                float g0 = G[a * 3], g1 = G[a * 3 + 1], g2 = G[a * 3 + 2], *o = r[a][k];
                for (int j = 0; j < jb; j++) o[j] = g0 * d[k][j] + g1 * d[3 + k][j] + g2 * d[6 + k][j];
            }
        for (int a = 0; a < t; a++)
            for (int b = 0; b < t; b++) {
                float g0 = G[b * 3], g1 = G[b * 3 + 1], g2 = G[b * 3 + 2], *o = U + (int64_t)(a * t + b) * n + j0;
                for (int j = 0; j < jb; j++) o[j] = g0 * r[a][0][j] + g1 * r[a][1][j] + g2 * r[a][2][j];
            }
    }
}
/* Winograd input transform of tiles first .. first + count - 1 (t <= 8):
   V[a*t+b][i][c] = sum_jk BT[a][j] d[j][k] BT[b][k], d the t x t patch of tile first + i, at
   (row*m - 1, column*m - 1) in image n of channels-last x (zero outside); tiles in (n, row, column) order. */
void winograd_input(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t sn, int64_t sh,
                    int64_t sw, int64_t first, int64_t count, int t, int m, const float *BT, float *V)
{
    int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m;
    #pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < count; it++) {
        int64_t tile = first + it, n = tile / (th * tw), i0 = (tile / tw) % th * m - 1, j0 = tile % tw * m - 1;
        float d[8][8][CB], r[8][8][CB];
        for (int64_t c0 = 0; c0 < C; c0 += CB) {
            int cb = C - c0 < CB ? (int)(C - c0) : CB;
            for (int i = 0; i < t; i++)
                for (int j = 0; j < t; j++) {
                    int64_t y = i0 + i, z = j0 + j;
                    if (y < 0 || y >= H || z < 0 || z >= W) memset(d[i][j], 0, cb * sizeof(float));
                    else memcpy(d[i][j], x + n * sn + y * sh + z * sw + c0, cb * sizeof(float));
                }
            for (int a = 0; a < t; a++)
                for (int j = 0; j < t; j++) {
                    float *o = r[a][j];
                    for (int c = 0; c < cb; c++) o[c] = 0;
                    for (int i = 0; i < t; i++) {
                        float f = BT[a * t + i];
                        if (f != 0) for (int c = 0; c < cb; c++) o[c] += f * d[i][j][c];
                    }
                }
            for (int a = 0; a < t; a++)
                for (int b = 0; b < t; b++) {
                    float *o = V + ((int64_t)(a * t + b) * count + it) * C + c0;
                    for (int c = 0; c < cb; c++) o[c] = 0;
                    for (int j = 0; j < t; j++) {
                        float f = BT[b * t + j];
                        if (f != 0) for (int c = 0; c < cb; c++) o[c] += f * r[a][j][c];
                    }
                }
        }
    }
}
/* Winograd output transform of tiles first .. first + count - 1 (t <= 8): at (row*m + p, column*m + q)
   of image n, y[k] = bias[k] + sum_ab AT[p][a] M[a*t+b][i][k] AT[q][b] for tile first + i; y channels-last
   (N, H, W, K) contiguous, outputs past H, W dropped. */
void winograd_output(const float *const *M, const float *bias, int64_t N, int64_t H, int64_t W, int64_t K,
                     int64_t first, int64_t count, int t, int m, const float *AT, float *y)
{
    int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m;
    #pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < count; it++) {
        int64_t tile = first + it, n = tile / (th * tw), i0 = (tile / tw) % th * m, j0 = tile % tw * m;
        float r[8][8][CB];
        for (int64_t k0 = 0; k0 < K; k0 += CB) {
            int kb = K - k0 < CB ? (int)(K - k0) : CB;
            for (int p = 0; p < m; p++)
                for (int b = 0; b < t; b++) {
                    float *o = r[p][b];
                    for (int k = 0; k < kb; k++) o[k] = 0;
                    for (int a = 0; a < t; a++) {
                        float f = AT[p * t + a];
                        const float *s = M[a * t + b] + it * K + k0;
                        if (f != 0) for (int k = 0; k < kb; k++) o[k] += f * s[k];
                    }
                }
            for (int p = 0; p < m && i0 + p < H; p++)
                for (int q = 0; q < m && j0 + q < W; q++) {
                    float *o = y + ((n * H + i0 + p) * W + j0 + q) * K + k0;
                    for (int k = 0; k < kb; k++) o[k] = bias ? bias[k0 + k] : 0;
                    for (int b = 0; b < t; b++) {
                        float f = AT[q * t + b];
                        if (f != 0) for (int k = 0; k < kb; k++) o[k] += f * r[p][b][k];
                    }
                }
        }
    }
}
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
                      "torch ops and the convolutions' plain algorithms are used instead (slower)", stacklevel=3)
        return None
    pointer, int64, int32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for size in WORD_BYTES:
        getattr(lib, f"look_up_{size}").argtypes = [pointer, pointer, int32, pointer, pointer, int64]
    lib.winograd_weight.argtypes = [pointer, int64, int32, pointer, pointer]
    lib.winograd_input.argtypes = [pointer, *[int64] * 9, int32, int32, pointer, pointer]
    lib.winograd_output.argtypes = [pointer, pointer, *[int64] * 6, int32, int32, pointer, pointer]
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


def winograd_weight(weight: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The Winograd weight transform as in `SOURCE`: the (t*t, K, C) products G w G^T of a CPU
    fp32 (K, C, 3, 3) weight's filters w, for the contiguous fp32 t x 3 matrix `G` (t at most 8).
    Takes the library `library()` built (callers ask for it first, as `winograd.tiling` does)."""
    if (weight.dim() != 4 or weight.shape[2:] != (3, 3) or G.dim() != 2 or G.shape[1] != 3 or not 2 < len(G) <= 8
            or not cpu_fp32(weight, G) or not G.is_contiguous()):
        raise ValueError("winograd_weight takes a CPU fp32 (K, C, 3, 3) weight and a contiguous t x 3 matrix (t <= 8)")
    K, C, t = *weight.shape[:2], len(G)
    weight = weight.contiguous()
    U = torch.empty(t * t, K, C, dtype=torch.float32, device="cpu")
    library().winograd_weight(weight.data_ptr(), K * C, t, G.data_ptr(), U.data_ptr())
    return U


def winograd_input(x: torch.Tensor, m: int, BT: torch.Tensor, first: int, count: int) -> torch.Tensor | None:
    """The Winograd input transform as in `SOURCE`: for channels-last CPU fp32 `x` (N, C, H, W),
    the (t*t, count, C) products BT d BT^T of its t x t tiles d `first` to `first + count - 1`
    (t = m + 2 at most 8, zero-padded by one, tile origins m apart, tiles in (n, row, column)
    order); None where no library is built."""
    lib = library()
    if lib is None:
        return None
    N, C, H, W = x.shape
    t = m + 2
    sn, sc, sh, sw = x.stride()
    if (not 2 <= m <= 6 or BT.shape != (t, t) or not cpu_fp32(x, BT) or sc != 1 or not BT.is_contiguous()
            or not 0 <= first <= first + count <= tile_count(N, H, W, m)):
        raise ValueError("winograd_input takes a channels-last CPU fp32 input, a contiguous t x t matrix "
                         "(t = m + 2 <= 8) and a range of its tiles")
    V = torch.empty(t * t, count, C, dtype=torch.float32, device="cpu")
    lib.winograd_input(x.data_ptr(), N, H, W, C, sn, sh, sw, first, count, t, m, BT.data_ptr(), V.data_ptr())
    return V


def winograd_output(products: list[torch.Tensor], bias: torch.Tensor | None, AT: torch.Tensor,
                    out: torch.Tensor, first: int) -> None:
    """The Winograd output transform as in `SOURCE`: the t*t (count, K) `products` of
    `winograd_input`'s tiles `first` to `first + count - 1` transformed (AT P AT^T) into their
    outputs in `out`, the (N, H, W, K) contiguous CPU fp32 output, plus `bias`. Takes the library
    `winograd_input` found."""
    m, t = AT.shape
    N, H, W, K = out.shape
    count = len(products[0]) if products else 0
    if (t != m + 2 or not 2 <= m <= 6 or len(products) != t * t or not cpu_fp32(AT, out, *products)
            or not AT.is_contiguous() or not out.is_contiguous()
            or any(p.shape != (count, K) or not p.is_contiguous() for p in products)
            or not 0 <= first <= first + count <= tile_count(N, H, W, m)
            or (bias is not None and (bias.shape != (K,) or not bias.is_contiguous() or not cpu_fp32(bias)))):
        raise ValueError("winograd_output takes t*t contiguous CPU fp32 (tiles, K) products of a range of "
                         "tiles, an m x (m + 2) matrix (m + 2 <= 8), a contiguous output and K biases")
    pointers = (ctypes.c_void_p * (t * t))(*[p.data_ptr() for p in products])
    library().winograd_output(pointers, 0 if bias is None else bias.data_ptr(), N, H, W, K, first, count, t, m,
                              AT.data_ptr(), out.data_ptr())


def tile_count(N: int, H: int, W: int, m: int) -> int:
    """The Winograd tiles of N images of H x W pixels, m x m outputs each (the last row and column
    of tiles reach past the image)."""
    return N * -(-H // m) * -(-W // m)


def cpu_fp32(*tensors: torch.Tensor) -> bool:
    """Whether all `tensors` are fp32 on the CPU (what the kernels and oneDNN's fp32 ops take)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


_library = None  # None: not built yet; False: no compiler, or building failed
_lock = threading.Lock()
