"""Benchmark train.py: PSNR against training seconds and steps, and the end-to-end command.

    python bench/train.py ../shared/data/albert.jpg            # from the repository root

Two runs of train.py on the CPU (or whatever --accelerator says):
1. curve: PSNR every --curve_every steps (sRGB 8-bit; scoring is paused out of the training
   clock), for --seconds of training. Writes bench/out/train_<image>.csv and .png.
2. end to end: the command a user would type for the target (--seconds of training, then
   the full-resolution export), timed from the shell; its PSNR is recomputed on every pixel
   of the export.
Prints a table with training pixels/second, the time to --target dB and the command time.
"""
import argparse
import csv
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import images  # noqa: E402  (after the repository root is on sys.path)


def train_cmd(image, root, trace, seconds, extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "-i", image, "--root", root,
            "--trace", trace, "--max_time", str(seconds), "--max_steps", "1000000",
            "--ckpt_every", "0", *extra]


def read_curve(log_dir):
    """[(step, train_seconds, psnr)] from a run's metrics.csv (validation rows)."""
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/psnr")]
    return [(int(r["step"]), float(r["time/train_seconds"]), float(r["val/psnr"])) for r in rows]


def read_batch_size(log_dir):
    """The batch size the run used (train.py resolves the device-dependent default)."""
    import yaml
    with open(os.path.join(log_dir, "hparams.yaml")) as f:
        return int(yaml.safe_load(f)["batch_size"])


def latest_log_dir(root, trace, name):
    base = os.path.join(root, trace, name)
    versions = [d for d in os.listdir(base) if d.startswith("version_")]
    return os.path.join(base, max(versions, key=lambda d: int(d.split("_")[1])))


def time_to(curve, target):
    """Training seconds and step where the curve first reaches `target` dB, interpolated
    linearly between the logged points; (None, None) if it never does."""
    previous = (0, 0.0, 0.0)
    for step, seconds, psnr in curve:
        if psnr >= target:
            s0, t0, p0 = previous
            w = (target - p0) / (psnr - p0) if psnr > p0 else 1.0
            return t0 + w * (seconds - t0), s0 + w * (step - s0)
        previous = (step, seconds, psnr)
    return None, None


def whole_image_psnr(source_path, fit_path):
    source = images.read_image(source_path).astype(np.int64)
    fit = images.read_image(fit_path).astype(np.int64)
    sse = float(((source - fit) ** 2).sum())
    return 10 * np.log10(255.0 ** 2 * source.size / sse)


def plot(curve, target, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, seconds, psnr = zip(*curve)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x, label in ((axes[0], seconds, "training seconds"), (axes[1], steps, "steps")):
        ax.plot(x, psnr, marker=".")
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR (dB, sRGB 8-bit)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", nargs="?",
                   default=os.path.join(REPO, "..", "shared", "data", "albert.jpg"))
    p.add_argument("--seconds", type=float, default=60.0, help="training seconds (curve run)")
    p.add_argument("--e2e_seconds", type=float, default=50.0,
                   help="training seconds of the end-to-end run (its whole command, start-up "
                   "and export included, should take <= 75 s on 2 cores)")
    p.add_argument("--curve_every", type=int, default=20, help="PSNR every N steps (curve run)")
    p.add_argument("--target", type=float, default=33.0, help="dB")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out"))
    p.add_argument("--skip_end_to_end", action="store_true")
    args, extra = p.parse_known_args(argv)   # anything else goes to train.py
    os.makedirs(args.out, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.image))[0]
    root = os.path.join(args.out, "logs")

    subprocess.run(train_cmd(args.image, root, "curve", args.seconds,
                             ["--val_every", str(args.curve_every), *extra]), check=True)
    log_dir = latest_log_dir(root, "curve", name)
    curve = read_curve(log_dir)
    csv_path = os.path.join(args.out, f"train_{name}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_seconds", "psnr_db"])
        writer.writerows(curve)
    png_path = os.path.join(args.out, f"train_{name}.png")
    plot(curve, args.target, png_path, f"train.py on {os.path.basename(args.image)}")

    batch = read_batch_size(log_dir)
    steps, seconds, psnr = curve[-1]
    t_target, s_target = time_to(curve, args.target)

    print(f"\nPSNR vs training time ({csv_path}, {png_path})")
    print("| step | train s | PSNR dB |\n|---:|---:|---:|")
    shown = [c for c in curve if c[0] in (10, 20, 50) or c[0] % 100 == 0] + [curve[-1]]
    for step, sec, db in sorted(set(shown)):
        print(f"| {step} | {sec:.1f} | {db:.2f} |")
    print(f"\ntraining pixels/second: {steps * batch / seconds / 1e6:.3f} M "
          f"(batch {batch}, {steps} steps in {seconds:.1f} s)")
    print(f"time to {args.target:g} dB: " + (f"{t_target:.1f} s (step {s_target:.0f})"
                                           if t_target is not None else "not reached"))

    if not args.skip_end_to_end:
        export = os.path.join(args.out, f"fit_{name}.png")
        start = time.perf_counter()
        subprocess.run(train_cmd(args.image, root, "end_to_end", args.e2e_seconds,
                                 ["--export", export, *extra]), check=True)
        total = time.perf_counter() - start
        e2e = read_curve(latest_log_dir(root, "end_to_end", name))[-1]
        whole = whole_image_psnr(args.image, export)
        print(f"end to end (train {args.e2e_seconds:g} s + export): {total:.1f} s wall, "
              f"{e2e[0]} steps, PSNR {whole:.2f} dB on every pixel of the export")


if __name__ == "__main__":
    main()
