"""Image files for the command line: grids, the labelled strength/steps grid, PNG metadata, saving.

Pure PIL (no torch), so it can be tested and used without loading a model.

- `make_grid` lays a batch out in rows, as the MLX `txt2image.py` seed tool does (without its
  8-pixel black border, so a grid of n 64x64 images in r rows is exactly 64*n/r x 64*r pixels).
- `labelled_grid` draws the progressive-strength figure of the seed tool `image2image.py -gt`:
  a table of images with row and column labels in PIL's default font; empty cells stay grey.
- `webui_parameters` writes the `parameters` text chunk in the format the Stable Diffusion web UIs
  (AUTOMATIC1111, ComfyUI readers, civitai) parse; `png_info`/`read_png_text` add and read it
  beside our own `sdlite` chunk (JSON).
- `save_png` writes atomically: a temporary file in the same folder, then a rename, so an
  interrupted run never leaves a half-written PNG; it never replaces an existing file unless asked.
"""

import json
import os
import secrets
import struct
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

# Our sampler names -> the names the web UIs write in `parameters` (AUTOMATIC1111's list).
WEBUI_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}
GAP = 4  # pixels between the cells of a labelled grid, and after the last row and column
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (200, 200, 200)
TEXT = (0, 0, 0)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as upright RGB: turned as its EXIF orientation says (phone photos; diffusers'
    load_image does the same), an alpha channel dropped, 16-bit greyscale scaled to 8 bits."""
    try:
        image = ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, OSError, struct.error):  # damaged EXIF: the image as stored
        pass
    if image.mode.startswith("I"):  # 16-bit greyscale: PIL's RGB conversion would clip it at 255
        return image.convert("I").point(lambda v: v * (1 / 257)).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as `to_rgb` gives it, with a one-line error if unreadable."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"input image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def make_grid(images: list[Image.Image], n_rows: int) -> Image.Image:
    """`images` (all one size) in `n_rows` rows filled left to right; `n_rows` must divide their number."""
    if n_rows < 1 or len(images) % n_rows:
        raise ValueError(f"{n_rows} rows do not divide {len(images)} images")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError("all images of a grid must have the same size")
    n_cols = len(images) // n_rows
    grid = Image.new("RGB", (n_cols * width, n_rows * height))
    for i, image in enumerate(images):
        row, col = divmod(i, n_cols)
        grid.paste(image, (col * width, row * height))
    return grid


def labelled_grid(
    cells: list[list[Image.Image | None]],
    row_labels: list[str],
    col_labels: list[str],
    cell_size: tuple[int, int],
) -> Image.Image:
    """A table of images: `cells[r][c]` under `col_labels[c]`, right of `row_labels[r]`.

    `cell_size` is (width, height); images of another size (such as the source image) are resized
    to it. A `None` cell is left grey. Labels are drawn in PIL's default font.
    """
    n_rows, n_cols = len(cells), len(col_labels)
    if len(row_labels) != n_rows or any(len(row) != n_cols for row in cells):
        raise ValueError(f"expected {len(row_labels)} rows of {n_cols} cells")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = lambda text: draw.textbbox((0, 0), text, font=font)[2]
    text_height = max(draw.textbbox((0, 0), t, font=font)[3] for t in [*row_labels, *col_labels, "Ag"])
    left = max(text_width(label) for label in row_labels) + 2 * GAP
    top = text_height + 2 * GAP
    width, height = cell_size

    grid = Image.new("RGB", (left + n_cols * (width + GAP), top + n_rows * (height + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((left + c * (width + GAP), GAP), label, fill=TEXT, font=font)
    for r, (label, row) in enumerate(zip(row_labels, cells)):
        y = top + r * (height + GAP)
        draw.text((GAP, y + (height - text_height) // 2), label, fill=TEXT, font=font)
        for c, image in enumerate(row):
            x = left + c * (width + GAP)
            if image is None:
                draw.rectangle((x, y, x + width - 1, y + height - 1), fill=EMPTY_CELL)
            else:
                grid.paste(image if image.size == cell_size else image.resize(cell_size), (x, y))
    return grid


def _webui_value(value) -> str:
    """A value as the web UIs quote it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text) if any(ch in text for ch in ",:\n") else text


def webui_parameters(prompt: str | None, negative_prompt: str | None, fields: dict) -> str:
    """The web UI `parameters` text: prompt, `Negative prompt: ...` and a `Key: value, ...` line.

    Fields whose value is None are left out; an empty or None prompt writes no prompt line.
    """
    lines = [prompt] if prompt else []
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_webui_value(v)}" for key, v in fields.items() if v is not None))
    return "\n".join(lines)


def png_info(parameters: str | None = None, record: dict | None = None) -> PngInfo:
    """PNG text chunks: `parameters` (web UI format) and `sdlite` (`record` as JSON)."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if record is not None:
        info.add_text("sdlite", json.dumps(record, sort_keys=True))
    return info


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of the PNG at `path` (e.g. {"parameters": ..., "sdlite": ...})."""
    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are read only now
            return dict(getattr(image, "text", {}))
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def save_png(image: Image.Image, path: str | os.PathLike, info: PngInfo | None = None, overwrite: bool = False) -> None:
    """Write `image` to `path` as PNG, atomically; refuse to replace an existing file unless `overwrite`.

    The PNG is written to a hidden temporary file in the same folder and then renamed onto `path`
    (`os.replace`, or `os.link` when not overwriting, which fails if `path` appeared meanwhile), so
    readers and crashes only ever see the old file or the complete new one.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)")
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(temp, path)
            return
        try:
            os.link(temp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)") from None
        except OSError:  # a file system without hard links: the check above is all we can do
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
