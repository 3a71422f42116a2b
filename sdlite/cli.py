"""The `sdlite` command line: `generate`, `img2img` (with the strength x steps figure) and `info`.

argv -> argparse -> `Settings` (everything that decides the pixels, recorded in every PNG and
replayed by `generate --from-png`) + `Output` (which files to write, how to report) ->
StableDiffusion calls -> files written by `sdlite.images`. Options and the seed tools' aliases
(MLX stable_diffusion txt2image.py / image2image.py) are documented in the README.

Usage mistakes exit with status 2 and one line on stderr; torch is imported only once the
command has been checked, so they are reported at once.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import __version__, images

DEFAULT_STRENGTH = 0.8  # StableDiffusion.generate_latents_from_image's default
TRIANGLE_STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DTYPES = ("float32", "float16", "bfloat16")
PREDICTION_TYPES = ("epsilon", "v_prediction")


class UsageError(Exception):
    """A mistake in the command line; reported as one line, exit status 2."""


@dataclass
class Settings:
    """What decides the pixels. Recorded as JSON in each PNG; None fields are resolved from the
    model (or drawn, for the seed) before generating, so the record is complete."""

    mode: str = "txt2img"  # "txt2img" or "img2img"
    prompt: str | None = None  # None in a record written with --no-save-prompt
    negative_prompt: str | None = ""  # None likewise, when it was not empty
    model: str | None = None  # model folder (absolute); None: the bundled model
    n_images: int = 1  # batch size: one generator draws the noise of all images, as in diffusers
    n_rows: int = 1  # rows of the output grid; must divide n_images
    steps: int | None = None  # sampler steps (img2img runs about strength * steps of them)
    cfg: float | None = None  # classifier-free guidance scale; <= 1 turns guidance off
    sampler: str | None = None  # one of StableDiffusion.sampler_names
    seed: int | None = None  # seed of the batch's generator
    height: int | None = None  # pixels; img2img: the source is resized to it (and cut to x64)
    width: int | None = None
    decoding_batch_size: int | None = None  # latents decoded at a time; None: the whole batch
    device: str = "cpu"
    dtype: str = "float32"
    prediction_type: str | None = None  # overrides the model's: "epsilon" or "v_prediction"
    loras: list | None = None  # [[LoRA file (absolute), weight], ...] merged after loading
    long_prompts: bool = False  # prompts over 77 tokens and (word:1.3) emphasis (sdlite.prompts)
    compute_dtype: str | None = None  # None: as dtype; float32 with dtype float16: fp16 weights at rest
    low_memory: bool = False  # text encoder and VAE loaded only while used; VAE decoded in tiles
    palettized_mode: str = "jit"  # palettized models: "jit" (weights rebuilt per layer) or "fast"
    image: str | None = None  # img2img: the source image (absolute path)
    image_sha256: str | None = None  # img2img: its bytes' hash, checked when replaying
    strength: float | None = None  # img2img: 0 keeps the image, 1 replaces it with noise
    triangle: bool = False  # img2img: one run per (steps, strength) cell, drawn as a labelled grid
    triangle_strengths: list[float] | None = None  # columns
    triangle_steps: list[int] | None = None  # rows; default: [steps]


@dataclass
class Output:
    """Which files to write and how to report. Not recorded, not replayed."""

    path: Path  # -o: the grid (a single image when n_images is 1); other names derive from it
    save_each: bool = False  # also <base>_<index>.png for each image of the batch
    show_denoising: int | None = None  # every N steps: <base>_<total steps>_<step>.png
    save_last: int | None = None  # the N steps before the final one, named as above
    save_prompt: bool = True  # record prompt and negative prompt in the metadata
    overwrite: bool = False  # replace existing files instead of refusing
    verbose: bool = False
    quiet: bool = False
    replay: dict | None = None  # --from-png: the recorded file entry (kind, index, step) to redo
    allow_pickle: bool = False  # --allow-pickle: a permission, so not recorded or replayed

    def derived(self, *parts) -> Path:
        return self.path.with_name("_".join([self.path.stem, *map(str, parts)]) + self.path.suffix)


# -- the parser -------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _number(kind, low=None, high=None):
    """An argparse type: `kind` (int or float) within [low, high]."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _list_of(parse):
    return lambda text: [parse(item) for item in text.replace(",", " ").split()]


