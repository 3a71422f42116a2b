"""Benchmark sdlite against diffusers and OpenVINO on the same model, side by side.

    python -m benchmarks.run                         # SD 2.1-base, 256 px, 20 DDIM steps, CPU fp32
    python -m benchmarks.run --model sd-1.5 --size 512
    python -m benchmarks.run --model sdxl-base-1.0 --size 1024 --steps 6 --batches 1
    python -m benchmarks.run --quick                 # tiny model, seconds per engine (the test runs this)
    python -m benchmarks.run --device cuda --dtype float16 --engines sdlite,diffusers

The model is a full-size random-weight checkpoint written from the reference configs in
`benchmarks/configs/` (see `benchmarks.models`) and cached in ~/.cache/sdlite-bench. Every engine
runs in its own fresh process (`benchmarks.worker`) with the same architecture, dtype, size,
sampler, steps, seed and thread count, so import time, cold start and peak RSS are comparable. A
probe process first counts the UNet's FLOPs and measures the machine's matmul peak (the best of
torch.mm and, on the CPU in fp32, oneDNN's GEMM on a prepacked weight). Before each
engine the model's files are read once, so every engine starts with them in the page cache (as far
as memory allows): all engines read weights lazily, and disk reads would otherwise favour whichever
engine runs after another has read the files.

Figures per engine (all times in seconds, from one text-to-image generation of one image with
classifier-free guidance, i.e. the UNet runs on two texts, the prompt and the negative prompt:
a batch of 2 for diffusers; sdlite hands its UNet the latents once, as both texts share them):

    import          importing the engine (torch included) in a fresh interpreter
    load            from_pretrained (for OpenVINO: plus conversion and compilation)
    cold start      process spawn to model ready (interpreter + import + load)
    text encoding   the text encoder's calls during the generation (sdlite-low-memory: the
                    prompt encoding calls, which load the text encoder(s) each time)
    UNet first step the first UNet call; UNet step: the median of the others
    VAE decode      the VAE decoder's calls (sdlite-low-memory: `decode`, loading the VAE)
    end to end      the whole text-to-image call (tokenising to PIL image)
    spawn to first image  cold start, then that call: what a one-shot command-line run waits
    peak RSS        the process's peak resident memory after the generation
    GFLOP/s         UNet FLOPs per call / median step time, and its fraction of the matmul peak.
                    The FLOPs are counted once for every engine, on the network as written at
                    batch 2; sdlite's Winograd convolutions (sdlite.winograd) multiply less and
                    its layers before the text run once on the shared latents, so for sdlite
                    this is an effective rate, which may pass the peak
    img/s @ n       UNet throughput for n images with CFG (2n texts) per step, median of --reps

Ratios are to diffusers (for times and memory below 1 is better). With --runs N every engine
runs N times, in turn (round after round, so drift hits all alike), each time in a fresh process,
and every figure is the median of an engine's runs (peak RSS: the largest; an engine that fails
stops, keeping the runs it finished, and the notes say how many). A fresh process's first UNet
step writes the weights sdlite keeps packed and transformed, and on some machines (virtual ones
that hand freed memory back to their host) writing fresh memory takes several times longer from
one minute to the next: sdlite's first step at 256 px has taken 4-14 s for the same work. The
results record the commit measured (and whether the tree had changes).
Results are written to `benchmarks/results/<name>.{json,md,png}`.
"""

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .models import MODELS, build_model
from .report import fmt, write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("sdlite", "sdlite-low-memory", "diffusers", "openvino")
DEFAULT_ENGINES = ("sdlite", "diffusers", "openvino")
DTYPES = ("float32", "float16", "bfloat16")


