"""The `sdlite` command line end to end: `python -m sdlite ...` as a subprocess on a tiny random
model (64x64 px), checking the files it writes, their metadata, replay from metadata, and that
every usage mistake is one line on stderr with exit status 2."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdlite.images import EMPTY_CELL, GAP, WEBUI_SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # the tiny model's native size


def sdlite(*args, cwd: Path, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # a tiny model; extra threads only fight the other processes
    command = [sys.executable, "-m", "sdlite", *map(str, args)]
    if not wait:  # to be interrupted: Ctrl-C's default action even where the tests run with SIGINT
        # ignored (a background job of a script), which Python would pass on and then keep
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def record(path: Path) -> dict:
    return json.loads(Image.open(path).text["sdlite"])


def same_pixels(a: Path, b: Path) -> bool:
    first, second = Image.open(a), Image.open(b)
    return first.size == second.size and first.tobytes() == second.tobytes()


@pytest.fixture(scope="module")
def model(reference_model):
    return reference_model("sd1")


@pytest.fixture(scope="module")
def source(model, tmp_path_factory) -> Path:
    """A 64x64 source image for img2img."""
    path = tmp_path_factory.mktemp("source") / "source.png"
    Image.effect_noise((SIZE, SIZE), 64).convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def batch(model, tmp_path_factory):
    """One txt2img run of a batch of 4 images with every kind of extra file."""
    folder = tmp_path_factory.mktemp("batch")
    result = ok(sdlite("generate", "a red cube", "--model", model, "--steps", 4, "--sampler", "ddim",
                       "--n_images", 4, "--n-rows", 2,
                       "-sd", 2, "--save-last", 2, "--save-each", "--seed", 7, "--negative-prompt", "blurry",
                       "-o", "out.png", cwd=folder))
    return folder, result


def test_batch_files(batch):
    folder, result = batch
    names = sorted(p.name for p in folder.iterdir())
    # 4 DDIM steps (PLMS would run 5): -sd 2 snapshots steps 2 and 4; --save-last 2 the two steps before the final one.
    assert names == ["out.png", "out_0.png", "out_1.png", "out_2.png", "out_3.png",
                     "out_4_2.png", "out_4_3.png", "out_4_4.png"]
    grid = Image.open(folder / "out.png")
    assert grid.size == (2 * SIZE, 2 * SIZE)
    for index in range(4):
        image = Image.open(folder / f"out_{index}.png")
        assert image.size == (SIZE, SIZE)
        row, col = divmod(index, 2)
        tile = grid.crop((col * SIZE, row * SIZE, (col + 1) * SIZE, (row + 1) * SIZE))
        assert tile.tobytes() == image.tobytes()
    assert same_pixels(folder / "out_4_4.png", folder / "out.png")  # the last snapshot is the result
    assert not same_pixels(folder / "out_4_2.png", folder / "out.png")
    assert "seed: 7" in result.stdout
    assert re.search(r"^done in [\d.]+ s; wrote .*\bout.png\b", result.stdout, re.MULTILINE)
    assert "s/step" in result.stderr  # the progress bar


def test_batch_metadata(batch, model):
    folder, _ = batch
    parameters = Image.open(folder / "out.png").text["parameters"]
    prompt, negative, settings = parameters.split("\n")
    assert (prompt, negative) == ("a red cube", "Negative prompt: blurry")
    assert settings.startswith(f"Steps: 4, Sampler: {WEBUI_SAMPLERS['ddim']}, CFG scale: 7.5, Seed: 7, "
                               f"Size: {SIZE}x{SIZE}, Model: {Path(model).name}, Batch size: 4, Version: sdlite")
    grid = record(folder / "out.png")
    assert grid["file"] == {"kind": "grid", "index": None, "step": None}
    assert grid["settings"]["seed"] == 7 and grid["settings"]["n_images"] == 4
    assert grid["settings"]["model"] == str(model)
    assert "Batch pos: 2" in Image.open(folder / "out_2.png").text["parameters"]
    assert record(folder / "out_2.png")["file"] == {"kind": "image", "index": 2, "step": None}
    assert record(folder / "out_4_3.png")["file"] == {"kind": "snapshot", "index": None, "step": 3}


@pytest.mark.parametrize("name", ["out.png", "out_2.png", "out_4_3.png"])
def test_replay_is_pixel_identical(batch, name):
    folder, _ = batch
    again = f"again_{name}"
    ok(sdlite("generate", "--from-png", name, "-o", again, "--quiet", cwd=folder))
    assert same_pixels(folder / name, folder / again)
    assert record(folder / again) == record(folder / name)


def test_random_seed_without_prompt_in_metadata(model, tmp_path):
    result = ok(sdlite("generate", "secret", "--negative-prompt", "hidden", "--model", model, "--steps", 2,
                       "--no-save-prompt", cwd=tmp_path))
    seed = int(re.search(r"seed: (\d+)", result.stdout).group(1))
    parameters = Image.open(tmp_path / "out.png").text["parameters"]
    assert "secret" not in parameters and "hidden" not in parameters and f"Seed: {seed}," in parameters
    assert record(tmp_path / "out.png")["settings"]["prompt"] is None
    refused = sdlite("generate", "--from-png", "out.png", "-o", "again.png", cwd=tmp_path)
    assert refused.returncode == 2 and "PROMPT" in refused.stderr
    ok(sdlite("generate", "secret", "--negative-prompt", "hidden", "--from-png", "out.png", "-o", "again.png",
              cwd=tmp_path))
    assert same_pixels(tmp_path / "out.png", tmp_path / "again.png")


def test_img2img_and_replay(model, source, tmp_path):
    ok(sdlite("img2img", source, "a blue sphere", "--strength", 0.5, "--steps", 4, "--sampler", "ddim", "-sd", 1,
              "--seed", 3,
              "--model", model, cwd=tmp_path))
    # strength 0.5 of 4 steps runs 2.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "out_2_1.png", "out_2_2.png"]
    assert Image.open(tmp_path / "out.png").size == (SIZE, SIZE)
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "out.png").text["parameters"]
    settings = record(tmp_path / "out.png")["settings"]
    assert settings["mode"] == "img2img" and settings["image"] == str(source)
    ok(sdlite("generate", "--from-png", "out.png", "-o", "again.png", cwd=tmp_path))
    assert same_pixels(tmp_path / "out.png", tmp_path / "again.png")


def test_img2img_of_a_size_cut_to_64_replays_pixel_for_pixel(model, tmp_path):
    Image.effect_noise((100, 100), 64).convert("RGB").save(tmp_path / "noise.png")
    ok(sdlite("img2img", "noise.png", "a blue sphere", "--height", 72, "--width", 72, "--strength", 0.5,
              "--steps", 4, "--seed", 1, "--model", model, "-o", "cut.png", cwd=tmp_path))
    assert Image.open(tmp_path / "cut.png").size == (64, 64)
    ok(sdlite("generate", "--from-png", "cut.png", "-o", "again.png", cwd=tmp_path))
    assert same_pixels(tmp_path / "cut.png", tmp_path / "again.png")


def test_triangle(model, source, tmp_path):
    ok(sdlite("img2img", source, "a blue sphere", "-gt", "--triangle-strengths", "0.1,0.5,1",
              "--triangle-steps", "2,4", "--sampler", "ddim", "--seed", 1, "--model", model, cwd=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    grid = Image.open(tmp_path / "out.png")
    width, height = grid.size
    columns, rows = 4, 2  # the source, then 3 strengths; 2 step counts
    assert width > columns * (SIZE + GAP) and height > rows * (SIZE + GAP)

    def cell(row, col):  # located from the bottom-right corner, which has no label margin
        x = width - (columns - col) * (SIZE + GAP)
        y = height - (rows - row) * (SIZE + GAP)
        return grid.crop((x, y, x + SIZE, y + SIZE))

    for row in range(rows):
        assert cell(row, 0).tobytes() == Image.open(source).tobytes()
    # strength 0.1 of 2 or 4 steps leaves no step to run: grey cells.
    assert cell(0, 1).getcolors() == [(SIZE * SIZE, EMPTY_CELL)]
    assert cell(1, 1).getcolors() == [(SIZE * SIZE, EMPTY_CELL)]
    assert len(cell(1, 3).getcolors(SIZE * SIZE)) > 100  # a generated image
    assert record(tmp_path / "out.png")["file"]["kind"] == "triangle"


def test_info(model, tmp_path):
    result = ok(sdlite("info", model, cwd=tmp_path))
    for text in ("text_encoder", "unet", "vae", "parameters", "float32", f"{SIZE}x{SIZE} px",
                 "unet/diffusion_pytorch_model.safetensors", "MiB", "stored as F32"):
        assert text in result.stdout


def test_info_names_refused_samplers_and_lists_a_single_file(family_model, tmp_path):
    result = ok(sdlite("info", cwd=tmp_path))  # the bundled model: zero terminal SNR, which PNDM refuses
    samplers = next(line for line in result.stdout.splitlines() if line.startswith("samplers"))
    assert "euler" in samplers and "pndm" not in samplers
    assert "refused    pndm: PNDMScheduler has no zero-terminal-SNR support" in result.stdout
    single = family_model("sd1")[1]
    result = ok(sdlite("info", single, cwd=tmp_path))
    assert f"  {single.name}" in result.stdout and "stored as" in result.stdout and "refused" not in result.stdout


def test_existing_output_is_refused_unless_overwrite(model, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "out.png")
    refused = sdlite("generate", "p", "--model", model, "--steps", 1, cwd=tmp_path)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert Image.open(tmp_path / "out.png").size == (8, 8)
    result = ok(sdlite("generate", "p", "--model", model, "--steps", 1, "--overwrite", "--quiet", cwd=tmp_path))
    assert result.stdout == result.stderr == ""
    assert Image.open(tmp_path / "out.png").size == (SIZE, SIZE)


def test_interrupt_leaves_only_complete_files(model, tmp_path):
    process = sdlite("generate", "p", "--model", model, "--steps", 200, "--sampler", "ddim", "-sd", 1, cwd=tmp_path, wait=False)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob("out_*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "sdlite: interrupted"
    written = sorted(tmp_path.iterdir())
    assert written and all(p.name.startswith("out_200_") for p in written)  # no temporary files
    for path in written:
        Image.open(path).load()  # complete


def write_bad_image(folder):
    (folder / "bad.png").write_text("not an image")


ERRORS = {
    "unknown option": (["generate", "p", "--bogus"], "unrecognized arguments: --bogus"),
    "bad number": (["generate", "p", "--steps", "x"], "argument --steps: not an integer"),
    "zero steps": (["generate", "p", "--steps", "0"], "argument --steps: must be at least 1"),
    "strength above 1": (["img2img", "{source}", "p", "--strength", "1.5"], "must be in [0.0, 1.0]"),
    "strength below 0": (["img2img", "{source}", "p", "--strength=-0.1"], "must be in [0.0, 1.0]"),
    "missing image": (["img2img", "missing.png", "p"], "input image not found"),
    "unreadable image": (["img2img", "bad.png", "p"], "cannot read image"),
    "missing model": (["generate", "p", "--model", "nowhere"], "model folder not found"),
    "rows not dividing": (["generate", "p", "--n-images", "3", "--n-rows", "2"], "does not divide"),
    "missing output folder": (["generate", "p", "-o", "nowhere/out.png"], "output folder nowhere does not exist"),
    "not png": (["generate", "p", "-o", "out.jpg"], "PNG"),
    "empty output": (["generate", "p", "-o", ""], "names no file"),
    "compress into a missing folder": (["compress", "{model}", "-o", "nowhere/small", "--bits", "8"],
                                       "for nowhere/small does not exist"),
    "no prompt": (["generate"], "PROMPT"),
    "no metadata": (["generate", "--from-png", "bad.png"], "cannot read image"),
    "quiet and verbose": (["generate", "p", "-q", "-v"], "not allowed with"),
    "triangle with a batch": (["img2img", "{source}", "p", "-gt", "--n-images", "2"], "--triangle"),
    # Checked before the model loads: a missing model is not what is reported.
    "unknown sampler": (["generate", "p", "--model", "nowhere", "--sampler", "nope"], "unknown sampler 'nope'"),
    "height not a multiple of 8": (["generate", "p", "--model", "nowhere", "--height", "60"], "multiple of 8"),
    "image without a record": (["generate", "p", "--image", "{source}"], "--image gives the source of an img2img"),
    "bad prompt weight": (["generate", "(p:1.2.3)", "--model", "nowhere", "--long-prompts"], "is not a number"),
    "bad negative prompt weight": (["generate", "p", "--negative-prompt", "(q:1..2)", "--model", "nowhere",
                                    "--long-prompts"], "is not a number"),
    "unknown device": (["generate", "p", "--model", "{model}", "--device", "nope"], "device 'nope' is not available"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_usage_errors(case, model, source, tmp_path):
    args, message = ERRORS[case]
    write_bad_image(tmp_path)
    args = [a.format(source=source, model=model) for a in args]
    result = sdlite(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("sdlite: error: ") and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]  # nothing written


def test_png_without_metadata_is_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = sdlite("generate", "--from-png", "plain.png", "-o", "again.png", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "sdlite: error: plain.png has no sdlite metadata to reproduce\n"


@pytest.mark.parametrize("chunk", ["{}", "[1]", "not json", '{"settings": {}, "file": 3}'])
def test_png_with_damaged_metadata_is_refused(chunk, tmp_path):
    info = PngInfo()
    info.add_text("sdlite", chunk)
    Image.new("RGB", (8, 8)).save(tmp_path / "damaged.png", pnginfo=info)
    result = sdlite("generate", "--from-png", "damaged.png", "-o", "again.png", cwd=tmp_path)
    assert result.returncode == 2 and "sdlite metadata is damaged" in result.stderr and "Traceback" not in result.stderr


def test_a_replay_of_n_rows_0_is_refused(batch, tmp_path):
    folder, _ = batch
    info = PngInfo()
    data = record(folder / "out.png")
    data["settings"]["n_rows"] = 0
    info.add_text("sdlite", json.dumps(data))
    Image.open(folder / "out.png").save(tmp_path / "zero.png", pnginfo=info)
    result = sdlite("generate", "--from-png", "zero.png", "-o", "again.png", cwd=tmp_path)
    assert result.returncode == 2 and "does not divide" in result.stderr


def test_bundled_model_is_the_default_and_named_in_the_metadata(tmp_path):
    result = ok(sdlite("generate", "a red circle on a blue background", "--steps", 4, "--seed", 3,
                       "--n-images", 2, "--n-rows", 1, "-o", "shapes.png", cwd=tmp_path))
    assert "seed: 3" in result.stdout + result.stderr
    settings = json.loads(Path(__file__).resolve().parents[1].joinpath("sdlite/data/bundled/sdlite.json").read_text())
    grid = Image.open(tmp_path / "shapes.png")
    assert grid.size == (2 * SIZE, SIZE)  # the bundled model is 64x64 too
    assert f"Model: {settings['name']}" in grid.text["parameters"]
    ok(sdlite("generate", "--from-png", "shapes.png", "-o", "again.png", cwd=tmp_path))
    assert same_pixels(tmp_path / "shapes.png", tmp_path / "again.png")
