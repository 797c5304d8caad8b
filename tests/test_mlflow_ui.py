"""The MLflow UI shows a new model version's provenance, checked in headless Chromium.

The test runs the nightly flow once, serves the workspace's store with the command
that `lethe serve` uses, and opens the model version page in Debian's `chromium`
through Selenium and Debian's `chromium-driver`. Nothing is downloaded at test time:
the driver path is given to Selenium, so Selenium Manager never runs, and Chromium
resolves no host name other than 127.0.0.1.

The module took 72-91 s on a 2-core x86_64 machine while other tests shared the cores,
most of it bootstrapping the workspace and running the flow.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import serve as serve_module
from flows.nightly import nightly_deletion_run
from tasks import registry, versioning
from tasks.settings import WorkspaceSettings
from tests.helpers import request, train_subjects, write_requests

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MODEL = WorkspaceSettings().model_name
VERSION = "2"
SERVER_READY_TIMEOUT = 60
SERVER_STOP_TIMEOUT = 15
PAGE_RENDER_TIMEOUT = 30
# Measured with Chromium 156 at 1600x1200: about:blank saves as 7 kB of PNG, a two-line text
# page as 13 kB and the model version page as about 170 kB.
MIN_SCREENSHOT_BYTES = 50_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Health checks go straight to 127.0.0.1, never through an HTTP proxy named in the environment.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = [
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.skipif(
        not CHROMIUM.is_file() or not CHROMEDRIVER.is_file(),
        reason=f"{CHROMIUM} or {CHROMEDRIVER} not found: install Debian's packages with "
               f"`apt-get install chromium chromium-driver`",
    ),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(log_file: Path) -> str:
    return log_file.read_text(errors="replace")[-4000:] if log_file.exists() else f"({log_file} does not exist)"


def wait_for_health(url: str, process: subprocess.Popen, log_file: Path) -> None:
    """Poll url until it returns 200. Fail with the server's log when the server exits or times out."""
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with code {process.returncode} before {url} was ready:\n"
                        f"{log_tail(log_file)}")
        try:
            with DIRECT.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"{url} not ready after {SERVER_READY_TIMEOUT} s:\n{log_tail(log_file)}")


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop the server and the workers it started: SIGTERM to its process group, then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=SERVER_STOP_TIMEOUT)


@pytest.fixture
def erased(workspace) -> dict:
    """Run the nightly flow once on requests for two training subjects, so model version 2 exists."""
    subjects = train_subjects(workspace, 2)
    write_requests(workspace, "ui.jsonl", [request("ui-1", subjects[0]), request("ui-2", subjects[1])])
    summary = nightly_deletion_run(workspace=str(workspace.root))
    assert summary["status"] == "completed", summary
    assert registry.champion_version(workspace, MODEL) == VERSION
    return {"subjects": subjects, "summary": summary}


@pytest.fixture
def mlflow_ui(workspace, erased, tmp_path) -> Iterator[str]:
    """Serve the workspace's MLflow store on a free 127.0.0.1 port and return the base URL."""
    port = free_port()
    env = serve_module.mlflow_environment({
        **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1",
    })
    log_file = tmp_path / "mlflow-server.log"
    with log_file.open("wb") as log:
        # A process group of its own, so stopping it also stops the uvicorn workers it starts.
        process = subprocess.Popen(serve_module.mlflow_server_command(workspace, port, workers=1), env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(f"{url}/health", process, log_file)
        yield url
    finally:
        stop_process_group(process)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Chromium driven by Debian's chromedriver, with every host but 127.0.0.1 unresolvable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium 4.51 skips Selenium Manager when the Service names the driver. Should it run
    # anyway, these variables set its --offline and --avoid-stats options: no downloads, no usage reports.
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1200",
        "--no-first-run", "--no-default-browser-check", "--no-proxy-server",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions",
        # The UI needs only the server it was loaded from, so a request to any other host is a leak.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_tag_rows(driver, screenshot: Path) -> None:
    """Wait until the React app has rendered the version's tags table, or fail with what it shows instead."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    selector = 'tr[data-row-key="lethe.parent_version"]'
    try:
        WebDriverWait(driver, PAGE_RENDER_TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))
    except TimeoutException:
        driver.save_screenshot(str(screenshot))
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"{selector} not rendered at {driver.current_url} after {PAGE_RENDER_TIMEOUT} s "
                    f"(screenshot: {screenshot}). The page shows:\n{body[:3000]}")


def scroll_into_view(driver, element, block: str = "center") -> None:
    """Scroll every scrolling ancestor, the tags table's own scroll box included, to show element."""
    driver.execute_script("arguments[0].scrollIntoView({block: arguments[1]});", element, block)


def is_drawn(driver, element) -> bool:
    """Return whether element is what the browser draws at its own centre point.

    Selenium's is_displayed() is also true for a row hidden in the tags table's scroll
    box (280 px high in MLflow 3.17.2), so this checks which element is drawn there.
    """
    return driver.execute_script("""
        const element = arguments[0];
        const box = element.getBoundingClientRect();
        const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
        return hit !== null && (hit === element || element.contains(hit));
    """, element)


def tag_value_cell(driver, key: str):
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-row-key="{key}"]')
    assert rows, f"no row for tag {key} in the tags table"
    cells = rows[0].find_elements(By.TAG_NAME, "td")
    assert cells[0].text == key
    return cells[1]


