"""The interactive path in a real browser: JupyterLab shows both executed notebooks on the project's kernel.

JupyterLab runs headless on localhost with a token; Debian's chromium, driven by Selenium through Debian's
chromium-driver, opens each notebook as a person would and checks what they would see: the kernel's name, the
cells' outputs, every figure decoded as an image, no error. The kernel is also started and run through the
server's API. Screenshots go to $STLIB_SCREENSHOTS (`make test-browser` sets docs/figures/; `make test`
leaves the tree as it was: a temporary folder). `make test-browser` installs chromium; without it (or
selenium) the test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from stlib_testing import REPO

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("notebooks"),  # with -n: on the worker that executed the notebooks
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                       "(make test-browser installs them)"),
]
SCREENSHOTS = Path(os.environ.get("STLIB_SCREENSHOTS") or tempfile.mkdtemp(prefix="stlib_screens_"))
KERNEL_DISPLAY = "Python (stlib)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(executed_notebooks, tmp_path_factory):
    """A JupyterLab server on the executed notebooks' folder: (base url, token)."""
    root = executed_notebooks["root"]
    port, token = _free_port(), secrets.token_hex(16)
    # every cell in the page, not only those scrolled into view (JupyterLab 4 virtualises long notebooks)
    settings = tmp_path_factory.mktemp("lab_settings")
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))  # no "get notified about Jupyter news?" pop-up
    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}", f"--ServerApp.root_dir={root}",
         f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False", "--allow-root",
         f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={settings / 'workspaces'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("jupyter lab did not start within 60 s")
            time.sleep(0.5)
    yield url, token
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[dev])")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, script: str, timeout: float = 60.0):
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for: {script}")


@pytest.mark.parametrize("notebook", ["train", "compare"])
def test_notebook_opens_on_the_project_kernel_with_its_outputs(lab, browser, executed_notebooks, notebook):
    url, token = lab
    path = executed_notebooks[notebook]
    browser.get(f"{url}/lab/tree/{path.name}?token={token}")
    _wait(browser, "document.querySelectorAll('.jp-Notebook .jp-Cell').length > 0")
    kernel = _wait(browser, "Array.from(document.querySelectorAll('.jp-Toolbar-kernelName, .jp-KernelName'))"
                            ".map(e => e.textContent.trim()).find(t => t.includes('Python')) || ''")
    assert kernel == KERNEL_DISPLAY
    saved = json.loads(path.read_text())
    n_images = sum("image/png" in o.get("data", {}) for c in saved["cells"] for o in c.get("outputs", []))
    _wait(browser, "document.querySelectorAll('.jp-OutputArea-output').length > 0")
    decoded = _wait(browser, f"(() => {{ const imgs = Array.from(document.querySelectorAll('.jp-OutputArea img'));"
                             f" return imgs.length >= {n_images} && imgs.every(i => i.complete && i.naturalWidth > 0)"
                             f" ? imgs.length + 1 : 0 }})()") - 1  # + 1: truthy with no image
    assert decoded >= n_images
    assert browser.execute_script("return document.querySelectorAll('.jp-OutputArea-output').length") > 0
    text = browser.execute_script("return Array.from(document.querySelectorAll('.jp-OutputArea')).map(e => e.innerText).join('\\n')")
    assert "Traceback" not in text and "Error" not in text.split("\n")[0]
    browser.execute_script("document.querySelector('.jp-Cell').scrollIntoView()")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"lab_{'train_all_variants' if notebook == 'train' else 'compare_results'}.png"))


def test_html_report_renders_every_figure(browser, executed_notebooks):
    browser.get(executed_notebooks["html"].as_uri())
    n = _wait(browser, "(() => { const imgs = Array.from(document.images);"
                       " return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0 })()")
    assert n >= 5
    assert "Traceback" not in browser.execute_script("return document.body.innerText")
    browser.save_screenshot(str(SCREENSHOTS / "compare_results_html.png"))


def test_kernel_runs_stlib_through_the_server(lab):
    """Start the project's kernel through the REST API and execute code over its websocket, as JupyterLab does."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    url, token = lab
    request = urllib.request.Request(f"{url}/api/kernels?token={token}", data=json.dumps({"name": "stlib"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    kernel = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert kernel["name"] == "stlib"

    async def run(code: str) -> str:
        ws_url = f"{url.replace('http', 'ws')}/api/kernels/{kernel['id']}/channels?token={token}"
        conn = await websocket_connect(HTTPRequest(ws_url, connect_timeout=30))
        msg_id = uuid.uuid4().hex
        await conn.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                       "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False}}))
        out = []
        deadline = time.time() + 60
        while time.time() < deadline:
            msg = json.loads(await asyncio.wait_for(conn.read_message(), timeout=60))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            if msg["msg_type"] == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        conn.close()
        return "".join(out)

    printed = asyncio.run(run("import sys, stlib; print(stlib.__file__); print(sys.executable)"))
    module, interpreter = printed.split()
    assert Path(module).resolve() == (REPO / "stlib" / "__init__.py").resolve()
    assert Path(interpreter).parent == Path(sys.executable).parent  # the project's venv
    urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels/{kernel['id']}?token={token}", method="DELETE"))
