"""Look at a fit in the browser: a Deep Zoom server that renders every tile from the field.

    python view.py --ckpt last.ckpt [--source image] [--port 8000] [--host 127.0.0.1]

prints one URL. The page (viewer/, OpenSeadragon from npm) shows the fit from the whole image
down to ZOOM times past the source resolution (the field is continuous: new pixels, not
enlarged ones), the source beside it in step, the visible region's PSNR and the per-pixel
error. Any Deep Zoom viewer can open the pyramids: /fit.dzi, /fit_files/L/C_R.jpg (or .png),
/source.dzi and /error.dzi when there is a source. A tile is render.render_region of its window,
the same pixels `render.py -o fit.dzi --scale ZOOM` writes. When the checkpoint file changes
it is reloaded and the page refreshes its tiles. live.py serves the same during training.
"""
import collections
import errno
import io
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import numpy as np
import torch

import cli
import images
import pixels
import render
from field import CheckpointError, load_field
from hardware import DEVICE_HELP

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_DIR = os.path.join(HERE, "viewer")
OSD_DIR = os.path.join(HERE, "node_modules", "openseadragon", "build", "openseadragon")
OSD_MISSING = ("OpenSeadragon is missing: run `npm ci` in the hashgrid folder (needs Node.js), "
               "then reload the page")
TILE_SIZE, OVERLAP = render.DZI_DEFAULTS["tile_size"], render.DZI_DEFAULTS["overlap"]
FORMATS = {"jpg": "image/jpeg", "png": "image/png"}
QUALITY = 95                       # render.py's default, so served jpg tiles equal its files
ZOOM = 4                           # levels past the source resolution: 2**2
CACHE_BYTES = 64 << 20             # encoded tiles kept, least recently used dropped first
MAX_WAITING = 64                   # renders queued; beyond that a request gets 503
MAX_CONNECTIONS = 32               # open connections; beyond that a new one is closed
WAIT_SECONDS = 60                  # a request waits at most this long for its render
PSNR_POINTS = 2 ** 16              # region PSNR: every source pixel up to this many, else a grid
ERROR_FULL_SCALE = 32              # per-pixel error map: white at 32 8-bit levels off
RELOAD_POLL = 1.0                  # seconds between looks at the checkpoint file
TILE_PATH = re.compile(r"/(fit|source|error)_files/(0|[1-9][0-9]{0,3})/(0|[1-9][0-9]{0,8})_"
                       r"(0|[1-9][0-9]{0,8})\.(jpg|png)")


class SourceField:
    """The source image as a field: bilinear at xy in linear light, what training samples
    (pixels.bilinear_sample), so a source tile at the source resolution is its pixels."""

    def __init__(self, array, periodic=""):
        self.pixels = pixels.host_tensor(array)
        self.lut = torch.tensor(images.SRGB_TO_LINEAR_LUT)
        self.periodic = periodic

    def __call__(self, xy):
        return pixels.bilinear_sample(self.pixels, self.lut, xy, self.periodic)


