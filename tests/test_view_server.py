"""view.py's server as an attacker and a heavy user meet it, over real sockets: a foreign Host
header (DNS rebinding) and other sites' requests refused before any render, slow clients cut
off at the header deadline while the user still gets tiles, 503 (never a silent close) past
capacity, keep-alive requests answered without Nagle / delayed-ACK stalls, a burst of connects
within the listen backlog, IPv6 and wildcard addresses, versioned tiles cacheable, and
`view.py ... | head -1` then SIGTERM without a traceback. Each test is a few dozen requests."""
import http.client
import os
import signal
import socket
import statistics
import threading
import time

import pytest

import images
import tileserver
import view
from field import load_field
from test_view import ViewServer

TILE = "/fit_files/7/0_0.jpg"
PSNR = "/psnr.json?x0=0&y0=0&x1=1&y1=1"


@pytest.fixture
def scene(checkpoint):
    """A tileserver.Scene of the shared checkpoint with its source, renders not yet running."""
    field, info = load_field(checkpoint)
    source = images.to_srgb8(images.read_image(
        os.path.join(os.path.dirname(checkpoint), *[os.pardir] * 5, "src.png")))
    return tileserver.Scene(field, info, source)


class Serving:
    """start_server(scene, host, 0); .render() starts the render worker; closed on exit."""

    def __init__(self, scene, host="127.0.0.1"):
        self.scene, self.stop = scene, threading.Event()
        self.server, self.url = tileserver.start_server(scene, host, 0)
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
        self.host = "[::1]" if ":" in host else "127.0.0.1"

    def render(self):
        threading.Thread(target=self.scene.queue.work, args=(self.stop,), daemon=True).start()
        return self

    def connect(self):
        return http.client.HTTPConnection(self.host.strip("[]"), self.port, timeout=30)

    def ask(self, path, headers=(), connection=None):
        """(status, headers, body) of GET path; Host is ours unless `headers` names one."""
        headers = dict(headers)
        headers.setdefault("Host", f"{self.host}:{self.port}")
        own = connection is None
        connection = connection or self.connect()
        try:
            connection.request("GET", path, headers=headers)
            reply = connection.getresponse()
            return reply.status, reply.headers, reply.read()
        finally:
            if own:
                connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.close()


def test_a_foreign_host_header_is_refused(scene):
    with Serving(scene) as serving:           # no render worker: a queued render would show
        port = serving.port
        for host in ("evil.example:%d" % port, "evil.example", "localhost", "127.0.0.1:1",
                     "localhost.evil.example:%d" % port, ""):
            for path in ("/", "/status.json", PSNR, TILE):
                status, _, body = serving.ask(path, {"Host": host})
                assert (status, body[:10]) == (403, b"forbidden:"), (host, path)
        # an absolute URI names its own host: refused as well
        assert serving.ask("http://localhost/../view.py", {"Host": "localhost"})[0] == 403
        assert scene.queue.jobs.qsize() == 0
        for host in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):
            assert serving.ask("/status.json", {"Host": f"{host}:{port}"})[0] == 200, host
    assert tileserver.host_names("myhost.lan", 8000) == {"localhost:8000", "127.0.0.1:8000",
                                                         "[::1]:8000", "myhost.lan:8000"}
    assert tileserver.host_names("::1", 80) == {"localhost:80", "127.0.0.1:80", "[::1]:80",
                                                "localhost", "127.0.0.1", "[::1]"}
    assert tileserver.host_names("0.0.0.0", 8000) is None
    assert tileserver.host_names("::", 8000) is None


def test_the_host_value_given_is_allowed(scene):
    with Serving(scene, "127.0.0.2") as serving:    # another loopback address, by its number
        serving.host = "127.0.0.2"
        assert serving.ask("/status.json")[0] == 200
        assert serving.ask("/status.json", {"Host": f"127.0.0.1:{serving.port}"})[0] == 200
        assert serving.ask("/status.json", {"Host": f"evil.example:{serving.port}"})[0] == 403


