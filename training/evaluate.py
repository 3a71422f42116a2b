"""Evaluate the bundled model: generate shape pictures from prompts and grade them with shapes.classify.

    python training/evaluate.py                      # sdlite engine, the model's defaults (sdlite.json)
    python training/evaluate.py --engine diffusers   # the reference pipeline instead
    python training/evaluate.py --validation --cfg 3 # other draws, for choosing defaults

Prompts: every training (colour, shape, background) combination once and every held-out
combination four times (204 pictures), all in the evaluation template "a {fg} {shape} on a {bg}
background", one seed each. The classifier is first checked on ground-truth renderings of the same
scenes. Writes training/eval_report.json (scores for train and held-out combinations separately,
per-colour and per-shape breakdowns, timings) and training/sample_grid.png.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # sdlite from this checkout
import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "sdlite" / "data" / "bundled"
HERE = Path(__file__).resolve().parent
THRESHOLDS = {"fg": 0.90, "bg": 0.90, "shape": 0.75}
# Validation (--validation), for choosing sampling defaults without the evaluation's own draws:
# the same combinations with positions and sizes drawn from another seed, and other image seeds.
VALIDATION_SCENE_SEED, VALIDATION_IMAGE_SEED = 7, 10_000

DIFFUSERS_SCHEDULERS = {  # sdlite sampler name -> diffusers scheduler class
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def load_defaults(folder: Path) -> dict:
    return json.loads((Path(folder) / "sdlite.json").read_text())


class Generator:
    """prompt + seed -> PIL image with one engine; the model is loaded once."""

    def __init__(self, folder: Path, engine: str, sampler: str):
        self.engine, self.sampler = engine, sampler
        t0 = time.time()
        if engine == "sdlite":
            from sdlite import StableDiffusion

            self.sd = StableDiffusion.from_pretrained(folder)
        elif engine == "diffusers":
            import diffusers
            import torch

            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
            )
            cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler])
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            self.pipe = pipe
        else:
            raise ValueError(f"unknown engine {engine!r}; expected 'sdlite' or 'diffusers'")
        self.load_seconds = time.time() - t0

    def __call__(self, prompts: list[str], seeds: list[int], steps: int, cfg: float) -> list:
        if self.engine == "sdlite":
            return [
                self.sd.text_to_image(p, n_images=1, steps=steps, cfg=cfg, seed=s, sampler=self.sampler)[0]
                for p, s in zip(prompts, seeds)
            ]
        import torch

        out = []
        for i in range(0, len(prompts), 16):  # batches of 16 prompts, one torch.Generator per picture
            gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + 16]]
            out += self.pipe(prompts[i : i + 16], num_inference_steps=steps, guidance_scale=cfg, generator=gens).images
        return out


def subset(items: list, n: int) -> list:
    """n items spread evenly over the list (so a short run still covers all colours)."""
    if n >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def fast_scenes(n: int = 12) -> list[tuple[shapes.Scene, bool]]:
    """A short evaluation set: every colour as foreground and as background, every shape, 2 held-out."""
    colors = list(shapes.COLORS)
    out = []
    for i in range(n - 2):
        fg = colors[i % 8]
        bg = colors[(i * 3 + 1 + i // 8) % 8]
        if bg == fg:
            bg = colors[(colors.index(fg) + 4) % 8]
        combo = (fg, shapes.SHAPES[i % 3], bg)
        if combo in shapes.HELD_OUT:
            combo = (fg, shapes.SHAPES[(i + 1) % 3], bg)
        out.append((shapes.Scene(*combo), False))
    out += [(shapes.Scene(*c), True) for c in shapes.HELD_OUT[:2]]
    return out


def grade(images: list, scenes: list[tuple[shapes.Scene, bool]]) -> dict:
    """Scores for train and held-out combinations, plus the individual readings."""
    readings = [shapes.classify(im) for im in images]
    report = {}
    for key, held in (("train", False), ("held_out", True)):
        pairs = [(r, s) for r, (s, h) in zip(readings, scenes) if h == held]
        if pairs:
            report[key] = shapes.score([r for r, _ in pairs], [s for _, s in pairs])
    report["all"] = shapes.score(readings, [s for s, _ in scenes])
    report["per_color_fg"] = {
        c: shapes.score(*zip(*[(r, s) for r, (s, _) in zip(readings, scenes) if s.fg == c]))["fg"]
        for c in shapes.COLORS if any(s.fg == c for s, _ in scenes)
    }
    report["per_color_bg"] = {
        c: shapes.score(*zip(*[(r, s) for r, (s, _) in zip(readings, scenes) if s.bg == c]))["bg"]
        for c in shapes.COLORS if any(s.bg == c for s, _ in scenes)
    }
    report["per_shape"] = {
        sh: shapes.score(*zip(*[(r, s) for r, (s, _) in zip(readings, scenes) if s.shape == sh]))["shape"]
        for sh in shapes.SHAPES if any(s.shape == sh for s, _ in scenes)
    }
    report["readings"] = [
        {"prompt": s.caption(), "held_out": h, "fg": r.fg, "shape": r.shape, "bg": r.bg, "fill": round(r.fill, 3), "balance": round(r.balance, 3), "pieces": r.pieces}
        for r, (s, h) in zip(readings, scenes)
    ]
    return report


def passes(report: dict) -> bool:
    return all(report[k][m] >= t for k in ("train", "held_out") if k in report for m, t in THRESHOLDS.items())


def sample_grid(images: list, scenes: list, path: Path, cols: int = 12, scale: int = 2) -> None:
    """First rows: training combinations; last rows: held-out ones (red frame)."""
    from PIL import Image, ImageDraw

    train = [(im, h) for im, (_, h) in zip(images, scenes) if not h][: cols * 4]
    held = [(im, h) for im, (_, h) in zip(images, scenes) if h][: cols * 4]
    cells = train + held
    w, h = images[0].size
    cw, ch = w * scale + 4, h * scale + 4
    grid = Image.new("RGB", (cols * cw, -(-len(cells) // cols) * ch), "gray")
    d = ImageDraw.Draw(grid)
    for i, (im, held_out) in enumerate(cells):
        x, y = (i % cols) * cw, (i // cols) * ch
        if held_out:
            d.rectangle([x, y, x + cw - 1, y + ch - 1], fill="red")
        grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (x + 2, y + 2))
    grid.save(path)


def evaluate(folder: Path = BUNDLED, engine: str = "sdlite", steps=None, cfg=None, sampler=None,
             limit: int | None = None, scenes=None, quiet: bool = False, grid: Path | None = None,
             validation: bool = False) -> dict:
    defaults = load_defaults(folder)
    steps = defaults["steps"] if steps is None else steps
    cfg = defaults["cfg"] if cfg is None else cfg
    sampler = defaults["sampler"] if sampler is None else sampler
    if scenes is None:
        scenes = shapes.eval_scenes(seed=VALIDATION_SCENE_SEED if validation else 0)
        if limit is not None:
            scenes = subset(scenes, limit)
    # 1. the classifier on ground-truth renderings of the same scenes
    truth = grade([shapes.render(s) for s, _ in scenes], scenes)
    # 2. generations
    gen = Generator(folder, engine, sampler)
    prompts = [s.caption() for s, _ in scenes]
    seeds = [(VALIDATION_IMAGE_SEED if validation else 0) + i for i in range(len(scenes))]
    t0 = time.time()
    images = gen(prompts, seeds, steps, cfg)
    seconds = time.time() - t0
    report = grade(images, scenes)
    report["classifier_on_ground_truth"] = {k: truth[k] for k in ("train", "held_out", "all") if k in truth}
    report["settings"] = {"engine": engine, "steps": steps, "cfg": cfg, "sampler": sampler, "n_images": len(scenes)}
    report["timing"] = {"load_s": round(gen.load_seconds, 3), "generate_total_s": round(seconds, 2), "per_image_s": round(seconds / len(scenes), 3)}
    report["thresholds"] = THRESHOLDS
    report["passes"] = passes(report)
    if grid is not None:
        sample_grid(images, scenes, grid)
    if not quiet:
        for k in ("classifier_on_ground_truth", "train", "held_out", "per_color_fg", "per_color_bg", "per_shape", "timing", "passes"):
            print(k, json.dumps(report.get(k)))
    report["_images"] = images
    return report


def time_one_image(folder: Path, engine: str) -> dict:
    """Seconds for one picture with the defaults: model loading + generation, in a fresh Generator."""
    d = load_defaults(folder)
    t0 = time.time()
    gen = Generator(folder, engine, d["sampler"])
    t1 = time.time()
    gen(["a red circle on a blue background"], [0], d["steps"], d["cfg"])
    t2 = time.time()
    gen(["a green square on a white background"], [1], d["steps"], d["cfg"])
    t3 = time.time()
    return {"engine": engine, "load_s": round(t1 - t0, 3), "first_image_s": round(t2 - t1, 3), "second_image_s": round(t3 - t2, 3), "end_to_end_s": round(t2 - t0, 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=BUNDLED)
    p.add_argument("--engine", default="sdlite", choices=["sdlite", "diffusers"])
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sampler", choices=list(DIFFUSERS_SCHEDULERS))
    p.add_argument("--limit", type=int, help="evaluate only this many prompts (spread over all combos)")
    p.add_argument("--validation", action="store_true",
                   help="validation draws (other positions, sizes and image seeds); writes no files unless asked")
    p.add_argument("--report", type=Path, help="default training/eval_report.json (none with --validation)")
    p.add_argument("--grid", type=Path, help="default training/sample_grid.png (none with --validation)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not args.validation:
        args.report = args.report or HERE / "eval_report.json"
        args.grid = args.grid or HERE / "sample_grid.png"
    report = evaluate(args.folder, args.engine, args.steps, args.cfg, args.sampler, args.limit, grid=args.grid,
                      validation=args.validation)
    report.pop("_images")
    if not args.validation:
        report["one_image_with_defaults"] = time_one_image(args.folder, args.engine)
        print("one_image_with_defaults", json.dumps(report["one_image_with_defaults"]))
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
