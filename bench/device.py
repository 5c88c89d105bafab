"""The GPU check, in one command: everything that only a CUDA machine can tell us.

    python bench/device.py                                            # on a machine with a GPU
    python bench/device.py --vs ../peers/upstream_encoding.py:MultiResHashGrid

1. the encoding's tests on the GPU (tests/test_encoding.py with every tensor made on cuda:
   HASHGRID_TEST_DEVICE, see tests/conftest.py), so the one-pass device branch, its backward
   and double backward run where users run them;
2. the encoding benchmark on the GPU (bench/encoding.py: 2-D and 3-D, eager and compiled,
   fwd and fwd+bwd, peak allocated memory; the peers given with --vs side by side), and its
   traffic table (--traffic: ops, bytes written per point, compiled in one graph or not);
3. a --seconds albert fit at batch 2^18 (the paper's batch): PSNR, steps, pixels/s and the
   peak GPU memory train.py logs;
4. the table's step, dense against sparse (bench/step.py at T = 2^19 and 2^24, batch 2^18):
   bytes, peak memory and milliseconds per step, and whether the sparse gradient's bits
   repeat run to run (and the dense one's, scattered with atomics, do not).
It prints one markdown table (for the README) and writes bench/out/device.json; all of it takes
under 12 minutes on one GPU. On a machine without a CUDA GPU it says so in one line and exits 0.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")


def run(command, timeout, env=None):
    """(exit status, seconds, last lines of output) of a child process."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, output = "timeout", str(expired.stdout or "")
    return status, time.perf_counter() - start, output.strip().splitlines()


def encoding_tests(timeout):
    status, seconds, lines = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  "tests/test_encoding.py"], timeout,
                                 env={"HASHGRID_TEST_DEVICE": "cuda"})
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line
                    or " error" in line), f"exit {status}")
    return dict(check="encoding tests on cuda", result=summary.strip("= "), seconds=seconds,
                ok=status == 0)


def bench_encoding(flags, peers, json_name, what, timeout):
    """(rows of bench/encoding.py run on cuda with flags and the peers, seconds), or (None, a
    failed check)."""
    out = os.path.join(OUT, "device_encoding.json")
    command = [sys.executable, "bench/encoding.py", "--device", "cuda", *flags, "--out", out]
    for peer in peers:
        command += ["--vs", peer]
    status, seconds, lines = run(command, timeout)
    if status != 0:
        return None, dict(check=what, result=f"failed: {lines[-1:] or status}", seconds=seconds,
                          ok=False)
    with open(os.path.join(OUT, json_name)) as f:
        return json.load(f)["rows"], seconds


def encoding_bench(peers, timeout):
    rows, seconds = bench_encoding(["--workloads", "2d", "3d", "--repeats", "5"], peers,
                                   "device_encoding.json", "encoding benchmark", timeout)
    if rows is None:
        return [seconds]
    memory = {(r["workload"], r["impl"]): r.get("extra_bytes") for r in rows
              if r["step"] == "memory"}
    checks = []
    for r in rows:
        if r["step"] == "memory":
            continue
        ratio = "" if r["impl"] == "ours" else f" (ours is {r['ratio_ours_over_impl']:.2f}x)"
        peak = memory.get((r["workload"], r["impl"]))
        checks.append(dict(check=f"encoding {r['workload']} {r['mode']} {r['step']} "
                                 f"[{os.path.basename(r['impl'])}]",
                           result=f"{r['points_per_second'] / 1e6:.1f} M points/s{ratio}",
                           peak_mib=None if peak is None else peak / 2**20, ok=True))
    checks[0]["seconds"] = seconds
    return checks


def encoding_traffic(peers, timeout):
    """bench/encoding.py --traffic on the GPU: ops, bytes written per point and peak memory of
    one fwd+bwd step, eager and compiled, ours and the peers (the counts match the CPU's; the
    peaks are the caching allocator's)."""
    rows, seconds = bench_encoding(["--traffic"], peers, "device_encoding_traffic.json",
                                   "encoding traffic", timeout)
    if rows is None:
        return [seconds]
    checks = []
    for r in rows:
        compiled = r.get("compiled") or {}
        whole = ("" if not compiled else ", compiled: whole graph" if compiled.get("fullgraph")
                 else ", compiled: GRAPH BREAK")
        peak = r.get("peak_bytes")
        checks.append(dict(check=f"traffic {r['workload']} [{os.path.basename(r['impl'])}]",
                           result=f"{r['ops']} ops, {r['bytes_per_point']:,.0f} B/point{whole}",
                           peak_mib=None if peak is None else peak / 2**20,
                           ok=not compiled or compiled.get("fullgraph", False)))
    checks[0]["seconds"] = seconds
    return checks


