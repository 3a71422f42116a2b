"""The job queue behind `sdlite serve`: generation jobs run in worker threads, in order, while the
HTTP server keeps answering.

- `Generation` is everything that decides a job's pixels, already checked against the model and the
  server's limits (see `sdlite.server`); `n_iter` batches of `batch_size` images, batch k seeded
  with `seed + k * batch_size`, as the web UIs number their seeds.
- `JobQueue.submit` appends a `Job` to a bounded queue (`QueueFull` when it is full); `workers`
  threads (default one) take jobs in order and run the pipeline's latents generator step by step,
  so every job reports its step, a preview of the denoising every few steps, and stops between
  two steps when cancelled (no result) or interrupted (the images decoded from the latents so far,
  as the web UI's Interrupt does).
- Results are PNG files with the command line's metadata (`sdlite.cli.png_metadata`), so
  `sdlite generate --from-png` redoes a server image. Finished jobs are kept for `keep_finished`
  more jobs, then forgotten, so memory stays flat however long the server runs.
- Previews: "vae" decodes the latents for real; "approx" maps latent channels linearly to RGB (the
  web UIs' "Approx cheap" preview), with a map that `fit_latent_rgb` fits once per model on a few
  encoded images instead of hard-coded factors; "auto" (the default) decodes for real when one
  decode takes under `CHEAP_DECODE` seconds (small models, GPUs), else uses the linear map.

No web framework here: the queue is usable and testable on its own.
"""

import io
import itertools
import secrets
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from PIL import Image

from . import cli, images
from .pipeline import BUNDLED_MODEL

PREVIEW_METHODS = ("auto", "approx", "vae", "none")
CHEAP_DECODE = 0.05  # seconds: "auto" previews with real VAE decodes below this
FINISHED = ("done", "interrupted", "cancelled", "failed")


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs; try again later."""


class Cancelled(Exception):
    pass


@dataclass
class Generation:
    """What decides the pixels of a job (checked before it is queued)."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg: float
    sampler: str
    seed: int  # of the first batch; batch k uses seed + k * batch_size
    width: int
    height: int
    batch_size: int = 1  # images per batch (one generator draws the noise of all of them)
    n_iter: int = 1  # batches, run one after the other
    image: Image.Image | None = None  # img2img: the source, already fitted to width x height
    image_sha256: str | None = None  # img2img: hash of the uploaded file
    strength: float | None = None  # img2img: 0 keeps the image, 1 replaces it with noise

    @property
    def mode(self) -> str:
        return "txt2img" if self.strength is None else "img2img"

    def settings(self, sd, batch: int) -> cli.Settings:
        """The command line's record of batch number `batch`, as `sdlite generate` would write it."""
        bundled = sd.path.resolve() == BUNDLED_MODEL.resolve()
        return cli.Settings(
            mode=self.mode, prompt=self.prompt, negative_prompt=self.negative_prompt,
            model=None if bundled else str(sd.path.resolve()), n_images=self.batch_size, steps=self.steps,
            cfg=self.cfg, sampler=self.sampler, seed=self.seed + batch * self.batch_size,
            height=self.height, width=self.width, device=str(sd.device), dtype=str(sd.dtype).removeprefix("torch."),
            image_sha256=self.image_sha256, strength=self.strength,
        )

    def describe(self) -> dict:
        """JSON-friendly settings (for the job API and the gallery's 'reuse')."""
        described = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "image"}  # not asdict:
        return {**described, "mode": self.mode}  # it would deep-copy the source image


@dataclass
class Result:
    png: bytes  # the image with the command line's PNG metadata
    seed: int  # the seed of its batch
    infotext: str  # the web UI `parameters` text, as in the PNG


