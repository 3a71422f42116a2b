"""Palettization (k-means LUT + packed indices), weights at rest and low-memory generation, on a
tiny SD2-like model. The tiny model's tensors are small, so `min_elements` is lowered to make the
compressor palettize most of them."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import sdlite.kernels as kernels
import sdlite.memory as memory
import sdlite.palettize as palettize_module
import sdlite.pipeline as pipeline_module
from sdlite import StableDiffusion
from sdlite.layers import Conv2d
from sdlite.loading import CheckpointError
from sdlite.memory import decode_tiled
from sdlite.palettize import BITS, PalettizedTensor, compress, kmeans_1d, pack_bits, palettize
from sdlite.unet import FeedForward

MIN_ELEMENTS = 1000
SETTINGS = dict(steps=3, seed=0, cfg=5.0)
PROMPT = "a red circle on a blue background"


def pixels(sd, **kwargs) -> np.ndarray:
    return np.asarray(sd.text_to_image(PROMPT, **{**SETTINGS, **kwargs})[0]).astype(np.float64)


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def source(reference_model):
    return reference_model("sd2", "epsilon")


@pytest.fixture(scope="module")
def reference_pixels(source):
    return pixels(StableDiffusion.from_pretrained(source))


@pytest.fixture(scope="module")
def palettized(source, tmp_path_factory):
    """bits -> folder of the tiny model palettized at that width (built on first use)."""
    built = {}

    def get(bits: int):
        if bits not in built:
            out = tmp_path_factory.mktemp(f"palettized{bits}") / "model"
            compress(source, out, bits=bits, min_elements=MIN_ELEMENTS, log=None)
            built[bits] = out
        return built[bits]

    return get


@pytest.mark.parametrize("bits", BITS)
def test_packing_round_trips(bits):
    index = torch.randint(0, 2**bits, (1003,), dtype=torch.uint8)
    packed = pack_bits(index, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1003 if bits == 8 else math.ceil(1003 / 8) * bits)
    counting = PalettizedTensor(torch.arange(2.0**bits)[None].half(), packed, (1003,), bits)  # LUT value = index
    assert torch.equal(counting.unpack(), index.float())


@pytest.mark.parametrize("bits", BITS)
def test_lut_reconstructs_within_the_error_of_its_bit_width(bits):
    """k-means of a Gaussian: the relative RMS error of an optimal 2**bits-level quantiser is about
    sqrt(2.72) * 2**-bits (Panter-Dite; 0.60 at 1 bit, 0.12 at 4 bits); allow 15% above it."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)  # enough values for 256 levels to reach their asymptotic error
    p = palettize(w, bits)
    assert p.lut.shape == (1, 2**bits) and p.indices.numel() == w.numel() * bits // 8
    error = ((p.unpack() - w).pow(2).mean().sqrt() / w.std()).item()
    bound = {1: 0.61, 2: 0.34}.get(bits, math.sqrt(2.72) * 2.0**-bits)
    assert error < 1.15 * bound, (bits, error)
    assert p.unpack().unique().numel() <= 2**bits


def test_per_group_luts_and_fast_path_agree_with_plain_lookup():
    torch.manual_seed(1)
    w = torch.randn(64, 40) * torch.linspace(0.1, 3, 64)[:, None]  # channels of very different scales
    whole, grouped = palettize(w, 4), palettize(w, 4, group_size=8)
    assert grouped.lut.shape == (8, 16)
    assert (grouped.unpack() - w).pow(2).mean() < (whole.unpack() - w).pow(2).mean()
    for bits in BITS:  # the table path (one group) and the generic path (groups) give the same values
        p = palettize(w, bits)
        twice = PalettizedTensor(p.lut.repeat(2, 1), p.indices, p.shape, bits)
        assert torch.equal(p.unpack(), twice.unpack())


def test_kmeans_finds_separated_clusters():
    values = torch.cat([torch.full((1000,), -2.0), torch.full((500,), 0.5), torch.full((10,), 7.0)])
    assert torch.allclose(kmeans_1d(values, 3), torch.tensor([-2.0, 0.5, 7.0]), atol=1e-3)


def test_palettize_load_generate_round_trip(source, palettized, reference_pixels):
    out = palettized(8)
    recipe = json.loads((out / "unet" / "palettization.json").read_text())
    assert recipe["format"] == "sdlite-palettized" and recipe["tensors"]
    assert (out / "tokenizer").is_dir() and (out / "scheduler" / "scheduler_config.json").is_file()
    sd = StableDiffusion.from_pretrained(out)
    assert image_psnr(pixels(sd), reference_pixels) > 30  # 8 bits: close to the fp32 image
    assert sd.dtype == torch.float32


