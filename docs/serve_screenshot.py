"""Make docs/serve.png: the page of `tipcap serve --demo` in headless Chromium, with two of the demo world's
test images captioned by every method side by side and CLIP's first guess clicked on the first image.

Usage (after `tipcap demo` or `tipcap demo --quick`, whose grids have a prompt-trained method):
    python docs/serve_screenshot.py [--demo runs/demo] [--out docs/serve.png]
Needs Debian's chromium and chromium-driver and the test extra (selenium).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tipcap.app.server import serving
from tipcap.app.service import CaptionService, load_models
from tipcap.data.karpathy import read_karpathy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "serve.png")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 3], help="positions in the test split")
    args = parser.parse_args()

    karpathy = Path(json.loads((args.demo / "grid.json").read_text())["fixed"]["karpathy"])
    test = read_karpathy(karpathy, "test")
    service = CaptionService(load_models([args.demo], device="cpu"))
    with tempfile.TemporaryDirectory() as profile, serving(service) as url:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1200,1000", "--hide-scrollbars",
                     f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            wait = WebDriverWait(driver, 120)
            driver.get(url)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
            driver.find_element(By.CSS_SELECTOR, '#method option[value="*"]').click()
            picker = driver.find_element(By.ID, "files")
            driver.execute_script("arguments[0].hidden = false", picker)
            for position in reversed(args.images):
                picker.send_keys(str(karpathy.parent / test[position].relative_path))

            def settled(d) -> bool:
                states = [c.get_attribute("data-state") for c in d.find_elements(By.CSS_SELECTOR, ".card")]
                return len(states) == len(args.images) and set(states) == {"done"}

            wait.until(settled)
            first = driver.find_elements(By.CSS_SELECTOR, ".card")[0]
            chips = first.find_elements(By.CSS_SELECTOR, ".chip")
            if chips:  # a demo folder without its prompt-trained model has no entity vocabulary
                chips[0].click()
                wait.until(lambda d: first.get_attribute("data-requests") == "2" and settled(d))
            driver.execute_script("arguments[0].hidden = true", picker)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
