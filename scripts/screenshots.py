"""Screenshots of the running Dagster and MLflow UIs with headless Chromium (over the DevTools protocol,
so a page's first-visit dialogs can be dismissed before the picture is taken).

    python scripts/screenshots.py OUT.png URL [--click-text Skip] [--wait 8]

Start the servers first (`make ui`); Chromium comes from Debian's `chromium` package.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import tempfile
import time
import urllib.request

import websockets

CLICK = """(() => { const b = [...document.querySelectorAll('button')].find(e => e.textContent.trim() === %s);
if (b) { b.click(); return true; } return false; })()"""


async def capture(ws_url: str, url: str, out: str, click_text: str | None, wait: float) -> None:
    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        ids = iter(range(1, 10_000))

        async def call(method: str, **params):
            msg_id = next(ids)
            await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == msg_id:
                    return reply.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=url)
        await asyncio.sleep(wait)
        if click_text:
            await call("Runtime.evaluate", expression=CLICK % json.dumps(click_text))
            await asyncio.sleep(2)
        shot = await call("Page.captureScreenshot", format="png")
        with open(out, "wb") as fh:
            fh.write(base64.b64decode(shot["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("url")
    parser.add_argument("--click-text", default=None, help="click the button with this text first (e.g. Skip)")
    parser.add_argument("--wait", type=float, default=8.0)
    parser.add_argument("--port", type=int, default=9333)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # chromium may still flush its cache
        browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--remote-debugging-port={args.port}", f"--user-data-dir={profile}",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/json") as resp:
                        pages = [p for p in json.load(resp) if p.get("type") == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            asyncio.run(capture(pages[0]["webSocketDebuggerUrl"], args.url, args.out, args.click_text, args.wait))
        finally:
            browser.terminate()
            browser.wait(timeout=10)


if __name__ == "__main__":
    main()