@pytest.mark.parametrize("slice_values", [None, 2000])
def test_jit_and_fast_modes_give_identical_images(palettized, slice_values, monkeypatch):
    """Also with the convolutions' palettized weights materialised in slices of output channels,
    as the largest are (here every one over 2,000 values)."""
    slices = []
    if slice_values:
        monkeypatch.setattr(memory, "SLICE_VALUES", slice_values)
        iterate = memory.Slices.__iter__
        monkeypatch.setattr(memory.Slices, "__iter__", lambda self: (slices.append(part) or part for part in iterate(self)))
    out = palettized(4)
    jit = StableDiffusion.from_pretrained(out, palettized_mode="jit")
    fast = StableDiffusion.from_pretrained(out, palettized_mode="fast")
    # jit keeps the palettized weights out of the parameters; fast holds them dense
    jit_params = sum(p.numel() for p in jit.unet.parameters())
    assert jit_params < sum(p.numel() for p in fast.unet.parameters()) / 2
    difference = np.abs(pixels(jit) - pixels(fast)).max()
    # float rounding: fast mode multiplies by prepacked linear weights, jit hands oneDNN the
    # materialised ones (other kernels for some shapes), and slices may sum in another order
    assert difference <= 1
    assert bool(slices) == bool(slice_values)
    with pytest.raises(ValueError, match="palettized_mode"):
        StableDiffusion.from_pretrained(out, palettized_mode="lazy")


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("bits", BITS)
def test_slices_of_output_channels_unpack_as_the_whole_weight(bits, group_size):
    """Rows of 45 values: a slice starts on a whole code only every 8 / gcd(45, per) rows; 6-bit
    slices cross the middle of the codes, where the high-nibble plane turns to the high halves."""
    torch.manual_seed(4)
    p = palettize(torch.randn(24, 5, 3, 3), bits, group_size)
    whole = p.unpack()
    step = p.values_per_code // math.gcd(45, p.values_per_code)
    buffer = torch.empty(memory.materialised_size(p, 2 * step))
    for start in range(0, 24, 2 * step):
        stop = min(start + 2 * step, 24)
        part = p.unpack(torch.float32, buffer, (start, stop))
        assert part.data_ptr() == buffer.data_ptr() and torch.equal(part, whole[start:stop])
    if step > 1:
        with pytest.raises(ValueError, match="whole code"):
            p.unpack(torch.float32, rows=(1, 3))
    with pytest.raises(ValueError, match="rows"):
        p.unpack(torch.float32, rows=(0, 25))


def test_slices_are_as_large_as_allowed_and_start_on_whole_codes(monkeypatch):
    monkeypatch.setattr(memory, "SLICE_VALUES", 1000)
    conv = Conv2d(5, 64, 3)
    for bits, rows in [(8, 22), (6, 22), (4, 22), (2, 20), (1, 16)]:  # 1000 // 45 = 22, down to whole codes
        p = palettize(torch.randn(64, 5, 3, 3), bits)
        assert memory.slice_rows(conv, p) == rows
    assert memory.slice_rows(torch.nn.Conv2d(5, 64, 3), p) is None  # a layer that takes no slices
    assert memory.slice_rows(conv, torch.randn(64, 5, 3, 3)) is None  # not palettized


def test_fp16_at_rest_is_close_to_fp32(source, reference_pixels):
    sd = StableDiffusion.from_pretrained(source, dtype=torch.float16, compute_dtype=torch.float32)
    assert sd.dtype == torch.float32 and sd.vae_dtype == torch.float32
    assert all(p.dtype == torch.float16 for p in sd.unet.state_dict().values() if p.is_floating_point()) or \
        not list(sd.unet.parameters())
    assert image_psnr(pixels(sd), reference_pixels) > 35


