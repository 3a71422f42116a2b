"""sdlite.images: grids, the labelled grid, PNG metadata and atomic, no-clobber saving (no model)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sdlite import images


def solid(colour, size=(8, 6)):
    return Image.new("RGB", size, colour)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def test_grid_fills_rows_left_to_right():
    grid = images.make_grid([solid(c) for c in COLOURS], n_rows=2)
    assert grid.size == (3 * 8, 2 * 6)
    for i, colour in enumerate(COLOURS):
        row, col = divmod(i, 3)
        assert grid.getpixel((col * 8 + 4, row * 6 + 3)) == colour


def test_grid_of_one_is_the_image():
    image = solid((1, 2, 3))
    assert images.make_grid([image], 1).tobytes() == image.tobytes()


@pytest.mark.parametrize("n_rows", [0, 4, 7])
def test_grid_rows_must_divide_images(n_rows):
    with pytest.raises(ValueError, match="do not divide"):
        images.make_grid([solid(c) for c in COLOURS], n_rows)


def test_grid_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="same size"):
        images.make_grid([solid((0, 0, 0)), solid((0, 0, 0), (4, 4))], 1)


def test_labelled_grid_places_cells_and_labels():
    cell = (8, 6)
    big_source = solid((9, 9, 9), (32, 24))  # resized to the cell size
    cells = [[big_source, solid(COLOURS[0]), None], [big_source, solid(COLOURS[1]), solid(COLOURS[2])]]
    grid = images.labelled_grid(cells, ["10 steps", "20 steps"], ["source", "0.5", "1.0"], cell)
    width, height = grid.size
    assert width > 3 * (8 + images.GAP) and height > 2 * (6 + images.GAP)
    # Cells are counted from the bottom-right corner, which has no label margin.
    def cell_pixel(row_from_bottom, col_from_right):
        x = width - (col_from_right + 1) * (8 + images.GAP) + 4
        y = height - (row_from_bottom + 1) * (6 + images.GAP) + 3
        return grid.getpixel((x, y))

    assert cell_pixel(0, 0) == COLOURS[2]
    assert cell_pixel(0, 1) == COLOURS[1]
    assert cell_pixel(0, 2) == (9, 9, 9)
    assert cell_pixel(1, 0) == images.EMPTY_CELL
    assert cell_pixel(1, 1) == COLOURS[0]
    # Labels are drawn: the margins hold dark text pixels.
    left_margin = grid.crop((0, 0, width - 3 * (8 + images.GAP), height))
    assert left_margin.convert("L").getextrema()[0] < 128


def test_labelled_grid_checks_its_table():
    with pytest.raises(ValueError):
        images.labelled_grid([[None, None]], ["a"], ["x", "y", "z"], (8, 8))


def test_webui_parameters_format():
    text = images.webui_parameters(
        "a red cube",
        "blurry",
        {"Steps": 20, "Sampler": images.WEBUI_SAMPLERS["euler_a"], "CFG scale": 7.5, "Seed": 123,
         "Size": "512x512", "Model": "my, model", "Batch size": None},
    )
    assert text == (
        "a red cube\nNegative prompt: blurry\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, Model: "my, model"'
    )
    assert images.webui_parameters("", "", {"Seed": 1}) == "Seed: 1"


def test_webui_sampler_names_cover_ours():
    # The CLI checks sampler names against these keys before it loads a model (and torch).
    from sdlite.samplers import SAMPLERS

    assert set(images.WEBUI_SAMPLERS) == set(SAMPLERS)
    assert images.WEBUI_SAMPLERS["pndm"] == "PLMS"


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "a.png"
    record = {"settings": {"prompt": "é ünïcode ✓", "seed": 2**40}, "file": {"kind": "grid"}}
    images.save_png(solid((1, 2, 3)), path, images.png_info("params ✓", record))
    text = images.read_png_text(path)
    assert text["parameters"] == "params ✓"
    assert json.loads(text["sdlite"]) == record


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "a.png"
    images.save_png(solid((1, 2, 3)), path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        images.save_png(solid((4, 5, 6)), path)
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    images.save_png(solid((4, 5, 6)), path, overwrite=True)
    assert Image.open(path).getpixel((0, 0)) == (4, 5, 6)
    assert os.listdir(tmp_path) == ["a.png"]  # no temporary files left


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "a.png"

    def crash(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        images.save_png(solid((1, 2, 3)), path)
    assert os.listdir(tmp_path) == []


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        images.load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        images.load_image(tmp_path / "bad.png")
    Image.new("RGBA", (4, 4), (1, 2, 3, 0)).save(tmp_path / "alpha.png")
    assert images.load_image(tmp_path / "alpha.png").mode == "RGB"


def test_16_bit_greyscale_images_keep_their_tones(tmp_path):
    Image.fromarray(np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(2, 0)).save(tmp_path / "grey.png")
    assert Image.open(tmp_path / "grey.png").mode.startswith("I")
    rgb = np.asarray(images.load_image(tmp_path / "grey.png"))
    assert rgb.shape == (2, 256, 3) and rgb[0, :, 0].tolist() == list(range(256))


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """A phone stores a portrait photo as a landscape image with orientation 6 (turn 90° clockwise)."""
    stored = Image.new("RGB", (16, 8), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # the left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100, subsampling=0)
    upright = np.asarray(images.load_image(tmp_path / "photo.jpg"), dtype=int)
    assert upright.shape == (16, 8, 3)  # 8 wide, 16 high
    assert upright[2, 4, 0] > 200 and upright[2, 4, 2] < 60  # the left half is now the top half
    assert upright[13, 4, 2] > 200 and upright[13, 4, 0] < 60
    stored.save(tmp_path / "damaged.png", exif=b"garbage!!")  # an EXIF block that is not one
    assert images.load_image(tmp_path / "damaged.png").size == (16, 8)  # as stored
