"""The demo in a real headless browser (not collected by pytest: no test_ prefix).

Debian's ``chromium`` driven through its ``chromedriver`` by selenium (both named by path, so selenium's
own driver manager never runs and nothing is downloaded): open the page, upload images, choose a prior, press
Classify, read the top class the page shows and save a screenshot. ``tests/test_demo.py`` runs it on a
tiny model (``pytest -m browser``); to look at the demo of any model by hand:

    apt-get install -y chromium chromium-driver
    python tests/demo_browser.py runs/cifar10-lt cat.png dog.png --screenshot demo.png   # then open demo.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# The headless browser stays off the network: no background requests, updates, sync or QUIC.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def browser_paths() -> tuple[str, str] | None:
    """Debian's chromium and chromedriver, or ``None`` when either is missing."""
    browser = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def classify_in_browser(url: str, images: Sequence[str | os.PathLike], screenshot: str | os.PathLike,
                        prior: str | None = None, width: int = 1280, height: int = 1000,
                        timeout: float = 120) -> str:
    """Upload ``images`` to the demo at ``url``, classify them (under ``prior``, a label of the page's prior
    choice, when given), save a screenshot of the page to ``screenshot`` and return the top class shown."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    paths = browser_paths()
    if paths is None:
        raise FileNotFoundError("chromium and chromedriver are needed: apt-get install -y chromium "
                                "chromium-driver")
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = paths[0]
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
        try:
            wait = WebDriverWait(driver, timeout)
            driver.get(url)
            upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=file]"))
            # One send_keys with the paths on separate lines uploads them as one batch.
            upload.send_keys("\n".join(str(Path(image).resolve()) for image in images))
            # Uploaded when the file list shows the last one (its name and suffix are drawn apart).
            wait.until(lambda d: Path(images[-1]).stem in d.find_element(By.ID, "images").text)
            if prior is not None:
                driver.find_element(By.XPATH, f"//label[normalize-space()={prior!r}]").click()
            driver.find_element(By.XPATH, "//button[normalize-space()='Classify']").click()
            top = wait.until(lambda d: next((e.text.strip() for e in d.find_elements(
                By.CSS_SELECTOR, "#top-classes .output-class") if e.text.strip()), None))
            # The bar plot and the table arrive with the label: wait for the table's first row to be drawn.
            wait.until(lambda d: Path(images[0]).name in d.find_element(By.ID, "top-table").text)
            driver.save_screenshot(str(screenshot))
        finally:
            driver.quit()
    return top


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from balpoe_hf.demo import build_demo, load_demo_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved BalPoE model: a run's folder or a Hub id")
    parser.add_argument("images", nargs="+", help="image files to upload as one batch")
    parser.add_argument("--screenshot", default="demo.png", help="where the screenshot goes")
    parser.add_argument("--prior", default=None, help="the prior to choose, as the page names it")
    args = parser.parse_args(argv)
    model, processor = load_demo_model(args.model, "cpu")
    demo = build_demo(model, processor, name=Path(args.model).name)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        top = classify_in_browser(url, args.images, args.screenshot, prior=args.prior)
    finally:
        demo.close()
    print(f"top class of {Path(args.images[0]).name}: {top}; screenshot: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
