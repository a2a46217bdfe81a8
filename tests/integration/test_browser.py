"""A real browser (Debian's headless Chromium) in Label Studio's labeling UI with the Defect-Click backend.

The annotator logs in, opens a pre-annotated task, places a smart key point on the defect, receives the
backend's brush mask and submits; the stored annotation must hold that very mask. Screenshots of each step
go to ``tests/artifacts/browser/``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from loom.config import Settings
from loom.data.imageio import write_png
from loom.datasets.fabric import render_sample
from loom.services import labelstudio as ls
from loom.services.backend import mask_digest, read_interactions
from tests.integration.test_backend import wait_for_clicker

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
PASSWORD = "fabric-reviewer-3"
# Flags that keep Chromium from reaching for the network this machine does not have.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--window-size=1600,1200",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = Options()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _is_task_image(element: object) -> bool:
    return element.is_displayed() and element.size["width"] > 200  # not the data manager's thumbnails


def _toggle(driver: WebDriver, text: str) -> None:
    WebDriverWait(driver, 30).until(
        expected_conditions.element_to_be_clickable((By.XPATH, f"//span[text()='{text}']/ancestor::label[1]"))
    ).click()


def test_annotator_clicks_a_defect_in_the_labeling_ui(stack_settings: Settings, browser: WebDriver) -> None:
    settings = dataclasses.replace(stack_settings, project_title=f"test-browser-{uuid.uuid4().hex[:8]}")
    project_id = ls.ensure_project(settings)
    ls.connect_ml_backend(settings, project_id)
    sample = render_sample(5, 256, 256, defect_prob=1.0)
    image_id = f"browser-{uuid.uuid4().hex[:12]}"
    write_png(settings.images_dir / f"{image_id}.png", sample.image)
    pre = np.roll(sample.mask, 4, axis=0)
    items = [ls.TaskItem(image_id, pre, 0.7, "teacher-test", 1)]
    task_id = ls.push_tasks(settings, project_id, items)[image_id]
    email = f"browser-{uuid.uuid4().hex[:8]}@loom.local"
    ls.invite_annotator(settings, email, PASSWORD)
    wait_for_clicker(settings)
    label = settings.classes[int(np.bincount(sample.mask[sample.mask > 0]).argmax()) - 1]

    # Log in and open the task.
    url = settings.label_studio_url
    browser.get(f"{url}/user/login/")
    browser.find_element(By.NAME, "email").send_keys(email)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    WebDriverWait(browser, 30).until(lambda d: "/user/login" not in d.current_url)
    browser.get(f"{url}/projects/{project_id}/data?task={task_id}")
    # The page re-renders while it loads: an element found a moment ago may be gone, so look again.
    image = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: next((i for i in d.find_elements(By.CSS_SELECTOR, "img") if _is_task_image(i)), None)
    )
    # The pre-annotation is there: its region, with the teacher's class, in the regions list.
    regions = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".lsf-outliner-item") if e.text]
    )
    assert any(label in r.text for r in regions), [r.text for r in regions]
    _shot(browser, "1-pre-annotation")

    # Smart key point: auto-annotation on, auto-accept on, the smart key point tool, the label, a click.
    _toggle(browser, "Auto-Annotation")
    _toggle(browser, "Auto-Accept Suggestions")
    smart = browser.find_element(By.CSS_SELECTOR, ".lsf-tool_smart[aria-label='key-point-tool']")
    browser.execute_script("arguments[0].click()", smart)
    named = f"//span[contains(@class,'lsf-label') and .//*[text()='{label}']]"
    labels = [e for e in browser.find_elements(By.XPATH, named) if e.is_displayed()]
    browser.execute_script("arguments[0].scrollIntoView(); arguments[0].click()", labels[-1])
    before = len(read_interactions(settings, {task_id}))
    ys, xs = np.nonzero(sample.mask == settings.classes.index(label) + 1)
    pick = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    width, height = image.size["width"], image.size["height"]
    offset_x = (xs[pick] + 0.5) / 256 * width - width / 2
    offset_y = (ys[pick] + 0.5) / 256 * height - height / 2
    ActionChains(browser).move_to_element_with_offset(image, offset_x, offset_y).click().perform()
    deadline = time.monotonic() + 30
    while len(read_interactions(settings, {task_id})) == before and time.monotonic() < deadline:
        time.sleep(0.25)
    answers = read_interactions(settings, {task_id})[before:]
    assert answers, "no interactive request reached the backend from the labeling UI"
    time.sleep(1.5)  # the answer is drawn
    _shot(browser, "2-clicked-mask")

    # Submit, then read the stored annotation back.
    browser.find_element(By.CSS_SELECTOR, "[aria-label='Submit current annotation']").click()
    client = ls.connect(settings)
    deadline = time.monotonic() + 30
    stored: list = []
    while not stored and time.monotonic() < deadline:
        stored = client.annotations.list(id=task_id)
        time.sleep(0.5)
    _shot(browser, "3-submitted")
    assert stored, "the annotation was not submitted"
    brush = [r for r in stored[-1].result if r["type"] == "brushlabels"]
    digests = {
        mask_digest(ls.decode_region(r["value"]["rle"], sample.mask.shape[0], sample.mask.shape[1], 0))
        for r in brush
    }
    assert answers[-1]["mask_sha1"] in digests, "the stored annotation does not hold the backend's mask"
    assert any(r["value"]["brushlabels"] == [label] for r in brush)
