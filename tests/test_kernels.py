"""sdlite's C kernels (`sdlite.kernels`): the same values as torch's ops, built once and cached,
and a clean fallback to torch where no C compiler works."""

import warnings

import pytest
import torch

import sdlite.kernels as kernels
from sdlite.palettize import BITS, PalettizedTensor, pack_bits

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler builds sdlite's kernels here")


def torch_look_up(low, high, shift, table):
    codes = low.long() if high is None else low.long() | (high.long() >> shift & 15) << 8
    return table[codes]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty kernel cache, and the kernels not loaded yet in this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_library", None)
    return tmp_path / "sdlite" / "kernels"


@needs_kernels
@pytest.mark.parametrize("word", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("twelve_bits", [False, True])
@pytest.mark.parametrize("n, threads", [(1, 1), (1001, 1), (200_003, 2)])  # 200k: over the OpenMP threshold
def test_look_up_matches_torch(word, twelve_bits, n, threads):
    torch.manual_seed(0)
    entries = 4096 if twelve_bits else 256
    table = torch.randint(0, 256, (entries * word.itemsize,), dtype=torch.uint8).view(word)  # every byte
    packed = torch.randint(0, 256, (n + 3,), dtype=torch.uint8)
    low = packed[3:]  # not at the start of its storage
    high = torch.randint(0, 256, (n,), dtype=torch.uint8) if twelve_bits else None
    for shift in (0, 4) if twelve_bits else (0,):
        out = torch.zeros(n + 2, dtype=word)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert kernels.look_up(low, high, shift, table, out[1:-1])
        finally:
            torch.set_num_threads(before)
        assert torch.equal(out[1:-1], torch_look_up(low, high, shift, table))
        assert out[0] == 0 and out[-1] == 0  # nothing written outside `out`


@needs_kernels
def test_look_up_leaves_what_it_does_not_take_to_torch():
    table, low, out = torch.zeros(256, dtype=torch.int32), torch.zeros(8, dtype=torch.uint8), torch.empty(8, dtype=torch.int32)
    assert not kernels.look_up(low, None, 0, torch.zeros(256, 4), torch.empty(8, 4))  # rows, not words
    assert not kernels.look_up(low.long(), None, 0, table, out)  # codes not bytes
    assert not kernels.look_up(torch.zeros(16, dtype=torch.uint8)[::2], None, 0, table, out)  # strided
    with pytest.raises(ValueError, match="short"):
        kernels.look_up(low, low, 0, table, out)  # 12-bit codes need 4,096 entries


@needs_kernels
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 2])
def test_decoding_with_the_kernel_equals_torch_ops(bits, group_size, monkeypatch):
    """Whole weights and runs of output channels from odd offsets, fp32 and fp16, per-tensor and
    per-group LUTs: the same values whichever way they are decoded."""
    torch.manual_seed(bits)
    shape = (12, 3001)
    index = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    groups = 1 if group_size is None else shape[0] // group_size
    lut = torch.randn(groups, 2**bits).half()
    p = PalettizedTensor(lut, pack_bits(index.flatten(), bits), shape, bits)
    per = p.values_per_code
    rows = [None] + [(start, 12) for start in range(1, 12) if start * 3001 % per == 0][:2]

    def decoded():
        return [p.unpack(dtype, rows=r) for dtype in (torch.float32, torch.float16) for r in rows]

    with_kernel = decoded()
    monkeypatch.setattr(kernels, "_library", False)
    for a, b in zip(with_kernel, decoded(), strict=True):
        assert torch.equal(a, b)


def test_without_a_compiler_torch_ops_decode_silently(own_cache, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-sdlite")
    index = torch.randint(0, 64, (5000,), dtype=torch.uint8)
    lut = torch.randn(1, 64).half()
    p = PalettizedTensor(lut, pack_bits(index, 6), (5000,), 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(p.unpack(), lut[0].float()[index.long()])
    assert kernels.library() is None and not own_cache.exists()


def test_a_failing_compiler_warns_once_and_torch_ops_decode(own_cache, monkeypatch):
    monkeypatch.setenv("CC", "false")  # found, and exits 1
    index = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    lut = torch.randn(1, 256).half()
    p = PalettizedTensor(lut, pack_bits(index, 8), (5000,), 8)
    with pytest.warns(UserWarning, match="could not be built"):
        assert torch.equal(p.unpack(), lut[0].float()[index.long()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.unpack()
    assert kernels.library() is None


@needs_kernels
def test_no_place_for_the_cache_warns_and_torch_ops_decode(own_cache, monkeypatch):
    def no_home(name):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(kernels, "cache_folder", no_home)
    with pytest.warns(UserWarning, match="home directory"):
        assert kernels.library() is None


@needs_kernels
def test_kernels_are_built_once_and_read_from_the_cache(own_cache, monkeypatch):
    assert kernels.library() is not None
    assert len(list(own_cache.glob("kernels-*.so"))) == 1
    monkeypatch.setattr(kernels, "_library", None)  # as in a new process

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiling)
    assert kernels.library() is not None


@needs_kernels
@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_counts_as_unset(tmp_path, monkeypatch, xdg):
    """The XDG spec: a relative path there is invalid. The cache must not land in the working
    directory, where an `sdlite/` folder would shadow the installed package."""
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "_library", None)
    assert kernels.library() is not None
    assert len(list((tmp_path / "home" / ".cache" / "sdlite" / "kernels").glob("kernels-*.so"))) == 1
    assert not (tmp_path / "sdlite").exists() and not (tmp_path / "relative").exists()


# With -fopenmp: writes a file that is no library and exits 0; else the real compiler.
FAKE_OPENMP_COMPILER = """#!/bin/sh
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
for a in "$@"; do [ "$a" = "-fopenmp" ] && { echo garbage > "$out"; exit 0; }; done
exec cc "$@"
"""


@needs_kernels
def test_a_library_that_compiles_but_does_not_load_is_not_cached(own_cache, tmp_path, monkeypatch):
    """A compiler that takes -fopenmp but gives a library that does not load (no OpenMP runtime):
    the build without OpenMP is used and cached."""
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text(FAKE_OPENMP_COMPILER)
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    assert kernels.library() is not None
    monkeypatch.setattr(kernels, "_library", None)  # as in a new process: it loads from the cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.library() is not None
    assert len(list(own_cache.glob("kernels-*.so"))) == 1


@needs_kernels
def test_a_cached_library_that_does_not_load_is_built_again(own_cache, monkeypatch):
    assert kernels.library() is not None
    (cached,) = own_cache.glob("kernels-*.so")
    cached.unlink()  # a new file: this process has the old one loaded
    cached.write_text("garbage")
    monkeypatch.setattr(kernels, "_library", None)  # as in a new process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.library() is not None
    assert cached.stat().st_size > len("garbage")
