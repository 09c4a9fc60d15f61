"""The Gradio demo in a real browser: headless Debian Chromium, driven over its DevTools protocol.

Loads /demo from the Serve app of test_serve.py (same Ray, started once), types a prompt, uploads the
example photo, clicks Generate and waits for the result image; the screenshot is saved under pytest's
tmp dir and its path printed. The DevTools client is ~30 lines over `websockets` (a Gradio
dependency), so no test tool downloads a browser of its own.
"""
import base64
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

pytest.importorskip("ray")
pytest.importorskip("gradio")
ws_client = pytest.importorskip("websockets.sync.client")

from engine.serve.local import free_port  # noqa: E402  (after the import skips)
from tests.test_serve import start_server, stop_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT_S = 60.0
# A module-level skip, so a machine without the browser does not start Ray for nothing.
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="session")
def demo_server_url():
    yield start_server()
    stop_server()


class DevTools:
    """Minimal Chrome DevTools Protocol client over one page's websocket: commands with a timeout."""

    def __init__(self, ws_url: str):
        self.ws = ws_client.connect(ws_url, max_size=64 * 2**20, open_timeout=10)
        self.next_id = 0

    def send(self, method: str, timeout: float = 20.0, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:  # skip events until our reply arrives
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self):
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         "--remote-debugging-address=127.0.0.1", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,900", "--no-first-run", "--disable-extensions", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"chromium did not open its DevTools port (exit code {proc.poll()})")
            time.sleep(0.2)
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_demo_generates_in_browser(demo_server_url, browser, tmp_path, photo):
    photo_path = tmp_path / "control.png"
    photo.save(photo_path)
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{demo_server_url}/demo/")
    browser.wait_for("!!document.querySelector('#prompt textarea')", "the demo to render")

    browser.js("""(() => {
        const box = document.querySelector('#prompt textarea');
        box.value = 'an astronaut on the moon';
        box.dispatchEvent(new Event('input', {bubbles: true}));
    })()""")
    root = browser.send("DOM.getDocument", depth=-1, pierce=True)["root"]["nodeId"]
    file_input = browser.send("DOM.querySelector", nodeId=root, selector="#control-image input[type=file]")["nodeId"]
    assert file_input, "no file input in the control image component"
    browser.send("DOM.setFileInputFiles", files=[str(photo_path)], nodeId=file_input)
    browser.wait_for("!!document.querySelector('#control-image img')", "the uploaded image preview")

    browser.js("document.querySelector('#generate').click()")
    browser.wait_for(
        "(() => { const i = document.querySelector('#result img'); return !!(i && i.complete && i.naturalWidth > 0); })()",
        "the generated image",
    )
    assert browser.js("(() => { const i = document.querySelector('#control-map img'); return i ? i.naturalWidth : 0; })()") > 0
    assert "astronaut" in browser.js("document.querySelector('#prompt textarea').value")

    shot = tmp_path / "demo-screenshot.png"
    shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    print(f"demo screenshot: {shot}")
    assert shot.stat().st_size > 1000
