"""view.py's tile latency over HTTP, and what train.py --serve costs a run nobody looks at.

    python bench/view.py latency              # albert-sized field (3250 x 4333, log2 T = 20)
    python bench/view.py latency --view /tmp/before/view.py   # another version's server
    python bench/view.py slowdown --pairs 2   # grace_hopper runs with and without --serve
    python bench/view.py slowdown --steps 400 -i tiny.png --batch_size 4096   # short steps

latency: a view.py server (a subprocess, as a user runs it) on a checkpoint of the default
field for a 3250 x 4333 image (random weights: a forward pass costs the same whatever their
values). First distinct full 256 x 256 tiles (254 + overlap on both sides), none from the
cache, one new connection each, at the finest level (4x past the source resolution), at the
source resolution and at the level showing the whole image at about 1000 pixels; then what a
browser does, kept-alive connections: cached tiles with 1 and 8 clients at once, renders at
the finest level with 1 and 8 clients (queued on the one render thread), and 20 clients
connecting at once. --view OLD/view.py measures another version (before/after).
slowdown: train.py on grace_hopper (other train.py flags pass through), the same steps with
and without --serve 0, runs interleaved so that other load on the machine hits both alike;
the best training seconds train.py reports, and the best CPU seconds of the whole process,
are compared. Results go to
bench/out/view.json and stdout.
"""
import argparse
import http.client
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tileserver  # noqa: E402  (after the path set-up)
from field import FieldConfig  # noqa: E402
from tiles import dzi_levels, dzi_tiles  # noqa: E402


def write_checkpoint(path, config):
    """A checkpoint as train.py writes one, of `config`'s freshly initialised field."""
    field = config.build()
    torch.save({"hyper_parameters": {"field": config.to_dict(), "source": ""},
                "state_dict": {"field." + k: v for k, v in field.state_dict().items()},
                "global_step": 0}, path)


def get(connection, path):
    """Seconds for GET path on an http.client connection (kept alive), the body read."""
    start = time.perf_counter()
    connection.request("GET", path)
    reply = connection.getresponse()
    reply.read()
    assert reply.status == 200, (path, reply.status)
    return time.perf_counter() - start


def clients(port, paths_per_client):
    """Seconds of every request of len(paths_per_client) clients run at once, each on one
    kept-alive connection fetching its paths in turn."""
    seconds, barrier = [], threading.Barrier(len(paths_per_client))

    def client(paths):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        barrier.wait()
        seconds.extend(get(connection, path) for path in paths)
        connection.close()
    threads = [threading.Thread(target=client, args=(paths,)) for paths in paths_per_client]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seconds


def stats(seconds):
    ordered = sorted(seconds)
    return dict(requests=len(seconds), median_ms=1e3 * statistics.median(seconds),
                p90_ms=1e3 * ordered[int(0.9 * (len(ordered) - 1))], worst_ms=1e3 * ordered[-1])


def show(name, result):
    print(f"{name:34s} {result['requests']:4d} requests: median {result['median_ms']:7.2f} ms, "
          f"p90 {result['p90_ms']:7.2f} ms, worst {result['worst_ms']:7.1f} ms", flush=True)


