"""Screenshots of the status page for docs/ui.md: a daemon with the simulator and a catalogue of
three models in three states (ready, sleeping, loading), seen by headless Chromium (Debian's
``chromium``, driven by Playwright; nothing is downloaded).

    .venv/bin/python scripts/ui_screenshots.py docs/

writes ``ui.png`` (the page with an admin key) and ``ui-log.png`` (an instance's live log).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.async_api import async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
KEY = "admin-key-for-the-screenshots"
CATALOGUE = """
[models.chat]
model = "org/chat-8b"
args = "--sim-import-delay 0.05 --sim-load-delay 0.3"
aliases = ["chat"]
gpus = [0]
gpu_memory_utilization = 0.6
sleep = 1
ttl = 1800

[models.coder]
model = "org/coder-7b"
args = "--sim-import-delay 0.05 --sim-load-delay 0.3 --max-model-len 8192"
gpus = [0]
gpu_memory_utilization = 0.6
ttl = 900

[models.embed]
model = "org/embed-small"
args = "--sim-import-delay 0.1 --sim-load-delay 120"
gpus = [1]
gpu_memory_utilization = 0.3
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def shoot(out: Path, url: str, client: httpx.Client) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1280, "height": 860})
        await page.goto(url + "/ui")
        await page.fill("#key", KEY)
        await page.click("#key-form button[type=submit]")
        await expect(page.locator("#role")).to_have_text("admin")
        client.post("/load", json={"model": "chat"}).raise_for_status()
        client.post("/load", json={"model": "coder"}).raise_for_status()  # chat goes to sleep
        client.post("/load", json={"model": "embed", "wait": False}).raise_for_status()
        for _ in range(3):
            body = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            client.post("/v1/chat/completions", json=body).raise_for_status()
        await expect(page.locator('tr[data-name="chat"] .state')).to_have_text("sleeping", timeout=60_000)
        await expect(page.locator('tr[data-name="embed"] .state')).to_contain_text("starting")
        await page.fill("#spec", "coder")
        await page.wait_for_timeout(3000)  # a few seconds of uptime and TTL on the clock
        await page.screenshot(path=str(out / "ui.png"), full_page=True)
        await page.locator('tr[data-name="coder"]').get_by_role("button", name="Log").click()
        await expect(page.locator("#log")).to_contain_text("POST /v1/chat/completions")
        await page.locator("#log-view").scroll_into_view_if_needed()
        await page.screenshot(path=str(out / "ui-log.png"), full_page=True)
        await browser.close()


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "proxy.toml"
        config.write_text(CATALOGUE)
        port = free_port()
        command = [
            sys.executable, "-m", "aic_vllm_proxy", "serve", "--simulator", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--vllm-port", str(free_port()),
            "--gpus", "0,1", "--admin-key", KEY, "--log-dir", str(Path(tmp) / "logs"),
        ]  # fmt: skip
        quiet = subprocess.DEVNULL
        daemon = subprocess.Popen(command, stdout=quiet, stderr=quiet, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        client.get("/proxy/health").raise_for_status()
                        break
                    except httpx.HTTPError:
                        time.sleep(0.2)
                asyncio.run(shoot(out, url, client))
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


if __name__ == "__main__":
    main()
