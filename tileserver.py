"""The Deep Zoom server of view.py and of train.py --serve (live.py): a fit's tiles, rendered
from the field on demand, its source's and the error map's, the page (viewer/) and its status.

    scene = Scene(field, info, source)          # info: load_field's; source: (H, W, C) uint8
    server, url = start_server(scene, "127.0.0.1", 8000)
    scene.queue.work(stop)                      # renders, on a thread where the field may be used

Pyramids: /fit.dzi, /fit_files/L/C_R.jpg (or .png), /source.dzi and /error.dzi when there is a
source; a tile is tiles.render_region of its window, the same pixels `render.py -o fit.dzi
--scale ZOOM` writes. /status.json (version, step, PSNR curve) and /psnr.json?x0=&y0=&x1=&y1=
(the region's PSNR) feed the page.

Serving is tornado's HTTP/1.1 (keep-alive, one write per response with TCP_NODELAY, a deadline
for every request's headers, a listen backlog) on an asyncio loop of its own thread; renders
wait in a RenderQueue without holding it. Before any work a request is refused (403) when its
Host header is not this server's (DNS rebinding) or another site's page sent it (Sec-Fetch-Site,
Origin, Referer); past MAX_CONNECTIONS connections or MAX_WAITING renders the answer is 503.
"""
import asyncio
import collections
import concurrent.futures
import datetime
import errno
import io
import json
import math
import os
import queue
import re
import threading
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import tornado.gen
import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.util
import tornado.web

import cli
import images
from pixels import PixelSource, psnr_from_sse, uint8_sse
from tiles import DZI_DEFAULTS, dzi_levels, dzi_tiles, dzi_xml, render_region

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_DIR = os.path.join(HERE, "viewer")
OSD_DIR = os.path.join(HERE, "node_modules", "openseadragon", "build", "openseadragon")
OSD_MISSING = ("OpenSeadragon is missing: run `npm ci` in the hashgrid folder (needs Node.js), "
               "then reload the page")
TILE_SIZE, OVERLAP = DZI_DEFAULTS["tile_size"], DZI_DEFAULTS["overlap"]
FORMATS = {"jpg": "image/jpeg", "png": "image/png"}
QUALITY = 95                       # render.py's default, so served jpg tiles equal its files
ZOOM = 4                           # levels past the source resolution: 2**2
CACHE_BYTES = 64 << 20             # encoded tiles kept, least recently used dropped first
MAX_WAITING = 64                   # renders queued; beyond that a request gets 503
MAX_CONNECTIONS = 256              # open connections; beyond that a new one gets 503
HEADER_SECONDS = 10                # a request's headers (or the next one's) arrive within this
BACKLOG = 128                      # connections the kernel holds before we accept them
WAIT_SECONDS = 60                  # a request waits at most this long for its render
PSNR_POINTS = 2 ** 16              # region PSNR: every source pixel up to this many, else a grid
ERROR_FULL_SCALE = 32              # per-pixel error map: white at 32 8-bit levels off
TILE_PATH = re.compile(r"/(fit|source|error)_files/(0|[1-9][0-9]{0,3})/(0|[1-9][0-9]{0,8})_"
                       r"(0|[1-9][0-9]{0,8})\.(jpg|png)")


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

    async def call(self, fn):
        """fn() run by the queue's runner, awaited on the server's loop; Busy when the queue is
        full or fn has not started within WAIT_SECONDS (then it never runs)."""
        job = (fn, concurrent.futures.Future())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy() from None
        try:    # a timeout cancels the wrapped future, so a job not yet started is dropped
            return await asyncio.wait_for(asyncio.wrap_future(job[1]), WAIT_SECONDS)
        except asyncio.TimeoutError:
            raise Busy() from None

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
        fn, future = job
        if not future.set_running_or_notify_cancel():      # its request gave up waiting
            return 0
        try:
            future.set_result(fn())
        except Exception as error:       # reported to the waiting request as HTTP 500
            future.set_exception(error)
        return 1


