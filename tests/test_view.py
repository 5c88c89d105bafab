"""Tests for view.py, the browser Deep Zoom server, over real HTTP: a server process on a free
port, tiles checked pixel for pixel against render.render_region (and byte for byte against
the files `render.py -o fit.dzi` writes), 404s for everything outside the pyramids including
traversal attempts, the checkpoint reloaded when it changes, one-line errors before listening,
a clean stop on SIGINT / SIGTERM, and bounded waiting."""
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

import images
import render
import tileserver
import view
from conftest import ROOT
from field import load_field, read_checkpoint
from pixels import PixelSource
from tiles import DZI_NAMESPACE, dzi_levels, dzi_tiles

PYTHON = sys.executable


class ViewServer:
    """`python view.py ARGS --port 0` in a subprocess; .url once it listens, .notes the lines
    printed after the URL's."""

    def __init__(self, *args, cwd=None):
        self.process = subprocess.Popen(
            [PYTHON, os.path.join(ROOT, "view.py"), *map(str, args), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
        self.lines = []
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"view.py ended: {self.process.stderr.read()}")
            self.lines.append(line)
            if " at http://" in line:
                self.url = line.rsplit(" at ", 1)[1].strip()
                break
        # then one line for each thing to know: an open --host, OpenSeadragon missing
        args = list(map(str, args))
        host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
        count = (view.exposure_warning(host) is not None) + (not os.path.isdir(tileserver.OSD_DIR))
        self.notes = [self.process.stdout.readline() for _ in range(count)]

    def get(self, path):
        """(status, body bytes) of GET url+path (path sent as written, not normalised)."""
        host, port = self.url[len("http://"):].rstrip("/").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request("GET", path)
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()

    def image(self, path):
        status, body = self.get(path)
        assert status == 200, (path, status, body[:200])
        array = np.array(Image.open(io.BytesIO(body)))
        return array.reshape(array.shape[0], array.shape[1], -1)

    def json(self, path):
        status, body = self.get(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def stop(self, signum=signal.SIGINT):
        """Send a signal; (exit status, stdout rest, stderr)."""
        self.process.send_signal(signum)
        out, err = self.process.communicate(timeout=30)
        return self.process.returncode, out, err


@pytest.fixture(scope="module")
def fit(checkpoint, tmp_path_factory):
    """A copy of the shared checkpoint (the tests replace it) and its source image."""
    folder = tmp_path_factory.mktemp("view")
    ckpt = folder / "last.ckpt"
    shutil.copy(checkpoint, ckpt)
    # conftest trained on FOLDER/src.png, logging to FOLDER/logs/experiments/src/version_0/...
    return ckpt, os.path.join(os.path.dirname(checkpoint), *[os.pardir] * 5, "src.png")


@pytest.fixture(scope="module")
def server(fit):
    ckpt, source = fit
    running = ViewServer("--ckpt", ckpt, "--source", source)
    yield running
    running.stop()


def expected_tile(field, size, level, col, row):
    """render_region of tile (col, row) of `level` of a pyramid whose top level is `size`."""
    width, height = dzi_levels(*size)[level]
    rect = {(c, r): (x0, y0, x1, y1) for c, r, x0, y0, x1, y1
            in dzi_tiles(width, height, tileserver.TILE_SIZE, tileserver.OVERLAP)}
    x0, y0, x1, y1 = rect[col, row]
    return render.render_region(field, width, height, window=((y0, y1), (x0, x1)))


def test_tiles_are_render_region_windows(server, fit):
    field, info = load_field(str(fit[0]))
    size = (info["width"] * tileserver.ZOOM, info["height"] * tileserver.ZOOM)     # 160 x 96
    root = ET.fromstring(server.get("/fit.dzi")[1])
    ns = "{" + DZI_NAMESPACE + "}"
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("254", "1", "jpg")
    assert root.find(ns + "Size").attrib == {"Width": "160", "Height": "96"}
    top = len(dzi_levels(*size)) - 1
    # the top level is 4x the source resolution: new pixels from the field, not enlarged ones
    for level, col, row in [(top, 0, 0), (top - 2, 0, 0), (top - 4, 0, 0), (0, 0, 0)]:
        np.testing.assert_array_equal(server.image(f"/fit_files/{level}/{col}_{row}.png"),
                                      expected_tile(field, size, level, col, row))


def test_jpg_tiles_are_the_files_render_py_writes(server, fit, tmp_path):
    dzi = tmp_path / "fit.dzi"
    zoom = str(tileserver.ZOOM)
    assert render.main(["--ckpt", str(fit[0]), "-o", str(dzi), "--scale", zoom]) == 0
    assert server.get("/fit.dzi")[1] == dzi.read_bytes()
    folder = tmp_path / "fit_files"
    tiles = sorted(f"{level}/{name}" for level in os.listdir(folder) if level.isdigit()
                   for name in os.listdir(folder / level))
    assert len(tiles) == 9       # levels 0..8 one tile each: 160 x 96 fits in one tile
    for tile in tiles:
        assert server.get(f"/fit_files/{tile}") == (200, (folder / tile).read_bytes()), tile


def test_source_tiles_and_error_map(server, fit):
    field, info = load_field(str(fit[0]))
    source = images.read_image(fit[1])
    top = len(dzi_levels(40, 24)) - 1
    root = ET.fromstring(server.get("/source.dzi")[1])
    assert root.find("{" + DZI_NAMESPACE + "}Size").attrib == {"Width": "40",
                                                                     "Height": "24"}
    np.testing.assert_array_equal(server.image(f"/source_files/{top}/0_0.png"), source)
    assert server.get(f"/source_files/{top + 1}/0_0.png")[0] == 404
    # the error map at 4x: the field against the source sampled bilinearly at each pixel
    fine = (160, 96)
    fit_tile = expected_tile(field, fine, 8, 0, 0)
    source_tile = render.render_region(PixelSource(source), 160, 96)
    error = server.image("/error_files/8/0_0.png")
    np.testing.assert_array_equal(error, tileserver.error_colours(fit_tile, source_tile))
    diff = np.abs(fit_tile.astype(int) - source_tile.astype(int)).max(axis=2)
    assert (error[diff == 0] == 0).all() and (error[diff >= 32] == 255).all()


def test_region_psnr_is_the_fit_against_the_source(server, fit):
    field, _ = load_field(str(fit[0]))
    source = images.read_image(fit[1]).astype(np.float64)
    whole = server.json("/psnr.json?x0=0&y0=0&x1=1&y1=1")
    mse = np.mean((render.render_region(field, 40, 24) - source) ** 2)
    assert whole["points"] == 40 * 24
    assert whole["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=1e-3)
    # the right half, given past the image's edge: clipped to columns 20..39
    right = server.json("/psnr.json?x0=0.5&y0=-1&x1=3&y1=1.5")
    mse = np.mean((render.render_region(field, 40, 24)[:, 20:] - source[:, 20:]) ** 2)
    assert right["points"] == 20 * 24
    assert right["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=1e-3)
    # zoomed past one pixel: that pixel
    one = server.json("/psnr.json?x0=0.5&y0=0.5&x1=0.51&y1=0.51")
    assert one["points"] == 1
    # a region wholly off the image, on any side (or touching its edge from outside): nothing
    for region in ("x0=-2&y0=0&x1=-1&y1=1", "x0=0&y0=-2&x1=1&y1=-1", "x0=-1&y0=0&x1=0&y1=1",
                   "x0=1.5&y0=0&x1=2&y1=1", "x0=0&y0=1&x1=1&y1=2"):
        assert server.json(f"/psnr.json?{region}") == dict(psnr=None, points=0, step=3), region
    assert server.get("/psnr.json?x0=1&y0=0&x1=0&y1=1")[0] == 404
    assert server.get("/psnr.json?x0=nan&y0=0&x1=1&y1=1")[0] == 404


@pytest.mark.parametrize("path", [
    "/fit_files/9/0_0.jpg",          # past the top level (8: 160 x 96)
    "/fit_files/8/1_0.jpg",          # column past the level's tiles
    "/fit_files/8/0_1.png",          # row past them
    "/source_files/7/0_0.jpg",       # past the source's top level (6: 40 x 24)
    "/fit_files/99999/0_0.jpg", "/fit_files/7/99999999999_0.jpg",
    "/fit_files/07/0_0.jpg",         # not the canonical spelling
    "/fit_files/7/0_0.gif", "/fit_files/7/0_0.jpg/", "/fit_files/7/-1_0.jpg",
    "/other.dzi", "/fit_files/", "/index.html", "/viewer/index.html", "/view.py",
    "/../view.py", "/%2e%2e/view.py", "/fit_files/..%2f..%2fview.py", "/viewer/../view.py",
    "/openseadragon/../../../view.py", "/openseadragon/images/../../../../view.py",
    "/openseadragon/%2e%2e%2fopenseadragon.js", "//etc/passwd", "/%2fetc%2fpasswd",
    "/openseadragon/openseadragon.js",
])
def test_everything_outside_the_served_set_is_404(server, path):
    status, body = server.get(path)
    assert (status, body) == (404, b"not found\n")


def test_recorded_source_is_found_in_the_current_folder(fit):
    running = ViewServer("--ckpt", os.path.abspath(fit[0]), cwd=os.path.dirname(fit[1]))
    try:
        assert running.lines == [f"view.py: serving {os.path.abspath(fit[0])} (step 3, with its "
                                 f"source) at {running.url}\n"]
        assert running.notes == ([] if os.path.isdir(tileserver.OSD_DIR) else   # a fresh machine
                                 [f"view.py: {tileserver.OSD_MISSING}\n"])
        assert running.json("/status.json")["source"] is True
    finally:
        running.stop()


def test_page_and_assets(server):
    status, page = server.get("/")
    assert status == 200 and b'src="/view.js"' in page
    assert b"OpenSeadragon" in server.get("/view.js")[1]
    status = server.json("/status.json")
    assert status == dict(version=status["version"], step=3, live=False, curve=[], width=40,
                          height=24, zoom=4, source=True,
                          viewer=(None if os.path.isdir(tileserver.OSD_DIR)
                                  else tileserver.OSD_MISSING))
    if os.path.isdir(tileserver.OSD_DIR):
        with open(os.path.join(tileserver.OSD_DIR, "openseadragon.min.js"), "rb") as f:
            assert server.get("/openseadragon/openseadragon.min.js") == (200, f.read())
        assert server.get("/openseadragon/images/home_rest.png")[0] == 200


def test_reloads_when_the_checkpoint_changes(fit, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(fit[0], ckpt)
    running = ViewServer("--ckpt", ckpt)           # no source: fit only
    try:
        before = running.json("/status.json")
        assert before["source"] is False and running.get("/source.dzi")[0] == 404
        first = running.image("/fit_files/7/0_0.png")
        # another fit of the same image: every weight changed, a later step; written the way
        # train.py writes (a complete file renamed into place)
        ckpt_dict = read_checkpoint(str(ckpt))
        generator = torch.Generator().manual_seed(1)
        for key, value in ckpt_dict["state_dict"].items():
            value.add_(torch.randn(value.shape, generator=generator) * 0.1)
        ckpt_dict["global_step"] = 4
        torch.save(ckpt_dict, tmp_path / "next.ckpt")
        os.replace(tmp_path / "next.ckpt", ckpt)
        deadline = time.monotonic() + 20
        while running.json("/status.json")["version"] == before["version"]:
            assert time.monotonic() < deadline, "not reloaded"
            time.sleep(0.2)
        assert running.json("/status.json")["step"] == 4
        field, info = load_field(str(ckpt))
        second = running.image("/fit_files/7/0_0.png")
        np.testing.assert_array_equal(second, expected_tile(field, (160, 96), 7, 0, 0))
        assert not np.array_equal(first, second)
        assert running.process.stdout.readline() == f"view.py: reloaded {ckpt} (step 4)\n"
        # a broken file in its place: one line, the last good field kept
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
        assert running.process.stdout.readline().startswith(
            f"view.py: kept step 4: {ckpt}: truncated or corrupt checkpoint")
        np.testing.assert_array_equal(running.image("/fit_files/7/0_0.png"), second)
    finally:
        code, out, err = running.stop(signal.SIGTERM)
    assert (code, out, err) == (0, "view.py: stopped\n", "")


def run_view(capsys, *args):
    """view.main in this process: (exit status, stdout, stderr); it must exit before serving."""
    with pytest.raises(SystemExit) as stopped:
        view.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_bad_inputs_are_one_line_before_listening(fit, tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(fit[0].read_bytes()[:2000])
    code, out, err = run_view(capsys, "--ckpt", junk)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"view.py: error: {junk}: truncated or corrupt checkpoint")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    code, out, err = run_view(capsys, "--ckpt", text)
    assert (code, err) == (2, f"view.py: error: {text}: not a checkpoint (train.py writes them "
                              "with torch.save: a zip archive)\n")
    code, out, err = run_view(capsys, "--ckpt", tmp_path)
    assert (code, err) == (2, f"view.py: error: {tmp_path}: is a folder, not a checkpoint file "
                              "(train.py saves them as .../checkpoints/last.ckpt)\n")
    code, out, err = run_view(capsys, "--ckpt", tmp_path / "none.ckpt")
    assert (code, err) == (2, f"view.py: error: {tmp_path / 'none.ckpt'}: no such checkpoint "
                              "file\n")
    wrong = tmp_path / "wrong.png"
    images.write_image(str(wrong), np.zeros((10, 12, 3), np.uint8))
    code, out, err = run_view(capsys, "--ckpt", fit[0], "--source", wrong)
    assert (code, err) == (2, f"view.py: error: {wrong}: the source is 12x10x3, the checkpoint "
                              "was trained on 40x24x3\n")
    code, out, err = run_view(capsys, "--ckpt", fit[0], "--source", tmp_path / "none.png")
    assert code == 2 and err.startswith("view.py: error: ") and err.count("\n") == 1
    code, out, err = run_view(capsys, "--ckpt", fit[0], "--port", "70000")
    assert code == 2 and err.count("\n") == 1 and "70000" in err


def test_port_in_use_is_one_line_naming_it(fit, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_view(capsys, "--ckpt", fit[0], "--port", port)
    assert (code, out) == (2, "")
    assert err == f"view.py: error: port {port} on 127.0.0.1 is in use; pick another port " \
                  "(0: any free one)\n"


def test_ctrl_c_stops_cleanly_while_serving(fit):
    running = ViewServer("--ckpt", fit[0])
    assert running.get("/fit_files/7/0_0.jpg")[0] == 200
    assert running.url.startswith("http://127.0.0.1:")      # safe by default
    code, out, err = running.stop(signal.SIGINT)
    assert (code, out, err) == (0, "view.py: stopped\n", "")


def test_waiting_is_bounded(fit, monkeypatch):
    # a scene whose renders never run (no worker): requests wait WAIT_SECONDS, then 503;
    # past MAX_WAITING queued, 503 at once
    monkeypatch.setattr(tileserver, "WAIT_SECONDS", 0.5)
    monkeypatch.setattr(tileserver, "MAX_WAITING", 2)
    field, info = load_field(str(fit[0]))
    scene = tileserver.Scene(field, info)
    server, url = tileserver.start_server(scene, "127.0.0.1", 0)
    try:
        replies = []

        def fetch(path):
            try:
                urllib.request.urlopen(url + path, timeout=30)
                replies.append(200)
            except urllib.error.HTTPError as error:
                replies.append((error.code, error.headers["Retry-After"]))
        threads = [threading.Thread(target=fetch, args=(f"fit_files/{level}/0_0.png",))
                   for level in range(4)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert replies == [(503, "1")] * 4 and time.monotonic() - start < 5
        assert scene.queue.jobs.qsize() == 2 and scene.queue.run_pending() == 0   # cancelled
        threading.Thread(target=scene.queue.work, args=(threading.Event(),), daemon=True).start()
        with urllib.request.urlopen(url + "fit_files/7/0_0.png", timeout=30) as reply:
            assert reply.status == 200
    finally:
        server.close()


def test_without_openseadragon_the_page_says_how_to_get_it(fit, monkeypatch, tmp_path):
    monkeypatch.setattr(tileserver, "OSD_DIR", str(tmp_path / "node_modules" / "openseadragon"))
    field, info = load_field(str(fit[0]))
    server, url = tileserver.start_server(tileserver.Scene(field, info), "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(url + "status.json", timeout=30) as reply:
            assert json.load(reply)["viewer"] == tileserver.OSD_MISSING
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "openseadragon/openseadragon.min.js", timeout=30)
        assert missing.value.code == 404
        with urllib.request.urlopen(url + "fit.dzi", timeout=30) as reply:   # tiles still serve
            assert reply.status == 200
    finally:
        server.close()
    assert tileserver.OSD_MISSING == ("OpenSeadragon is missing: run `npm ci` in the hashgrid "
                                      "folder (needs Node.js), then reload the page")
