"""`ditlab serve`'s page in headless Chromium: pick two classes by name, press Generate, watch
the progress, and get the grid the API returns for the same settings. Skips when Chromium or its
driver is not installed (`.ci/run` installs Debian's chromium and chromium-driver)."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from serve_helpers import LiveServer, save_digits_checkpoint, wait_for  # noqa: E402

from ditlab.serve.app import create_app  # noqa: E402
from ditlab.serve.engine import Engine  # noqa: E402
from ditlab.serve.requests import Defaults, Limits  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,800"]


def chromium():
    """A headless Chromium driven by Selenium through the distribution's chromedriver, or a skip."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    return browser, driver, Options, Service


@pytest.fixture
def browser(tmp_path):
    path, driver, Options, Service = chromium()
    options = Options()
    options.binary_location = path
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=Service(driver))
    yield b
    b.quit()


def test_pick_3_and_7_generate_and_get_the_apis_grid(tmp_path, make_dit, browser):
    from selenium.webdriver.common.by import By

    ckpt = save_digits_checkpoint(tmp_path / "step-0000007.pt", make_dit(in_channels=3))
    steps = 30  # enough steps that the progress bar is seen moving
    served = create_app(Engine(ckpt, device="cpu"), Limits(max_steps=steps),
                        Defaults(steps=steps, per_class=3, cfg_scale=2.0), window_s=0.0)
    server = LiveServer(served.app)
    try:
        browser.get(server.url)
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#matches button.match"), "the class list")
        for name in ("3", "7"):
            box = browser.find_element(By.ID, "search")
            box.clear()
            box.send_keys(name)
            wait_for(lambda n=name: [b for b in browser.find_elements(By.CSS_SELECTOR, "#matches button.match")
                                     if b.get_attribute("data-id") == n], f"class {name} listed")[0].click()
        chosen = [s.get_attribute("data-id") for s in browser.find_elements(By.CSS_SELECTOR, "#chosen span.chosen")]
        assert chosen == ["3", "7"]
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("12")
        browser.find_element(By.ID, "generate").click()
        seen = set()

        def finished():
            value = browser.find_element(By.ID, "progress").get_attribute("value")
            seen.add(round(float(value), 3))
            return browser.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1"

        wait_for(finished, "the grid")
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 0
        assert len(seen - {0.0, 1.0}) >= 1, seen  # the bar moved through values between empty and full
        src = browser.find_element(By.ID, "grid").get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        page_png = base64.b64decode(src.split(",", 1)[1])
        record = json.loads(browser.find_element(By.ID, "record").text)
        assert record["labels"] == [3, 3, 3, 7, 7, 7] and record["seed"] == 12 and record["steps"] == steps
        assert browser.find_element(By.ID, "download").get_attribute("href") == src
        status, _, api_png = server.sample(classes=[3, 7], per_class=3, seed=12, steps=steps, cfg_scale=2.0,
                                           sampler="ddpm")
        assert status == 200
        page_grid = np.asarray(Image.open(io.BytesIO(page_png)).convert("RGB"))
        assert page_grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3) and page_grid.std() > 0
        assert np.array_equal(page_grid, np.asarray(Image.open(io.BytesIO(api_png)).convert("RGB")))
    finally:
        server.close()


def test_unconditional_models_hide_the_class_picker(tmp_path, make_dit, browser):
    from selenium.webdriver.common.by import By

    ckpt = save_digits_checkpoint(tmp_path / "uncond.pt", make_dit(in_channels=3, num_classes=0))
    server = LiveServer(create_app(Engine(ckpt, device="cpu"), Limits(max_steps=4), Defaults(steps=2)).app)
    try:
        browser.get(server.url)
        wait_for(lambda: "DiT depth" in browser.find_element(By.ID, "model").text, "the model line")
        assert not browser.find_element(By.ID, "picker").is_displayed()
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1", "the grid")
        assert json.loads(browser.find_element(By.ID, "record").text)["labels"] == []
    finally:
        server.close()
