"""view.py's page in a real browser: headless Chromium (Debian's `chromium`, which .ci/run
installs) opens it from a real server, and the screenshot must show the fit and the source
where the page puts them. Also makes the README's picture:

    python tests/test_view_browser.py --ckpt last.ckpt --source image.png -o docs/view.png \
        --view "x=0.5&y=0.4&zoom=2"
"""
import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import psnr  # noqa: E402  (the path set-up first, for the command line)
import images  # noqa: E402
import render  # noqa: E402
import tileserver  # noqa: E402
from field import load_field  # noqa: E402
from test_view import ViewServer  # noqa: E402

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1200, 600)
HEADER = 44                    # px, the page's header bar (viewer/index.html)
BACKGROUND = (27, 27, 27)      # the page's background colour, #1b1b1b


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ending in NUL on fds 3 and 4), so the page is laid out at exactly the window
    size and the picture is taken once its tiles are in, not after a guessed delay."""

    def __init__(self):
        self.profile = tempfile.TemporaryDirectory()
        commands_r, self.commands = os.pipe()
        self.replies, replies_w = os.pipe()

        def pipes():          # in the child: its fds 3 and 4 (via fds >= 10: no clash)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_r, replies_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)
        self.process = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}"],
            preexec_fn=pipes, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(replies_w)
        self.next_id, self.buffer, self.session = 0, b"", None

    def call(self, method, **params):
        self.next_id += 1
        message = dict(id=self.next_id, method=method, params=params)
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.replies, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self.buffer += chunk
            text, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(text)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def screenshot(self, url, window, ready, seconds=60):
        """A PNG (bytes) of `url` laid out at `window` (width, height), taken once the
        JavaScript expression `ready` is true."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=window[0], height=window[1],
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        self.wait(ready, seconds)
        return self.capture()

    def wait(self, ready, seconds=60):
        """Until the JavaScript expression `ready` has been true twice, 0.25 s apart (a view
        just changed may not have asked for its tiles yet)."""
        deadline, streak = time.monotonic() + seconds, 0
        while streak < 2:
            value = self.call("Runtime.evaluate", expression=ready, returnByValue=True)
            streak = streak + 1 if value["result"].get("value") else 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not get ready in {seconds} s: {ready}")
            time.sleep(0.25)

    def capture(self):
        time.sleep(0.5)        # the frame after the last tile
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        self.process.wait(timeout=30)
        os.close(self.commands)
        os.close(self.replies)
        self.profile.cleanup()


# every viewer on the page has drawn all the tiles of its current view
PAGE_READY = ("typeof fitViewer !== 'undefined' && shown && [fitViewer, sourceViewer].every(v => "
              "!v || (v.world.getItemCount() === 1 && v.world.getItemAt(0).getFullyLoaded()))")


def screenshot(url, path, window=WINDOW):
    """view.py's page at `url` in headless Chromium at `window` (width, height), once every
    tile in view is drawn, saved as a PNG at `path`; returns the (H, W, 3) uint8 picture."""
    browser = Browser()
    try:
        data = browser.screenshot(url, window, PAGE_READY)
    finally:
        browser.close()
    with open(path, "wb") as f:
        f.write(data)
    return np.array(Image.open(path).convert("RGB"))


def drawn_image(pane):
    """The picture inside a viewer pane: the rows and columns where most pixels are not the
    background (the buttons and the label are too small to count)."""
    painted = np.abs(pane.astype(int) - BACKGROUND).max(axis=2) > 8
    rows = np.flatnonzero(painted.mean(axis=1) > 0.5)
    cols = np.flatnonzero(painted.mean(axis=0) > 0.5)
    assert len(rows) and len(cols), "nothing drawn"
    return pane[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@pytest.fixture(scope="module")
def checker_fit(tmp_path_factory):
    """A fit of a 64 x 40 checkerboard over a gradient (a picture with edges and colour)."""
    import train
    folder = tmp_path_factory.mktemp("browser")
    y, x = np.mgrid[0:40, 0:64]
    source = np.stack([x * 4, y * 6, ((x // 8 + y // 8) % 2) * 220], -1).astype(np.uint8)
    images.write_image(str(folder / "checker.png"), source)
    summary = train.main(["-i", str(folder / "checker.png"), "--root", str(folder / "logs"),
                          "--max_steps", "150", "--batch_size", "2048", "--n_levels", "6",
                          "--log2_hashmap_size", "10", "--val_every", "150"])
    return summary["checkpoint"], str(folder / "checker.png")


@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed (.ci/run installs it: "
                    "apt-get install chromium)")
@pytest.mark.skipif(not os.path.isdir(tileserver.OSD_DIR), reason="OpenSeadragon is not installed: "
                    "run `npm ci` in the repository")
def test_the_page_draws_the_fit_and_the_source(checker_fit, tmp_path):
    ckpt, source_path = checker_fit
    running = ViewServer("--ckpt", ckpt, "--source", source_path)
    try:
        shot = screenshot(running.url, tmp_path / "page.png")
    finally:
        code, out, err = running.stop()
    assert (code, err) == (0, "")
    assert shot.shape == (WINDOW[1], WINDOW[0], 3)
    half = WINDOW[0] // 2
    fit = drawn_image(shot[HEADER:, :half])
    source = drawn_image(shot[HEADER:, half + 1:])
    # fitted to the pane's width, the image's aspect kept (64 x 40)
    assert abs(fit.shape[1] - half) <= 2 and abs(fit.shape[0] - half * 40 / 64) <= 3
    field, _ = load_field(ckpt)
    expected = render.render_region(field, fit.shape[1], fit.shape[0])

    def resized_source(like):
        return np.array(Image.open(source_path).resize(like.shape[1::-1], Image.BILINEAR))
    # the browser scales the tiles itself: close, not equal (33.4 and 41.5 dB measured); a
    # blank, a wrong image or the source in place of the fit scores far lower (the fit after
    # 150 steps against the source: 23.2 dB; a flat colour: 10.1)
    assert psnr(fit, expected) > 29
    assert psnr(source, resized_source(source)) > 35
    assert psnr(fit, expected) > psnr(fit, resized_source(fit)) + 6
    assert psnr(fit, np.full_like(fit, int(fit.mean()))) < 15


def main():
    parser = argparse.ArgumentParser(description="A screenshot of view.py's page.")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--source")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--window", type=int, nargs=2, default=WINDOW)
    parser.add_argument("--view", default="", help="the page's view, as in its address: "
                        "x=..&y=..&zoom=.. [default: the whole image]")
    args = parser.parse_args()
    running = ViewServer("--ckpt", args.ckpt, *(["--source", args.source] if args.source else []))
    try:
        screenshot(running.url + (f"#{args.view}" if args.view else ""), args.output,
                   tuple(args.window))
    finally:
        running.stop()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