positive = _number(int, 1)
strength = _number(float, 0.0, 1.0)


def build_parser() -> Parser:
    parser = Parser(prog="sdlite", description="Stable Diffusion on the command line.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"sdlite {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,img2img,info,serve,compress,convert}")
    generate = commands.add_parser("generate", help="text to image", allow_abbrev=False)
    generate.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png)")
    generate.add_argument("--from-png", type=Path, metavar="FILE", help="redo the image recorded in FILE's metadata")
    generate.add_argument("--image", metavar="FILE", help="with --from-png: the source image of an img2img record "
                          "that does not name it (the server's)")
    img2img = commands.add_parser("img2img", help="image and text to image", allow_abbrev=False)
    img2img.add_argument("image", help="source image")
    img2img.add_argument("prompt")
    img2img.add_argument("--strength", type=strength, metavar="S", help=f"0 keeps the image, 1 ignores it (default {DEFAULT_STRENGTH})")
    img2img.add_argument("--triangle", "-gt", "--generate_triangle", action="store_true", default=None,
                         help="one labelled grid: rows = --triangle-steps, columns = --triangle-strengths")
    img2img.add_argument("--triangle-strengths", type=_list_of(strength), metavar="LIST",
                         help="columns of --triangle (default 0.1,0.2,...,1.0)")
    img2img.add_argument("--triangle-steps", type=_list_of(positive), metavar="LIST",
                         help="rows of --triangle (default: --steps)")
    for sub in (generate, img2img):
        add_common_options(sub)
    info = commands.add_parser("info", help="describe a model", allow_abbrev=False)
    info.add_argument("model", nargs="?", help="model folder (default: the bundled model)")
    info.add_argument("--device", default="cpu")
    info.add_argument("--dtype", choices=DTYPES, default="float32")
    add_serve_parser(commands)
    add_convert_parser(commands)
    add_compress_parser(commands)
    return parser


def add_compress_parser(commands) -> None:
    """`sdlite compress`: a palettized copy of a model folder (sdlite.palettize.compress)."""
    compress = commands.add_parser("compress", help="palettize a model's weights (k-means LUT + packed indices)",
                                   allow_abbrev=False)
    add = compress.add_argument
    add("model", help="model folder (diffusers layout)")
    add("-o", "--output", type=Path, required=True, metavar="FOLDER", help="new folder for the palettized model")
    add("--bits", type=int, choices=(1, 2, 4, 6, 8), help="bits per weight (with --mixed-bit: text encoder and VAE, default 8)")
    add("--mixed-bit", type=_number(float, 0.0), metavar="DB",
        help="per-layer UNet bits meeting this PSNR (dB) of the UNet output, measured on the model")
    add("--group-size", type=positive, metavar="N", help="one LUT per N output channels (default: one per tensor)")


def add_convert_parser(commands) -> None:
    """`sdlite convert IN OUT`: diffusers folder <-> single-file checkpoint (sdlite.single_file)."""
    convert = commands.add_parser("convert", help="diffusers folder <-> single-file checkpoint", allow_abbrev=False)
    convert.add_argument("source", metavar="IN", help="a diffusers-layout folder, or a single-file checkpoint")
    convert.add_argument("target", metavar="OUT", help="a .safetensors file (from a folder), or a new folder (from a file)")
    convert.add_argument("--allow-pickle", action="store_true", help="read .ckpt / .bin pickle files (they can run code)")
    convert.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                         help="file -> folder: the scheduler's prediction type (default: epsilon, or the file's v_pred marker)")


