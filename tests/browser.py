"""Drive the web chat page in headless Debian chromium (selenium, the system chromedriver)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from conftest import REPO

ARTIFACTS = REPO / "tests" / "artifacts"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
         "--window-size=1100,760"]


def chat_in_browser(url: str, message: str, screenshot: str, key: str | None = None,
                    model: str | None = None, timeout: float = 120) -> tuple[str, list[str], Path]:
    """Open the page, send one message, wait for the streamed reply; returns (reply, every text the
    reply bubble showed while it grew, the screenshot's path)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not go looking for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="lr-chromium-")
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(f"{url}/")
        if key:
            driver.find_element(By.ID, "key").send_keys(key)
            driver.execute_script("document.getElementById('key').onchange()")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        names = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]
        assert model is None or names[0] == model, names
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")  # greedy: the same reply every run
        driver.find_element(By.ID, "input").send_keys(message)
        driver.find_element(By.ID, "send").click()
        seen: list[str] = []

        def finished(d):
            replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            if replies:
                seen.append(replies[-1].text)
                return replies[-1].get_attribute("data-state") == "done"
            return bool(d.find_elements(By.CSS_SELECTOR, ".msg.error"))

        WebDriverWait(driver, timeout, poll_frequency=0.02).until(finished)
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.error")]
        assert not errors, errors
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == message
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / screenshot
        driver.save_screenshot(str(shot))
        return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text, seen, shot
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
