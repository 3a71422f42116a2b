"""`sdlite serve`: one loaded model behind the HTTP APIs that existing clients speak, and a web page.

- OpenAI: `POST /v1/images/generations` (prompt, n, size "WxH", response_format `b64_json` or
  `url`; sdlite's own fields negative_prompt, steps, cfg, sampler, seed are accepted too) and
  `GET /v1/models`, so the official `openai` client works with only `base_url` changed.
- The Stable Diffusion web UI (AUTOMATIC1111) API: `POST /sdapi/v1/txt2img` and `/img2img`,
  `GET /sdapi/v1/progress`, `POST /sdapi/v1/interrupt`, `GET /sdapi/v1/sd-models`, `/samplers`,
  `/options`. Its sampler names ("Euler a", "DPM++ 2M Karras", ...) and sdlite's are both accepted.
- sdlite's job API, which the page at `/` uses: `POST /sdlite/v1/jobs` answers at once with a job
  id; `GET /sdlite/v1/jobs/{id}` gives queue position, progress, preview and results;
  `DELETE` cancels; `GET /sdlite/v1/jobs/{id}/images/{i}.png` is a result with its metadata.
- `/openapi.json` and `/docs` describe all of it.

Every request is checked here, where it enters (sizes, steps, sampler, images, limits), and
answers 4xx with `{"error": {"message", "type", "code"}}` (OpenAI's shape; `detail` repeats the
message for FastAPI-style clients); the worker only ever sees valid jobs (`sdlite.jobs`). A full
queue answers 503 with Retry-After, and so do the requests still waiting when the server shuts
down. With an API key every path but the page (static HTML, which asks for the key) and the API
description needs `Authorization: Bearer KEY`.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import math
import random
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import __version__
from .images import WEBUI_SAMPLERS, to_rgb
from .jobs import FINISHED, Generation, Job, JobQueue, QueueFull

WEB = Path(__file__).parent / "web"
# Static, the same for everyone: the page, which asks for the key, and the API description,
# whose "Authorize" button takes it (a browser cannot send a key when it opens /docs).
PUBLIC_PATHS = ("/", "/docs", "/openapi.json")
MAX_SEED = 2**63


@dataclass(frozen=True)
class ServerOptions:
    """Limits and behaviour of a server; the `sdlite serve` options map one to one."""

    api_key: str | None = None  # None: no authentication (bind to localhost only)
    max_width: int = 1024  # pixels
    max_height: int = 1024
    max_steps: int = 150
    max_images: int = 8  # images per request: n, or batch_size x n_iter
    max_body: int = 32 * 2**20  # bytes of a request body (img2img sends base64 images)
    max_queue: int = 16  # jobs waiting; more are refused with 503
    workers: int = 1  # jobs run at a time
    preview: str = "auto"  # auto, approx (linear latent -> RGB), vae (full decode) or none
    preview_every: int = 2  # steps between previews
    keep_finished: int = 32  # finished jobs kept for the job API and `url` results
    cors_origins: tuple[str, ...] = field(default_factory=tuple)  # empty: CORS off


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def error_response(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}, "detail": message}
    return JSONResponse(body, status, headers=headers)


# -- request bodies -----------------------------------------------------------------------------


class OpenAIImageRequest(BaseModel):
    """OpenAI's images.generate body; fields of other image models (quality, style, ...) are ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    model: str | None = None  # ignored: the server has one model
    n: int | None = 1
    size: str | None = None  # "WxH" or "auto"; default the model's size
    response_format: Literal["url", "b64_json"] | None = "url"
    output_format: Literal["png"] | None = None
    stream: bool | None = False
    negative_prompt: str = ""
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    seed: int | None = None


