"""view.py's tile latency over HTTP, and what train.py --serve costs a run nobody looks at.

    python bench/view.py latency              # albert-sized field (3250 x 4333, log2 T = 20)
    python bench/view.py slowdown --pairs 2   # grace_hopper runs with and without --serve
    python bench/view.py slowdown --steps 400 -i tiny.png --batch_size 4096   # short steps

latency: a view.py server (a subprocess, as a user runs it) on a checkpoint of the default
field for a 3250 x 4333 image (random weights: a forward pass costs the same whatever their
values); distinct full 256 x 256 tiles (254 + overlap on both sides) fetched one after another,
none from the cache, at the finest level (4x past the source resolution), at the source
resolution and at the level showing the whole image at about 1000 pixels.
slowdown: train.py on grace_hopper (other train.py flags pass through), the same steps with and without --serve 0, runs
interleaved so that other load on the machine hits both alike; the best training seconds
train.py reports, and the best CPU seconds of the whole process, are compared. Results go to
bench/out/view.json and stdout.
"""
import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import render  # noqa: E402  (after the path set-up)
import view  # noqa: E402
from field import FieldConfig  # noqa: E402


def write_checkpoint(path, config):
    """A checkpoint as train.py writes one, of `config`'s freshly initialised field."""
    field = config.build()
    torch.save({"hyper_parameters": {"field": config.to_dict(), "source": ""},
                "state_dict": {"field." + k: v for k, v in field.state_dict().items()},
                "global_step": 0}, path)


def latency(args):
    config = FieldConfig(width=3250, height=4333, channels=3)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = os.path.join(folder, "albert.ckpt")
        write_checkpoint(ckpt, config)
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "view.py"), "--ckpt",
                                   ckpt, "--port", "0"], stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().rsplit(" at ", 1)[1].strip()
            levels = render.dzi_levels(config.width * view.ZOOM, config.height * view.ZOOM)
            top = len(levels) - 1
            results = {}
            for name, level in (("4x past 1:1", top), ("1:1", top - 2), ("whole image", top - 4)):
                width, height = levels[level]
                tiles = [(c, r) for c, r, x0, y0, x1, y1 in
                         render.dzi_tiles(width, height, view.TILE_SIZE, view.OVERLAP)
                         if x1 - x0 == y1 - y0 == view.TILE_SIZE + 2 * view.OVERLAP]
                random.Random(0).shuffle(tiles)
                seconds = []
                for col, row in tiles[:args.tiles]:
                    start = time.perf_counter()
                    with urllib.request.urlopen(f"{url}fit_files/{level}/{col}_{row}.jpg") as r:
                        r.read()
                    seconds.append(time.perf_counter() - start)
                results[name] = dict(level=level, level_size=[width, height],
                                     tiles=len(seconds), median_ms=1e3 * statistics.median(seconds),
                                     worst_ms=1e3 * max(seconds))
                print(f"{name:12s} level {level:2d} ({width} x {height}): {len(seconds)} tiles, "
                      f"median {results[name]['median_ms']:.0f} ms, worst "
                      f"{results[name]['worst_ms']:.0f} ms", flush=True)
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