def test_cross_site_requests_are_refused_before_any_render(scene):
    with Serving(scene) as serving:
        ours = f"http://127.0.0.1:{serving.port}"
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": f"http://localhost:{serving.port + 1}"},
                        {"Referer": "http://evil.example/page.html"},
                        {"Referer": f"https://127.0.0.1:{serving.port}/"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
            for path in (PSNR, TILE, "/status.json", "/fit.dzi"):
                status, _, body = serving.ask(path, headers)
                assert (status, body[:10]) == (403, b"forbidden:"), (headers, path)
        assert scene.queue.jobs.qsize() == 0                      # nothing was queued
        # the page itself may be opened from a link on another site; no page may frame it
        status, headers, _ = serving.ask("/", {"Sec-Fetch-Site": "cross-site",
                                              "Referer": "http://evil.example/"})
        assert (status, headers["X-Frame-Options"]) == (200, "DENY")
        # what the page's own requests carry
        serving.render()
        same = {"Origin": ours, "Referer": ours + "/#x=0.5", "Sec-Fetch-Site": "same-origin"}
        assert serving.ask(TILE, same)[0] == 200 and serving.ask(PSNR, same)[0] == 200
        assert serving.ask("/status.json", {"Sec-Fetch-Site": "none"})[0] == 200


def test_slow_clients_are_cut_off_and_the_user_still_gets_tiles(scene, monkeypatch):
    monkeypatch.setattr(tileserver, "HEADER_SECONDS", 1.0)
    with Serving(scene).render() as serving:
        # 32 connections that trickle a request's headers one byte at a time, never ending them
        slow = [socket.create_connection(("127.0.0.1", serving.port)) for _ in range(32)]
        opened = time.monotonic()
        done = threading.Event()

        def trickle():
            while not done.wait(0.2):
                for sock in slow:
                    try:
                        sock.send(b"G")
                    except OSError:
                        pass
        threading.Thread(target=trickle, daemon=True).start()
        try:
            # meanwhile the user's browser: a keep-alive connection and fresh ones
            connection = serving.connect()
            for level in range(9):
                assert serving.ask(f"/fit_files/{level}/0_0.jpg", connection=connection)[0] == 200
            connection.close()
            assert all(serving.ask(path)[0] == 200 for path in ("/status.json", PSNR, "/"))
            # every trickler is closed at the deadline for its whole headers, however it sends
            for sock in slow:
                sock.settimeout(5)
                try:
                    assert sock.recv(100) == b""
                except ConnectionResetError:
                    pass
            assert 0.9 < time.monotonic() - opened < 8         # not before the deadline
        finally:
            done.set()
            for sock in slow:
                sock.close()


def test_past_capacity_a_503_and_never_a_silent_close(scene, monkeypatch):
    monkeypatch.setattr(tileserver, "MAX_CONNECTIONS", 8)
    with Serving(scene).render() as serving:
        idle = [socket.create_connection(("127.0.0.1", serving.port)) for _ in range(8)]
        try:
            for sock in idle:
                sock.send(b"GET")                     # surely accepted before the next
            time.sleep(0.3)
            for _ in range(3):
                status, headers, body = serving.ask("/status.json")
                assert (status, headers["Retry-After"], headers["Connection"], body) == \
                    (503, "1", "close", b"busy: too many connections, retry\n")
            with socket.create_connection(("127.0.0.1", serving.port), timeout=5) as mute:
                assert mute.recv(100).startswith(b"HTTP/1.1 503 ")      # even if it says nothing
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 5              # their slots free once they are gone
        while serving.ask("/status.json")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_keep_alive_requests_are_not_stalled(scene):
    # Nagle + delayed ACK stall a response written in pieces by 40 ms; it goes in one write
    with Serving(scene).render() as serving:
        connection = serving.connect()
        try:
            assert serving.ask(TILE, connection=connection)[0] == 200       # rendered, cached
            sock = connection.sock
            seconds = []
            for _ in range(30):
                start = time.perf_counter()
                status, headers, _ = serving.ask(TILE, connection=connection)
                seconds.append(time.perf_counter() - start)
                assert status == 200 and headers["Connection"] is None
            assert connection.sock is sock                   # one connection throughout
        finally:
            connection.close()
    assert statistics.median(seconds) < 0.02, seconds       # 40+ ms each when stalled


def test_a_burst_of_connects_fits_the_backlog(scene):
    # a backlog of 5 drops the rest of the SYNs, retried after 1 s
    with Serving(scene) as serving:
        barrier, seconds, statuses = threading.Barrier(20), [], []

        def one():
            barrier.wait()
            start = time.perf_counter()
            statuses.append(serving.ask("/status.json")[0])
            seconds.append(time.perf_counter() - start)
        threads = [threading.Thread(target=one) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == [200] * 20
    assert statistics.median(seconds) < 0.5 and max(seconds) < 0.9, seconds


def ipv6():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6(), reason="this machine has no IPv6 loopback")
def test_ipv6_addresses(scene):
    with Serving(scene, "::1") as serving:
        assert serving.url == f"http://[::1]:{serving.port}/"
        assert serving.ask("/status.json")[0] == 200
        assert serving.ask("/status.json", {"Host": f"evil.example:{serving.port}"})[0] == 403
    with Serving(scene, "::") as serving:          # every address: any name reaches it
        assert serving.url == f"http://[::1]:{serving.port}/"
        assert serving.ask("/status.json", {"Host": f"myhost.lan:{serving.port}"})[0] == 200
    assert view.exposure_warning("::1") is None and view.exposure_warning("localhost") is None
    assert view.exposure_warning("::").startswith("view.py: warning: --host '::' serves")


def test_versioned_tiles_are_cacheable_while_the_version_holds(scene):
    with Serving(scene).render() as serving:
        version = scene.version
        assert version > 1e12                    # ms since 1970: a later server's are higher
        for path in (f"{TILE}?v={version}", f"/fit.dzi?v={version}"):
            assert serving.ask(path)[1]["Cache-Control"] == "private, max-age=86400, immutable"
        for path in (TILE, f"{TILE}?v={version - 1}", "/fit.dzi", "/status.json", PSNR):
            assert serving.ask(path)[1]["Cache-Control"] == "no-store", path
        scene.update()                           # a reload: the page asks with the new version
        assert serving.ask(f"{TILE}?v={version}")[1]["Cache-Control"] == "no-store"
        assert serving.ask(f"{TILE}?v={version + 1}")[1]["Cache-Control"] == \
            "private, max-age=86400, immutable"


def test_wildcard_host_warns_and_head_then_sigterm_is_quiet(checkpoint):
    running = ViewServer("--ckpt", checkpoint, "--host", "0.0.0.0")
    try:
        port = int(running.url.rsplit(":", 1)[1].strip("/"))
        assert running.url == f"http://127.0.0.1:{port}/"
        assert running.notes[0] == (
            "view.py: warning: --host '0.0.0.0' serves the source image and the fit, without a "
            "password, to every machine that can reach this one; the default 127.0.0.1 with an "
            "SSH port forward keeps them to you\n")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/status.json", headers={"Host": f"myhost.lan:{port}"})
        assert connection.getresponse().status == 200      # other machines name it their way
        connection.close()
    finally:
        running.process.stdout.close()           # as `| head -1` does once it has its line
        running.process.send_signal(signal.SIGTERM)
        err = running.process.stderr.read()
        running.process.wait(timeout=30)
    assert (running.process.returncode, err) == (0, "")