class Txt2ImgRequest(BaseModel):
    """The web UI's txt2img body; its other fields (hires fix, face restoration, ...) are ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str | None = ""
    steps: int | None = Field(None, description="default: the model's")
    cfg_scale: float | None = Field(None, description="default: the model's; <= 1 turns guidance off")
    sampler_name: str | None = Field(None, description="a web UI name ('Euler a') or sdlite's ('euler_a')")
    sampler_index: str | None = Field(None, description="older clients' name for sampler_name")
    scheduler: str | None = Field(None, description="'Automatic' or 'Karras'")
    seed: int | None = Field(-1, description="-1 (or null): random")
    width: int | None = Field(None, description="default: the model's size (img2img: the image's)")
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., description="base64 images (a data: URL prefix is allowed); the first is used")
    denoising_strength: float = 0.75


class JobRequest(Txt2ImgRequest):
    """A job of sdlite's job API: txt2img, or img2img when init_images is given."""

    init_images: list[str] | None = None
    denoising_strength: float = 0.75


# -- the application ----------------------------------------------------------------------------


class Server:
    """The request handlers' shared state: the model, its job queue and the limits."""

    def __init__(self, sd, options: ServerOptions):
        self.sd = sd
        self.options = options
        self.queue = JobQueue(sd, options.max_queue, options.workers, options.preview, options.preview_every,
                              options.keep_finished)
        self.samplers = {}  # every name a client may use -> sdlite's name
        for name in (*sd.sampler_names, *sd.refused_samplers):
            for alias in (name, WEBUI_SAMPLERS.get(name, name), f"k_{name}"):
                self.samplers[alias.lower()] = name

    # checks, where the input enters

    def generation(self, r: Txt2ImgRequest, image: str | None = None, strength: float | None = None,
                   sampler: str | None = None, cfg: float | None = None) -> Generation:
        sd, o = self.sd, self.options
        steps = sd.default_steps if r.steps is None else r.steps
        if not 1 <= steps <= o.max_steps:
            raise ApiError(400, f"steps must be in [1, {o.max_steps}], got {steps}")
        cfg = sd.default_cfg if cfg is None else cfg
        if not math.isfinite(cfg) or not 0 <= cfg <= 100:
            raise ApiError(400, f"cfg_scale must be in [0, 100], got {cfg}")
        if r.batch_size < 1 or r.n_iter < 1 or r.batch_size * r.n_iter > o.max_images:
            raise ApiError(400, f"batch_size and n_iter must be at least 1 and give at most {o.max_images} images, "
                                f"got {r.batch_size} x {r.n_iter}")
        seed = -1 if r.seed is None else r.seed
        if seed != -1 and not 0 <= seed < MAX_SEED:
            raise ApiError(400, f"seed must be -1 (random) or in [0, 2^63), got {seed}")
        self.check_size(r.width, r.height)  # before an img2img source is resized to them
        source, digest = (None, None) if image is None else self.source_image(image, r.width, r.height)
        if source is not None:
            width, height = source.size
            if not 0 <= strength <= 1:
                raise ApiError(400, f"denoising_strength must be in [0, 1], got {strength}")
        else:
            width = sd.default_size[1] if r.width is None else r.width
            height = sd.default_size[0] if r.height is None else r.height
        self.check_size(width, height)
        try:
            sd.check_memory(height, width)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if sampler is None:
            sampler = r.sampler_name if r.sampler_name is not None else r.sampler_index
        sampler = self.sampler(sampler, r.scheduler)
        try:  # the schedule may not allow this many steps (more than its training timesteps)
            sd.num_denoising_steps(steps, 1.0 if source is None else strength, sampler)
        except (ValueError, IndexError) as e:
            raise ApiError(400, f"{steps} steps of {sampler} are not possible with this model ({e})") from None
        return Generation(
            prompt=r.prompt, negative_prompt=r.negative_prompt or "", steps=steps, cfg=float(cfg), sampler=sampler,
            seed=random.randrange(2**32) if seed == -1 else seed, width=width, height=height,
            batch_size=r.batch_size, n_iter=r.n_iter, image=source, image_sha256=digest,
            strength=None if source is None else float(strength),
        )

    def check_size(self, width: int | None, height: int | None) -> None:
        o, factor = self.options, self.sd.vae.config.downscale_factor
        for name, value, limit in (("width", width, o.max_width), ("height", height, o.max_height)):
            if value is not None and (value % 8 or not max(8, factor) <= value <= limit):
                raise ApiError(400, f"{name} must be a multiple of 8 in [{max(8, factor)}, {limit}], got {value}")

    def sampler(self, name: str | None, scheduler: str | None) -> str:
        if name is None or not name.strip():
            sampler = self.sd.default_sampler
        else:
            sampler = self.samplers.get(name.strip().lower())
            if sampler is None:
                known = ", ".join(f"{WEBUI_SAMPLERS.get(n, n)!r} ({n})" for n in self.sd.sampler_names)
                raise ApiError(400, f"unknown sampler {name!r}; choose one of {known}")
            why = self.sd.refused_samplers.get(sampler)
            if why is not None:
                raise ApiError(400, f"sampler {name!r} does not work with this model: {why}")
        if scheduler is None or scheduler.strip().lower() in ("", "automatic"):
            return sampler
        if scheduler.strip().lower() == "karras" and f"{sampler}_karras" in self.sd.sampler_names:
            return f"{sampler}_karras"
        if scheduler.strip().lower() == "karras" and sampler.endswith("_karras"):
            return sampler
        raise ApiError(400, f"scheduler {scheduler!r} is not available with sampler {sampler!r}: "
                            "use 'Automatic' (or 'Karras' with DPM++ 2M)")

    def source_image(self, data: str, width: int | None, height: int | None) -> tuple[Image.Image, str]:
        """An img2img source from base64 (or a data: URL): decoded, checked, fitted to the model."""
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:  # without whitespace: MIME base64 (the `base64` command, Java) breaks lines every 76 characters
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "init_images[0] is not valid base64") from None
        o = self.options
        try:
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > 16 * o.max_width * o.max_height:
                raise ApiError(400, f"the source image is {image.width}x{image.height} pixels: too large")
            image = to_rgb(image)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ApiError(400, f"init_images[0] is not an image PIL can read ({type(e).__name__})") from None
        if width is None and height is None and (image.width > o.max_width or image.height > o.max_height):
            raise ApiError(400, f"the source image is {image.width}x{image.height}, over the limit of "
                                f"{o.max_width}x{o.max_height}: give width and height to resize it")
        try:
            image = self.sd.fit_image(image, height, width)  # warns when it cuts to multiples of 64
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return image, hashlib.sha256(raw).hexdigest()

    # queue and waiting

    def submit(self, generation: Generation) -> Job:
        try:
            return self.queue.submit(generation)
        except QueueFull as e:
            raise ApiError(503, f"{e}; try again later", "server_busy",
                           {"Retry-After": str(self.retry_after())}) from None

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the mean job time so far, at least 1."""
        times = [j.finished - j.started for j in self.queue.jobs() if j.state in FINISHED and j.started]
        return max(1, math.ceil(sum(times) / len(times))) if times else 5

    async def wait(self, job: Job, request: Request) -> Job:
        """Wait for `job` without holding a thread; cancel it if the client goes away meanwhile."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished(_job):
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        async def disconnected():  # the body has been read: the next message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        self.queue.on_finish(job, finished)
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([done, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not done.done():
            self.queue.cancel(job)  # nobody is waiting for it any more
            raise ApiError(499, "the client closed the connection")
        if job.state == "failed":
            raise ApiError(500, f"generation failed: {job.error}", "server_error")
        if job.state == "cancelled" and self.queue.closed:
            raise ApiError(503, "the server is shutting down", "server_error")
        if job.state == "cancelled":
            raise ApiError(409, f"job {job.id} was cancelled")
        return job

    def job_json(self, job: Job, base_url: str, preview: bool = True) -> dict:
        return {
            "id": job.id, "state": job.state, "position": self.queue.position(job),
            "progress": job.progress, "step": job.step, "total_steps": job.total_steps, "eta": job.eta,
            "created": job.created, "started": job.started, "finished": job.finished, "error": job.error,
            "settings": job.generation.describe(), "preview_step": job.preview_step,
            "preview": b64(job.preview) if preview and job.preview and job.state == "running" else None,
            "images": [{"url": f"{base_url}sdlite/v1/jobs/{job.id}/images/{i}.png", "seed": r.seed,
                        "infotext": r.infotext} for i, r in enumerate(job.results)],
        }

    def find(self, job_id: str) -> Job:
        job = self.queue.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for {self.options.keep_finished} more jobs)")
        return job


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def webui_info(job: Job) -> str:
    """The web UI's `info` JSON; its per-image lists have one entry per image. sdlite has no
    variation seeds: subseed -1, strength 0."""
    g, n = job.generation, len(job.results)
    return json.dumps({
        "prompt": g.prompt, "negative_prompt": g.negative_prompt, "seed": g.seed,
        "all_prompts": [g.prompt] * n, "all_negative_prompts": [g.negative_prompt] * n,
        "all_seeds": [r.seed for r in job.results], "subseed": -1, "all_subseeds": [-1] * n,
        "subseed_strength": 0, "index_of_first_image": 0, "width": g.width, "height": g.height,
        "sampler_name": WEBUI_SAMPLERS.get(g.sampler, g.sampler), "cfg_scale": g.cfg, "steps": g.steps,
        "batch_size": g.batch_size, "n_iter": g.n_iter, "denoising_strength": g.strength,
        "infotexts": [r.infotext for r in job.results], "job_id": job.id,
        "interrupted": job.state == "interrupted", "version": f"sdlite {__version__}",
    })


class Guard:
    """ASGI middleware run before anything else: the origin of requests that change something,
    the API key, then the body size."""

    def __init__(self, app, api_key: str | None, max_body: int, cors_origins: tuple[str, ...] = ()):
        self.app, self.api_key, self.max_body, self.cors_origins = app, api_key, max_body, cors_origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        # Browsers send a POST without a body (the interrupt) from any web page with no CORS
        # preflight: one from another site than this server's page, and not allowed by
        # --cors-origin, is refused.
        if (origin and scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin not in self.cors_origins
                and urlsplit(origin).netloc != headers.get(b"host", b"").decode("latin-1")):
            response = error_response(403, f"a request from the web page at {origin} is refused: allow that origin "
                                           "with --cors-origin", "permission_error")
            return await response(scope, receive, send)
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode())):
                response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                          "authentication_error", {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            response = error_response(413, f"the request body is over the limit of {self.max_body} bytes")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():  # bodies without a Content-Length (chunked) are counted as they come
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, f"the request body is over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)


def create_app(sd, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI application serving `sd` (a loaded StableDiffusion)."""
    options = ServerOptions() if options is None else options
    server = Server(sd, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.queue.close()

    # With a key, the description declares the bearer scheme (the key itself is checked by Guard):
    # /docs then has an "Authorize" button and sends the key with its requests.
    bearer = [Depends(HTTPBearer(auto_error=False, description="the server's --api-key"))] if options.api_key else []
    app = FastAPI(title="sdlite", version=__version__, lifespan=lifespan, dependencies=bearer,
                  description="A Stable Diffusion server: OpenAI's images API, the web UI's API and sdlite's jobs.")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.kind, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, err['loc'][1:])) or 'body'}: {err['msg']}" for err in e.errors())
        return error_response(422, f"invalid request: {problems}")

    # the page

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    # OpenAI

    @app.post("/v1/images/generations", tags=["OpenAI"])
    async def openai_generate(body: OpenAIImageRequest, request: Request):
        if body.stream:
            raise ApiError(400, "stream is not supported")
        width = height = None
        if body.size not in (None, "auto"):
            match = re.fullmatch(r"(\d+)x(\d+)", body.size, re.ASCII)  # ASCII: int() refuses '²'
            if match is None:
                raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {body.size!r}")
            width, height = int(match[1]), int(match[2])
        n = 1 if body.n is None else body.n
        if not 1 <= n <= options.max_images:  # said in OpenAI's terms (the web UI's check names batch_size)
            raise ApiError(400, f"n must be from 1 to {options.max_images}, got {n}")
        webui = Txt2ImgRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                               seed=-1 if body.seed is None else body.seed, width=width, height=height, batch_size=n)
        job = await server.wait(server.submit(server.generation(webui, sampler=body.sampler, cfg=body.cfg)), request)
        base = str(request.base_url)
        data = [{"b64_json": b64(r.png)} if body.response_format == "b64_json" else
                {"url": f"{base}sdlite/v1/jobs/{job.id}/images/{i}.png"} for i, r in enumerate(job.results)]
        return {"created": int(job.created), "data": data, "output_format": "png"}

    @app.get("/v1/models", tags=["OpenAI"])
    async def openai_models():
        return {"object": "list", "data": [{"id": sd.name, "object": "model", "created": 0, "owned_by": "sdlite"}]}

    # the web UI's API

    async def webui_generate(request: Request, body: Txt2ImgRequest, image=None, strength=None):
        job = await server.wait(server.submit(server.generation(body, image, strength, cfg=body.cfg_scale)), request)
        parameters = body.model_dump(exclude={"init_images"})
        return {"images": [b64(r.png) for r in job.results], "parameters": parameters, "info": webui_info(job)}

    @app.post("/sdapi/v1/txt2img", tags=["web UI"])
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await webui_generate(request, body)

    @app.post("/sdapi/v1/img2img", tags=["web UI"])
    async def img2img(body: Img2ImgRequest, request: Request):
        if not body.init_images:
            raise ApiError(400, "init_images must hold one base64 image")
        return await webui_generate(request, body, body.init_images[0], body.denoising_strength)

    @app.get("/sdapi/v1/progress", tags=["web UI"])
    async def progress(skip_current_image: bool = False):
        queue = server.queue
        running = list(queue.running)
        job = running[0] if running else None
        steps = job.total_steps // job.generation.n_iter if job else 0
        return {
            "progress": job.progress if job else 0.0,
            "eta_relative": (job.eta or 0.0) if job else 0.0,
            "state": {
                "skipped": False, "interrupted": bool(job and job._interrupt.is_set()), "job": job.id if job else "",
                "job_count": len(queue.running) + len(queue.pending),
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)) if job else "0",
                "job_no": job.batch if job else 0, "sampling_step": job.step - job.batch * steps if job else 0,
                "sampling_steps": steps,
            },
            "current_image": b64(job.preview) if job and job.preview and not skip_current_image else None,
            "textinfo": None,
        }

    @app.post("/sdapi/v1/interrupt", tags=["web UI"])
    async def interrupt():
        return {"interrupted": server.queue.interrupt()}

    @app.get("/sdapi/v1/sd-models", tags=["web UI"])
    async def sd_models():
        return [{"title": sd.name, "model_name": sd.name, "hash": None, "sha256": None,
                 "filename": str(sd.path), "config": None}]

    @app.get("/sdapi/v1/samplers", tags=["web UI"])
    async def samplers():
        return [{"name": WEBUI_SAMPLERS.get(n, n), "aliases": [n, f"k_{n}"], "options": {}}
                for n in sd.sampler_names]

    @app.get("/sdapi/v1/options", tags=["web UI"])
    async def webui_options():
        return {"sd_model_checkpoint": sd.name}

    # sdlite's job API

    @app.get("/sdlite/v1/info", tags=["sdlite"])
    async def info():
        return {"version": __version__, "model": sd.name, "samplers": list(sd.sampler_names),
                "webui_samplers": {n: WEBUI_SAMPLERS.get(n, n) for n in sd.sampler_names},
                "preview": server.queue.preview,
                "defaults": {"steps": sd.default_steps, "cfg": sd.default_cfg, "sampler": sd.default_sampler,
                             "width": sd.default_size[1], "height": sd.default_size[0]},
                "limits": {k: getattr(options, k) for k in ("max_width", "max_height", "max_steps", "max_images",
                                                            "max_body", "max_queue", "workers")}}

    @app.post("/sdlite/v1/jobs", status_code=202, tags=["sdlite"])
    async def create_job(body: JobRequest, request: Request):
        image = body.init_images[0] if body.init_images else None
        job = server.submit(server.generation(body, image, body.denoising_strength if image else None,
                                              cfg=body.cfg_scale))
        return server.job_json(job, str(request.base_url))

    @app.get("/sdlite/v1/jobs", tags=["sdlite"])
    async def list_jobs(request: Request):
        return {"jobs": [server.job_json(j, str(request.base_url), preview=False) for j in server.queue.jobs()],
                "counts": dict(server.queue.counts), "pending": len(server.queue.pending),
                "running": len(server.queue.running)}

    @app.get("/sdlite/v1/jobs/{job_id}", tags=["sdlite"])
    async def get_job(job_id: str, request: Request):
        return server.job_json(server.find(job_id), str(request.base_url))

    @app.delete("/sdlite/v1/jobs/{job_id}", tags=["sdlite"])
    async def cancel_job(job_id: str, request: Request):
        job = server.find(job_id)
        server.queue.cancel(job)
        return server.job_json(job, str(request.base_url))

    @app.get("/sdlite/v1/jobs/{job_id}/images/{index}.png", tags=["sdlite"], response_class=Response)
    async def job_image(job_id: str, index: int):
        job = server.find(job_id)
        results = job.results  # one list: a cancel may replace it meanwhile
        if not 0 <= index < len(results):
            raise ApiError(404, f"job {job_id} has {len(results)} images (state {job.state})")
        return Response(results[index].png, media_type="image/png")

    app.add_middleware(Guard, api_key=options.api_key, max_body=options.max_body, cors_origins=options.cors_origins)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for `serve`: taken before the model loads, so that a port in use
    fails at once, with a one-line OSError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if sys.platform != "win32":  # there it would let a second server take the same port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()  # held: a second server on this port fails at once too
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(sd, host: str = "127.0.0.1", port: int = 7860, options: ServerOptions | None = None,
          sock: socket.socket | None = None) -> None:
    """Serve `sd` until interrupted (Ctrl-C), on `sock` if given (`listening_socket(host, port)`)."""
    sock = listening_socket(host, port) if sock is None else sock
    options = ServerOptions() if options is None else options
    if not is_loopback(host) and options.api_key is None:
        print(f"sdlite: warning: serving on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    app = create_app(sd, options)
    if is_loopback(host):  # against DNS rebinding: a web page whose name now points here gets 400
        names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted(names))
    port = sock.getsockname()[1]  # the one the system chose for port 0
    print(f"sdlite: serving {sd.name} at http://{host}:{port}/ (API docs at /docs)", file=sys.stderr, flush=True)
    uvicorn_server(app, log_level="warning", timeout_graceful_shutdown=5).run(sockets=[sock])


def uvicorn_server(app: FastAPI, **config):
    """A uvicorn server for `app` (from `create_app`) that closes the job queue first when it shuts
    down, so the requests waiting for jobs get their 503 before the connections close (uvicorn
    would cut them off with a bare 500 after its grace period); a job still in a step when the
    queue's timeout ends is cut off."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await asyncio.to_thread(app.state.server.queue.close)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, **config))