@dataclass
class Job:
    id: str
    generation: Generation
    total_steps: int  # over all batches
    state: str = "queued"  # queued, running, then done, interrupted, cancelled or failed
    step: int = 0  # denoising steps finished, over all batches
    batch: int = 0  # the batch being denoised
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    preview: bytes | None = None  # PNG of the latest preview
    preview_step: int = 0
    results: list[Result] = field(default_factory=list)
    error: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _interrupt: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: list = field(default_factory=list, repr=False)

    @property
    def progress(self) -> float:
        if self.state in ("done", "interrupted"):
            return 1.0
        return self.step / self.total_steps if self.total_steps else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the steps done so far."""
        if self.state != "running" or not self.step:
            return None
        elapsed = time.time() - self.started
        return elapsed * (self.total_steps - self.step) / self.step


class JobQueue:
    """A bounded FIFO of generation jobs, run by `workers` threads on one loaded model."""

    def __init__(self, sd, max_queue: int = 16, workers: int = 1, preview: str = "auto",
                 preview_every: int = 2, keep_finished: int = 32):
        if preview not in PREVIEW_METHODS:
            raise ValueError(f"preview must be one of {', '.join(PREVIEW_METHODS)}, got {preview!r}")
        self.sd = sd
        self.max_queue = max_queue
        self.preview = preview if preview != "auto" else "vae" if decode_seconds(sd) < CHEAP_DECODE else "approx"
        self.preview_every = preview_every
        self.keep_finished = keep_finished
        self.latent_rgb = fit_latent_rgb(sd) if self.preview == "approx" else None
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self.counts = dict(submitted=0, rejected=0, **{state: 0 for state in FINISHED})
        self._lock = threading.Condition()
        self.closed = False  # set by close: no job is taken any more
        self._threads = [threading.Thread(target=self._work, name=f"sdlite-worker-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # -- what the HTTP handlers call ----------------------------------------------------------

    def submit(self, generation: Generation) -> Job:
        steps = self.sd.num_denoising_steps(generation.steps, 1.0 if generation.image is None else generation.strength,
                                            generation.sampler)
        with self._lock:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)")
            job = Job(id=secrets.token_hex(8), generation=generation,
                      total_steps=steps * generation.n_iter)
            self.pending.append(job)
            self.counts["submitted"] += 1
            self._lock.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            for job in itertools.chain(self.running, self.pending):
                if job.id == job_id:
                    return job
            return self.finished.get(job_id)

    def position(self, job: Job) -> int:
        """0 for a running or finished job, else how many jobs run before it (1: it is next)."""
        with self._lock:
            try:
                return self.pending.index(job) + 1
            except ValueError:
                return 0

    def jobs(self) -> list[Job]:
        with self._lock:
            return [*self.running, *self.pending, *reversed(self.finished.values())]

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue; a running one stops after its current step, without result."""
        with self._lock:
            if job in self.pending:
                self.pending.remove(job)
                self._finish(job, "cancelled")
                return
        job._cancel.set()

    def interrupt(self) -> int:
        """The running jobs stop after their current step and return what they have; how many."""
        with self._lock:
            for job in self.running:
                job._interrupt.set()
            return len(self.running)

    def on_finish(self, job: Job, callback) -> None:
        """Call `callback(job)` once the job is finished (at once if it is), from any thread."""
        with self._lock:
            if job.state not in FINISHED:
                job._callbacks.append(callback)
                return
        callback(job)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel waiting jobs, interrupt running ones and stop the workers; once (later calls return)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            while self.pending:
                self._finish(self.pending.popleft(), "cancelled")
            for job in self.running:
                job._cancel.set()
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # -- the workers -------------------------------------------------------------------------

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        # Called with the lock held.
        job.state, job.error, job.finished = state, error, time.time()
        job.generation.image = None  # the source of an img2img job is not needed any more
        job.preview = None  # nor the last preview: previews are shown while a job runs
        if job in self.running:
            self.running.remove(job)
        self.finished[job.id] = job
        while len(self.finished) > self.keep_finished:
            self.finished.popitem(last=False)
        self.counts[state] += 1
        callbacks, job._callbacks = job._callbacks, []
        for callback in callbacks:
            callback(job)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self.pending and not self.closed:
                    self._lock.wait()
                if self.closed:
                    return
                job = self.pending.popleft()
                job.state, job.started = "running", time.time()
                self.running.append(job)
            try:
                interrupted = self._run(job)
                state, error = ("interrupted" if interrupted else "done"), None
            except Cancelled:
                job.results = []  # a cancelled job has no result, not even the batches it finished
                state, error = "cancelled", None
            except Exception as e:  # a bad job must never take the worker down
                traceback.print_exc()
                state, error = "failed", f"{type(e).__name__}: {e}"
            with self._lock:
                self._finish(job, state, error)

    def _run(self, job: Job) -> bool:
        """Denoise every batch of `job`, filling its step, preview and results; True if interrupted."""
        sd, g = self.sd, job.generation
        for batch in range(g.n_iter):
            job.batch = batch
            kwargs = dict(negative_prompt=g.negative_prompt, n_images=g.batch_size, steps=g.steps, cfg=g.cfg,
                          seed=g.seed + batch * g.batch_size, sampler=g.sampler)
            if g.image is None:
                latents_steps = sd.generate_latents(g.prompt, height=g.height, width=g.width, **kwargs)
            else:
                latents_steps = sd.generate_latents_from_image(g.image, g.prompt, g.strength, **kwargs)
            latents = None
            for i, latents in latents_steps:
                job.step += 1
                if job._cancel.is_set():
                    raise Cancelled
                if job._interrupt.is_set():
                    break
                if self.preview != "none" and (i + 1) % self.preview_every == 0:
                    job.preview, job.preview_step = self._preview(latents), job.step
            latents_steps = None  # after an interrupt: its frame (text projections, sampler state) goes now
            if latents is None:  # img2img at strength 0: no step, the image comes back
                decoded = [g.image.copy() for _ in range(g.batch_size)]
            else:
                decoded = sd.decode(latents)
            settings = g.settings(sd, batch)
            for index, image in enumerate(decoded):
                parameters, record = cli.png_metadata(settings, sd.name, {"kind": "image", "index": index})
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", pnginfo=images.png_info(parameters, record))
                job.results.append(Result(buffer.getvalue(), settings.seed, parameters))
            if job._interrupt.is_set():
                return True
        return False

    def _preview(self, latents: torch.Tensor) -> bytes:
        """A PNG of the batch's latents, side by side (a grid of one row)."""
        if self.preview == "vae":
            pictures = self.sd.decode(latents)
        else:
            pictures = latents_to_rgb(latents, self.latent_rgb, self.sd.vae.config.downscale_factor)
        buffer = io.BytesIO()
        images.make_grid(pictures, 1).save(buffer, format="PNG")
        return buffer.getvalue()