def resolve_device(device: str, dtype: str, cuda_available: bool | None = None) -> tuple[str, str]:
    """The (device, dtype) to run on. "auto" picks cuda when present, else cpu; dtype "auto" is
    float16 on cuda and float32 on cpu (diffusers' CPU default). Asking for cuda without a GPU
    is an error, not a silent fall-back, so a CPU figure is never reported as a GPU one."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise SystemExit(f"--device {device}: no CUDA GPU is available (torch sees none); use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda[:n], got {device!r}")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return device, dtype


def gemm_sizes(quick: bool, device: str) -> list[int]:
    """Square GEMM sizes for the matmul peak: a GPU needs far larger products than a CPU to reach
    its peak (at 2048 an H200 would spend microseconds, mostly launching)."""
    if quick:
        return [256, 512]
    return [4096, 8192] if device.startswith("cuda") else [1024, 2048]


def engine_skip_reason(engine: str, device: str, dtype: str, sdxl: bool = False) -> str | None:
    """Why an engine cannot run in this configuration, or None."""
    if engine == "diffusers" and importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (pip install -e '.[test]')"
    if engine == "openvino":
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed (pip install -e '.[bench]')"
        if device != "cpu" or dtype != "float32":
            return "the OpenVINO engine is measured on the CPU in float32 only"
        if sdxl:
            return "sdlite's OpenVINO backend converts SD 1.x/2.x UNets only (not SDXL's added conditioning)"
    return None


def run_process(spec: dict, workdir: Path, timeout: float) -> dict:
    """Run benchmarks.worker on `spec` in a fresh interpreter; its result, or an error entry."""
    name = spec["engine"]
    spec_path, result_path, log_path = (workdir / f"{name}.{s}" for s in ("spec.json", "result.json", "log"))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep the caller's
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=path)
    spec = dict(spec, spawned=time.time())
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            failed = done.returncode != 0
        except subprocess.TimeoutExpired:
            failed = True
    if failed or not result_path.is_file():
        tail = log_path.read_text().strip().splitlines()[-5:]
        return {"engine": name, "error": " | ".join(tail) or "no output"}
    return json.loads(result_path.read_text())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default=None, help="default sd-2.1-base (tiny with --quick)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 256; 64 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 3 with --quick)")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:n] or auto")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every engine")
    parser.add_argument("--batches", default=None, help="images per UNet throughput test (default 1,2,4; 1,2 quick)")
    parser.add_argument("--reps", type=int, default=None, help="timed UNet calls per throughput batch (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny model, a few seconds per engine")
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default ~/.cache/sdlite-bench)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--name", default=None, help="result file stem (default from the settings)")
    parser.add_argument("--openvino-cache", type=Path, default=None,
                        help="reuse converted UNets from this folder (default: convert afresh, as a cold start)")
    parser.add_argument("--runs", type=int, default=1,
                        help="fresh processes per engine, engines in turn; figures are their medians")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per engine")
    args = parser.parse_args(argv)
    quick = args.quick
    args.model = args.model or ("tiny" if quick else "sd-2.1-base")
    args.size = args.size or (64 if quick else 256)
    args.steps = args.steps or (3 if quick else 20)
    args.batches = [int(b) for b in (args.batches or ("1,2" if quick else "1,2,4")).split(",")]
    args.reps = args.reps or (1 if quick else 2)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in args.engines:
        if engine not in ENGINES:
            parser.error(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if args.size % 8 or args.size < 64:
        parser.error("--size must be a multiple of 8, at least 64")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = resolve_device(args.device, args.dtype)
    command = ("python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    print(f"building / finding the {args.model} model ...", flush=True)
    model = build_model(args.model, args.cache)
    sdxl = json.loads((model / "unet" / "config.json").read_text()).get("addition_embed_type") is not None
    spec = dict(model=str(model), device=device, dtype=dtype, height=args.size, width=args.size, steps=args.steps,
                sampler=args.sampler, cfg=args.cfg, seed=args.seed, threads=args.threads, batches=args.batches,
                reps=args.reps, prompt="a lighthouse on a cliff at dusk, oil painting", negative_prompt="blurry",
                gemm_sizes=gemm_sizes(args.quick, device), gemm_reps=3 if args.quick else 5)
    name = args.name or f"{args.model}-{args.size}px-{args.steps}steps-{device.replace(':', '')}-{dtype}"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"settings": {k: v for k, v in spec.items() if k not in ("gemm_sizes", "gemm_reps")},
               "model_name": args.model, "command": command, "commit": measured_commit(), "engines": {}, "notes": []}
    results["settings"]["model"] = args.model
    with tempfile.TemporaryDirectory(prefix="sdlite-bench-") as tmp:
        workdir = Path(tmp)
        print("probing the machine (matmul peak, UNet FLOPs) ...", flush=True)
        probe = run_process(dict(spec, engine="probe"), workdir, args.timeout)
        if "error" in probe:
            raise SystemExit(f"the probe failed: {probe['error']}")
        results["machine"], results["unet_flops"] = probe["machine"], probe["unet_flops"]
        engines = []
        for engine in args.engines:
            reason = engine_skip_reason(engine, device, dtype, sdxl)
            if reason:
                results["notes"].append(f"{engine} skipped: {reason}")
                print(f"{engine}: skipped ({reason})", flush=True)
            else:
                engines.append(engine)
        runs, failed = {engine: [] for engine in engines}, set()
        # unless a cache is given, each run converts afresh (a cold start) into a folder emptied after it
        fresh_cache = workdir / "openvino"
        spec["openvino_cache"] = str(args.openvino_cache or fresh_cache)
        for round_index in range(args.runs):
            for engine in [e for e in engines if e not in failed]:  # an engine that failed runs no more
                print(f"{engine} (run {round_index + 1} of {args.runs}) ...", flush=True)
                read_files(model)
                t0 = time.time()
                image = workdir / f"{engine}.png"
                result = run_process(dict(spec, engine=engine, image=str(image)), workdir, args.timeout)
                if "error" in result:
                    results["notes"].append(f"{engine} failed in run {round_index + 1}: {result['error']}")
                    print(f"{engine}: FAILED {result['error']}", flush=True)
                    failed.add(engine)
                else:
                    runs[engine].append(result)
                    print(f"{engine}: done in {time.time() - t0:.1f} s", flush=True)
            shutil.rmtree(fresh_cache, ignore_errors=True)  # GBs of IR for a full-size UNet
        results["engines"] = {engine: combine_runs(done) for engine, done in runs.items() if done}
        if args.runs > 1:
            results["notes"].append(f"Every figure is the median of an engine's runs ({args.runs} each unless said) in "
                                    "fresh processes, engines in turn (peak RSS: the largest); end to end in each "
                                    "run, in turn: " + "; ".join(
                                        f"{e} " + ", ".join(fmt(r["end_to_end_s"]) for r in done) + " s"
                                        + ("" if len(done) == args.runs else f" ({len(done)} of {args.runs} runs)")
                                        for e, done in runs.items() if done))
        reference = workdir / "diffusers.png"
        for engine, result in results["engines"].items():
            if reference.is_file():  # the same seed should give the same image in every engine
                result["max_pixel_diff_vs_diffusers"] = max_pixel_difference(workdir / f"{engine}.png", reference)
        if "openvino" in results["engines"]:
            how = "converted in this run" if results["engines"]["openvino"].get("converted") else "read from cache"
            results["notes"].append("openvino: sdlite with its OpenVINO UNet (sdlite.openvino: convert_model of "
                                    f"sdlite's UNet, {how}; static shapes, fp32, compiled for the CPU on first "
                                    "use, so the first step includes compiling); text encoder and VAE in torch")
        if results["machine"].get("accelerate") is None and "diffusers" in results["engines"]:
            results["notes"].append("diffusers: accelerate is not installed, so diffusers random-initialises its "
                                    "models before loading the weights (its default in this environment)")
    paths = write_report(results, args.out, name)
    print("\n" + paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return results


def measured_commit() -> str | None:
    """The repository's commit, with "+changes" where tracked files differ from it (files under
    benchmarks/results/ aside: runs write there), or None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if status.stdout.strip() else "")


def combine_runs(runs: list[dict]) -> dict:
    """One engine's figures from its runs: the last run's entry with every number the median of the
    runs' (per key for dicts such as images/s), the largest peak RSS, and under "runs" each run's
    end-to-end and first-step times. With one run, that run's entry as it is."""
    if len(runs) == 1:
        return runs[0]
    combined = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            combined[key] = max(values) if key.startswith("peak_") else statistics.median(values)
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            combined[key] = {k: statistics.median(r[key][k] for r in runs if k in r.get(key, {})) for k in value}
    combined["runs"] = {key: [r[key] for r in runs] for key in ("end_to_end_s", "unet_first_step_s")
                        if all(key in r for r in runs)}
    return combined


def read_files(folder: Path) -> None:
    """Read every file under `folder` once (into the page cache)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def max_pixel_difference(a: Path, b: Path) -> int:
    """Largest per-channel difference (0-255) between two images of the same size."""
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    return int(np.abs(x - y).max()) if x.shape == y.shape else 255


if __name__ == "__main__":
    main()
