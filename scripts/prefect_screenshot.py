"""Screenshots of what the Prefect UI shows for a qwen-image-batch run, for docs/img/.

    python scripts/prefect_screenshot.py [--out docs/img]

Starts a Prefect server on a free loopback port (its database in a temporary folder), runs the flow
on the tiny model over a few example prompts (made small, plus one invalid row so the problems
artifact has something to show), opens the run's page in headless Chromium and saves:

- `prefect-run.png`: the run's page: its task runs on the timeline, and its Artifacts tab;
- `prefect-artifacts.png`: three of those artifacts as the UI shows them: the summary table, the
  invalid and failed rows, and the output location with sample images.

Needs Debian's `chromium` (`apt-get install chromium`) and no network: Chromium is driven over the
DevTools protocol with `websockets`, which Prefect already depends on. Everything started is stopped.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
FLOW = "qwen-image-batch"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
WIDTH, HEIGHT = 1400, 1050


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in its own session, so that stopping it stops its children too."""
    with open(log, "wb") as handle:
        return subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def small_manifest(path: Path, rows: int = 8) -> Path:
    """The first example prompts at 256x256 and 4 steps, and a row with an invalid size."""
    table = pq.read_table(ROOT / "prompts" / "example.parquet", use_threads=False).slice(0, rows)
    records = [
        {**row, "width": 256, "height": 256, "num_inference_steps": 4, "true_cfg_scale": 4.0}
        for row in table.to_pylist()
    ]
    records.append({**records[0], "id": "too-wide", "width": 1000})
    pq.write_table(pa.Table.from_pylist(records, schema=table.schema), path)
    return path


class Page:
    """Just enough of the DevTools protocol: navigate, evaluate, screenshot."""

    def __init__(self, websocket_url: str):
        self.socket = connect(websocket_url, max_size=None)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for_text(self, text: str, timeout: float = 30.0) -> None:
        wait_for(
            lambda: self.evaluate(f"document.body && document.body.innerText.includes({json.dumps(text)})"),
            text,
            timeout,
        )

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        options = {"clip": {**clip, "scale": 1}, "captureBeyondViewport": True} if clip else {}
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png", **options)["data"]))
        return path

    def screenshot_of(self, column: str, last: str, path: Path) -> Path:
        """The page from its top down to the element `last`, across the width of the element `column`."""
        box, end = (
            json.loads(
                self.evaluate(f"JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
            )
            for selector in (column, last)
        )
        return self.screenshot(
            path, {"x": box["x"] - 16, "y": 0, "width": box["width"] + 32, "height": end["bottom"] + 16}
        )


def artifact_id(api: str, run_id: str, key: str) -> str:
    body = {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [run_id]}}}
    return json.load(urllib.request.urlopen(post(f"{api}/artifacts/filter", body)))[0]["id"]


def post(url: str, body: dict) -> urllib.request.Request:
    return urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def stack(parts: list[Path], target: Path, gap: int = 12) -> None:
    """The screenshots one above the other, on the UI's background colour."""
    from PIL import Image

    images = [Image.open(part).convert("RGB") for part in parts]
    canvas = Image.new("RGB", (max(image.width for image in images), sum(image.height + gap for image in images) - gap))
    canvas.paste(images[0].getpixel((2, 2)), (0, 0, canvas.width, canvas.height))
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height + gap
    canvas.save(target, optimize=True)
    print(f"wrote {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNGs (default docs/img)"
    )
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        parser.error("chromium not found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="qwen-batch-screenshot-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "HF_HUB_OFFLINE": "1",
    }
    processes: list[subprocess.Popen] = []
    try:
        prefect = str(Path(sys.executable).with_name("prefect"))
        server = start(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, work / "server.log"
        )
        processes.append(server)
        wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, "the Prefect server")

        manifest = small_manifest(work / "manifest.parquet")
        flow_command = [sys.executable, "flows/qwen_image_batch.py", "--manifest", str(manifest)]
        flow_command += ["--output", str(work / "out"), "--batch-size", "2", "--chunk-size", "4"]
        done = subprocess.run(flow_command, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode not in (0, 1):  # 1: the invalid row, on purpose
            sys.exit(f"the flow run failed:\n{done.stdout}\n{done.stderr}")
        runs = urllib.request.urlopen(post(f"{api}/flow_runs/filter", {"limit": 1, "sort": "START_TIME_DESC"}))
        run_id = json.load(runs)[0]["id"]

        debugging = free_port()
        browser = start(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={work / 'chromium'}",
                f"--remote-debugging-port={debugging}",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            env,
            work / "chromium.log",
        )
        processes.append(browser)
        targets = wait_for(
            lambda: json.load(urllib.request.urlopen(f"http://127.0.0.1:{debugging}/json/list", timeout=2)), "Chromium"
        )
        page = Page(next(target for target in targets if target["type"] == "page")["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

        base = f"http://127.0.0.1:{port}"
        page.call("Page.navigate", url=f"{base}/runs/flow-run/{run_id}")
        page.wait_for_text("Finished in state")
        page.evaluate(
            f"[...document.querySelectorAll('.p-tab, [role=tab]')].find(e => e.textContent.trim() === {json.dumps('Artifacts')}).click()"
        )
        page.wait_for_text(f"{FLOW}-samples")
        time.sleep(2.0)  # the timeline draws after the data arrives
        print(f"wrote {page.screenshot(args.out / 'prefect-run.png')}")

        parts = []
        for kind in ("summary", "problems", "samples"):
            page.call("Page.navigate", url=f"{base}/artifacts/artifact/{artifact_id(api, run_id, f'{FLOW}-{kind}')}")
            page.wait_for_text("Show raw data")
            time.sleep(1.0)
            parts.append(
                page.screenshot_of(".p-layout-well__content", ".artifact__raw-data-button", work / f"{kind}.png")
            )
        stack(parts, args.out / "prefect-artifacts.png")
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
