"""`sdlite serve` end to end: the real uvicorn server on a free loopback port, serving a tiny random
model (64x64 px), driven by the official `openai` client and by plain HTTP as web UI clients do:
results and their PNG metadata (replayed by the command line), progress and interrupt while a job
runs, queue order / position / cancel / 503 when full, every kind of bad input, the API key, and
the `sdlite serve` command itself."""

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import b64_png, call, png_from_b64, running, wait_for  # noqa: E402

from sdlite import StableDiffusion, cli  # noqa: E402
from sdlite.server import ServerOptions, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LONG = 500  # steps of a job that the tests always interrupt or cancel (~10 s if it ran out)
OPTIONS = ServerOptions(max_steps=2000, max_body=2**20, max_queue=4, preview_every=1)


@pytest.fixture(scope="module")
def model_path(reference_model):
    return reference_model("sd1")


@pytest.fixture(scope="module")
def sd(model_path):
    return StableDiffusion.from_pretrained(model_path)


@pytest.fixture(scope="module")
def url(sd):
    with running(create_app(sd, OPTIONS)) as base:
        yield base


def job(url, **body):
    status, _, answer = call(f"{url}/sdlite/v1/jobs", {"prompt": "a cat", **body})
    assert status == 202, answer
    return answer


def job_state(url, job_id):
    return call(f"{url}/sdlite/v1/jobs/{job_id}")[2]


def finished(url, job_id):
    return wait_for(lambda: (s := job_state(url, job_id))["state"] in ("done", "interrupted", "cancelled", "failed") and s)


# -- OpenAI ---------------------------------------------------------------------------------------


def test_openai_client(url, sd):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(prompt="a red circle", n=2, size="64x64", response_format="b64_json",
                                    extra_body={"steps": 3, "seed": 5, "negative_prompt": "blue"})
    images = [png_from_b64(item.b64_json) for item in answer.data]
    assert [image.size for image in images] == [(64, 64)] * 2
    expected = sd.text_to_image("a red circle", negative_prompt="blue", n_images=2, steps=3, seed=5)
    for image, reference in zip(images, expected):
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(reference))
    record = json.loads(images[1].text["sdlite"])
    assert record["settings"]["seed"] == 5 and record["settings"]["n_images"] == 2
    assert record["file"] == {"kind": "image", "index": 1, "step": None}

    answer = client.images.generate(prompt="a red circle", extra_body={"steps": 2})  # response_format url
    status, headers, png = call(answer.data[0].url)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(png)).size == sd.default_size

    for size in ("large", "²x²"):  # '²' is a digit to str.isdigit, not to int()
        with pytest.raises(openai.BadRequestError, match="size must be"):
            client.images.generate(prompt="x", size=size)
    with pytest.raises(openai.BadRequestError, match="multiple of 8"):
        client.images.generate(prompt="x", size="60x64")
    for n in (0, 9):
        with pytest.raises(openai.BadRequestError, match=f"n must be from 1 to 8, got {n}"):
            client.images.generate(prompt="x", n=n)
    assert client.models.list().data[0].id == sd.name


def test_preview_methods(sd):
    from sdlite.jobs import Generation, JobQueue

    generation = Generation("a cat", "", steps=4, cfg=7.5, sampler="ddim", seed=0, width=64, height=48)
    for method in ("approx", "vae", "auto"):
        queue = JobQueue(sd, preview=method, preview_every=1)
        assert queue.preview == ("vae" if method == "auto" else method)  # a tiny model decodes in no time
        made, preview = [], queue._preview
        queue._preview = lambda latents: made.append(preview(latents)) or made[-1]
        job = queue.submit(generation)
        wait_for(lambda: job.state == "done")
        queue.close()
        assert len(made) == 4 and Image.open(io.BytesIO(made[-1])).size == (64, 48) and len(job.results) == 1
        assert job.preview is None  # a finished job keeps its images, not its last preview


