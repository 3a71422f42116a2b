"""The procedural "shapes" dataset of the bundled model, its captions, held-out list and classifier.

One picture = one shape (circle, square, triangle) of a named colour on a plain background of
another named colour, at one of nine positions, small or large. Everything is drawn from a seed, so
the training set, the held-out set and the evaluation prompts are reproducible without any files.

The classifier reads a picture back with plain image analysis (no learned model), so it can grade
generations: background = median colour of the border pixels, foreground = pixels nearer to a
second colour than to the background, colour names by nearest RGB distance, shape from the
foreground's top/bottom balance (an apex-up triangle is bottom-heavy) and how much of its bounding box
it fills (square ~1.0, circle ~0.8).
Shared by train_bundled.py, evaluate.py and tests/test_bundled_model.py; numpy and Pillow only.
"""

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLORS = {  # name -> RGB; saturated and far apart (closest pair, orange/yellow, is 96 apart)
    "red": (230, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 226, 30),
    "orange": (250, 130, 20),
    "purple": (130, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> centre (x, y) as a fraction of the image side
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
SIZES = {"small": 0.12, "large": 0.21}  # half the shape's side as a fraction of the image side

TEMPLATES = (
    "a {fg} {shape} on a {bg} background",
    "{size} {fg} {shape}, {pos}, {bg} background",
    "a {fg} {shape} on {bg}",
    "a {size} {fg} {shape} on a {bg} background",
    "{fg} {shape} in the {pos}, {bg} background",
    "a {fg} {shape}, {bg} background",
    "{bg} background with a {fg} {shape}",
    "a {size} {fg} {shape} at the {pos} on a {bg} background",
    "{fg} {shape} on {bg}",
)
EVAL_TEMPLATE = TEMPLATES[0]

ALL_COMBOS = [(fg, shape, bg) for fg, shape, bg in itertools.product(COLORS, SHAPES, COLORS) if fg != bg]


def held_out_combos(n: int = 12, seed: int = 1234) -> list[tuple[str, str, str]]:
    """(fg, shape, bg) combinations never shown in training; every colour stays a fg and bg in training.

    Chosen so that each colour appears at most twice as a held-out foreground and twice as a
    held-out background and each shape four times, so the held-out set tests recombination of
    things the model has seen, not unseen words.
    """
    rng = random.Random(seed)
    combos = ALL_COMBOS[:]
    rng.shuffle(combos)
    picked, fg_count, bg_count, shape_count = [], {}, {}, {}
    for fg, shape, bg in combos:
        if fg_count.get(fg, 0) < 2 and bg_count.get(bg, 0) < 2 and shape_count.get(shape, 0) < n // 3:
            picked.append((fg, shape, bg))
            fg_count[fg] = fg_count.get(fg, 0) + 1
            bg_count[bg] = bg_count.get(bg, 0) + 1
            shape_count[shape] = shape_count.get(shape, 0) + 1
        if len(picked) == n:
            break
    return sorted(picked)


HELD_OUT = held_out_combos()
TRAIN_COMBOS = [c for c in ALL_COMBOS if c not in set(HELD_OUT)]


@dataclass(frozen=True)
class Scene:
    fg: str
    shape: str
    bg: str
    pos: str = "center"
    size: str = "large"

    def caption(self, template: str = EVAL_TEMPLATE) -> str:
        return template.format(fg=self.fg, shape=self.shape, bg=self.bg, pos=self.pos, size=self.size)


def render(scene: Scene, resolution: int = 64, jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Image.Image:
    """Draw `scene` anti-aliased (4x supersampling); jitter = (dx, dy, scale change) in image fractions."""
    ss = 4
    n = resolution * ss
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)  # (n, n) each, y grows downwards
    cx, cy = POSITIONS[scene.pos]
    cx, cy = cx + jitter[0], cy + jitter[1]
    r = SIZES[scene.size] * (1.0 + jitter[2])
    if scene.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif scene.shape == "square":
        mask = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif scene.shape == "triangle":  # upright isosceles, base and height 2r, apex at the top
        t = (y - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        mask = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= r * t)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; expected one of {SHAPES}")
    cov = mask.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3))[..., None]  # (H, W, 1)
    rgb = cov * np.array(COLORS[scene.fg], np.float32) + (1 - cov) * np.array(COLORS[scene.bg], np.float32)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def random_scene(rng: random.Random, combos=TRAIN_COMBOS) -> Scene:
    fg, shape, bg = rng.choice(combos)
    return Scene(fg, shape, bg, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))