def error_colours(fit, source):
    """Per-pixel error map of two uint8 tiles: the largest channel difference on a black-red-
    yellow-white ramp, white at ERROR_FULL_SCALE levels. (H, W, 3) uint8."""
    diff = np.abs(fit.astype(np.int16) - source.astype(np.int16)).max(axis=2)
    v = np.minimum(diff, ERROR_FULL_SCALE) * (3.0 / ERROR_FULL_SCALE)
    ramp = np.stack([v, v - 1, v - 2], axis=2)
    return (np.clip(ramp, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode(tile, fmt):
    """A uint8 tile as the bytes of a jpg or png, encoded as images.write_image writes them."""
    buffer = io.BytesIO()
    images._write_pil(buffer, "." + fmt, tile, QUALITY)
    return buffer.getvalue()


class Busy(Exception):
    """Too many renders waiting (HTTP 503)."""


class RenderQueue:
    """Renders run one at a time where the field may be used: a worker thread (view.py) or the
    training loop between steps (live.py, run_pending). At most MAX_WAITING wait."""

    def __init__(self):
        self.jobs = queue.Queue(MAX_WAITING)

    def call(self, fn):
        """fn() run by the queue's runner; Busy when full or not run within WAIT_SECONDS."""
        job = dict(fn=fn, done=threading.Event(), result=None, error=None, cancelled=False)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy() from None
        if not job["done"].wait(WAIT_SECONDS):
            job["cancelled"] = True
            raise Busy()
        if job["error"] is not None:
            raise job["error"]
        return job["result"]

    def run_pending(self, budget=None):
        """Run waiting jobs until none is left or `budget` seconds have passed (at least one
        job runs); returns the number run."""
        start, count = time.monotonic(), 0
        while budget is None or count == 0 or time.monotonic() - start < budget:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            count += self._run(job)
        return count

    def work(self, stop):
        """Worker thread body: run jobs as they come until the `stop` event is set."""
        while not stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self._run(job)

    @staticmethod
    def _run(job):
        if job["cancelled"]:
            return 0
        try:
            job["result"] = job["fn"]()
        except Exception as error:       # reported to the waiting request as HTTP 500
            job["error"] = error
        job["done"].set()
        return 1


class Scene:
    """What is served: the field (replaced on reload or updated live), the source, the
    pyramids' geometry, a version that changes whenever the tiles do, and the PSNR curve."""

    def __init__(self, field, info, source=None, zoom=ZOOM, live=False):
        self.width, self.height, self.channels = info["width"], info["height"], info["channels"]
        self.periodic = info["config"].periodic
        self.zoom, self.live = zoom, live
        self.source = None if source is None else SourceField(source, self.periodic)
        self.lock = threading.Lock()
        self.field, self.step, self.version = field, info["global_step"], 1
        self.curve = []                       # (step, PSNR dB) so far
        self.seen = 0.0                       # time.monotonic() of the last request
        self.cache = collections.OrderedDict()
        self.cached_bytes = 0
        self.queue = RenderQueue()

    def sizes(self):
        """Top-level size of each served pyramid: the fit and the error map ZOOM times the
        source resolution, the source at its own."""
        fine = (self.width * self.zoom, self.height * self.zoom)
        if self.source is None:
            return {"fit": fine}
        return {"fit": fine, "error": fine, "source": (self.width, self.height)}

    def update(self, field=None, step=None):
        """New weights (a reloaded checkpoint, or the live field after more steps): the tiles
        change, so the version moves on and the cache empties."""
        with self.lock:
            if field is not None:
                self.field = field
            if step is not None:
                self.step = step
            self.version += 1
            self.cache.clear()
            self.cached_bytes = 0

    def snapshot(self):
        with self.lock:
            return self.field, self.version

    def status(self):
        with self.lock:
            return dict(version=self.version, step=self.step, live=self.live,
                        curve=list(self.curve), width=self.width, height=self.height,
                        zoom=self.zoom, source=self.source is not None,
                        viewer=None if os.path.isdir(OSD_DIR) else OSD_MISSING)

    def tile(self, name, level, col, row, fmt):
        """Encoded bytes of one tile, or None when it is outside that pyramid."""
        size = self.sizes().get(name)
        levels = render.dzi_levels(*size) if size else []
        if level >= len(levels):
            return None
        width, height = levels[level]
        window = tile_window(width, height, col, row)
        if window is None:
            return None
        field, version = self.snapshot()
        key = (version, name, level, col, row, fmt)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        data = self.queue.call(lambda: encode(self._render(field, name, width, height,
                                                           window), fmt))
        with self.lock:
            if version == self.version and key not in self.cache:
                self.cache[key] = data
                self.cached_bytes += len(data)
                while self.cached_bytes > CACHE_BYTES:
                    self.cached_bytes -= len(self.cache.popitem(last=False)[1])
        return data

    def _render(self, field, name, width, height, window):
        if name == "source":
            return render.render_region(self.source, width, height, window=window)
        fit = render.render_region(field, width, height, window=window)
        if name == "fit":
            return fit
        return error_colours(fit, render.render_region(self.source, width, height,
                                                       window=window))

    def region_psnr(self, region):
        """PSNR (dB, None for an empty region) of the fit against the source over `region`
        (normalised, clipped to the image), and the number of points scored: every source
        pixel the region touches up to PSNR_POINTS, else an even grid of about that many."""
        x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in region)
        px0, py0 = int(x0 * self.width), int(y0 * self.height)
        px1 = max(px0 + 1, min(self.width, math.ceil(x1 * self.width)))
        py1 = max(py0 + 1, min(self.height, math.ceil(y1 * self.height)))
        if px0 >= self.width or py0 >= self.height:
            return None, 0
        shrink = max(1.0, ((px1 - px0) * (py1 - py0) / PSNR_POINTS) ** 0.5)
        w, h = max(1, int((px1 - px0) / shrink)), max(1, int((py1 - py0) / shrink))
        snapped = (px0 / self.width, py0 / self.height, px1 / self.width, py1 / self.height)
        field, _ = self.snapshot()

        def score():
            fit = render.render_region(field, w, h, snapped)
            source = render.render_region(self.source, w, h, snapped)
            sse, count = pixels_sse(fit, source)
            return pixels.psnr_from_sse(sse, count)
        return self.queue.call(score), w * h


def pixels_sse(a, b):
    """Sum of squared differences of two uint8 arrays, and the number of values."""
    diff = a.astype(np.int32) - b.astype(np.int32)
    return float(np.einsum("ijk,ijk->", diff, diff, dtype=np.int64)), diff.size


def tile_window(width, height, col, row):
    """((y0, y1), (x0, x1)) of tile (col, row) of a width x height level (render.dzi_tiles
    along each axis), or None when the level has no such tile."""
    cols, rows = _axis_tiles(width), _axis_tiles(height)
    if col >= len(cols) or row >= len(rows):
        return None
    return rows[row], cols[col]


_spans = {}


def _axis_tiles(length):
    """The [start, stop) spans of one axis's tiles, remembered per length."""
    if length not in _spans:
        _spans[length] = [(x0, x1) for _, _, x0, _, x1, _ in
                          render.dzi_tiles(length, 1, TILE_SIZE, OVERLAP)]
    return _spans[length]


def static_files():
    """URL path -> file of everything besides tiles the server may send: the page, its script,
    and OpenSeadragon's script and button images when npm installed them. Fixed at start, so
    no request can name any other file."""
    files = {"/": os.path.join(PAGE_DIR, "index.html"),
             "/view.js": os.path.join(PAGE_DIR, "view.js")}
    if os.path.isdir(OSD_DIR):
        files["/openseadragon/openseadragon.min.js"] = os.path.join(OSD_DIR, "openseadragon.min.js")
        image_dir = os.path.join(OSD_DIR, "images")
        for name in sorted(os.listdir(image_dir)):
            if name.endswith(".png"):
                files[f"/openseadragon/images/{name}"] = os.path.join(image_dir, name)
    return files


CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".png": "image/png"}