def test_two_workers_give_the_same_images(sd):
    from sdlite.jobs import Generation, JobQueue

    queue = JobQueue(sd, workers=2, preview="none")
    generations = [Generation("a cat", "", steps=20, cfg=7.5, sampler=sampler, seed=seed, width=64, height=64)
                   for sampler, seed in (("euler_a", 1), ("ddim", 2))]
    jobs = [queue.submit(g) for g in generations]
    wait_for(lambda: queue.counts["done"] == 2)
    assert all(j.started < min(k.finished for k in jobs) for j in jobs)  # side by side
    queue.close()
    for job, g in zip(jobs, generations):
        expected = sd.text_to_image("a cat", steps=20, sampler=g.sampler, seed=g.seed)[0]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(job.results[0].png)).convert("RGB")),
                                      np.asarray(expected))


def test_a_failing_job_does_not_stop_the_worker(sd, monkeypatch):
    from sdlite.jobs import FINISHED, Generation, JobQueue

    real_decode, calls = sd.decode, []

    def decode(latents, *args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real_decode(latents, *args)

    monkeypatch.setattr(sd, "decode", decode)
    queue = JobQueue(sd, preview="none")
    generation = Generation("a cat", "", steps=2, cfg=7.5, sampler="ddim", seed=0, width=64, height=64)
    first, second = queue.submit(generation), queue.submit(generation)
    wait_for(lambda: second.state in FINISHED)
    queue.close()
    assert first.state == "failed" and first.error == "RuntimeError: out of memory"
    assert second.state == "done" and len(second.results) == 1


def test_a_cancelled_job_keeps_no_finished_batch(sd, monkeypatch):
    from sdlite.jobs import FINISHED, Generation, JobQueue

    queue = JobQueue(sd, preview="none")  # no preview: decode runs once per batch
    real_decode = sd.decode

    def decode(latents, *args):  # cancel as the first batch ends
        for job in queue.jobs():
            queue.cancel(job)
        return real_decode(latents, *args)

    monkeypatch.setattr(sd, "decode", decode)
    job = queue.submit(Generation("a cat", "", steps=2, cfg=7.5, sampler="ddim", seed=0, width=64, height=64, n_iter=3))
    wait_for(lambda: job.state in FINISHED)
    queue.close()
    assert job.state == "cancelled" and job.results == []


def test_default_keep_finished_is_the_same_everywhere():
    import inspect

    from sdlite.jobs import JobQueue

    assert inspect.signature(JobQueue).parameters["keep_finished"].default == ServerOptions().keep_finished


# -- the web UI's API -----------------------------------------------------------------------------


def test_txt2img_webui_names_metadata_and_cli_replay(url, model_path, tmp_path):
    body = {"prompt": "a blue square", "negative_prompt": "red", "steps": 3, "cfg_scale": 4,
            "sampler_name": "Euler a", "seed": 7, "batch_size": 1, "n_iter": 2, "width": 64, "height": 48,
            "enable_hr": False}  # a web UI field sdlite does not have: ignored
    status, _, answer = call(f"{url}/sdapi/v1/txt2img", body)
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [7, 8] and info["sampler_name"] == "Euler a"
    assert info["all_prompts"] == ["a blue square"] * 2 and info["all_negative_prompts"] == ["red"] * 2
    assert info["all_subseeds"] == [-1, -1] and info["index_of_first_image"] == 0
    assert len(answer["images"]) == 2
    image = png_from_b64(answer["images"][1])
    assert image.size == (64, 48)
    assert "Sampler: Euler a" in image.text["parameters"] and "Seed: 8" in image.text["parameters"]
    assert image.text["parameters"] == info["infotexts"][1]
    record = json.loads(image.text["sdlite"])
    assert record["settings"]["sampler"] == "euler_a" and record["settings"]["model"] == str(Path(model_path).resolve())

    # The command line redoes a server image from its metadata, pixel for pixel.
    (tmp_path / "server.png").write_bytes(base64.b64decode(answer["images"][1]))
    assert cli.main(["generate", "--from-png", str(tmp_path / "server.png"), "-o", str(tmp_path / "cli.png"), "-q"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")),
                                  np.asarray(image.convert("RGB")))

    # DPM++ 2M with the Karras schedule, as newer web UIs send it (older ones say sampler_index); the
    # random seed (-1 or null) is drawn; a null negative prompt is an empty one.
    status, _, answer = call(f"{url}/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "sampler_index": "DPM++ 2M",
                                                          "scheduler": "Karras", "seed": None, "negative_prompt": None})
    assert status == 200
    settings = json.loads(png_from_b64(answer["images"][0]).text["sdlite"])["settings"]
    assert settings["sampler"] == "dpmpp_2m_karras" and 0 <= settings["seed"] < 2**32


def test_img2img(url, tmp_path, capsys):
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    encoded = b64_png(source)
    mime = base64.encodebytes(base64.b64decode(encoded)).decode()  # lines of 76 characters, as `base64` writes
    assert "\n" in mime.strip()
    for init in (encoded, f"data:image/png;base64,{encoded}", mime):
        status, _, answer = call(f"{url}/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [init], "steps": 4,
                                                              "denoising_strength": 0.5, "seed": 1})
        assert status == 200, answer
        image = png_from_b64(answer["images"][0])
        assert image.size == (64, 64)
        settings = json.loads(image.text["sdlite"])["settings"]
        assert settings["mode"] == "img2img" and settings["strength"] == 0.5
        assert settings["image_sha256"] == hashlib.sha256(base64.b64decode(encoded)).hexdigest()
        assert "Denoising strength: 0.5" in image.text["parameters"]

    # A 16-bit greyscale source keeps its tones, as on the command line (sdlite.images.to_rgb).
    grey = Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16))  # 128 in 8 bits
    body = {"prompt": "a cat", "init_images": [b64_png(grey)], "steps": 1, "denoising_strength": 0.0}
    status, _, grey_answer = call(f"{url}/sdapi/v1/img2img", body)
    assert status == 200 and np.asarray(png_from_b64(grey_answer["images"][0]).convert("L")).max() == 128

    # The command line redoes it given the source, which the record does not name.
    (tmp_path / "server.png").write_bytes(base64.b64decode(answer["images"][0]))
    (tmp_path / "source.png").write_bytes(base64.b64decode(encoded))
    replay = ["generate", "--from-png", str(tmp_path / "server.png"), "-o", str(tmp_path / "cli.png"), "-q"]
    assert cli.main(replay) == 2 and "give the source with --image FILE" in capsys.readouterr().err
    assert cli.main([*replay, "--image", str(tmp_path / "source.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")),
                                  np.asarray(image.convert("RGB")))


