"""Helpers for the server tests: run the real uvicorn server in a thread on a free loopback port,
and small JSON-over-HTTP calls with urllib (the tests need no HTTP client library of their own)."""

import base64
import contextlib
import io
import json
import threading
import time
import urllib.error
import urllib.request

from PIL import Image


@contextlib.contextmanager
def running(app):
    """Serve `app` (from create_app) with uvicorn in a thread, as `sdlite serve` does; yields its
    base URL (http://127.0.0.1:PORT)."""
    from sdlite.server import listening_socket, uvicorn_server

    sock = listening_socket("127.0.0.1", 0)  # the kernel picks a free port; no race with other tests
    server = uvicorn_server(app, log_level="warning", timeout_graceful_shutdown=2)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def call(url: str, body=None, method: str | None = None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60):
    """(status, headers, parsed JSON or bytes) of one request; errors are answers too, not exceptions."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, content = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, head, content = e.code, e.headers, e.read()
    if head.get("Content-Type", "").startswith("application/json"):
        content = json.loads(content)
    return status, head, content


def png_from_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def wait_for(predicate, timeout: float = 30, interval: float = 0.02):
    """Poll `predicate()` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
