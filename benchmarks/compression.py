"""Weight compression and low-memory generation, measured: for fp32, fp16 weights at rest, 8/6/4-bit
palettization and a mixed-bit recipe (each palettized model in jit and fast mode): size on disk,
peak RSS of one generation (loading included), seconds per denoising step, PSNR of the final image
against fp32, and for the bundled model the colour/shape accuracy of training/evaluate.py.

    flock /tmp/sdlite-heavy.lock python benchmarks/compression.py sd-2.1-base --steps 3 --rounds 3
    python benchmarks/compression.py bundled --eval-scenes 48

Models: "sd-2.1-base" (random weights from the reference configs, benchmarks/models.py) or
"bundled" (sdlite/data/bundled). Compressed copies are cached next to the source under
~/.cache/sdlite-bench/compression/. Each setting runs in its own subprocess, so its peak RSS
(VmHWM) is its own. Every row but "fp32" runs in low-memory mode (text encoder and VAE loaded only
while used, VAE decoded in 32-latent tiles); PSNR compares with the fp32 image decoded the same way
(the "fp32 low-memory" row gives the cost of tiling alone, against plain fp32). Seconds per step:
the mean over the steps after the first. With --rounds N every setting is measured N times, the
settings in turn (step times here drift by 10-30% over minutes), and a row gives the median
seconds per step and the largest peak RSS. Results: benchmarks/results/compression-<model>.json
and a Markdown table on stdout.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: sdlite and benchmarks importable
CACHE = Path.home() / ".cache" / "sdlite-bench" / "compression"
PROMPT = "a red circle on a blue background"
SEED = 0


# -- preparing the model variants -------------------------------------------------------------


def source_folder(model: str) -> Path:
    if model == "bundled":
        return ROOT / "sdlite" / "data" / "bundled"
    from benchmarks.models import build_model

    return build_model(model)


def fresh_cache(cache: Path, source: Path) -> Path:
    """`cache`, emptied first unless its copies were made from `source`'s weights as they are now
    (names, sizes and modification times of the weight files): a retrained bundled model gets
    new copies."""
    import shutil

    files = sorted(p for p in source.rglob("*") if p.suffix in (".safetensors", ".bin"))
    stamp = "\n".join(f"{p.relative_to(source)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    stamp_file = cache / "source.txt"
    if cache.exists() and not (stamp_file.is_file() and stamp_file.read_text() == stamp):
        print(f"clearing {cache}: made from other weights than {source}'s", flush=True)
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp)
    return cache


def write_fp16_copy(source: Path, out: Path) -> None:
    """The model with fp16 weights (as `*.fp16.safetensors` variants), configs copied."""
    import shutil

    from safetensors.torch import save_file

    from sdlite.loading import find_weight_files, read_weights

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    for component in ("text_encoder", "unet", "vae"):
        for path in find_weight_files(source / component):
            weights = {k: v.half() if v.is_floating_point() else v for k, v in read_weights(path).items()}
            name = path.name.replace(".safetensors", ".fp16.safetensors")
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / component / name))
            del weights
    tmp.rename(out)


def prepare(model: str, bits: list[int], mixed_db: float | None, mixed_options: dict) -> dict[str, tuple[Path, dict]]:
    """setting name -> (model folder, from_pretrained keywords), building what is missing."""
    import torch  # noqa: F401  (the compressors need it; imported here so --help stays quick)

    from sdlite.palettize import VERSION, compress

    source = source_folder(model)
    cache = fresh_cache(CACHE / model, source)
    settings = {"fp32": (source, {}), "fp32 low-memory": (source, {"low_memory": True})}
    fp16 = cache / "fp16"
    if not fp16.exists():
        print(f"writing {fp16}", flush=True)
        write_fp16_copy(source, fp16)
    settings["fp16 at rest"] = (fp16, {"dtype": "float16", "compute_dtype": "float32", "low_memory": True})
    unet_cache: dict = {}
    variants = [(f"{b}-bit", dict(bits=b)) for b in bits]
    if mixed_db is not None:
        target = mixed_db if mixed_db.endswith("-bit") else float(mixed_db)
        label = f"mixed (= {mixed_db} PSNR)" if mixed_db.endswith("-bit") else f"mixed {target:g} dB"
        variants.append((label, dict(mixed_bit=target, **mixed_options)))
    for name, options in variants:
        # named with the format version: copies in an older format are built again
        folder = cache / ("".join(c if c.isalnum() or c in "-." else "-" for c in name) + f"-v{VERSION}")
        if not (folder / "summary.json").is_file():  # written last: the folder is complete
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            print(f"compressing {name} -> {folder}", flush=True)
            start = time.perf_counter()
            summary = compress(source, folder, unet_cache=unet_cache, **options)
            summary["seconds"] = time.perf_counter() - start
            (folder / "summary.json").write_text(json.dumps(summary, indent=1))
        for mode in ("jit", "fast"):
            settings[f"{name} {mode}"] = (folder, {"palettized_mode": mode, "low_memory": True})
    return settings


# -- one measurement (in a subprocess) --------------------------------------------------------


def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def measure(folder: Path, kwargs: dict, steps: int, size: int | None, image_path: Path, eval_scenes: int) -> dict:
    """Load, generate one image, time the steps; optionally grade `eval_scenes` evaluation images."""
    import torch

    from sdlite import StableDiffusion

    kwargs = {k: getattr(torch, v) if k.endswith("dtype") else v for k, v in kwargs.items()}
    start = time.perf_counter()
    sd = StableDiffusion.from_pretrained(folder, **kwargs)
    load_s = time.perf_counter() - start
    times, latents = [], None
    tick = time.perf_counter()
    for _, latents in sd.generate_latents(PROMPT, steps=steps, seed=SEED, height=size, width=size):
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
    image = sd.decode(latents)[0]
    decode_s = time.perf_counter() - tick
    image.save(image_path)
    result = {"load_s": load_s, "step_s": times, "decode_s": decode_s, "peak_rss": vm("VmHWM"),
              "seconds_per_step": sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0]}
    if eval_scenes:
        result["evaluation"] = evaluate(sd, eval_scenes)
    return result


def evaluate(sd, n: int) -> dict:
    """training/evaluate.py's grading of `n` evaluation scenes (spread over all), the model's defaults."""
    sys.path.insert(0, str(ROOT / "training"))
    import evaluate as quality
    import shapes

    scenes = quality.subset(shapes.eval_scenes(), n)
    images = [sd.text_to_image(s.caption(), seed=i)[0] for i, (s, _) in enumerate(scenes)]
    report = quality.grade(images, scenes)
    return {k: report[k] for k in ("train", "held_out", "all") if k in report}


# -- the table ---------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "summary.json")


def image_psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a)).astype(np.float64)
    y = np.asarray(Image.open(b)).astype(np.float64)
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def table(rows: list[dict], with_eval: bool) -> str:
    head = "| setting | size on disk | peak RSS | s / step | vs fp32 | PSNR vs fp32 |"
    rule = "|---|---:|---:|---:|---:|---:|"
    fp32 = next((r["seconds_per_step"] for r in rows if r["setting"] == "fp32"), None)
    if with_eval:
        head += " fg colour | bg colour | shape |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        ratio = "n/a" if fp32 is None else f"{r['seconds_per_step'] / fp32:.2f}x"
        psnr = "(reference)" if r["setting"] == "fp32" else "n/a" if r["psnr"] is None else ("identical" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f} dB")
        line = (f"| {r['setting']} | {r['bytes'] / 2**20:,.0f} MiB | {r['peak_rss'] / 2**20:,.0f} MiB | "
                f"{r['seconds_per_step']:.2f} | {ratio} | {psnr} |")
        if with_eval:
            scores = r.get("evaluation", {}).get("all", {})
            line += "".join(f" {scores.get(k, float('nan')):.2f} |" for k in ("fg", "bg", "shape"))
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("sd-2.1-base", "bundled"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's: 512 for SD 2.1-base)")
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 6, 4])
    parser.add_argument("--mixed-db", default=None,
                        help="target UNet-output PSNR (dB) of the mixed recipe, or N-bit: uniform N-bit's PSNR")
    parser.add_argument("--mixed-latent", type=int, default=None, help="latent size of the sensitivity inputs")
    parser.add_argument("--mixed-inputs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every setting this many times, in turn; the table takes medians")
    parser.add_argument("--only", nargs="*", default=None, help="settings to measure (default: all)")
    parser.add_argument("--prepare-only", action="store_true", help="build the compressed copies, measure nothing")
    parser.add_argument("--eval-scenes", type=int, default=0, help="bundled: images graded per setting")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "KWARGS"), help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the subprocess
        folder, kwargs = Path(args.measure[0]), json.loads(args.measure[1])
        print(json.dumps(measure(folder, kwargs, args.steps, args.size, args.image, args.eval_scenes)))
        return 0
    mixed_options = {"latent_size": args.mixed_latent, "n_inputs": args.mixed_inputs, "candidates": (4, 6, 8)}
    settings = prepare(args.model, args.bits, args.mixed_db, mixed_options)
    if args.prepare_only:
        return 0
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"compression-{args.model}.json"
    previous = {r["setting"]: r for r in json.loads(results_path.read_text())["rows"]} if results_path.exists() else {}
    previous = {k: r for k, r in previous.items() if Path(r["image"]).is_file()}  # rows of a rebuilt cache go
    images = CACHE / args.model / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = dict(previous)  # setting -> row; earlier runs' rows stay unless measured again
    order = list(settings) if args.only is None else [n for n in args.only if n in settings]
    runs: dict[str, list[dict]] = {}  # setting -> one measurement per round
    for round_index in range(args.rounds):  # settings in turn, round after round: drift hits all alike
        for name in order:
            folder, kwargs = settings[name]
            image = images / (name.replace(" ", "_") + ".png")
            eval_scenes = args.eval_scenes if round_index == 0 else 0  # the images are the same every round
            command = [sys.executable, __file__, args.model, "--measure", str(folder), json.dumps(kwargs),
                       "--steps", str(args.steps), "--image", str(image), "--eval-scenes", str(eval_scenes)]
            if args.size is not None:
                command += ["--size", str(args.size)]
            print(f"measuring {name} (round {round_index + 1} of {args.rounds})", flush=True)
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                continue
            runs.setdefault(name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = combine_rounds(runs[name])
            row.update(setting=name, folder=str(folder), kwargs=kwargs, bytes=folder_bytes(folder), image=str(image))
            summary = folder / "summary.json"
            if summary.is_file():
                row["compression"] = json.loads(summary.read_text())
            rows[name] = row
            print(f"  {runs[name][-1]['seconds_per_step']:.2f} s/step, peak RSS "
                  f"{runs[name][-1]['peak_rss'] / 2**20:.0f} MiB", flush=True)
            write_results(results_path, args, rows, list(settings))
    print(table(write_results(results_path, args, rows, list(settings)), args.eval_scenes > 0))
    return 0


def combine_rounds(results: list[dict]) -> dict:
    """One row from a setting's measurements: the median seconds per step, the largest peak RSS,
    the first round's other figures (and evaluation), and every round's two figures."""
    import statistics

    row = dict(results[0])
    row["seconds_per_step"] = statistics.median(r["seconds_per_step"] for r in results)
    row["peak_rss"] = max(r["peak_rss"] for r in results)
    row["rounds"] = [{k: r[k] for k in ("seconds_per_step", "peak_rss", "load_s")} for r in results]
    return row


def write_results(path: Path, args, rows: dict, order: list[str]) -> list[dict]:
    """All rows, in the settings' `order` (rows of settings not in it last), with PSNR against the
    fp32 image decoded the same way."""
    ordered = sorted(rows.values(), key=lambda r: order.index(r["setting"]) if r["setting"] in order else len(order))
    for r in ordered:
        reference = None if r["setting"] == "fp32" else rows.get("fp32" if r["setting"] == "fp32 low-memory"
                                                                  else "fp32 low-memory")
        r["psnr"] = None if reference is None else image_psnr(Path(reference["image"]), Path(r["image"]))
    path.write_text(json.dumps({"model": args.model, "steps": args.steps, "size": args.size, "prompt": PROMPT,
                                "seed": SEED, "rows": ordered}, indent=1, default=str))
    return ordered


if __name__ == "__main__":
    sys.exit(main())