class Handler(BaseHTTPRequestHandler):
    """GET/HEAD of the page, its assets, status, region PSNR, .dzi and tiles; 404 otherwise."""
    protocol_version = "HTTP/1.1"
    timeout = 30                        # an idle or slow connection is dropped
    server_version = "hashgrid-view"

    def do_GET(self):
        self.reply(body=True)

    def do_HEAD(self):
        self.reply(body=False)

    def reply(self, body):
        self.body = body
        self.server.scene.seen = time.monotonic()
        path, _, query = self.path.partition("?")
        try:
            self.answer(path, query)
        except Busy:
            self.send(503, b"busy: too many tiles waiting, retry\n", "text/plain", retry=True)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as error:       # one line to the client; the server keeps serving
            self.send(500, f"render failed: {cli.one_line(error)}\n".encode(), "text/plain")

    def answer(self, path, query):
        scene, files = self.server.scene, self.server.files
        if path in files:
            with open(files[path], "rb") as f:
                return self.send(200, f.read(), CONTENT_TYPES[os.path.splitext(files[path])[1]])
        if path == "/status.json":
            return self.send_json(scene.status())
        if path == "/psnr.json" and scene.source is not None:
            region = parse_region(query)
            if region is not None:
                psnr, points = scene.region_psnr(region)
                psnr = None if psnr is None or psnr == float("inf") else round(psnr, 3)
                return self.send_json(dict(psnr=psnr, points=points, step=scene.step))
        name = path[1:-4] if path.endswith(".dzi") else None
        if name in scene.sizes():
            width, height = scene.sizes()[name]
            xml = render.dzi_xml(width, height, TILE_SIZE, OVERLAP, "jpg")
            return self.send(200, xml.encode(), "application/xml")
        match = TILE_PATH.fullmatch(path)
        if match:
            name, level, col, row, fmt = match.groups()
            data = scene.tile(name, int(level), int(col), int(row), fmt)
            if data is not None:
                return self.send(200, data, FORMATS[fmt])
        self.send(404, b"not found\n", "text/plain")

    def send_json(self, value):
        self.send(200, json.dumps(value).encode(), "application/json")

    def send(self, code, body, content_type, retry=False):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if retry:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if self.body:
            self.wfile.write(body)

    def log_message(self, format, *args):      # quiet: one line at start is the interface
        pass