def visible_tag_value(driver, key: str) -> str:
    """Scroll the tags table to key's row, check that its value is drawn on screen and return its text."""
    cell = tag_value_cell(driver, key)
    scroll_into_view(driver, cell)
    assert is_drawn(driver, cell), f"the value of tag {key} is in the page but not drawn on screen"
    return cell.text


def assert_drawn(driver, keys: list[str]) -> None:
    for key in keys:
        assert is_drawn(driver, tag_value_cell(driver, key)), f"the value of tag {key} is not in the screenshot"


def save_screenshot(driver, path: Path) -> None:
    assert driver.save_screenshot(str(path)), f"Chromium could not write {path}"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG file"
    assert len(data) > MIN_SCREENSHOT_BYTES, f"{path} has only {len(data)} bytes: the page looks empty"


def raw_subject_ids_in(text: str, subjects: list[int]) -> list[int]:
    return [sid for sid in subjects if re.search(rf"(?<![0-9]){sid}(?![0-9])", text)]


def test_version_page_shows_provenance(workspace, erased, mlflow_ui, browser, tmp_path):
    from selenium.webdriver.common.by import By

    ws = workspace
    summary = erased["summary"]
    stored_tags = registry.version_tags(ws, MODEL, VERSION)
    mlflow_client = registry.client(ws)
    run_id = mlflow_client.get_model_version(MODEL, VERSION).run_id
    run_name = mlflow_client.get_run(run_id).info.run_name

    browser.get(f"{mlflow_ui}/#/models/{MODEL}/versions/{VERSION}")
    wait_for_tag_rows(browser, tmp_path / "model-version-timeout.png")
    headings = [heading.text for heading in browser.find_elements(By.TAG_NAME, "h2")]
    assert f"Version {VERSION}" in headings

    # The lineage facts come from the flow's summary, git and DVC, not from the tags being checked.
    expected = {
        "lethe.parent_version": "1",
        "lethe.batch_id": summary["batch_id"],
        "lethe.request_count": "2",
        "lethe.data_md5": versioning.data_md5(ws),
        "lethe.data_git_rev": versioning.head_rev(ws),
    }
    for key, value in expected.items():
        assert visible_tag_value(browser, key) == value, key
    # The router's choice and the subject digest have no second source, so the UI must show the stored value.
    for key in ("method", "method_reason", "subject_digest"):
        assert stored_tags[key], f"lethe.{key} is empty in the MLflow store"
        assert visible_tag_value(browser, f"lethe.{key}") == stored_tags[key], key
    assert stored_tags["method"] in {"neggrad_plus", "retrain"}

    # The header links the version to the MLflow run that logged it, shown by the run's name.
    run_links = browser.find_elements(By.CSS_SELECTOR, f'a[href$="/runs/{run_id}"]')
    assert run_links, f"no link to source run {run_id} on the page"
    assert run_links[0].text == run_name
    scroll_into_view(browser, run_links[0])
    assert is_drawn(browser, run_links[0]), "the source run link is not drawn on screen"

    # Two screenshots, because the tags table scrolls: the first shows the header with the
    # source run and the top of the table, the second the rows from method to parent version.
    scroll_into_view(browser, tag_value_cell(browser, "lethe.batch_id"))
    assert is_drawn(browser, run_links[0])
    assert_drawn(browser, ["lethe.batch_id", "lethe.data_git_rev", "lethe.data_md5"])
    save_screenshot(browser, tmp_path / "model-version-2.png")
    # Coming from above, "nearest" puts parent_version at the bottom of the box, below method.
    scroll_into_view(browser, tag_value_cell(browser, "lethe.parent_version"), block="nearest")
    assert_drawn(browser, ["lethe.method", "lethe.method_reason", "lethe.model_family", "lethe.parent_version"])
    save_screenshot(browser, tmp_path / "model-version-2-lineage.png")

    page_text = browser.find_element(By.TAG_NAME, "body").text
    assert raw_subject_ids_in(page_text, erased["subjects"]) == []
    assert raw_subject_ids_in(browser.page_source, erased["subjects"]) == []