def lora_option(text: str) -> list:
    """--lora FILE[:WEIGHT] -> [absolute path, weight]; the weight defaults to 1."""
    path, _, weight = text.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        path, value = text, 1.0
    if not path:
        raise argparse.ArgumentTypeError(f"expected FILE[:WEIGHT], got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"LoRA weight must be finite, got {weight}")
    return [str(Path(path).absolute()), value]


def add_serve_parser(commands) -> None:
    """`sdlite serve`: the options map one to one to sdlite.server.ServerOptions (docs: README, Server)."""
    serve = commands.add_parser("serve", help="HTTP server: OpenAI and web UI APIs, a web page", allow_abbrev=False)
    add = serve.add_argument
    add("--model", metavar="PATH", help="model folder or single-file checkpoint (default: the bundled model)")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    add("--port", type=_number(int, 0, 65535), default=7860, help="default 7860")
    add("--api-key", default=os.environ.get("SDLITE_API_KEY"), metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $SDLITE_API_KEY; none: no key)")
    add("--device", default="cpu", help="torch device (default cpu)")
    add("--dtype", choices=DTYPES, default="float32", help="default float32")
    add("--max-width", type=positive, default=1024, metavar="PX", help="largest width a request may ask (default 1024)")
    add("--max-height", type=positive, default=1024, metavar="PX", help="largest height (default 1024)")
    add("--max-steps", type=positive, default=150, metavar="N", help="most steps a request may ask (default 150)")
    add("--max-images", type=positive, default=8, metavar="N", help="per request (default 8)")
    add("--max-body-mb", type=_number(float, 0.001), default=32.0, metavar="MB", help="request body limit (default 32)")
    add("--max-queue", type=positive, default=16, metavar="N", help="waiting jobs; more get 503 (default 16)")
    add("--workers", type=positive, default=1, metavar="N", help="jobs run at a time (default 1)")
    add("--preview", choices=("auto", "approx", "vae", "none"), default="auto",
        help="live preview: vae (real decode), approx (linear latent to RGB, cheap), none; "
             "auto (default): vae if a decode takes under 50 ms, else approx")
    add("--preview-every", type=positive, default=2, metavar="N", help="steps between previews (default 2)")
    add("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow this origin (repeatable; default: CORS off)")


def add_common_options(p: Parser) -> None:
    """Options of generate and img2img. Setting options default to None: 'not given', so that
    --from-png knows what to override."""
    add = p.add_argument
    add("--model", metavar="PATH", help="model folder or single-file checkpoint (default: the bundled model)")
    add("--n-images", "--n_images", type=positive, metavar="N", help="images in the batch (default 1)")
    add("--n-rows", "--n_rows", type=positive, metavar="R", help="rows of the grid; must divide --n-images (default 1)")
    add("--steps", type=positive, metavar="N", help="sampler steps (default: the model's)")
    add("--cfg", type=_number(float), metavar="SCALE", help="guidance scale (default: the model's)")
    add("--negative-prompt", "--negative_prompt", metavar="TEXT", help="what to avoid")
    add("--sampler", metavar="NAME", help="ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras (default: the model's)")
    add("--seed", type=_number(int, 0, 2**64 - 1), metavar="N", help="default: random; always printed and recorded")
    add("--height", type=positive, metavar="PX", help="pixels, a multiple of 8 (default: the model's size)")
    add("--width", type=positive, metavar="PX", help="pixels, a multiple of 8 (default: the model's size)")
    add("--decoding-batch-size", "--decoding_batch_size", type=positive, metavar="N", help="latents decoded at a time")
    add("--prediction-type", choices=PREDICTION_TYPES, help="override the model's (single files default to "
        "epsilon unless they carry a v_pred marker)")
    add("--lora", dest="loras", action="append", type=lora_option, metavar="FILE[:WEIGHT]",
        help="merge a LoRA file (kohya or diffusers format), weight default 1 (repeatable)")
    add("--allow-pickle", action="store_true", help="read pickle checkpoints (.ckpt, .bin); they can run code")
    add("--long-prompts", action="store_true", default=None,
        help="prompts over 77 tokens (75-token chunks) and (word:1.3) / (word) / [word] emphasis, as the web UIs")
    add("--device", help="torch device (default cpu)")
    add("--dtype", choices=DTYPES, help="weights' dtype (default float32)")
    add("--compute-dtype", choices=DTYPES, help="math dtype (default: --dtype); float32 with --dtype float16 keeps "
                                               "weights fp16 in memory")
    add("--low-memory", action="store_true", default=None,
        help="load the text encoder and VAE only while used; decode in tiles")
    add("--palettized-mode", choices=("jit", "fast"),
        help="palettized models: rebuild each weight when used (jit, default: least RAM) or unpack at load (fast)")
    add("-o", "--output", type=Path, default=Path("out.png"), metavar="FILE", help="file to write, .png (default out.png)")
    add("--overwrite", action="store_true", help="replace existing files (default: refuse)")
    add("--save-each", action="store_true", help="also write each image as <base>_<index>.png")
    add("--show-denoising", "-sd", "--show_denoising", type=positive, metavar="N",
        help="every N steps write <base>_<steps>_<step>.png")
    add("--save-last", "--save_last_N", type=positive, metavar="N", help="write the N steps before the final one")
    add("--save-prompt", "-sp", "--save_prompt", action="store_true", default=True, help="record the prompts (default)")
    add("--no-save-prompt", dest="save_prompt", action="store_false", help="leave the prompts out of the metadata")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("--verbose", "-v", "-pp", "--print_parser", action="store_true",
                          help="print the resolved settings first")
    loudness.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")


# -- argv -> Settings + Output ----------------------------------------------------------------


def settings_from_args(args) -> tuple[Settings, Output]:
    """The settings and outputs a parsed command asks for; replayed from --from-png if given."""
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    for name in ("image", "model"):
        if name in given:
            given[name] = str(Path(given[name]).absolute())
    output = Output(args.output, args.save_each, args.show_denoising, args.save_last, args.save_prompt,
                    args.overwrite, args.verbose, args.quiet, allow_pickle=args.allow_pickle)
    if getattr(args, "from_png", None) is not None:
        record = read_record(args.from_png)
        recorded = {k: v for k, v in record["settings"].items() if k in {f.name for f in fields(Settings)}}
        settings = Settings(**{**recorded, **given})
        output.replay = record["file"]
        for name, option in (("prompt", "PROMPT"), ("negative_prompt", "--negative-prompt")):
            if getattr(settings, name) is None:
                raise UsageError(f"{args.from_png} does not record its {name.replace('_', ' ')} "
                                 f"(written with --no-save-prompt): give it with {option}")
        if settings.mode == "img2img" and settings.image is None:
            raise UsageError(f"{args.from_png} records an img2img run without naming its source image (the "
                             "server's do not): give the source with --image FILE")
    else:
        settings = Settings(mode="img2img" if args.command == "img2img" else "txt2img", **given)
        if settings.prompt is None:
            raise UsageError("the PROMPT argument is required (or --from-png FILE)")
    if settings.mode == "txt2img" and "image" in given:
        raise UsageError("--image gives the source of an img2img record replayed with --from-png")
    check(settings, output)
    return settings, output


def read_record(path: Path) -> dict:
    record = images.read_png_text(path).get("sdlite")
    if record is None:
        raise UsageError(f"{path} has no sdlite metadata to reproduce")
    try:
        record = json.loads(record)
        if isinstance(record["settings"], dict) and isinstance(record["file"], dict):
            return record
    except (ValueError, KeyError, TypeError):
        pass
    raise UsageError(f"{path}: its sdlite metadata is damaged (not a record sdlite wrote)")


def check(s: Settings, out: Output) -> None:
    """The usage checks that need no model, so that they fail at once."""
    if s.sampler is not None and s.sampler not in images.WEBUI_SAMPLERS:
        raise UsageError(f"unknown sampler {s.sampler!r}; valid samplers: {sorted(images.WEBUI_SAMPLERS)}")
    for name, value in (("height", s.height), ("width", s.width)):
        if value is not None and value % 8:
            raise UsageError(f"--{name} must be a multiple of 8; got {value}")
    if s.n_rows < 1 or s.n_images % s.n_rows:
        raise UsageError(f"--n-rows {s.n_rows} does not divide --n-images {s.n_images}: "
                         "every row of the grid must be full")
    if s.triangle and (s.n_images > 1 or out.save_each or out.show_denoising or out.save_last):
        raise UsageError("--triangle draws one image per cell: it cannot be combined with --n-images, "
                         "--save-each, --show-denoising or --save-last")
    if not s.triangle and (s.triangle_strengths is not None or s.triangle_steps is not None):
        raise UsageError("--triangle-strengths and --triangle-steps need --triangle")
    if [] in (s.triangle_strengths, s.triangle_steps):
        raise UsageError("--triangle-strengths and --triangle-steps need at least one value")
    if s.long_prompts:  # emphasis weights that are not numbers (prompts.parse_weights raises ValueError)
        from .prompts import parse_weights

        with warnings.catch_warnings():  # warnings come when the prompt is encoded, as the options say
            warnings.simplefilter("ignore")
            for text in (s.prompt, s.negative_prompt):
                parse_weights(text or "")
    if not out.path.name or out.path.name in (".", ".."):
        raise UsageError(f"--output {str(out.path)!r} names no file")
    if out.path.suffix == "":
        out.path = out.path.with_suffix(".png")
    if out.path.suffix.lower() != ".png":
        raise UsageError(f"--output {out.path}: sdlite writes PNG files (metadata lives in PNG text chunks)")
    if not out.path.parent.is_dir():
        raise UsageError(f"output folder {out.path.parent} does not exist")


def refuse_existing(paths: list[Path], out: Output) -> None:
    """Refuse before any work if a file would be replaced without --overwrite."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not out.overwrite:
        raise UsageError(f"{', '.join(existing)} already exists; pass --overwrite to replace, or choose another -o")


# -- running ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "info":
            return show_info(args)
        if args.command == "serve":
            return serve(args)
        if args.command == "convert":
            return run_convert(args)
        if args.command == "compress":
            return run_compress(args)
        settings, output = settings_from_args(args)
        if output.quiet:
            warnings.simplefilter("ignore")
        warnings.showwarning = lambda message, *_: print(f"sdlite: warning: {message}", file=sys.stderr)
        return run(settings, output)
    except KeyboardInterrupt:
        print("sdlite: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        return fail(e, status=2)
    except OSError as e:  # the system refused, e.g. a read-only output folder
        return fail(e, status=1)


def fail(error: Exception, status: int) -> int:
    print(f"sdlite: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status


def load_model(path: str | None, device: str, dtype: str, compute_dtype: str | None = None, low_memory: bool = False,
               palettized_mode: str = "jit", **options):
    import torch

    from . import StableDiffusion

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # what torch raises for unknown or absent devices
        raise UsageError(f"device {device!r} is not available: {e}") from None
    return StableDiffusion.from_pretrained(path, device=device, dtype=getattr(torch, dtype), **options,
                                           compute_dtype=None if compute_dtype is None else getattr(torch, compute_dtype),
                                           low_memory=low_memory, palettized_mode=palettized_mode)


def run_compress(args) -> int:
    """Palettize args.model into args.output and report sizes, bits and (mixed-bit) PSNR."""
    if args.bits is None and args.mixed_bit is None:
        raise UsageError("give --bits {1,2,4,6,8} or --mixed-bit DB")
    if not (Path(args.model) / "model_index.json").is_file():
        raise UsageError(f"{args.model} is not a diffusers-layout model folder (no model_index.json)")
    if args.output.exists() and any(args.output.iterdir()):
        raise UsageError(f"{args.output} exists and is not empty; choose another output folder")
    if not args.output.absolute().parent.is_dir():
        raise UsageError(f"the folder {args.output.absolute().parent} for {args.output} does not exist")
    from .palettize import compress

    start = time.perf_counter()
    summary = compress(args.model, args.output, bits=args.bits, mixed_bit=args.mixed_bit, group_size=args.group_size)
    source = sum(p.stat().st_size for p in Path(args.model).rglob("*") if p.is_file())
    line = f"wrote {args.output}: {summary['bytes'] / 2**20:.1f} MiB (source {source / 2**20:.1f} MiB)"
    if args.mixed_bit is not None:
        line += (f"; UNet {summary['unet_average_bits']:.2f} bits on average, output PSNR {summary['psnr_db']:.1f} dB "
                 f"(target {args.mixed_bit:g} dB)")
    print(f"{line}; {time.perf_counter() - start:.0f} s")
    return 0


def model_options(s: Settings, out: Output) -> dict:
    """from_pretrained's checkpoint options: prediction type, LoRAs and the pickle permission."""
    return dict(prediction_type=s.prediction_type, loras=[tuple(lora) for lora in s.loras or ()],
                allow_pickle=out.allow_pickle, long_prompts=s.long_prompts)


def run_convert(args) -> int:
    """`convert`: a folder becomes one .safetensors file, a single file becomes a folder."""
    from .single_file import FAMILY_NAMES, save_diffusers_folder, save_single_file

    source, target = Path(args.source), Path(args.target)
    if not source.exists():
        raise UsageError(f"{source} does not exist")
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise UsageError(f"{source} is not a diffusers-layout model folder (no model_index.json)")
        if target.suffix != ".safetensors":
            raise UsageError(f"{target}: a folder converts to a .safetensors file")
        if target.exists():
            raise UsageError(f"{target} already exists")
        family = save_single_file(source, target, allow_pickle=args.allow_pickle)
    else:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise UsageError(f"{target} exists and is not an empty folder")
        family = save_diffusers_folder(source, target, allow_pickle=args.allow_pickle,
                                       prediction_type=args.prediction_type)
    print(f"wrote {target} ({FAMILY_NAMES[family]})")
    return 0


def run(s: Settings, out: Output) -> int:
    start = time.perf_counter()
    source = None
    if s.mode == "img2img":
        source = images.load_image(s.image)
        digest = hashlib.sha256(Path(s.image).read_bytes()).hexdigest()
        if s.image_sha256 not in (None, digest):
            raise UsageError(f"source image {s.image} has changed since the recorded run (its sha256 differs)")
        s.image_sha256 = digest
    refuse_existing([out.path] + [out.derived(i) for i in range(s.n_images) if out.save_each], out)
    sd = load_model(s.model, s.device, s.dtype, s.compute_dtype, s.low_memory, s.palettized_mode, **model_options(s, out))
    source = resolve(s, sd, source)
    say = (lambda *a: None) if out.quiet else print
    say(f"seed: {s.seed}")
    if out.verbose:
        say("\n".join(f"  {k}: {v}" for k, v in asdict(s).items()))
    written = (run_triangle if s.triangle else run_batch)(sd, s, out, source)
    say(f"done in {time.perf_counter() - start:.1f} s; wrote {', '.join(map(str, written))}")
    return 0


def resolve(s: Settings, sd, source):
    """Fill the settings left to the model (and draw the seed); returns the source as img2img uses it."""
    s.steps = sd.default_steps if s.steps is None else s.steps
    s.cfg = sd.default_cfg if s.cfg is None else s.cfg
    s.sampler = sd.default_sampler if s.sampler is None else s.sampler
    s.seed = random.randrange(2**32) if s.seed is None else s.seed
    if source is None:
        s.height, s.width = (sd.default_size[0] if s.height is None else s.height,
                             sd.default_size[1] if s.width is None else s.width)
        return None
    source = sd.fit_image(source, s.height, s.width)
    s.width, s.height = source.size
    s.strength = DEFAULT_STRENGTH if s.strength is None else s.strength
    if s.triangle and s.triangle_strengths is None:
        s.triangle_strengths = list(TRIANGLE_STRENGTHS)
    if s.triangle and s.triangle_steps is None:
        s.triangle_steps = [s.steps]
    return source


def generation_kwargs(s: Settings, **changes) -> dict:
    kwargs = dict(negative_prompt=s.negative_prompt, n_images=s.n_images, steps=s.steps, cfg=s.cfg,
                  seed=s.seed, sampler=s.sampler, height=s.height, width=s.width)
    return {**kwargs, **changes}


def progress(total: int, out: Output):
    """A progress bar on stderr, shown from the start. Callers check their arguments first (the
    library does before it returns a step generator; the triangle checks every cell's steps and
    strength), so a rejected argument leaves its one-line error alone."""
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=out.quiet or total == 0, unit="step", dynamic_ncols=True,
                mininterval=0,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}]")


