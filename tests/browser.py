"""A real headless Chromium for the tests of report.html, driven by selenium.

The system's Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``,
which .ci/run does) are used by path: nothing is downloaded (selenium-manager never runs, as the
driver's path is given). Missing, :func:`need_chromium` skips the test with one line naming what is
missing and how to install it; with ``MERA_REQUIRE_BROWSER=1`` (.ci/run sets it) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MERA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MERA_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")


def missing_programs() -> list[str]:
    """The paths of the Chromium and the driver that are not executable files here."""
    return [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]


def need_chromium() -> None:
    """Skip the test when Chromium or its driver is missing, saying which and how to install them;
    fail instead under ``MERA_REQUIRE_BROWSER=1``, where a skipped browser test would hide a gap."""
    missing = missing_programs()
    if not missing:
        return
    said = (f"{' and '.join(missing)} not found: the report.html browser test needs a headless Chromium and its "
            "driver; install them with `apt-get install -y chromium chromium-driver`, or run .ci/run (it does)")
    if os.environ.get("MERA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{said} (MERA_REQUIRE_BROWSER=1: the test may not skip)", pytrace=False)
    pytest.skip(said)


@contextmanager
def chromium(width: int = 1400, height: int = 1000, dark: bool = False):
    """A selenium Chrome driver on the system Chromium, headless, with a fresh profile; its browser
    console is readable with ``driver.get_log("browser")``."""
    need_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mera-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        if dark:
            driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                   {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def full_page_png(driver, path: Path, max_height: int = 30000) -> Path:
    """A screenshot of the whole page (the window made as tall as the document), written to ``path``."""
    import base64

    height = min(max_height, int(driver.execute_script("return document.documentElement.scrollHeight")))
    width = int(driver.execute_script("return window.innerWidth"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path