def test_low_memory_gives_the_same_image(source, palettized, reference_pixels, monkeypatch):
    """... and, for a UNet with its weights at rest (palettized jit), gives the heap back to the
    system after its mid block and each up block."""
    trims = []
    monkeypatch.setattr(pipeline_module, "trim_heap", lambda: trims.append(1))
    assert np.array_equal(pixels(StableDiffusion.from_pretrained(source)), reference_pixels)
    assert not trims  # only in low-memory mode
    sd = StableDiffusion.from_pretrained(source, low_memory=True)
    assert not isinstance(sd.text_encoder, torch.nn.Module) and not isinstance(sd.vae, torch.nn.Module)
    assert {m.chunk_tokens for m in sd.unet.modules() if isinstance(m, FeedForward)} == {1024}
    assert np.array_equal(pixels(sd), reference_pixels)
    assert not trims  # fp32 weights: the UNet's blocks are not followed by trims
    out = palettized(4)
    jit = StableDiffusion.from_pretrained(out, low_memory=True, palettized_mode="jit")
    assert np.array_equal(pixels(jit), pixels(StableDiffusion.from_pretrained(out, palettized_mode="jit")))
    blocks = (jit.unet.mid_block is not None) + len(jit.unet.up_blocks)
    assert len(trims) == SETTINGS["steps"] * blocks


def test_tiled_decoding_matches_whole_decoding_where_the_image_fits_a_tile(source, monkeypatch):
    sd = StableDiffusion.from_pretrained(source)
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    with torch.inference_mode():
        whole = sd.vae.decode(z)
        assert torch.equal(decode_tiled(sd.vae, z, tile=24), whole)
        assert not trims  # one tile: decoded whole
        tiled = decode_tiled(sd.vae, z, tile=12, overlap=4)
    assert len(trims) == 2 * 3  # after each tile (rows start at 0, 8; columns at 0, 8, 16)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # far from the seams the tiles see (nearly) what the whole decode sees
    assert (tiled - whole).abs().mean() < 0.5 * whole.abs().mean()


def measured_psnr(source, compressed) -> float:
    """The compressed UNet's output PSNR against the source's, on the inputs the recipe measures."""
    sd, small = StableDiffusion.from_pretrained(source), StableDiffusion.from_pretrained(compressed)
    prompt = palettize_module.PROMPTS[0]
    x, t, _, added = palettize_module.unet_inputs(sd, [prompt])[0]
    states = sd._conditioning(prompt, "", 1, True, sd.default_size)[0]  # the text, encoded here
    with torch.inference_mode():
        return palettize_module.psnr(sd.unet(x, t, states, added), small.unet(x, t, states, added))


def test_mixed_bit_recipe_meets_its_target(source, tmp_path):
    out = tmp_path / "mixed"
    summary = compress(source, out, mixed_bit=25.0, min_elements=20_000, log=None, candidates=(2, 8),
                       n_inputs=1)
    assert summary["psnr_db"] >= 25.0
    # Measured again on the plain text states: the recipe's inputs must not carry projections
    # made with the unpalettized weights (sdlite.layers.ProjectedContext).
    assert measured_psnr(source, out) == pytest.approx(summary["psnr_db"], abs=0.01)
    recipe = json.loads((out / "unet" / "palettization.json").read_text())
    assert {v["bits"] for v in recipe["tensors"].values()} <= {2, 8}
    pixels(StableDiffusion.from_pretrained(out))


def test_mixed_bit_recipe_for_sdxl(family_model, tmp_path):
    """SDXL's UNet takes added conditioning (pooled text, sizes), which the recipe's inputs keep."""
    source = family_model("sdxl")[0]
    summary = compress(source, tmp_path / "mixed", mixed_bit=25.0, min_elements=20_000, log=None,
                       candidates=(2, 8), n_inputs=1)
    assert summary["psnr_db"] >= 25.0
    assert measured_psnr(source, tmp_path / "mixed") == pytest.approx(summary["psnr_db"], abs=0.01)


def broken_copy(folder, tmp_path, edit):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    recipe_path = copy / "unet" / "palettization.json"
    edit(recipe_path)
    return copy


def edit_recipe(change):
    def edit(path):
        recipe = json.loads(path.read_text())
        change(recipe)
        path.write_text(json.dumps(recipe))
    return edit