def latency(args):
    config = FieldConfig(width=3250, height=4333, channels=3)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = os.path.join(folder, "albert.ckpt")
        write_checkpoint(ckpt, config)
        server = subprocess.Popen([sys.executable, args.view, "--ckpt", ckpt, "--port", "0"],
                                  stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=ROOT))
        try:
            url = next(line for line in server.stdout if " at http" in line)
            url = url.rsplit(" at ", 1)[1].strip()
            port = int(url.rsplit(":", 1)[1].strip("/"))
            levels = dzi_levels(config.width * tileserver.ZOOM, config.height * tileserver.ZOOM)
            top = len(levels) - 1
            tiles, results = {}, {}
            for name, level in (("4x past 1:1", top), ("1:1", top - 2), ("whole image", top - 4)):
                width, height = levels[level]
                found = [f"/fit_files/{level}/{c}_{r}.jpg" for c, r, x0, y0, x1, y1 in
                         dzi_tiles(width, height, tileserver.TILE_SIZE, tileserver.OVERLAP)
                         if x1 - x0 == y1 - y0 == tileserver.TILE_SIZE + 2 * tileserver.OVERLAP]
                random.Random(0).shuffle(found)
                tiles[name] = found
            # renders (none cached), a new connection each, as before keep-alive was measured
            for name, paths in tiles.items():
                seconds = []
                for path in paths[:args.tiles]:
                    start = time.perf_counter()
                    with urllib.request.urlopen(url + path[1:]) as reply:
                        reply.read()
                    seconds.append(time.perf_counter() - start)
                results[f"render, {name}"] = stats(seconds)
                show(f"render {name}, new connections", results[f"render, {name}"])
            # what a browser does: a few kept-alive connections; cached tiles (rendered above)
            cached = tiles["whole image"][:min(args.tiles, len(tiles["whole image"]))]
            for n in (1, 8):
                result = stats(clients(port, [cached * args.repeat] * n))
                results[f"cached, keep-alive, {n} client{'s' * (n > 1)}"] = result
                show(f"cached tile, keep-alive, {n} client{'s' * (n > 1)}", result)
            # renders over keep-alive: 8 clients queue on the one render thread
            fresh = iter(tiles["4x past 1:1"][args.tiles:])
            for n in (1, 8):
                per = [[next(fresh) for _ in range(max(2, args.tiles // n))] for _ in range(n)]
                result = stats(clients(port, per))
                results[f"render 4x, keep-alive, {n} client{'s' * (n > 1)}"] = result
                show(f"render 4x, keep-alive, {n} client{'s' * (n > 1)}", result)
            # 20 connects at once, each one request (the listen backlog)
            result = stats(clients(port, [["/status.json"]] * 20))
            results["burst of 20 connects"] = result
            show("20 clients connecting at once", result)
        finally:
            server.terminate()
            server.wait()
    return results


def train_run(args, serve, folder):
    """(training seconds train.py reports, CPU seconds of the whole process, all threads)."""
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--root", folder,
               "--max_steps", str(args.steps), "--val_every", str(args.steps)]
    command += args.train_args
    command += ["--serve", "0"] if serve else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return float(re.search(r"([0-9.]+) s of training", out).group(1)), cpu


def slowdown(args):
    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.pairs):
            for serve in (False, True):
                runs[serve].append(train_run(args, serve, folder))
            print(f"without --serve {runs[False][-1][0]:.1f} s training "
                  f"({runs[False][-1][1]:.1f} CPU s), with {runs[True][-1][0]:.1f} s "
                  f"({runs[True][-1][1]:.1f} CPU s)", flush=True)
    best = {serve: min(t for t, _ in r) for serve, r in runs.items()}
    cpu = {serve: min(c for _, c in r) for serve, r in runs.items()}
    print(f"{args.steps} steps, best of {args.pairs}: {best[False]:.1f} s without, "
          f"{best[True]:.1f} s with --serve (nobody looking): {best[True] / best[False]:.3f}x; "
          f"CPU seconds {cpu[False]:.1f} vs {cpu[True]:.1f}: {cpu[True] / cpu[False]:.3f}x")
    return dict(steps=args.steps, without=runs[False], with_serve=runs[True],
                ratio=best[True] / best[False], cpu_ratio=cpu[True] / cpu[False])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["latency", "slowdown"])
    parser.add_argument("--tiles", type=int, default=20, help="tiles per level")
    parser.add_argument("--repeat", type=int, default=5, help="passes over the cached tiles")
    parser.add_argument("--view", default=os.path.join(ROOT, "view.py"),
                        help="the view.py to measure (another version's, for a before/after)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=2, help="runs with and without --serve")
    args, args.train_args = parser.parse_known_args()   # the rest goes to train.py
    result = latency(args) if args.what == "latency" else slowdown(args)
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "out", "view.json")
    saved = json.load(open(path)) if os.path.exists(path) else {}
    saved[args.what] = dict(result, cpu=os.cpu_count(), torch=torch.__version__)
    with open(path, "w") as f:
        json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