class Scene:
    """What is served: the field (replaced on reload or updated live), the source, the
    pyramids' geometry, a version that changes whenever the tiles do, and the PSNR curve."""

    def __init__(self, field, info, source=None, zoom=ZOOM, live=False):
        self.width, self.height, self.channels = info["width"], info["height"], info["channels"]
        self.periodic = info["config"].periodic
        self.zoom, self.live = zoom, live
        self.source = None if source is None else PixelSource(source, self.periodic)
        self.lock = threading.Lock()
        # versions count on from the start time in ms: a later server's are higher, so the
        # tiles a browser keeps for ?v= never come from another server on the same port
        self.field, self.step, self.version = field, info["global_step"], time.time_ns() // 10**6
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

    async def tile(self, name, level, col, row, fmt):
        """(encoded bytes, the version they show) of one tile, or None when it is outside that
        pyramid."""
        size = self.sizes().get(name)
        levels = dzi_levels(*size) if size else []
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
                return self.cache[key], version
        data = await self.queue.call(lambda: encode(self._render(field, name, width, height,
                                                                 window), fmt))
        with self.lock:
            if version == self.version and key not in self.cache:
                self.cache[key] = data
                self.cached_bytes += len(data)
                while self.cached_bytes > CACHE_BYTES:
                    self.cached_bytes -= len(self.cache.popitem(last=False)[1])
        return data, version

    def _render(self, field, name, width, height, window):
        if name == "source":
            return render_region(self.source, width, height, window=window)
        fit = render_region(field, width, height, window=window)
        if name == "fit":
            return fit
        return error_colours(fit, render_region(self.source, width, height,
                                                       window=window))

    async def region_psnr(self, region):
        """PSNR (dB, None for an empty region) of the fit against the source over `region`
        (normalised, clipped to the image), and the number of points scored: every source
        pixel the region touches up to PSNR_POINTS, else an even grid of about that many;
        (None, 0) for a region that misses the image on any side."""
        if region[0] >= 1 or region[1] >= 1 or region[2] <= 0 or region[3] <= 0:
            return None, 0
        x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in region)
        px0, py0 = int(x0 * self.width), int(y0 * self.height)
        px1 = max(px0 + 1, min(self.width, math.ceil(x1 * self.width)))
        py1 = max(py0 + 1, min(self.height, math.ceil(y1 * self.height)))
        shrink = max(1.0, ((px1 - px0) * (py1 - py0) / PSNR_POINTS) ** 0.5)
        w, h = max(1, int((px1 - px0) / shrink)), max(1, int((py1 - py0) / shrink))
        snapped = (px0 / self.width, py0 / self.height, px1 / self.width, py1 / self.height)
        field, _ = self.snapshot()

        def score():
            fit = render_region(field, w, h, snapped)
            source = render_region(self.source, w, h, snapped)
            return psnr_from_sse(*uint8_sse(fit, source))
        return await self.queue.call(score), w * h


def tile_window(width, height, col, row):
    """((y0, y1), (x0, x1)) of tile (col, row) of a width x height level (tiles.dzi_tiles
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
                          dzi_tiles(length, 1, TILE_SIZE, OVERLAP)]
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


class Handler(tornado.web.RequestHandler):
    """GET/HEAD of the page, its assets, status, region PSNR, .dzi and tiles; 404 otherwise.
    Before any of that, 403 for a Host header not in the server's list (DNS rebinding) and for
    a request another site's page makes (every path but the page itself)."""

    def initialize(self, server):
        self.view = server

    def set_default_headers(self):
        self.set_header("Server", "hashgrid-view")
        self.set_header("X-Frame-Options", "DENY")          # no other page frames ours
        self.set_header("X-Content-Type-Options", "nosniff")

    def compute_etag(self):                 # tiles change with the version, not a hash
        return None

    def prepare(self):
        refusal = self.view.refusal(self.request)
        if refusal:
            self.send(403, f"forbidden: {refusal}\n".encode(), "text/plain")

    async def get(self):
        await self.reply()

    async def head(self):
        await self.reply()

    async def reply(self):
        self.view.scene.seen = time.monotonic()
        try:
            await self.answer(self.request.path, self.request.query)
        except Busy:
            self.send(503, b"busy: too many tiles waiting, retry\n", "text/plain", retry=True)
        except Exception as error:       # one line to the client; the server keeps serving
            self.send(500, f"render failed: {cli.one_line(error)}\n".encode(), "text/plain")

    async def answer(self, path, query):
        scene, files = self.view.scene, self.view.files
        if path in files:
            with open(files[path], "rb") as f:
                return self.send(200, f.read(), CONTENT_TYPES[os.path.splitext(files[path])[1]])
        if path == "/status.json":
            return self.send_json(scene.status())
        if path == "/psnr.json" and scene.source is not None:
            region = parse_region(query)
            if region is not None:
                psnr, points = await scene.region_psnr(region)
                psnr = None if psnr is None or psnr == float("inf") else round(psnr, 3)
                return self.send_json(dict(psnr=psnr, points=points, step=scene.step))
        asked = parse_qs(query).get("v", [None])[0]     # the page's ?v=: the version it shows
        name = path[1:-4] if path.endswith(".dzi") else None
        if name in scene.sizes():
            width, height = scene.sizes()[name]
            xml = dzi_xml(width, height, TILE_SIZE, OVERLAP, "jpg")
            return self.send(200, xml.encode(), "application/xml",
                             cache=cache_control(asked, scene.version))
        match = TILE_PATH.fullmatch(path)
        if match:
            name, level, col, row, fmt = match.groups()
            found = await scene.tile(name, int(level), int(col), int(row), fmt)
            if found is not None:
                return self.send(200, found[0], FORMATS[fmt], cache=cache_control(asked, found[1]))
        self.send(404, b"not found\n", "text/plain")

    def send_json(self, value):
        self.send(200, json.dumps(value).encode(), "application/json")

    def send(self, code, body, content_type, cache="no-store", retry=False):
        """The whole response in one write (tornado sends it with TCP_NODELAY on)."""
        self.set_status(code)
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", cache)
        if retry:
            self.set_header("Retry-After", "1")
        self.finish(body)


