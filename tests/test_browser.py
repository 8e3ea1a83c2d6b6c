"""The photo app in a real browser: headless Chromium, the page of a real `serve.py` on a free port, one upload.

Skips where no Chromium (or Playwright) is installed, unless FEATSTACK_REQUIRE_BROWSER=1 (CI), where that fails.
The README's picture, docs/serve.png, is the page as this test sees it: the test rewrites it whenever the page looks
different from it (see refresh_screenshot), so it cannot go stale; FEATSTACK_SCREENSHOT=PATH writes the screenshot
to PATH instead, and FEATSTACK_SCREENSHOT=off leaves every file alone.
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


SCREENSHOT = ROOT / "docs" / "serve.png"


def looks_different(new: Path, old: Path, ignore: dict | None = None) -> bool:
    """Whether two screenshots differ to the eye outside ``ignore`` (a Playwright bounding box: the run's id, which
    holds the time the run was made): another size, or more than 70 pixels (0.01 %) changed by more than 32 of 255.
    A changed word, number or style changes hundreds."""
    import numpy as np
    from PIL import Image

    if not old.is_file():
        return True
    with Image.open(new) as a, Image.open(old) as b:
        if a.size != b.size:
            return True
        changed = np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max(-1) > 32
    if ignore:
        x0, y0 = max(int(ignore["x"]) - 2, 0), max(int(ignore["y"]) - 2, 0)
        changed[y0:int(ignore["y"] + ignore["height"]) + 3, x0:int(ignore["x"] + ignore["width"]) + 3] = False
    return int(changed.sum()) > 70


def refresh_screenshot(shot: Path, ignore: dict | None = None) -> Path | None:
    """Put the test's screenshot where it belongs; the path written, or None. By default docs/serve.png, only when it
    looks different (outside ``ignore``), so a rerun on an unchanged page leaves the checkout clean and a changed page
    updates the README's picture (commit it; CI's checkout is thrown away, and nothing there checks it)."""
    wanted = os.environ.get("FEATSTACK_SCREENSHOT", "")
    if wanted.lower() in ("off", "0", "no"):
        return None
    target = Path(wanted) if wanted else SCREENSHOT
    if wanted or looks_different(shot, target, ignore):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copy(shot, tmp)
        os.replace(tmp, target)  # a reader never sees half a picture
        return target
    return None


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
        run_id_box = page.locator("#run strong").first.bounding_box()
        page.screenshot(path=str(tmp_path / "serve.png"))
    written = refresh_screenshot(tmp_path / "serve.png", run_id_box)
    if written:
        print(f"note: the page looks different from the README's picture: wrote {written}")
    if not os.environ.get("FEATSTACK_SCREENSHOT"):
        assert not looks_different(tmp_path / "serve.png", SCREENSHOT, run_id_box)  # the README shows the page

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


def test_the_readme_picture_is_rewritten_only_when_the_page_looks_different(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    readme_picture = tmp_path / "docs" / "serve.png"
    monkeypatch.setattr(sys.modules[__name__], "SCREENSHOT", readme_picture)
    monkeypatch.delenv("FEATSTACK_SCREENSHOT", raising=False)
    page = np.full((700, 1000, 3), 245, np.uint8)
    page[20:40, 28:300] = 20  # a heading
    shots = {}
    run_id = {"x": 60, "y": 50, "width": 240, "height": 10}
    for name, change in (("same", None), ("new_run_id", (slice(50, 60), slice(60, 300))),
                         ("one_word", (slice(20, 40), slice(310, 360))), ("speck", (slice(600, 605), slice(5, 10)))):
        shot = page.copy()
        if change:
            shot[change] = 90
        shots[name] = tmp_path / f"{name}.png"
        Image.fromarray(shot).save(shots[name])

    assert refresh_screenshot(shots["same"], run_id) == readme_picture  # none yet: written
    stamp = readme_picture.stat().st_mtime_ns
    for same in ("same", "new_run_id", "speck"):  # the run's id is its time; a few pixels are a font's hinting
        assert refresh_screenshot(shots[same], run_id) is None
    assert readme_picture.stat().st_mtime_ns == stamp  # a page that looks the same leaves the checkout clean
    assert refresh_screenshot(shots["new_run_id"]) == readme_picture  # not told where the id is: a change
    assert refresh_screenshot(shots["one_word"], run_id) == readme_picture  # a word of the heading
    assert readme_picture.read_bytes() == shots["one_word"].read_bytes()
    assert not list(readme_picture.parent.glob("*.tmp"))

    monkeypatch.setenv("FEATSTACK_SCREENSHOT", "off")
    assert refresh_screenshot(shots["same"]) is None
    assert readme_picture.read_bytes() == shots["one_word"].read_bytes()
    elsewhere = tmp_path / "out" / "page.png"
    monkeypatch.setenv("FEATSTACK_SCREENSHOT", str(elsewhere))
    assert refresh_screenshot(shots["same"]) == elsewhere and elsewhere.read_bytes() == shots["same"].read_bytes()
    assert readme_picture.read_bytes() == shots["one_word"].read_bytes()