def run_batch(sd, s: Settings, out: Output, source) -> list[Path]:
    """One batch: the grid, and as asked each image and the snapshots during denoising."""
    n_steps = sd.num_denoising_steps(s.steps, 1.0 if source is None else s.strength, s.sampler)
    replay = out.replay or {"kind": "grid"}
    stop = replay["step"] if replay["kind"] == "snapshot" else None
    snapshots = set()
    if stop is None and out.show_denoising:
        snapshots |= set(range(out.show_denoising, n_steps + 1, out.show_denoising))
    if stop is None and out.save_last:
        snapshots |= set(range(max(1, n_steps - out.save_last), n_steps))
    refuse_existing([out.derived(n_steps, k) for k in sorted(snapshots)], out)
    if replay["kind"] == "image" and not 0 <= replay["index"] < s.n_images:
        raise UsageError(f"the recorded image is number {replay['index']} of a batch, but --n-images is {s.n_images}")
    if stop is not None and stop > n_steps:
        raise UsageError(f"the recorded snapshot is step {stop}, but only {n_steps} steps run")

    written = []

    def write(image, path, **file):
        save(image, path, s, sd.name, out, file)
        written.append(path)

    if source is None:
        latents_steps = sd.generate_latents(s.prompt, **generation_kwargs(s))
    else:
        kwargs = generation_kwargs(s, height=None, width=None)  # `source` already has the size
        latents_steps = sd.generate_latents_from_image(source, s.prompt, s.strength, **kwargs)
    final = [source] * s.n_images  # what strength 0 (no step at all) gives
    with progress(stop or n_steps, out) as bar:
        for i, latents in latents_steps:
            bar.update()
            final = sd.decode(latents, s.decoding_batch_size) if i + 1 in snapshots or i + 1 == stop else None
            if i + 1 in snapshots:
                write(images.make_grid(final, s.n_rows), out.derived(n_steps, i + 1), kind="snapshot", step=i + 1)
            if i + 1 == stop:
                break
    if final is None:
        final = sd.decode(latents, s.decoding_batch_size)
    if replay["kind"] == "image":
        write(final[replay["index"]], out.path, kind="image", index=replay["index"])
    else:
        write(images.make_grid(final, s.n_rows), out.path, **replay)
    for index, image in enumerate(final if out.save_each else []):
        write(image, out.derived(index), kind="image", index=index)
    return written


