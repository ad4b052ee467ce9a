"""`make lab-screenshot`: the lab page on a generated field, in headless Chromium -> docs/images/lab-page.png.

Also prints how long the page takes to load (navigation timing) and to show a field's boxes. Needs a
model in the BentoML store and Debian's `chromium` and `chromium-driver`. The field is generated
(`malaria.smear.synthetic`): the shared smear set may not be redistributed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from benchmarks.bench import bento_server
from malaria.smear.synthetic import synthetic_field

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "lab-page.png"


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    field = Path(tempfile.mkdtemp()) / "generated-field.png"
    synthetic_field(width=960, height=720, diameter=60, n_free=30, n_pairs=4, seed=5).image.save(field)
    server = bento_server(3321, MALARIA_SMEAR_CELL_DIAMETER_PX="60")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{server.url}/ui/")
        load_ms = driver.execute_script("return performance.getEntriesByType('navigation')[0].duration")
        driver.find_element(By.ID, "slide-id").send_keys("generated-demo")
        driver.find_element(By.ID, "upload").send_keys(str(field))
        started = time.perf_counter()
        driver.find_element(By.ID, "analyze").click()
        while not driver.find_elements(By.CSS_SELECTOR, ".cell-box"):
            time.sleep(0.05)
        boxes_s = time.perf_counter() - started
        driver.execute_script("arguments[0].click()", driver.find_elements(By.CSS_SELECTOR, ".cell-box.parasitized")[0])
        while driver.find_element(By.ID, "cell-heatmap").get_attribute("data-ready") != "true":
            time.sleep(0.05)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(OUT))
    finally:
        driver.quit()
        server.stop()
    image = Image.open(OUT).convert("RGB")
    image.thumbnail((760, 860))
    image.quantize(colors=48).save(OUT, optimize=True)  # a small PNG for the docs
    print(json.dumps({"page_load_ms": round(load_ms, 1), "field_boxes_s": round(boxes_s, 2), "screenshot": str(OUT)}))


if __name__ == "__main__":
    main()