def test_models_samplers_openapi_docs(url, sd):
    assert call(f"{url}/sdapi/v1/sd-models")[2][0]["model_name"] == sd.name
    samplers = call(f"{url}/sdapi/v1/samplers")[2]
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= {s["name"] for s in samplers}
    schema = call(f"{url}/openapi.json")[2]
    assert {"/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress",
            "/sdlite/v1/jobs"} <= set(schema["paths"])
    status, headers, page = call(f"{url}/docs")
    assert status == 200 and b"swagger" in page.lower()
    status, headers, page = call(f"{url}/")
    assert status == 200 and b'id="generate"' in page
    assert "access-control-allow-origin" not in {k.lower() for k in call(f"{url}/sdapi/v1/samplers",
                                                                             headers={"Origin": "http://x.test"})[1]}


def test_samplers_the_model_refuses_are_not_offered():
    from sdlite.pipeline import BUNDLED_MODEL

    sd = StableDiffusion.from_pretrained(BUNDLED_MODEL)  # zero terminal SNR: PNDM cannot run it
    with running(create_app(sd, ServerOptions(preview="none"))) as base:
        assert "PLMS" not in {s["name"] for s in call(f"{base}/sdapi/v1/samplers")[2]}
        info = call(f"{base}/sdlite/v1/info")[2]
        assert "pndm" not in info["samplers"] and "pndm" not in info["webui_samplers"]
        assert {"ddim", "euler_a", "dpmpp_2m_karras"} <= set(info["samplers"])
        status, _, answer = call(f"{base}/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "sampler_name": "PLMS"})
        message = answer["error"]["message"]
        assert status == 400 and message.startswith("sampler 'PLMS' does not work with this model: PNDMScheduler")


def test_progress_and_interrupt_while_a_job_runs(url):
    answers = []
    request = threading.Thread(target=lambda: answers.append(
        call(f"{url}/sdapi/v1/txt2img", {"prompt": "a cat", "steps": LONG, "seed": 3})))
    request.start()
    seen = []

    def moving():
        start = time.monotonic()
        status, _, progress = call(f"{url}/sdapi/v1/progress")
        assert status == 200 and time.monotonic() - start < 2, "the server must answer while a job runs"
        seen.append(progress)
        steps = [p["state"]["sampling_step"] for p in seen if p["state"]["job"]]
        return len(set(steps)) >= 3 and progress["current_image"]

    wait_for(moving, timeout=20)
    progress = seen[-1]
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert progress["state"]["sampling_steps"] >= LONG and progress["state"]["job_count"] == 1
    assert png_from_b64(progress["current_image"]).size == (64, 64)  # the live preview
    assert call(f"{url}/sdapi/v1/interrupt", {})[2] == {"interrupted": 1}
    request.join(30)
    status, _, answer = answers[0]
    assert status == 200 and json.loads(answer["info"])["interrupted"] is True
    assert png_from_b64(answer["images"][0]).size == (64, 64)  # what the interrupted job had
    assert call(f"{url}/sdapi/v1/progress")[2]["state"]["job_count"] == 0


def test_queue_order_position_and_cancel(url):
    first = job(url, steps=LONG)
    wait_for(lambda: job_state(url, first["id"])["state"] == "running")
    second, third, fourth = job(url, steps=2, seed=2), job(url, steps=2, seed=3), job(url, steps=2, seed=4)
    assert [job_state(url, j["id"])["position"] for j in (first, second, third, fourth)] == [0, 1, 2, 3]
    cancelled = call(f"{url}/sdlite/v1/jobs/{third['id']}", method="DELETE")[2]
    assert cancelled["state"] == "cancelled"
    assert job_state(url, fourth["id"])["position"] == 2
    assert call(f"{url}/sdlite/v1/jobs/{first['id']}", method="DELETE")[2]["id"] == first["id"]  # the running one
    states = {name: finished(url, j["id"]) for name, j in (("first", first), ("second", second), ("fourth", fourth))}
    assert states["first"]["state"] == "cancelled" and not states["first"]["images"]
    assert states["second"]["state"] == states["fourth"]["state"] == "done"
    assert states["second"]["started"] <= states["fourth"]["started"]  # in order
    status, headers, png = call(states["fourth"]["images"][0]["url"])
    assert status == 200 and json.loads(Image.open(io.BytesIO(png)).text["sdlite"])["settings"]["seed"] == 4
    assert call(f"{url}/sdlite/v1/jobs/nope")[0] == 404


def test_a_client_that_goes_away_cancels_its_job(url):
    with pytest.raises(OSError):  # the client's timeout: it closes the connection
        call(f"{url}/sdapi/v1/txt2img", {"prompt": "gone", "steps": LONG}, timeout=1)
    gone = next(j for j in call(f"{url}/sdlite/v1/jobs")[2]["jobs"] if j["settings"]["prompt"] == "gone")
    assert finished(url, gone["id"])["state"] == "cancelled"


def test_full_queue_answers_503_with_retry_after(sd):
    with running(create_app(sd, ServerOptions(max_queue=1, max_steps=2000))) as base:
        running_job = job(base, steps=LONG)
        wait_for(lambda: job_state(base, running_job["id"])["state"] == "running")
        waiting = job(base, steps=2)
        status, headers, answer = call(f"{base}/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})
        assert status == 503 and "queue is full" in answer["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        call(f"{base}/sdlite/v1/jobs/{running_job['id']}", method="DELETE")
        assert finished(base, waiting["id"])["state"] == "done"


def test_requests_waiting_when_the_server_shuts_down_get_503(sd):
    answers = {}

    def request(name):
        answers[name] = call(f"{base}/sdapi/v1/txt2img", {"prompt": name, "steps": LONG})

    threads = [threading.Thread(target=request, args=(name,)) for name in ("running", "waiting")]
    with running(create_app(sd, ServerOptions(max_steps=2000))) as base:
        threads[0].start()
        wait_for(lambda: any(j["state"] == "running" for j in call(f"{base}/sdlite/v1/jobs")[2]["jobs"]))
        threads[1].start()
        wait_for(lambda: len(call(f"{base}/sdlite/v1/jobs")[2]["jobs"]) == 2)
    for thread in threads:
        thread.join(30)
    for status, _, answer in answers.values():
        assert status == 503 and answer["error"]["message"] == "the server is shutting down"
    assert set(answers) == {"running", "waiting"}


def test_a_size_too_large_for_the_device_is_a_400(url, monkeypatch):
    import sdlite.pipeline

    monkeypatch.setattr(sdlite.pipeline, "device_memory", lambda device: 2**10)
    status, _, answer = call(f"{url}/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})
    assert status == 400 and "too large for this device" in answer["error"]["message"]


BAD_REQUESTS = [
    ("txt2img", {"width": 65}, 400, "width must be a multiple of 8"),
    ("txt2img", {"height": 4096}, 400, "height must be a multiple of 8 in [8, 1024]"),
    ("txt2img", {"steps": 0}, 400, "steps must be in [1, 2000]"),
    ("txt2img", {"steps": 5000}, 400, "steps must be in"),
    ("txt2img", {"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"sampler_name": "Heun"}, 400, "unknown sampler 'Heun'"),
    ("txt2img", {"sampler_name": "Euler", "scheduler": "Exponential"}, 400, "scheduler 'Exponential'"),
    ("txt2img", {"seed": -7}, 400, "seed must be -1"),
    ("txt2img", {"batch_size": 3, "n_iter": 3}, 400, "at most 8 images"),
    ("txt2img", {"cfg_scale": "nan"}, 400, "cfg_scale must be in"),
    ("img2img", {"init_images": ["not base64!"]}, 400, "not valid base64"),
    ("img2img", {"init_images": [base64.b64encode(b"plain text, no image").decode()]}, 400, "not an image"),
    ("img2img", {"init_images": []}, 400, "init_images must hold one"),
    ("img2img", {"init_images": [b64_png(Image.new("RGB", (32, 32)))]}, 400, "at least 64x64"),
    ("img2img", {"init_images": [b64_png(Image.new("RGB", (64, 64)))], "denoising_strength": 2}, 400, "[0, 1]"),
    ("img2img", {"init_images": [b64_png(Image.new("RGB", (64, 64)))], "width": 10**6}, 400, "width must be"),
    ("img2img", {"init_images": [b64_png(Image.new("RGB", (2048, 64)))]}, 400, "give width and height"),
    ("img2img", {}, 422, "init_images: Field required"),
]


@pytest.mark.parametrize("endpoint, body, status, message", BAD_REQUESTS)
def test_bad_input_is_a_clear_4xx(url, endpoint, body, status, message):
    got, _, answer = call(f"{url}/sdapi/v1/{endpoint}", {"prompt": "x", "steps": 2, **body})
    assert got == status and message in answer["error"]["message"], answer
    assert answer["detail"] == answer["error"]["message"]


def test_bad_bodies_and_the_worker_survives(url):
    status, _, answer = call(f"{url}/sdapi/v1/txt2img", raw=b"{not json")
    assert status == 422 and "JSON" in answer["error"]["message"]
    # Too large by its Content-Length: refused before the body is read.
    head = raw_http(url, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (2**20 + 1))
    assert head.startswith(b"HTTP/1.1 413") and b"over the limit" in head
    # Too large as it streams in (chunked, no Content-Length).
    chunk = b"%x\r\n%s\r\n" % (2**19, b" " * 2**19)
    head = raw_http(url, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3)
    assert head.startswith(b"HTTP/1.1 413") and b"over the limit" in head
    status, _, answer = call(f"{url}/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})
    assert status == 200 and len(answer["images"]) == 1


def raw_http(url: str, data: bytes) -> bytes:
    """Send raw bytes to the server and return what it answers (up to 64 KiB)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while b"}" not in answer and len(answer) < 2**16:
            part = sock.recv(4096)
            if not part:
                break
            answer += part
    return answer


def test_api_key(sd):
    openai = pytest.importorskip("openai")
    key = "s3cret-key"
    with running(create_app(sd, ServerOptions(api_key=key, cors_origins=("http://ui.test",)))) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            for path in ("/sdapi/v1/samplers", "/sdlite/v1/jobs", "/v1/models"):
                status, _, answer = call(f"{base}{path}", headers=headers)
                assert status == 401 and "API key" in answer["error"]["message"]
        assert call(f"{base}/sdapi/v1/samplers", headers={"Authorization": f"Bearer {key}"})[0] == 200
        assert call(f"{base}/")[0] == 200  # the page is static; it asks for the key
        # /docs opens in a browser, which sends no key; its "Authorize" button takes the bearer key.
        assert call(f"{base}/docs")[0] == 200
        schema = call(f"{base}/openapi.json")[2]
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert schema["paths"]["/sdapi/v1/txt2img"]["post"]["security"] == [{"HTTPBearer": []}]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        answer = client.images.generate(prompt="x", response_format="b64_json", extra_body={"steps": 2})
        assert png_from_b64(answer.data[0].b64_json).size == (64, 64)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        preflight = call(f"{base}/sdapi/v1/txt2img", method="OPTIONS", headers={
            "Origin": "http://ui.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight[0] == 200 and preflight[1]["access-control-allow-origin"] == "http://ui.test"


def test_requests_from_other_sites_that_change_something_are_refused(sd):
    # A web page can POST without a body (the interrupt) to any server, with no CORS preflight.
    with running(create_app(sd, ServerOptions(cors_origins=("http://ui.test",)))) as base:
        interrupt = f"{base}/sdapi/v1/interrupt"
        status, _, answer = call(interrupt, method="POST", headers={"Origin": "http://evil.example"})
        assert status == 403 and "--cors-origin" in answer["error"]["message"]
        assert call(interrupt, method="POST", headers={"Origin": base})[0] == 200  # the server's own page
        assert call(interrupt, method="POST", headers={"Origin": "http://ui.test"})[0] == 200  # allowed
        assert call(interrupt, method="POST")[0] == 200  # not from a browser
        assert call(f"{base}/sdapi/v1/samplers", headers={"Origin": "http://evil.example"})[0] == 200  # reads: CORS


def test_serve_command(model_path, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "SDLITE_API_KEY": "k"}
    process = subprocess.Popen([sys.executable, "-m", "sdlite", "serve", "--model", str(model_path), "--port", str(port),
                                "--max-steps", "10"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer k"}

        def up():
            try:
                return call(f"{base}/sdlite/v1/info", headers=auth, timeout=2)[0] == 200
            except OSError:
                assert process.poll() is None, process.stderr.read()
        wait_for(up, timeout=60, interval=0.2)
        assert call(f"{base}/sdlite/v1/info", headers=auth)[2]["limits"]["max_steps"] == 10
        assert call(f"{base}/sdapi/v1/txt2img", {"prompt": "x", "steps": 11}, headers=auth)[0] == 400
        assert call(f"{base}/sdapi/v1/txt2img", {"prompt": "x", "steps": 2}, headers=auth)[0] == 200
        # Bound to loopback, only loopback names may be in the Host header (against DNS rebinding).
        assert call(f"{base}/sdlite/v1/info", headers={**auth, "Host": f"localhost:{port}"})[0] == 200
        assert call(f"{base}/sdlite/v1/info", headers={**auth, "Host": f"evil.example:{port}"})[0] == 400
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(20)
    assert f"at http://127.0.0.1:{port}/" in process.stderr.read()
    usage = subprocess.run([sys.executable, "-m", "sdlite", "serve", "--port", "http"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "--port" in usage.stderr
    from sdlite.server import listening_socket

    held = listening_socket("127.0.0.1", 0)  # held from the start: a second server cannot take it
    with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
        listening_socket("127.0.0.1", held.getsockname()[1])
    held.close()
    with socket.socket() as taken:  # a port in use: one line, before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([sys.executable, "-m", "sdlite", "serve", "--model", "nowhere", "--port",
                               str(taken.getsockname()[1])], env=env, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1:" in busy.stderr


def test_load_test_short_form(model_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import load_test

    report = load_test.run(model=str(model_path), requests=12, max_queue=3, steps=2, rounds=2)
    assert report["answered"] + report["rejected"] == 12 and report["rejected"] > 0 and report["answered"] > 0
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["errors"] == []
    assert report["progress_max_s"] < 2
