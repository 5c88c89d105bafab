"""Peak memory and time of convert.py on a large generated RGB JPEG.

    python bench/convert.py            # 8192 x 8192 (67 Mpx); --size 16384 for 268 Mpx

Each case runs in its own child process; its peak resident set size comes from
os.wait4 (the kernel's ru_maxrss for exactly that child), so nothing this script holds
is counted. Target (issue 4): <= 4 bytes per input pixel for an 8-bit RGB JPEG at
--scale 0.5. Results: a table on stdout, bench/out/convert_SIZE.md and bench/out/convert_SIZE.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
CONVERT = os.path.join(ROOT, "convert.py")
TARGET_BYTES_PER_PIXEL = 4.0


def measure(argv):
    """Run argv as a child -> (seconds, peak RSS bytes). Raises if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # already reaped by wait4
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {child.stderr.read().decode().strip()}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


def cases(jpeg, npy, out):
    """(name, argv) pairs; the first two are references, not conversions."""
    py = sys.executable
    run = [py, CONVERT, "-i", jpeg, "-o"]
    return [
        ("python + numpy + PIL imported (baseline)", [py, "-c", "import convert"]),
        ("PIL full decode of the JPEG (reference)", [py, "-c",
         "import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = None; "
         "Image.open(sys.argv[1]).load()", jpeg]),
        ("--scale 0.5 (box, uint8 .npy)", run + [out, "--scale", "0.5"]),
        ("--scale 0.5 --no-draft", run + [out, "--scale", "0.5", "--no-draft"]),
        ("--scale 0.5 --filter lanczos", run + [out, "--scale", "0.5", "--filter", "lanczos"]),
        ("--scale 0.5 --linear", run + [out, "--scale", "0.5", "--linear"]),
        ("--scale 0.5 --dtype float16", run + [out, "--scale", "0.5", "--dtype", "float16"]),
        ("--scale 0.3", run + [out, "--scale", "0.3"]),
        ("--scale 0.25", run + [out, "--scale", "0.25"]),
        ("--scale 0.5 from the chart .npy", [py, CONVERT, "-i", npy, "-o", out, "--scale", "0.5"]),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="square input side (8192)")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    size, pixels = args.size, args.size * args.size
    jpeg = os.path.join(OUT, f"chart{size}.jpg")
    npy = os.path.join(OUT, f"chart{size}.npy")
    out = os.path.join(OUT, "converted.npy")
    rows = []
    for path in (npy, jpeg):  # the chart generator is itself a bounded-memory case
        seconds, peak = measure([sys.executable, CONVERT, "--chart", f"{size}x{size}",
                                 "-o", path])
        rows.append((f"--chart {size}x{size} -o {os.path.basename(path)}", seconds, peak))
    for name, argv in cases(jpeg, npy, out):
        seconds, peak = measure(argv)
        rows.append((name, seconds, peak))
    baseline = next(peak for name, _, peak in rows if "baseline" in name)

    header = (f"convert.py on a {size} x {size} RGB JPEG ({pixels / 1e6:.0f} Mpx, quality 95, "
              f"4:4:4), peak RSS per input pixel; target <= {TARGET_BYTES_PER_PIXEL:g} B/px "
              f"at --scale 0.5")
    lines = [header, "",
             "| case | seconds | peak RSS MiB | B / input px | B / px above baseline |",
             "|---|---:|---:|---:|---:|"]
    for name, seconds, peak in rows:
        lines.append(f"| {name} | {seconds:.2f} | {peak / 2**20:.0f} | {peak / pixels:.2f} | "
                     f"{(peak - baseline) / pixels:.2f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(OUT, f"convert_{size}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(OUT, f"convert_{size}.json"), "w") as f:
        json.dump({"size": size, "pixels": pixels, "baseline_bytes": baseline,
                   "cases": [{"case": n, "seconds": s, "peak_rss_bytes": p,
                              "bytes_per_input_pixel": p / pixels} for n, s, p in rows]},
                  f, indent=2)
    for path in (out, npy, jpeg):
        os.remove(path)  # hundreds of MB each


if __name__ == "__main__":
    main()
