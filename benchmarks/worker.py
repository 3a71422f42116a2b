"""One engine's benchmark, run in a fresh process by `benchmarks.run` so that import time, cold
start and peak memory are measured the same way for every engine.

    python -m benchmarks.worker SPEC.json RESULT.json

Nothing heavy is imported at module level: the import of the engine (torch included) is the first
thing timed. Each engine is an adapter with the same five operations (load, generate, unet, plus
the timers hooked on its text encoder, UNet and VAE decoder), so every figure means the same work:

- sdlite:    sdlite's StableDiffusion pipeline.
- sdlite-low-memory: the same with low_memory=True: the text encoder is loaded for each encoding
             and the VAE for each decoding (so their timings include loading them).
- diffusers: diffusers' pipeline named in model_index.json (StableDiffusionPipeline or
             StableDiffusionXLPipeline) with the matching scheduler.
- openvino:  sdlite's pipeline with sdlite.openvino's backend: the same UNet converted with
             `openvino.convert_model` (IR cached on disk), compiled per batch at a static shape
             for the CPU in fp32; the text encoder and VAE run in torch (sdlite's).
"""

import json
import resource
import sys
import time

STARTED = time.time()

DIFFUSERS_SCHEDULERS = {  # sdlite sampler -> (diffusers scheduler class, config overrides)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Clock:
    """Wall-clock timer that waits for the GPU when there is one."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def wrap(self, obj, method: str, into: list):
        """Replace obj.method by a version that appends its duration to `into`."""
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            t0 = self.now()
            out = original(*args, **kwargs)
            into.append(self.now() - t0)
            return out

        setattr(obj, method, timed)


class SdliteEngine:
    low_memory = False

    def __init__(self, spec):
        self.spec = spec

    def import_(self):
        import torch  # noqa: F401

        from sdlite import StableDiffusion  # noqa: F401

    def load(self):
        import torch

        from sdlite import StableDiffusion

        s = self.spec
        self.sd = StableDiffusion.from_pretrained(s["model"], device=s["device"], dtype=getattr(torch, s["dtype"]),
                                                  low_memory=self.low_memory)

    def parts(self):
        """{"text" | "unet" | "vae": [(object, method name)]}: the calls whose durations are summed as
        text encoding, UNet steps and VAE decoding."""
        encoders = [m for m in (self.sd.text_encoder, self.sd.text_encoder_2) if m is not None]
        return {"text": [(m, "forward") for m in encoders], "unet": [(self.sd.unet, "forward")],
                "vae": [(self.sd.vae, "decode")]}

    def generate(self):
        s = self.spec
        return self.sd.text_to_image(s["prompt"], negative_prompt=s["negative_prompt"], steps=s["steps"], cfg=s["cfg"],
                                     seed=s["seed"], sampler=s["sampler"], height=s["height"], width=s["width"])

    def unet(self, x, t, context, added_cond):
        # With CFG both texts denoise the same latents, which sdlite's pipeline hands its UNet once.
        samples = x[: len(x) // 2] if self.spec["cfg"] > 1 else x
        return self.sd.unet(samples, t, context, added_cond)


class DiffusersEngine(SdliteEngine):
    def import_(self):
        """torch and the pipeline class model_index.json names (StableDiffusion(XL)Pipeline): only
        what loading this model imports, as diffusers imports its modules lazily."""
        from pathlib import Path

        import diffusers
        import torch  # noqa: F401

        index = json.loads((Path(self.spec["model"]) / "model_index.json").read_text())
        self.pipeline_class = getattr(diffusers, index["_class_name"])

    def load(self):
        import inspect

        import diffusers
        import torch

        s = self.spec
        pipeline_class = self.pipeline_class
        has_checker = "safety_checker" in inspect.signature(pipeline_class).parameters  # SD 1/2, not SDXL
        extra = dict(safety_checker=None, requires_safety_checker=False) if has_checker else {}
        pipe = pipeline_class.from_pretrained(s["model"], torch_dtype=getattr(torch, s["dtype"]), **extra)
        pipe = pipe.to(s["device"])
        name, overrides = DIFFUSERS_SCHEDULERS[s["sampler"]]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def parts(self):
        encoders = [getattr(self.pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        return {"text": [(m, "forward") for m in encoders if m is not None], "unet": [(self.pipe.unet, "forward")],
                "vae": [(self.pipe.vae, "decode")]}

    def generate(self):
        import torch

        s = self.spec
        return self.pipe(s["prompt"], negative_prompt=s["negative_prompt"], num_inference_steps=s["steps"],
                         guidance_scale=s["cfg"], height=s["height"], width=s["width"],
                         generator=torch.Generator("cpu").manual_seed(s["seed"])).images

    def unet(self, x, t, context, added_cond):
        return self.pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added_cond).sample


class SdliteLowMemoryEngine(SdliteEngine):
    low_memory = True

    def parts(self):
        # The text encoders and the VAE exist only while used: time the pipeline calls that load
        # and run them (the VAE's includes the conversion to PIL images, a few ms).
        sdxl = self.sd.text_encoder_2 is not None
        return {"text": [(self.sd, "encode_prompt_sdxl" if sdxl else "encode_prompt")],
                "unet": [(self.sd.unet, "forward")], "vae": [(self.sd, "decode")]}


class OpenVINOEngine(SdliteEngine):
    """sdlite's pipeline with `sdlite.openvino.use_openvino`: the UNet converted by OpenVINO
    (static shapes per batch, fp32, `threads` threads); text encoder and VAE in torch."""

    def import_(self):
        super().import_()
        import openvino  # noqa: F401

    def load(self):
        from sdlite.openvino import use_openvino

        super().load()
        s = self.spec
        t0 = time.perf_counter()
        use_openvino(self.sd, s["height"], s["width"], cache_dir=s["openvino_cache"], threads=s["threads"])
        self.timings = {"convert_s": time.perf_counter() - t0, "converted": self.sd.unet.converted}


def unet_inputs(spec: dict, batch: int, device: str, generator=None) -> tuple:
    """Random (latents, text states, SDXL added conditioning or None) for one UNet call on `batch`
    samples at the benchmark's size, shaped from the model's unet/config.json."""
    from pathlib import Path

    import torch

    config = json.loads((Path(spec["model"]) / "unet" / "config.json").read_text())
    dtype = getattr(torch, spec["dtype"])

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    h, w = spec["height"] // 8, spec["width"] // 8
    x, context = randn(batch, config["in_channels"], h, w), randn(batch, 77, config["cross_attention_dim"])
    added_cond = None
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + size/crop ids
        time_ids = torch.tensor([[spec["height"], spec["width"], 0, 0, spec["height"], spec["width"]]], dtype=dtype)
        pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added_cond = {"text_embeds": randn(batch, pooled_dim), "time_ids": time_ids.repeat(batch, 1).to(device)}
    return x, context, added_cond


def probe(spec: dict) -> dict:
    """Facts about the machine and the work, shared by all engines: the UNet's FLOPs per call
    (counted once by FlopCounterMode on sdlite's UNet built on the meta device, so no memory and
    no time is spent) and the matmul peak (best of repeated square GEMMs) in the benchmark's
    dtype, device and thread count."""
    from pathlib import Path

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdlite.config import UNetConfig
    from sdlite.unet import UNet2DConditionModel

    torch.set_num_threads(spec["threads"])
    config = UNetConfig.from_json(json.loads((Path(spec["model"]) / "unet" / "config.json").read_text()))
    flops = {}
    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(config).to(dtype)
    for n in spec["batches"]:
        x, context, added_cond = unet_inputs(spec, 2 * n if spec["cfg"] > 1 else n, "meta")
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor(500.0, device="meta"), context, added_cond)
        flops[n] = counter.get_total_flops()
    clock = Clock(device)
    best = {}  # GEMM -> best GFLOP/s
    for size in spec["gemm_sizes"]:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        gemms = {"torch.mm": lambda: torch.mm(a, b)}
        if device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # oneDNN's GEMM on a prepacked weight, as sdlite's Linear runs it: on CPUs where
            # torch.mm's BLAS takes a slower code path (AVX2 on an AVX-512 AMD CPU: 215 against
            # 494 GFLOP/s) it is the machine's peak; the UNets' convolutions run on oneDNN too.
            packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
            gemms["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        for name, gemm in gemms.items():
            gemm()
            for _ in range(spec["gemm_reps"]):
                t0 = clock.now()
                gemm()
                best[name] = max(best.get(name, 0.0), 2 * size**3 / (clock.now() - t0) / 1e9)
    machine = {"gemm_peak_gflops": max(best.values()), "gemm_gflops": best, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpu": cpu_name()}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    try:
        import importlib.metadata as metadata

        for package in ("diffusers", "transformers", "openvino", "accelerate"):
            try:
                machine[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                machine[package] = None
    except ImportError:
        pass
    return {"engine": "probe", "unet_flops": flops, "machine": machine}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


ENGINES = {"sdlite": SdliteEngine, "sdlite-low-memory": SdliteLowMemoryEngine, "diffusers": DiffusersEngine,
           "openvino": OpenVINOEngine}


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    if spec["engine"] == "probe":
        with open(result_path, "w") as f:
            json.dump(probe(spec), f, indent=2)
        return
    result = {"engine": spec["engine"], "startup_s": STARTED - spec["spawned"]}
    engine = ENGINES[spec["engine"]](spec)

    t0 = time.perf_counter()
    engine.import_()
    result["import_s"] = time.perf_counter() - t0

    import torch

    torch.set_num_threads(spec["threads"])
    clock = Clock(spec["device"])
    t0 = clock.now()
    engine.load()
    result["load_s"] = clock.now() - t0
    result.update(getattr(engine, "timings", {}))
    result["cold_start_s"] = time.time() - spec["spawned"]  # process spawn -> model ready
    result["rss_after_load_mb"] = peak_rss_mb()

    times = {"text": [], "unet": [], "vae": []}
    for part, calls in engine.parts().items():
        for obj, method in calls:
            clock.wrap(obj, method, times[part])
    with torch.inference_mode():
        t0 = clock.now()
        images = engine.generate()
        result["end_to_end_s"] = clock.now() - t0
    result["first_image_s"] = time.time() - spec["spawned"]  # process spawn -> first image
    result["peak_rss_mb"] = peak_rss_mb()
    if spec["device"].startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    steps = list(times["unet"])  # the hooks stay: later calls must not count here
    result["text_encoding_s"] = sum(times["text"])
    result["unet_first_step_s"] = steps[0]
    rest = sorted(steps[1:]) or steps
    result["unet_step_s"] = rest[len(rest) // 2]
    result["unet_steps"] = steps
    result["vae_decode_s"] = sum(times["vae"])
    images[0].save(spec["image"])

    # UNet throughput: n images with CFG is one UNet call on 2n text contexts (and n latents for
    # sdlite's engines, 2n for diffusers).
    throughput = {}
    for n in spec["batches"]:
        batch = 2 * n if spec["cfg"] > 1 else n
        if batch == len(images) * (2 if spec["cfg"] > 1 else 1):
            throughput[n] = n / result["unet_step_s"]  # the shape the generation just ran
            continue
        x, context, added_cond = unet_inputs(spec, batch, spec["device"], torch.Generator().manual_seed(0))
        calls = []
        with torch.inference_mode():
            for _ in range(1 + spec["reps"]):  # the first call warms up
                t0 = clock.now()
                engine.unet(x, torch.tensor(500.0), context, added_cond)
                calls.append(clock.now() - t0)
        calls = sorted(calls[1:])
        throughput[n] = n / calls[len(calls) // 2]
    result["unet_images_per_s"] = throughput
    result["final_rss_mb"] = peak_rss_mb()
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