def run_triangle(sd, s: Settings, out: Output, source) -> list[Path]:
    """The progressive-strength figure: rows = step counts, columns = strengths, the source at the
    left. A cell whose strength leaves no denoising step stays grey."""
    counts = {(t, x): sd.num_denoising_steps(t, x, s.sampler) for t in s.triangle_steps for x in s.triangle_strengths}
    rows = []
    with progress(sum(counts.values()), out) as bar:
        for steps in s.triangle_steps:
            row = [source]
            for x in s.triangle_strengths:
                latents = None
                if counts[steps, x]:
                    kwargs = generation_kwargs(s, n_images=1, steps=steps, height=None, width=None)
                    for _, latents in sd.generate_latents_from_image(source, s.prompt, x, **kwargs):
                        bar.update()
                row.append(None if latents is None else sd.decode(latents)[0])
            rows.append(row)
    labels = ["source"] + [f"strength {x:g}" for x in s.triangle_strengths]
    grid = images.labelled_grid(rows, [f"{t} steps" for t in s.triangle_steps], labels, source.size)
    save(grid, out.path, s, sd.name, out, {"kind": "triangle"})
    return [out.path]


def save(image, path: Path, s: Settings, model_name: str, out: Output, file: dict) -> None:
    """Write `image` with the web UI `parameters` chunk and the `sdlite` record of the run."""
    parameters, record = png_metadata(s, model_name, file, out.save_prompt)
    images.save_png(image, path, images.png_info(parameters, record), overwrite=out.overwrite)


