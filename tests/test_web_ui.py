"""The web page of `sdlite serve` in a real browser: headless Chromium (the system's, driven by
Playwright) loads `/`, types a prompt, presses Generate, sees the progress bar move and the live
preview, then an image in the gallery; reuses its settings; drops an image for img2img (one over the
server's limits too); leaves boxes empty; sees a failed Cancel. Screenshots go to artifacts/
(web-ui.png, web-ui-img2img.png)."""

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import running  # noqa: E402

from sdlite import StableDiffusion  # noqa: E402
from sdlite.server import ServerOptions, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records, from before the click, every value the progress bar shows and whether a preview appeared.
WATCH = """() => {
  window.seen = { progress: [], preview: false };
  new MutationObserver(() => {
    window.seen.progress.push(+document.getElementById("bar").getAttribute("aria-valuenow"));
    const preview = document.getElementById("preview");
    if (preview.style.display === "block" && preview.src.startsWith("data:image/png")) window.seen.preview = true;
  }).observe(document.body, { attributes: true, subtree: true, attributeFilter: ["aria-valuenow", "src", "style"] });
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def sd(reference_model):
    return StableDiffusion.from_pretrained(reference_model("sd1"))


@pytest.fixture(scope="module")
def url(sd):
    with running(create_app(sd, ServerOptions(preview_every=1))) as base:
        yield base


def open_page(browser, url):
    """(page, the list of its JavaScript errors) with the page loaded."""
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('sampler').options.length > 0")  # /sdlite/v1/info loaded
    return page, errors


def drop(page, image: Image.Image):
    """Drop `image` (as a PNG file) on the page's drop zone."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    page.evaluate("""(data) => {
      const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
      const transfer = new DataTransfer();
      transfer.items.add(new File([bytes], "source.png", { type: "image/png" }));
      document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
    }""", base64.b64encode(buffer.getvalue()).decode())
    page.wait_for_selector("#source:not([hidden])")


def test_generate_in_the_browser(browser, url):
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page, errors = open_page(browser, url)
    assert page.input_value("#width") == "64" and page.input_value("#sampler") == "pndm"

    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "60")  # long enough to watch the bar move (~1 s on the tiny model)
    page.fill("#seed", "42")
    page.evaluate(WATCH)
    page.click("#generate")
    page.wait_for_selector("#gallery .result img", timeout=60_000)
    page.wait_for_function("document.querySelector('#gallery .result img').naturalWidth === 64")
    seen = page.evaluate("window.seen")
    assert any(0 < value < 100 for value in seen["progress"]), seen["progress"]
    assert seen["progress"][-1] == 100 and seen["preview"]
    assert "Seed: 42" in page.inner_text("#gallery .result pre")
    assert page.inner_text("#status").startswith("Done")
    page.screenshot(path=str(artifacts / "web-ui.png"))

    # Reuse puts the image's settings back into the form.
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    page.click("#gallery .result button")
    assert page.input_value("#prompt") == "a red circle on a blue background" and page.input_value("#seed") == "42"

    # img2img: drop an image on the drop zone.
    drop(page, Image.new("RGB", (64, 64), (30, 200, 30)))
    page.fill("#steps", "10")
    page.press("#prompt", "Control+Enter")  # the keyboard shortcut of Generate
    page.wait_for_function("document.querySelectorAll('#gallery .result').length === 2", timeout=60_000)
    assert "Denoising strength: 0.75" in page.inner_text("#gallery .result pre")
    page.screenshot(path=str(artifacts / "web-ui-img2img.png"))
    assert not errors


def test_img2img_with_an_image_over_the_limits(browser, sd):
    with running(create_app(sd, ServerOptions(max_width=128, max_height=128))) as base:
        page, errors = open_page(browser, base)
        drop(page, Image.new("RGB", (512, 256), (30, 200, 30)))
        # The size boxes get the image's size scaled down to fit 128x128, and stay editable.
        page.wait_for_function("document.getElementById('width').value === '128'", timeout=5_000)
        assert page.input_value("#height") == "64" and page.is_editable("#width") and page.is_editable("#height")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_selector("#gallery .result img", timeout=60_000)
        page.wait_for_function("document.querySelector('#gallery .result img').naturalWidth === 128")
        assert page.evaluate("document.querySelector('#gallery .result img').naturalHeight") == 64
        assert not errors


def test_empty_boxes_use_the_defaults(browser, url):
    page, errors = open_page(browser, url)
    page.fill("#cfg", "")
    page.fill("#seed", "")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/sdlite/v1/jobs")) as request:
        page.click("#generate")
    sent = request.value.post_data_json
    assert "cfg_scale" not in sent and "seed" not in sent  # not 0: that would turn guidance off, fix the seed
    page.wait_for_selector("#gallery .result img", timeout=60_000)
    assert page.inner_text("#status").startswith("Done") and not errors


def test_a_failed_cancel_is_shown(browser, url):
    page, errors = open_page(browser, url)

    def refuse_cancel(route):
        if route.request.method == "DELETE":
            route.fulfill(status=500, json={"error": {"message": "the server said no"}})
        else:
            route.continue_()

    page.route("**/sdlite/v1/jobs/*", refuse_cancel)
    page.fill("#steps", "150")  # with 4 images, a few seconds to press Cancel in
    page.fill("#n", "4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Step')", timeout=30_000)
    with page.expect_event("dialog", timeout=5_000) as dialog:
        page.click("#cancel")
    assert dialog.value.message == "Cancel failed: the server said no"
    dialog.value.dismiss()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=60_000)
    assert not errors
