"""Lazy Adam against Adam at equal steps: train.py --table_optimizer adam / sparse_adam on the
same image, seed and batches, then the PSNR curves side by side.

    python bench/optimizers.py run albert -i ../shared/data/albert.jpg --max_steps 1000
    python bench/optimizers.py run chart -i data/chart.npy --max_steps 400 --val_every 50 \
        --log2_hashmap_size 24
    python bench/optimizers.py plot albert chart -o docs/lazy_adam_psnr.png

`run LABEL ...` trains twice (the flags after LABEL go to train.py), logging under
ROOT/LABEL_adam and ROOT/LABEL_sparse_adam (--root, default bench/out/optimizers); a run that
was stopped (a signal saves it) continues from its last checkpoint when run again. `plot` reads
every version's metrics.csv of those folders (a resumed run's curve continues in the next
version) and draws one panel per label, with the final PSNRs and their difference; folders
ROOT/LABEL_skip and ROOT/LABEL_touch, if there are, add the curves of earlier lazy Adams: one
that skipped the steps without a gradient (the paper's and SparseAdam's rule), one that caught
them up at a row's next gradient rather than before the forward.
"""
import argparse
import csv
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZERS = ("adam", "sparse_adam")
# (earlier lazy Adams, drawn where their runs are there: LABEL_skip skipped a row's steps without
# a gradient, as SparseAdam and the paper do; LABEL_touch caught them up at the row's next
# gradient, not before the forward)
SKIP, TOUCH = "skip", "touch"
EARLIER = (SKIP, TOUCH)
STYLES = {"adam": ("-o", "C0"), "sparse_adam": ("--s", "C1"), SKIP: (":^", "C2"),
          TOUCH: ("-.v", "C3")}
NAMES = {"adam": "Adam (every row)", "sparse_adam": "LazyAdam (rows caught up before the forward)",
         SKIP: "lazy Adam, skipped steps (SparseAdam, paper)",
         TOUCH: "lazy Adam, caught up at the next gradient"}


def curve(root: str, trace: str) -> list:
    """[(step, psnr)] of every scored step of the runs under root/trace, by step."""
    points = {}
    for path in glob.glob(os.path.join(root, trace, "*", "version_*", "metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("val/psnr"):
                    points[int(float(row["step"]))] = float(row["val/psnr"])
    return sorted(points.items())


def run(label: str, root: str, flags: list) -> None:
    for optimizer in OPTIMIZERS:
        trace = f"{label}_{optimizer}"
        checkpoints = glob.glob(os.path.join(root, trace, "*", "version_*", "checkpoints",
                                             "last.ckpt"))
        resume = ["--ckpt", max(checkpoints, key=os.path.getmtime)] if checkpoints else []
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--root", root,
                        "--trace", trace, "--table_optimizer", optimizer, *flags, *resume],
                       check=True)


def plot(labels: list, root: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = {(label, o): curve(root, f"{label}_{o}") for label in labels
              for o in OPTIMIZERS + EARLIER}
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        finals = {}
        for optimizer in OPTIMIZERS + EARLIER:
            points = curves[label, optimizer]
            if not points:
                continue
            steps, psnr = zip(*points)
            finals[optimizer] = points[-1]
            style, colour = STYLES[optimizer]
            ax.plot(steps, psnr, style, color=colour, markersize=3,
                    label=f"{NAMES[optimizer]}: {psnr[-1]:.2f} dB at {steps[-1]}")
        # (a run stopped in its first steps scores there too: keep the axis on the fit)
        shown = [p for o in finals for s, p in curves[label, o]
                 if s >= 0.05 * max(step for step, _ in curves[label, o])]
        if shown:
            ax.set_ylim(min(shown) - 0.5, max(shown) + 0.5)
        title = label
        lazy = "sparse_adam" if "sparse_adam" in finals else SKIP
        if "adam" in finals and lazy in finals:
            title += f" (lazy - dense: {finals[lazy][1] - finals['adam'][1]:+.2f} dB)"
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("PSNR (dB, sRGB 8-bit)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = out + ".partial.png"
    fig.savefig(partial, dpi=110)
    os.replace(partial, out)
    for (label, optimizer), points in curves.items():
        print(f"{label} {optimizer}: " + ", ".join(f"{s}: {p:.2f}" for s, p in points))
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.path.join(ROOT, "bench", "out", "optimizers"))
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train LABEL with both table optimizers")
    r.add_argument("label")
    d = sub.add_parser("plot", help="the PSNR curves of LABELs, one panel each")
    d.add_argument("labels", nargs="+")
    d.add_argument("-o", "--out", default=os.path.join(ROOT, "docs", "lazy_adam_psnr.png"))
    args, flags = p.parse_known_args(argv)
    if args.command == "run":
        run(args.label, args.root, flags)
    else:
        if flags:
            p.error(f"unrecognized arguments: {' '.join(flags)}")
        plot(args.labels, args.root, args.out)


if __name__ == "__main__":
    main()