def parse_region(query):
    """x0, y0, x1, y1 from a query string (finite floats, x0 < x1, y0 < y1), or None."""
    values = parse_qs(query)
    try:
        region = [float(values[key][0]) for key in ("x0", "y0", "x1", "y1")]
    except (KeyError, ValueError):
        return None
    if not all(np.isfinite(region)) or region[0] >= region[2] or region[1] >= region[3]:
        return None
    return region


class Server(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""
    daemon_threads = True

    def __init__(self, host, port, scene):
        self.scene, self.files = scene, static_files()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), Handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def start_server(scene, host, port):
    """Bind and serve `scene` in a background thread; returns (server, url). OSError with one
    line naming the port when it cannot be bound."""
    try:
        server = Server(host, port, scene)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is in use; pick another port (0: "
                          "any free one)") from None
        raise OSError(f"cannot listen on {host} port {port}: {error.strerror or error}") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="view-http").start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return server, f"http://{shown}:{bound_port}/"


def find_source(path, info):
    """The source image for a checkpoint: `path` when given, else the file name the checkpoint
    recorded when it is in the current folder (else None). (H, W, C) uint8; ValueError /
    ImageError when it cannot be used."""
    if path is None:
        path = info["source"]
        if not path or not os.path.isfile(path):
            return None
    source = images.to_srgb8(images.read_image(path))
    if source.shape != (info["height"], info["width"], info["channels"]):
        raise ValueError(f"{path}: the source is {source.shape[1]}x{source.shape[0]}x"
                         f"{source.shape[2]}, the checkpoint was trained on "
                         f"{info['width']}x{info['height']}x{info['channels']}")
    return source


def watch(path, scene, device, stop):
    """Reload the checkpoint whenever the file changes (train.py renames a complete file into
    place); a file that does not load, or fits another image, keeps the current field."""
    def stamp():
        try:
            st = os.stat(path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None
    seen = stamp()
    while not stop.wait(RELOAD_POLL):
        now = stamp()
        if now is None or now == seen:
            continue
        seen = now
        try:
            field, info = load_field(path, device)
            if (info["width"], info["height"], info["channels"]) != \
                    (scene.width, scene.height, scene.channels):
                raise CheckpointError(f"{path}: now fits another image size")
        except (CheckpointError, OSError) as error:
            print(f"view.py: kept step {scene.step}: {cli.one_line(error)}", flush=True)
            continue
        scene.update(field, info["global_step"])
        print(f"view.py: reloaded {path} (step {info['global_step']})", flush=True)


def build_parser():
    parser = cli.ArgumentParser(
        prog="view.py", description="Serve a fit as a zoomable image in the browser (Deep "
        "Zoom tiles rendered from the field on demand), reloading it when the checkpoint "
        "changes.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--source", help="the image it was trained on, shown beside it "
                        "[default: the checkpoint's recorded file name, if it is here]")
    parser.add_argument("--port", type=cli.integer(0, 65535), default=8000,
                        help="port; 0 picks a free one [default: %(default)s]")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; "
                        "127.0.0.1 is only this machine (use an SSH port forward from "
                        "elsewhere) [default: %(default)s]")
    parser.add_argument("--zoom", type=cli.integer(0, 6), default=ZOOM.bit_length() - 1,
                        metavar="K", help="levels past the source resolution: the fit's "
                        "finest level is 2**K times the source [default: %(default)s]")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} [default: %(default)s]")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = render.resolve_device(args.device)
        field, info = load_field(args.ckpt, device)
        source = find_source(args.source, info)
        scene = Scene(field, info, source, zoom=2 ** args.zoom)
        server, url = start_server(scene, args.host, args.port)
    except (CheckpointError, images.ImageError, ValueError, OSError) as error:
        parser.error(error)
    except KeyboardInterrupt:        # Ctrl-C while loading
        parser.exit(130, "view.py: interrupted\n")
    stop = threading.Event()
    # Ctrl-C or SIGTERM: stop listening, finish, exit 0
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    workers = [threading.Thread(target=scene.queue.work, args=(stop,), name="view-render"),
               threading.Thread(target=watch, args=(args.ckpt, scene, device, stop),
                                name="view-reload")]
    for thread in workers:
        thread.start()
    if not os.path.isdir(OSD_DIR):
        print(f"view.py: {OSD_MISSING}", flush=True)
    print(f"view.py: serving {args.ckpt} (step {info['global_step']}"
          + (", with its source" if source is not None else ", no source") + f") at {url}",
          flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    for thread in workers:      # torch's threads must not be torn down under a render
        thread.join()
    print("view.py: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