@torch.inference_mode()
def decode_seconds(sd) -> float:
    """How long one VAE decode of a default-size latent takes (the second of two runs)."""
    factor = sd.vae.config.downscale_factor
    z = torch.zeros((1, sd.unet.config.in_channels, sd.default_size[0] // factor, sd.default_size[1] // factor),
                    device=sd.device, dtype=sd.dtype)
    sd.decode(z)
    start = time.perf_counter()
    sd.decode(z)
    return time.perf_counter() - start


@torch.inference_mode()
def fit_latent_rgb(sd, size: int = 16, samples: int = 8, seed: int = 0) -> torch.Tensor:
    """A (C + 1, 3) least-squares map from a latent pixel (and 1) to the mean RGB of the image
    pixels it encodes, fitted on `samples` smooth random colour fields encoded by the VAE."""
    factor = sd.vae.config.downscale_factor
    generator = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.rand((samples, 3, 4, 4), generator=generator) * 2 - 1  # 4x4 random colours in [-1, 1]
    pixels = F.interpolate(coarse, size=(size * factor, size * factor), mode="bilinear", align_corners=False)
    z = sd.vae.encode(pixels.to(sd.device, sd.vae_dtype)).mean.float().cpu() * sd.vae.config.scaling_factor
    rgb = F.avg_pool2d(pixels, factor)  # (S, 3, size, size): the colour under each latent pixel
    channels = z.shape[1]
    x = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(z.numel() // channels, 1)], dim=1)
    return torch.linalg.lstsq(x, rgb.permute(0, 2, 3, 1).reshape(-1, 3)).solution


def latents_to_rgb(latents: torch.Tensor, latent_rgb: torch.Tensor, scale: int) -> list[Image.Image]:
    """Latents (N, C, h, w) -> N images of (h * scale, w * scale) pixels through the linear map."""
    z = latents.detach().float().cpu().permute(0, 2, 3, 1)  # (N, h, w, C)
    rgb = z @ latent_rgb[:-1] + latent_rgb[-1]  # (N, h, w, 3) in [-1, 1]
    pixels = ((rgb / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST) for p in pixels]