def cache_control(asked, version):
    """A response that shows `version`, asked for as ?v=`asked`: the browser may keep it while
    that version holds (the URL changes with it); anything else is fetched again each time."""
    if asked == str(version):
        return "private, max-age=86400, immutable"
    return "no-store"


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


def host_names(host, port):
    """The Host header values a server on `host`:`port` answers: this machine's loopback names
    and `host`, with the port (alone too on port 80); None (any) when `host` is every address,
    where other machines reach it by names it cannot know (as Jupyter allows)."""
    if host in WILDCARD_HOSTS:
        return None
    names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host.lower()}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


def cross_site(headers, host):
    """Why a request came from a page of another site (its Sec-Fetch-Site, Origin or Referer
    says so), or None. Browsers send these; they cannot be left out by a page."""
    site = headers.get("Sec-Fetch-Site")
    if site not in (None, "same-origin", "none"):
        return f"Sec-Fetch-Site: {site}"
    origin = headers.get("Origin")
    if origin is not None and origin.lower() != f"http://{host}":
        return f"Origin: {origin}"
    referer = headers.get("Referer")
    if referer is not None:
        parts = urlsplit(referer)
        if (parts.scheme, parts.netloc.lower()) != ("http", host):
            return "Referer of another site"
    return None


WILDCARD_HOSTS = ("", "0.0.0.0", "::")
BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
              b"Content-Length: 34\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
              b"busy: too many connections, retry\n")


class Listener(tornado.httpserver.HTTPServer):
    """tornado's HTTP/1.1 server (keep-alive; every request's headers within HEADER_SECONDS,
    else the connection is closed), answering 503 to connections past MAX_CONNECTIONS."""

    def initialize(self, *args, **kwargs):
        super().initialize(*args, **kwargs)
        self.open = 0

    def handle_stream(self, stream, address):
        if self.open >= MAX_CONNECTIONS:
            return refuse(stream)
        self.open += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn):
        self.open -= 1
        super().on_close(server_conn)


async def refuse(stream):
    """503 on a connection past capacity, sent however little of a request came: the request's
    headers read first (1 s at most), so that closing does not reset the connection before
    the client reads the answer."""
    try:
        await tornado.gen.with_timeout(
            datetime.timedelta(seconds=1), stream.read_until_regex(b"\r?\n\r?\n", 1 << 16),
            quiet_exceptions=(tornado.iostream.StreamClosedError,
                              tornado.iostream.UnsatisfiableReadError))
    except (tornado.util.TimeoutError, tornado.iostream.UnsatisfiableReadError):
        pass
    except tornado.iostream.StreamClosedError:
        return
    try:
        await stream.write(BUSY_REPLY)
    except tornado.iostream.StreamClosedError:
        pass
    stream.close()


class Server:
    """What start_server starts: tornado on an asyncio loop of its own thread; renders wait in
    the scene's RenderQueue without holding the loop. .close() stops it."""

    def __init__(self, scene, sockets, hosts):
        self.scene, self.files, self.hosts = scene, static_files(), hosts
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            app = tornado.web.Application([(r".*", Handler, dict(server=self))],
                                          log_function=lambda handler: None)   # quiet
            self.http = Listener(app, idle_connection_timeout=HEADER_SECONDS,
                                 body_timeout=HEADER_SECONDS, max_body_size=1 << 16)
            self.http.add_sockets(sockets)
            started.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True, name="view-http")
        self.thread.start()
        started.wait()

    def refusal(self, request):
        """Why `request` is refused before any work (403), or None."""
        host = request.headers.get("Host", "").lower()
        if self.hosts is not None and host not in self.hosts:
            return f"Host {host!r} is not this server's (a DNS rebinding page?)"
        if request.path != "/":           # the page itself may be opened from a link
            return cross_site(request.headers, host)
        return None

    def close(self):
        """Stop listening, close every connection, end the thread."""
        async def stop():
            self.http.stop()
            await self.http.close_all_connections()
        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def start_server(scene, host, port):
    """Bind and serve `scene` in a background thread; returns (Server, url). OSError with one
    line naming the port when it cannot be bound."""
    try:
        sockets = tornado.netutil.bind_sockets(port, host or None, backlog=BACKLOG)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is in use; pick another port (0: "
                          "any free one)") from None
        raise OSError(f"cannot listen on {host} port {port}: {error.strerror or error}") from None
    port = sockets[0].getsockname()[1]
    server = Server(scene, sockets, host_names(host, port))
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(
        host, f"[{host}]" if ":" in host else host)
    return server, f"http://{shown}:{port}/"
