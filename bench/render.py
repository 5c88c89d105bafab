"""Rendering throughput of tiles.render_region (megapixels per second) at several tile
sizes, for the default train.py field: 2-D hash grid, L=16, F=2, log2 T=19, 64x2 MLP.

    python bench/render.py                     # 1024 x 1024 output on the CPU
    python bench/render.py --size 2048 2048 --tiles 16 18 --device cuda

The field's weights are its random initialisation: the cost of a forward pass does not
depend on their values. "field only" times the bare forward passes on the same pixel
centres made up front (tiles of 2**16): the gap to the rows below is what coordinates,
8-bit conversion and copying cost. Results go to bench/out/render.json and a markdown
table on stdout.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tiles  # noqa: E402  (after the path set-up)
from field import FieldConfig  # noqa: E402


def timings(cases, repeats):
    """Best wall and best process-CPU seconds of each named zero-argument callable.

    Repeats go round-robin over the cases (after one warm-up call each), so a burst of
    other work on the machine hits every case alike; CPU seconds (all threads) are the
    steadier figure on a busy machine, wall seconds the one a user waits.
    """
    for fn in cases.values():
        fn()
    wall = {name: float("inf") for name in cases}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, fn in cases.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - start_wall)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return wall, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 1024),
                        metavar=("WIDTH", "HEIGHT"), help="output size [default: 1024 1024]")
    parser.add_argument("--source", type=int, nargs=2, default=(4096, 4096),
                        metavar=("WIDTH", "HEIGHT"),
                        help="trained image size the field is built for (sets the finest "
                             "grid resolution) [default: 4096 4096]")
    parser.add_argument("--tiles", type=int, nargs="+", default=(12, 14, 16, 18, 20),
                        help="log2 of max_batch (pixels per tile) [default: 12 14 16 18 20]")
    parser.add_argument("--repeats", type=int, default=3, help="best of N [default: 3]")
    parser.add_argument("--device", default="cpu", help="torch device [default: cpu]")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "render.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    field = FieldConfig(*args.source, channels=3).build().to(device).eval()
    width, height = args.size
    megapixels = width * height / 1e6

    # The same pixel centres as a 2**16 render, made up front: the bare field cost.
    batches = [torch.from_numpy(tiles.pixel_centres(tiles.FULL, width, height, rows, cols))
               .float().to(device) for rows, cols in tiles.tiles(width, height, 2**16)]

    def field_only():
        with torch.no_grad():
            for xy in batches:
                field(xy)
            if device.type == "cuda":
                torch.cuda.synchronize()

    cases = {"field only, 2^16": field_only}
    for log2 in args.tiles:
        cases[f"2^{log2}"] = (lambda max_batch: lambda: tiles.render_region(
            field, width, height, max_batch=max_batch))(2**log2)
    wall, cpu = timings(cases, args.repeats)
    rows = [dict(max_batch=name, seconds=wall[name], cpu_seconds=cpu[name],
                 mpx_per_s=megapixels / wall[name], mpx_per_cpu_s=megapixels / cpu[name])
            for name in cases]

    env = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
               output=f"{width}x{height}", source=f"{args.source[0]}x{args.source[1]}",
               # other work on the machine skews the numbers: record how busy it was
               load_average_1min=round(os.getloadavg()[0], 2))
    print(f"tiles.render_region throughput: {env}")
    print("| max_batch | wall s | Mpx/s (wall) | CPU s | Mpx per CPU-s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['max_batch']} | {row['seconds']:.2f} | {row['mpx_per_s']:.3f} "
              f"| {row['cpu_seconds']:.2f} | {row['mpx_per_cpu_s']:.3f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