def png_metadata(s: Settings, model_name: str, file: dict, save_prompt: bool = True) -> tuple[str, dict]:
    """The web UI `parameters` text and the `sdlite` record of one file of a run (`sdlite serve`
    writes the same)."""
    recorded = asdict(s)
    if not save_prompt:
        recorded["prompt"] = None
        recorded["negative_prompt"] = None if s.negative_prompt else ""
    index = file.get("index")
    webui = {
        "Steps": s.steps if not s.triangle else None,
        "Sampler": images.WEBUI_SAMPLERS.get(s.sampler, s.sampler),
        "CFG scale": s.cfg,
        "Seed": s.seed,
        "Size": f"{s.width}x{s.height}",
        "Model": model_name,
        "Denoising strength": s.strength if s.mode == "img2img" and not s.triangle else None,
        "Batch size": s.n_images if s.n_images > 1 else None,
        "Batch pos": index if s.n_images > 1 else None,
        "Triangle steps": ",".join(map(str, s.triangle_steps)) if s.triangle else None,
        "Triangle strengths": ",".join(map(str, s.triangle_strengths)) if s.triangle else None,
        "Version": f"sdlite {__version__}",
    }
    parameters = images.webui_parameters(recorded["prompt"], recorded["negative_prompt"], webui)
    record = {"sdlite": __version__, "model_name": model_name, "settings": recorded,
              "file": {"kind": "grid", "index": None, "step": None, **file}}
    return parameters, record