def random_example(rng: random.Random, resolution: int = 64, combos=TRAIN_COMBOS) -> tuple[Image.Image, str, Scene]:
    """One training picture with a caption from a random template (held-out combos never drawn)."""
    scene = random_scene(rng, combos)
    jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(-0.1, 0.1))
    return render(scene, resolution, jitter), scene.caption(rng.choice(TEMPLATES)), scene


def make_dataset(n: int, seed: int, resolution: int = 64) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n training examples as a uint8 array (n, H, W, 3), their captions and scenes."""
    rng = random.Random(seed)
    images, captions, scenes = [], [], []
    for _ in range(n):
        img, cap, scene = random_example(rng, resolution)
        images.append(np.asarray(img))
        captions.append(cap)
        scenes.append(scene)
    return np.stack(images), captions, scenes


# ---------------------------------------------------------------------------------------------
# Classifier

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], np.float32)  # (8, 3)


def nearest_color(rgb) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(-1)))]


@dataclass
class Reading:
    fg: str | None
    shape: str | None
    bg: str
    fill: float  # foreground area / bounding-box area
    balance: float  # foreground area above / below the middle of its bounding box
    area: float  # foreground area as a fraction of the image
    pieces: int  # separate foreground regions of at least 0.3% of the image (one shape: 1)


def classify(image: Image.Image) -> Reading:
    """Read background colour, foreground colour and shape from a picture."""
    a = np.asarray(image.convert("RGB"), np.float32)  # (H, W, 3)
    h, w, _ = a.shape
    b = max(1, h // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    dist_bg = np.sqrt(((a - bg_rgb) ** 2).sum(-1))  # (H, W)
    far = dist_bg > 60
    if far.sum() < 0.005 * h * w:
        return Reading(None, None, nearest_color(bg_rgb), 0.0, 0.0, 0.0, 0)
    fg_rgb = np.median(a[far], axis=0)
    # two-means split: a pixel is foreground when it is nearer the foreground colour than the background
    dist_fg = np.sqrt(((a - fg_rgb) ** 2).sum(-1))
    mask = dist_fg < dist_bg
    ys, xs = np.nonzero(mask)
    # robust bounding box: ignore the outermost 1% of foreground pixels on each side (stray specks)
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    box = (x1 - x0 + 1) * (y1 - y0 + 1)
    inside = mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].sum()
    fill = float(inside / box)
    # top/bottom balance inside the box: a triangle (apex up) has 1/3 of the bottom half's area on top
    ym = (y0 + y1) / 2
    balance = float((ys < ym).sum() / max(1, (ys >= ym).sum()))
    if balance < 0.6:
        shape = "triangle"
    elif fill > 0.9:
        shape = "square"
    else:
        shape = "circle"
    return Reading(nearest_color(fg_rgb), shape, nearest_color(bg_rgb), fill, balance, float(mask.mean()),
                   count_pieces(mask, max(1, int(0.003 * h * w))))


def count_pieces(mask: np.ndarray, min_pixels: int) -> int:
    """Separate 4-connected regions of `mask` with at least `min_pixels` pixels: every pixel takes
    the smallest label among itself and its neighbours until nothing changes."""
    none = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        p = np.pad(labels, 1, constant_values=none)
        spread = np.where(mask, np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), none)
        if np.array_equal(spread, labels):
            break
        labels = spread
    _, sizes = np.unique(labels[mask], return_counts=True)
    return int((sizes >= min_pixels).sum())


def score(readings: list[Reading], scenes: list[Scene]) -> dict:
    """Fractions of pictures whose foreground colour, background colour and shape are right, and of
    those that show one shape (not two or more pieces)."""
    n = len(scenes)
    return {
        "n": n,
        "fg": sum(r.fg == s.fg for r, s in zip(readings, scenes)) / n,
        "bg": sum(r.bg == s.bg for r, s in zip(readings, scenes)) / n,
        "shape": sum(r.shape == s.shape for r, s in zip(readings, scenes)) / n,
        "all": sum(r.fg == s.fg and r.bg == s.bg and r.shape == s.shape for r, s in zip(readings, scenes)) / n,
        # not a target: the scores above read a picture of two pieces as one shape
        "one_shape": sum(r.pieces == 1 for r in readings) / n,
    }


def eval_scenes(n_per_train_combo: int = 1, n_per_held_out: int = 4, seed: int = 0) -> list[tuple[Scene, bool]]:
    """Evaluation prompts: every training combo and every held-out combo, (scene, is_held_out) pairs."""
    rng = random.Random(seed)
    out = []
    for combos, k, held in ((TRAIN_COMBOS, n_per_train_combo, False), (HELD_OUT, n_per_held_out, True)):
        for fg, shape, bg in combos:
            for _ in range(k):
                out.append((Scene(fg, shape, bg, rng.choice(list(POSITIONS)), rng.choice(list(SIZES))), held))
    return out
