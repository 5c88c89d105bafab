"""train.py --serve for real: a short training run in a subprocess serving view.py's page and
tiles from its live weights, fetched over HTTP while it trains."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

import images
import train
from conftest import ROOT


def get(url):
    with urllib.request.urlopen(url, timeout=60) as reply:
        return reply.read()


@pytest.fixture
def checker(tmp_path):
    """A 64 x 40 checkerboard over a gradient: quick to fit, far from its mean colour."""
    y, x = np.mgrid[0:40, 0:64]
    source = np.stack([x * 4, y * 6, ((x // 8 + y // 8) % 2) * 220], -1).astype(np.uint8)
    path = tmp_path / "checker.png"
    images.write_image(str(path), source)
    return path


def test_serve_shows_the_fit_as_it_learns(checker, tmp_path):
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "-i", str(checker), "--root",
         str(tmp_path / "logs"), "--max_steps", "100000", "--batch_size", "1024",
         "--n_levels", "6", "--log2_hashmap_size", "10", "--val_every", "20",
         "--serve", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("train.py: the fit live at http://127.0.0.1:"), line
        url = line.rsplit(" at ", 1)[1].strip()

        def status():
            return json.loads(get(url + "status.json"))

        def wait_for(condition, what, seconds=300):     # generous: a busy machine
            deadline = time.monotonic() + seconds
            while not condition():
                assert time.monotonic() < deadline, what
                time.sleep(0.2)

        wait_for(lambda: len(status()["curve"]) >= 1, "no PSNR point")
        early = status()
        assert early["live"] is True and early["step"] >= 20
        assert early["width"] == 64 and early["height"] == 40 and early["source"] is True
        # the finest level: 4x the source, rendered between two training steps
        tile = np.array(Image.open(io.BytesIO(get(url + "fit_files/8/0_0.png"))))
        assert tile.shape == (160, 254 + 1, 3)
        first_psnr = json.loads(get(url + "psnr.json?x0=0&y0=0&x1=1&y1=1"))
        assert first_psnr["points"] == 64 * 40
        # someone is looking: the version moves on as the weights change
        wait_for(lambda: status()["version"] > early["version"] and
                 status()["step"] > first_psnr["step"] + 60, "tiles not refreshed")
        later = json.loads(get(url + "psnr.json?x0=0&y0=0&x1=1&y1=1"))
        assert later["step"] > first_psnr["step"] and later["psnr"] > first_psnr["psnr"] + 1
        assert not np.array_equal(
            tile, np.array(Image.open(io.BytesIO(get(url + "fit_files/8/0_0.png")))))
        curve = status()["curve"]
        assert [step for step, _ in curve] == list(range(20, 20 * len(curve) + 1, 20))
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err
    assert "stopped by SIGINT" in err


def test_serve_on_a_port_in_use_is_one_line(checker, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            train.main(["-i", str(checker), "--root", str(tmp_path / "logs"), "--max_steps",
                        "1", "--serve", str(port)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        f"train.py: error: --serve: port {port} on 127.0.0.1 is in use; pick another port "
        "(0: any free one)\n")
    assert not list((tmp_path / "logs").rglob("version_*"))       # no empty log folder left