def first(recipe):
    return next(iter(recipe["tensors"].values()))


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.write_text("{not json"), "not valid json"),
    (edit_recipe(lambda r: r.update(format="coreml")), "not an sdlite palettization recipe"),
    (edit_recipe(lambda r: r.update(version=99)), "version 99"),
    (edit_recipe(lambda r: first(r).update(bits=6)), "does not match"),
    (edit_recipe(lambda r: first(r).update(shape=[3, 3])), "does not match"),
    (edit_recipe(lambda r: first(r).pop("bits")), "malformed entry"),
    (edit_recipe(lambda r: r["tensors"].update({"conv_in.extra": first(r)})), "do not belong together"),
    (edit_recipe(lambda r: r["tensors"].pop(next(iter(r["tensors"])))), "do not belong together"),
    (edit_recipe(lambda r: r.update(weights="gone.safetensors")), "missing"),
])
def test_corrupt_or_mismatched_recipes_give_clear_errors(palettized, tmp_path, edit, message):
    folder = broken_copy(palettized(4), tmp_path, edit)
    with pytest.raises((CheckpointError, FileNotFoundError), match=message):
        StableDiffusion.from_pretrained(folder)


def test_recipe_of_another_model_is_refused(palettized, tmp_path):
    """A recipe whose shapes match its weights but not the network's config."""
    folder = tmp_path / "other"
    shutil.copytree(palettized(4), folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 48
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config needs|does not match"):
        StableDiffusion.from_pretrained(folder)


def test_compress_refuses_bad_arguments(source, tmp_path):
    with pytest.raises(ValueError, match="bits must be one of"):
        compress(source, tmp_path / "a", bits=3, log=None)
    with pytest.raises(ValueError, match="give bits"):
        compress(source, tmp_path / "b", log=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError):
        compress(source, tmp_path / "full", bits=4, log=None)


def test_compress_leaves_nothing_when_it_fails(source, palettized, tmp_path):
    with pytest.raises(ValueError, match="already palettized"):
        compress(palettized(8), tmp_path / "again", bits=4, log=None)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weight file"):
        compress(broken, tmp_path / "out", bits=8, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no partial folder to block a retry
    (tmp_path / "out").mkdir()  # an empty output folder is fine
    compress(source, tmp_path / "out", bits=8, log=None)
    assert (tmp_path / "out" / "unet" / "palettization.json").is_file()


def test_cli_compress_and_generate_with_low_memory(source, tmp_path, capsys):
    from sdlite.cli import main

    out = tmp_path / "cli"
    assert main(["compress", str(source), "--bits", "8", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["compress", str(source), "-o", str(tmp_path / "x")]) == 2
    assert "--bits" in capsys.readouterr().err
    image = tmp_path / "a.png"
    assert main(["generate", PROMPT, "--model", str(out), "--steps", "2", "--seed", "1", "--low-memory",
                 "--palettized-mode", "fast", "--dtype", "float16", "--compute-dtype", "float32", "-q",
                 "-o", str(image)]) == 0
    assert image.is_file()


@pytest.mark.parametrize("route", ["kernel", "torch ops"])
@pytest.mark.parametrize("bits", BITS)
def test_unpacking_into_a_buffer_gives_the_weight(bits, route, monkeypatch):
    """Codes are decoded into a caller's buffer (weights at rest), with any number of threads, by
    sdlite's C kernel (`sdlite.kernels`) or by torch ops block by block (here blocks of 1,000
    codes, so many blocks and a ragged last one)."""
    if route == "kernel" and kernels.library() is None:
        pytest.skip("no C compiler builds sdlite's kernels here")
    if route == "torch ops":
        monkeypatch.setattr(kernels, "_library", False)
    monkeypatch.setattr(palettize_module, "CODE_BLOCK", 1000)
    torch.manual_seed(2)
    index = torch.randint(0, 2**bits, (64_003,), dtype=torch.uint8)
    lut = torch.randn(1, 2**bits).half()
    p = PalettizedTensor(lut, pack_bits(index, bits), (64_003,), bits)
    buffer = torch.full((p.padded_numel + 5,), float("nan"))
    into_buffer = p.unpack(torch.float32, out=buffer)
    assert into_buffer.data_ptr() == buffer.data_ptr()
    assert torch.equal(into_buffer, lut[0].float()[index.long()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(p.unpack(torch.float32), into_buffer)
    finally:
        torch.set_num_threads(threads)


def test_six_bit_layout():
    """Version 2's 6-bit layout (the module docstring): 12-bit codes of index pairs, their low
    bytes, then a byte of high nibbles for codes j and j + m/2."""
    packed = pack_bits(torch.tensor([1, 2, 3, 4, 0, 0, 0, 63], dtype=torch.uint8), 6)
    # codes 1 | 2 << 6 = 129, 3 | 4 << 6 = 259, 0, 63 << 6 = 4032 (0xFC0)
    assert packed.tolist() == [129, 259 & 255, 0, 4032 & 255, 0, 1 | (4032 >> 8) << 4]
