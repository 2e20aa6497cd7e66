"""End to end in a real browser: Debian's headless Chromium, driven by Playwright, uses the operator page of a real
uvicorn server on a free loopback port."""

import base64
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serving import png_bytes, tiny_model

from inpformer.deploy import load_predictor
from inpformer.service.app import Settings, create_app

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Chromium not found at /usr/bin/chromium (Debian: apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feedback")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, feedback_dir):
    predictor = load_predictor(tiny_model(tmp_path_factory))
    settings = Settings(api_key="browser-key", feedback_dir=str(feedback_dir))
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, settings), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}/"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(server_url)
    page.fill("#api-key", "browser-key")
    page.dispatch_event("#api-key", "change")
    playwright.expect(page.locator("#model")).to_contain_text("tiny_random")
    yield page
    page.close()
    assert not errors, errors


def test_picked_image_shows_overlay_mask_score_and_decision(page, tmp_path):
    path = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    page.set_input_files("#files", str(path))

    card = page.locator(".card").first
    playwright.expect(card.locator(".decision")).to_have_text(re.compile(r"^(good|defective)$"))
    page.wait_for_function("document.querySelector('.card .overlay').naturalWidth > 0")
    assert card.locator(".overlay").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [80, 60]
    assert card.locator(".mask").evaluate("img => img.naturalWidth") == 80
    playwright.expect(card.locator(".details")).to_contain_text("vs threshold")
    assert card.locator(".fill").evaluate("el => el.style.width").endswith("%")
    decision = card.locator(".decision").inner_text()
    playwright.expect(page.locator("#recent tr")).to_have_count(1)
    playwright.expect(page.locator("#recent tr").first).to_contain_text("part.png")
    playwright.expect(page.locator("#recent tr").first).to_contain_text(decision)


def test_dropped_files_get_a_card_each_and_a_bad_one_fails_alone(page):
    good = base64.b64encode(png_bytes(32, 32, seed=5)).decode()
    page.evaluate("""(good) => {
        const bytes = Uint8Array.from(atob(good), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        files.items.add(new File(["plain text"], "notes.txt", { type: "text/plain" }));
        const drop = document.getElementById("drop");
        drop.dispatchEvent(new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true }));
    }""", good)

    playwright.expect(page.locator("#recent tr")).to_have_count(2)
    failed = page.locator(".card.error")
    playwright.expect(failed).to_have_count(1)
    playwright.expect(failed.locator(".details")).to_contain_text("notes.txt: cannot read image")
    playwright.expect(page.locator(".card:not(.error) .decision")).to_have_text(re.compile(r"^(good|defective)$"))


def test_an_operator_marks_a_wrong_decision_and_the_image_is_kept(page, tmp_path, feedback_dir):
    path = tmp_path / "marked.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    page.set_input_files("#files", str(path))

    card = page.locator(".card").first
    button = card.locator(".mark")
    playwright.expect(button).to_be_visible()
    decision = card.locator(".decision").inner_text()
    label = "good" if decision == "defective" else "defective"  # the button offers the opposite of the decision
    playwright.expect(button).to_have_text(re.compile(f"^This part is {label} "))
    button.click()
    playwright.expect(card.locator(".mark-status")).to_have_text(f"marked {label}: {label}/marked.png")
    playwright.expect(button).to_be_disabled()
    stored = feedback_dir / label / "marked.png"
    assert np.array_equal(np.asarray(Image.open(stored)), np.asarray(Image.open(path)))
    sidecar = json.loads(stored.with_suffix(".json").read_text())
    assert (sidecar["label"], sidecar["decision"], sidecar["source"]) == (label, decision, "marked.png")