# -- serve --------------------------------------------------------------------------------------


def serve(args) -> int:
    """Load the model and serve it until Ctrl-C; the server and its dependencies are imported only now."""
    try:
        from . import server
    except ImportError as e:
        raise UsageError(f"sdlite serve needs the server dependencies: pip install 'sdlite[serve]' ({e})") from None
    options = server.ServerOptions(
        api_key=args.api_key or None, max_width=args.max_width, max_height=args.max_height, max_steps=args.max_steps,
        max_images=args.max_images, max_body=int(args.max_body_mb * 2**20), max_queue=args.max_queue,
        workers=args.workers, preview=args.preview, preview_every=args.preview_every,
        cors_origins=tuple(args.cors_origin))
    sock = server.listening_socket(args.host, args.port)  # a port in use fails before the model loads
    sd = load_model(args.model and str(Path(args.model).absolute()), args.device, args.dtype)
    server.serve(sd, args.host, args.port, options, sock)
    return 0


# -- info ---------------------------------------------------------------------------------------


def show_info(args) -> int:
    """Print what a model folder holds: networks, parameter counts, dtypes, defaults, files."""
    sd = load_model(args.model and str(Path(args.model).absolute()), args.device, args.dtype)
    unet, text, vae = sd.unet.config, sd.text_encoder.config, sd.vae.config
    height, width = sd.default_size
    print(f"model      {sd.name}  ({sd.path})")
    print(f"defaults   {width}x{height} px, {sd.default_steps} steps, cfg {sd.default_cfg}, "
          f"sampler {sd.default_sampler}")
    print(f"samplers   {', '.join(sd.sampler_names)}")
    for name, why in sd.refused_samplers.items():
        print(f"refused    {name}: {why}")
    print(f"schedule   {getattr(sd.schedule, 'prediction_type', '?')} prediction")
    architecture = {
        "text_encoder": f"CLIP {text.num_hidden_layers} layers x {text.hidden_size}, {text.hidden_act}",
        "unet": f"channels {list(unet.block_out_channels)}, heads {list(unet.num_attention_heads)}, "
                f"cross-attention {unet.cross_attention_dim}, "
                f"{'linear' if unet.use_linear_projection else 'conv'} projection",
        "vae": f"{vae.latent_channels} latent channels, /{vae.downscale_factor} scale, "
               f"scaling factor {vae.scaling_factor}",
    }
    for name, summary in architecture.items():
        network = getattr(sd, name)
        parameters = sum(p.numel() for p in network.parameters())
        dtype = str(next(network.parameters()).dtype).removeprefix("torch.")
        print(f"{name:<12} {parameters / 1e6:8.2f}M parameters, {dtype}; {summary}")
    print("files")
    total = 0
    root = Path(sd.path)
    for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):  # a single file
        size = path.stat().st_size
        total += size
        stored = f"  stored as {stored_dtypes(path)}" if path.suffix == ".safetensors" else ""
        print(f"  {path.relative_to(root.parent if root.is_file() else root)!s:<50} {size / 2**20:9.2f} MiB{stored}")
    print(f"  {'total':<50} {total / 2**20:9.2f} MiB")
    return 0


def stored_dtypes(path: Path) -> str:
    """The tensor dtypes in a safetensors file, from its JSON header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return ", ".join(sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"}))
