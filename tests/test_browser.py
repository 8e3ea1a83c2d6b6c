"""The photo app in a real browser: headless Chromium, the page of a real `serve.py` on a free port, one upload.

Skips where no Chromium (or Playwright) is installed, unless FEATSTACK_REQUIRE_BROWSER=1 (CI), where that fails.
FEATSTACK_SCREENSHOT=docs/serve.png also saves the page's screenshot there (the README's picture).
"""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import ROOT


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium's path; session-scoped so that it is checked before the session's demo run is built."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path, why = None, "playwright is not installed (pip install -r requirements-dev.txt)"
    else:
        why = "no Chromium on this machine (Debian: apt-get install chromium)"
    if path is None:
        if os.environ.get("FEATSTACK_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FEATSTACK_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def server(chromium, demo, tmp_path_factory):
    """`python serve.py --port 0` on the demo run; yields the URL it prints. One server for the module (each start
    pays TensorFlow's import and the compile of every batch shape); the first-answer test runs first, so its first
    photo is still the server's first forward pass."""
    tmp_path = tmp_path_factory.mktemp("serve")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(demo["run"]), "--port", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline = time.time() + 300
        url = None
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            found = re.search(r"at (http://\S+/) ", line)
            url = found and found.group(1)
        if url is None:
            proc.kill()
            pytest.fail(f"serve.py printed no URL: {(tmp_path / 'serve.log').read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def offline_page(chromium: str, blocked: list):
    """Headless Chromium's page whose requests to any host but this machine fail, as on a machine without a network;
    each such request is recorded in ``blocked``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield _offline_context(browser, blocked).new_page()
        finally:
            browser.close()


def _offline_context(browser, blocked: list):
    context = browser.new_context(viewport={"width": 1000, "height": 700})

    def route(r):
        if urlparse(r.request.url).hostname in ("127.0.0.1", "localhost"):
            return r.continue_()
        blocked.append(r.request.url)
        return r.abort("internetdisconnected")

    context.route("**/*", route)
    return context


@pytest.mark.slow
def test_first_answer_docs_offline_and_error_cards(chromium, demo, server):
    """The first answer within 2x a later one (the forward pass is compiled before the URL is printed); /docs
    renders with the network blocked; a photo that cannot be read gets a card without a broken image, naming the
    file once."""
    photos = sorted((demo["data"] / "test").glob("*.jpg"))[:4]
    blocked = []
    with offline_page(chromium, blocked) as page:
        page.goto(server)
        page.wait_for_function("document.querySelector('#run strong') !== null")  # the run is loaded
        # The unreadable file goes first: its round trip warms the page's upload path and the connection, which a
        # freshly started browser pays on its first upload, but it never reaches a forward pass, so the first photo
        # below is still the server's first forward pass after start.
        page.set_input_files('[data-testid="file-input"]',
                             files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"}])
        page.wait_for_selector('[data-state="failed"]', timeout=60_000)
        seconds = []
        for k, photo in enumerate(photos):
            t0 = time.perf_counter()
            page.set_input_files('[data-testid="file-input"]', str(photo))
            page.wait_for_function(f"document.querySelectorAll('[data-state=answered]').length === {k + 1}",
                                   timeout=120_000)
            seconds.append(time.perf_counter() - t0)

        card = page.query_selector('[data-state="failed"]')
        card_text = card.inner_text()
        card_images = card.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, "
                                                       "getComputedStyle(i).display])")
        error = card.query_selector('[data-testid="error"]').inner_text()
        progress_left = page.is_visible('[data-testid="progress"]')

        page.goto(server + "docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
        docs_text = page.inner_text("body")
    later = sorted(seconds[1:])[len(seconds[1:]) // 2]
    assert seconds[0] <= 2 * later, seconds
    assert card_text.count("notes.jpg") == 1 and "not an image" in error
    assert all(display == "none" or (done and width > 0) for done, width, display in card_images), card_images
    assert not progress_left  # every photo answered: the progress bar is gone
    assert "/api/predict" in docs_text and "featstack photo app" in docs_text
    assert blocked == []  # Swagger UI came from this server, not from a CDN


@pytest.mark.slow
def test_page_shows_predict_py_top_class_and_probability(chromium, demo, server, tmp_path):
    from featstack.commands.predict import main as predict_main

    photo = sorted((demo["data"] / "test").glob("*.jpg"))[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        predict_main(["--json", "--run", str(demo["run"]), str(photo)])
    [record] = json.loads(out.getvalue())
    top = record["predictions"][0]

    blocked = []
    with offline_page(chromium, blocked) as page:
        page.goto(server)
        page.set_input_files('[data-testid="file-input"]', str(photo))
        page.wait_for_selector('[data-testid="prediction"]', timeout=120_000)
        page.wait_for_function("document.querySelectorAll('[data-testid=example]').length === 0 || "
                               "[...document.querySelectorAll('[data-testid=example]')].every(i => i.complete)")
        rows = page.query_selector_all('[data-testid="prediction"]')
        shown = [(r.get_attribute("data-class"), float(r.get_attribute("data-probability")), r.inner_text())
                 for r in rows]
        header, banner = page.inner_text("header"), page.is_visible('[data-testid="random-weights-banner"]')
        title = page.title()
        page.screenshot(path=str(tmp_path / "serve.png"))
    if os.environ.get("FEATSTACK_SCREENSHOT"):
        shutil.copy(tmp_path / "serve.png", Path(os.environ["FEATSTACK_SCREENSHOT"]))

    assert len(shown) == 5
    name, probability, text = shown[0]
    assert name == top["class"] and abs(probability - top["probability"]) < 1e-5
    assert name in text and f"{100 * top['probability']:.2f} %" in text
    assert [s[1] for s in shown] == sorted((s[1] for s in shown), reverse=True)
    report = json.loads((demo["run"] / "report.json").read_text())
    assert f"holdout accuracy {report['holdout']['accuracy']:.4f}" in header and "Report" in header
    assert banner  # the demo fixture's features come from random weights
    assert "Which class is this?" in header and title == "featstack: which class is this?"  # digits, not breeds
    assert blocked == []  # nothing was asked of another host
