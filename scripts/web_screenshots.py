"""Screenshots of the web view for the README, taken from `make demo`: the saga list and the slow carrier's saga.

Runs the demo with its web view on (``SAGA_DEMO_WEB=1``), points Debian's
headless Chromium at it, saves ``docs/images/web-list.png`` and
``docs/images/web-saga.png``, then stops the demo with Ctrl-C (SIGINT).

Usage: ``python scripts/web_screenshots.py``
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"


def main() -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    env = {**os.environ, "SAGA_DEMO_WEB": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "example_project.demo"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert demo.stdout is not None
    try:
        url = ""
        for line in demo.stdout:
            print(line, end="")
            if found := re.findall(r"serving (http://\S+/)", line):
                url = found[0]
                break
        if not url:
            print("the demo did not serve its web view", file=sys.stderr)
            return 1
        with urllib.request.urlopen(url + "api/sagas", timeout=10) as response:
            sagas = json.loads(response.read())["sagas"]
        slow = next(s for s in sagas if s["failed_step"] == "shipping.ship_order")
        os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium download a driver
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,820"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            OUT.mkdir(parents=True, exist_ok=True)
            driver.get(url)
            driver.save_screenshot(str(OUT / "web-list.png"))
            driver.get(f"{url}saga/{slow['id']}")
            driver.save_screenshot(str(OUT / "web-saga.png"))
        finally:
            driver.quit()
        print(f"saved {OUT / 'web-list.png'} and {OUT / 'web-saga.png'}")
        return 0
    finally:
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