def training(image, seconds, timeout):
    root = os.path.join(OUT, "logs")
    status, wall, lines = run([sys.executable, "train.py", "-i", image, "--root", root,
                               "--trace", "device", "--accelerator", "gpu", "--batch_size",
                               str(2**18), "--max_time", str(seconds), "--max_steps", "10000000",
                               "--val_every", "500"], timeout)
    if status != 0:
        return dict(check="albert training", result=f"failed: {lines[-1:] or status}",
                    seconds=wall, ok=False)
    folder = os.path.join(root, "device", os.path.splitext(os.path.basename(image))[0])
    latest = max(os.listdir(folder), key=lambda name: int(name.split("_")[1]))
    with open(os.path.join(folder, latest, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/psnr")]
    last = rows[-1]
    steps, train_seconds = int(float(last["step"])), float(last["time/train_seconds"])
    peak = max((float(r["memory/peak_mib"]) for r in rows if r.get("memory/peak_mib")),
               default=None)
    return dict(check=f"albert fit, {seconds:g} s at batch 2^18",
                result=f"{float(last['val/psnr']):.2f} dB after {steps} steps, "
                       f"{steps * 2**18 / train_seconds / 1e6:.1f} M pixels/s",
                seconds=wall, peak_mib=peak, ok=True)


def sparse_step(timeout):
    """bench/step.py on the GPU: dense vs sparse table steps at T = 2^19 / 2^24, batch 2^18."""
    out = os.path.join(OUT, "device_step.json")
    status, seconds, lines = run([sys.executable, "bench/step.py", "--device", "cuda",
                                  "--log2_t", "19", "24", "--log2_batch", "18",
                                  "--determinism", "--out", out], timeout)
    if status != 0:
        return [dict(check="table step", result=f"failed: {lines[-1:] or status}",
                     seconds=seconds, ok=False)]
    with open(out) as f:
        result = json.load(f)
    return step_checks(result, seconds)


def step_checks(result: dict, seconds: float) -> list:
    """bench/step.py's JSON -> check rows: per T, bytes and ms per step of each variant, and
    the determinism of the sparse gradient (the check fails if its bits vary)."""
    checks = []
    clocks = {(c["log2_t"], c["batch"]): c["seconds"] for c in result["clocks"]}
    for row in result["counts"]:
        total = clocks.get((row["log2_t"], row["batch"]), {}).get(row["variant"])
        ms = "" if total is None else f", {total[0] * 1e3:.1f} ms/step"
        checks.append(dict(check=f"table step T=2^{row['log2_t']} batch {row['batch']} "
                                 f"[{row['variant']}]",
                           result=f"{row['bytes'] / 1e9:.3f} GB written{ms}",
                           peak_mib=row["peak_bytes"] / 2**20, ok=True))
    for check in result.get("determinism", []):
        same, diff = check["sparse"]
        dense_same, dense_diff = check["dense"]
        checks.append(dict(check=f"sparse gradient bits repeat, T=2^{check['log2_t']}",
                           result=("yes" if same else f"NO (up to {diff:.2g})")
                           + f"; dense: {'yes' if dense_same else f'no (up to {dense_diff:.2g})'}",
                           ok=same))
    if checks:
        checks[0]["seconds"] = seconds
    return checks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", action="append", default=[], metavar="FILE.py:CLASS",
                        help="encoding peers for the benchmark (bench/encoding.py --vs)")
    parser.add_argument("--image", default=os.path.join(ROOT, "..", "shared", "data",
                                                        "albert.jpg"))
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench/device.py: no CUDA GPU is visible to torch here; nothing to measure")
        return 0
    name = torch.cuda.get_device_name(0)
    checks = [encoding_tests(timeout=200)]
    checks += encoding_bench(args.vs, timeout=180)
    checks += encoding_traffic(args.vs, timeout=150)
    checks.append(training(args.image, args.seconds, timeout=args.seconds + 90))
    checks += sparse_step(timeout=240)
    print(f"\n{name}, torch {torch.__version__}\n")
    print("| check | result | wall s | peak GPU MiB |\n|---|---|---:|---:|")
    for c in checks:
        seconds = f"{c['seconds']:.0f}" if c.get("seconds") is not None else ""
        peak = f"{c['peak_mib']:.0f}" if c.get("peak_mib") is not None else ""
        print(f"| {c['check']} | {c['result']} | {seconds} | {peak} |")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "device.json"), "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, checks=checks), f, indent=1)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
