"""One training step of the table, dense against sparse: bytes written, peak memory, seconds.

    python bench/step.py                         # counts (any machine), then this CPU's clock
    python bench/step.py --no-clock              # counts and peak memory only
    python bench/step.py --device cuda           # on a GPU (bench/device.py runs this)

The grid train.py builds for Tokyo at half size (2-D, L = 16, F = 2, N_min 16, N_max
(14179, 5362)), T = 2^19, 2^22, 2^24 rows per level, batches 2^16 and 2^18. A step: the
encoding's forward, backward (loss y.square().mean()), the optimizer's step and zero_grad:
  dense       sparse=False, torch.optim.Adam (fused where torch has it): today's step
  sparse_adam sparse=True, torch.optim.SparseAdam
  lazy_adam   sparse=True, lazy_adam.LazyAdam (what train.py --table_optimizer sparse_adam runs:
              the rows x reads caught up before the forward, LazyAdam.catch_up)
Bytes: written by non-view aten ops in one step (after a warm-up step), device branch (the
module's private _device_branch hook: what a GPU runs), counted as bench/encoding.py --traffic
counts them (allocations excluded) except that an in-place scatter (index_add_, index_copy_,
index_fill_, a dense tensor plus a sparse one, ...) counts only the rows it writes, and a
sparse tensor counts its indices and values. Peak: the extra tensor bytes allocated during a
step (the table and the optimizer's state, alive throughout, excluded). Seconds: median per
step, the variants interleaved step by step, with the default implementation (the CPU branch on
a CPU) and freed memory kept for reuse as train.py keeps it (hardware.keep_freed_memory); time
it on a quiet machine. Writes bench/out/step.json.
"""
import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from encoding import MultiResHashGrid  # noqa: E402  (after the path set-up)
from hardware import fused_adam, keep_freed_memory  # noqa: E402
from lazy_adam import LazyAdam  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_encoding",
                                               os.path.join(ROOT, "bench", "encoding.py"))
bench_encoding = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_encoding)

TOKYO_HALF = dict(dim=2, n_levels=16, n_features_per_level=2, base_resolution=16,
                  finest_resolution=(14179, 5362))
VARIANTS = ("dense", "sparse_adam", "lazy_adam")
BETAS, EPS, LR = (0.9, 0.99), 1e-15, 1e-2          # the paper's


def _bytes(tensor: torch.Tensor) -> int:
    if tensor.is_sparse:
        return _bytes(tensor._indices()) + _bytes(tensor._values())
    return tensor.numel() * tensor.element_size()


# in-place scatters: the argument holding what they write (its rows are what they write)
_SCATTER_SOURCE = {"index_add_": 3, "index_copy_": 3, "scatter_add_": 3, "scatter_": 3,
                   "index_put_": 2, "_index_put_impl_": 2}


class StepCounter(bench_encoding.WriteCounter):
    """bench/encoding.py's counter, but an in-place scatter (or index_fill_) counts only the
    rows it writes, a sparse tensor its indices and values (not its dense size), and an op
    that returns nothing (fused Adam) the tensors it writes into."""

    def written(self, func, args, out) -> int:
        name = func.__name__.split(".")[0]
        source = _SCATTER_SOURCE.get(name)
        if source is not None and len(args) > source:
            values, target = args[source], args[0]
            row_bytes = target[0].numel() * target.element_size() if target.dim() else 0
            if name in ("index_put_", "_index_put_impl_"):
                return args[1][0].numel() * row_bytes      # one row per index
            return _bytes(values)
        if name == "index_fill_":                            # one row per index
            return args[2].numel() * (args[0][0].numel() * args[0].element_size())
        if name == "add_" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and args[1].is_sparse and not args[0].is_sparse:
            return _bytes(args[1]._values())               # dense += sparse: its rows
        if not func._schema.returns:        # e.g. _fused_adam_: the arguments it writes
            return sum(_bytes(t) for arg, value in zip(func._schema.arguments, args)
                       if arg.alias_info is not None and arg.alias_info.is_write
                       and arg.name != "grads"     # (written only to unscale / maximize)
                       for t in bench_encoding.tree_flatten(value)[0]
                       if isinstance(t, torch.Tensor))
        return sum(_bytes(t) for t in bench_encoding.tree_flatten(out)[0]   # sparse: its rows
                   if isinstance(t, torch.Tensor))


def encoder(log2_t: int, device: str, device_branch: bool, sparse: bool = False, grid=None):
    """The grid (TOKYO_HALF unless `grid`), seeded; device_branch: what a GPU runs, on any
    device (the module's private hook)."""
    torch.manual_seed(0)
    enc = MultiResHashGrid(**(grid or TOKYO_HALF), log2_hashmap_size=log2_t, device=device,
                           sparse=sparse)
    enc._device_branch = device_branch
    return enc


def build(variant: str, log2_t: int, device: str, device_branch: bool):
    """(encoding, optimizer) of a variant; device_branch: see encoder."""
    enc = encoder(log2_t, device, device_branch, sparse=variant != "dense")
    if variant == "sparse_adam":
        opt = torch.optim.SparseAdam(enc.parameters(), lr=LR, betas=BETAS, eps=EPS)
    else:
        kind = torch.optim.Adam if variant == "dense" else LazyAdam
        opt = kind(enc.parameters(), lr=LR, betas=BETAS, eps=EPS,
                   fused=fused_adam(torch.device(device)))
    return enc, opt


def make_step(enc, opt, batch: int, device: str, seed: int = 0):
    """A step on a fixed random batch; returns (fwd+bwd seconds (LazyAdam: with its catch_up
    before the forward), optimizer seconds)."""
    x = torch.rand(batch, 2, device=device,
                   generator=torch.Generator(device=device).manual_seed(seed))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        start = time.perf_counter()
        if isinstance(opt, LazyAdam):   # as train.py: the rows x reads, caught up first
            opt.catch_up(enc.embedding.weight, enc.rows(x))
        enc(x).square().mean().backward()
        sync()
        middle = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return middle - start, time.perf_counter() - middle
    return step


def count(variant: str, log2_t: int, batch: int, device: str) -> dict:
    """Bytes and ops of one device-branch step, and its peak extra allocation."""
    enc, opt = build(variant, log2_t, device, True)
    step = make_step(enc, opt, batch, device)
    step()                                          # the optimizer's state is made here
    step()                                          # (and LazyAdam's one-time tables)
    with StepCounter() as counter:
        step()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = bench_encoding._peak_allocated_cpu(step)
    top = sorted(counter.by_op.items(), key=lambda kv: -kv[1])[:5]
    return dict(variant=variant, log2_t=log2_t, batch=batch, ops=counter.ops,
                bytes=counter.bytes, peak_bytes=peak,
                params=enc.embedding.weight.numel(), top=top)


def clock(log2_t: int, batch: int, device: str, repeats: int) -> dict:
    """variant -> (median seconds per step, of which fwd+bwd, of which the optimizer), the
    default branch (a CPU's on a CPU), the variants interleaved."""
    steps = {}
    for variant in VARIANTS:
        enc, opt = build(variant, log2_t, device, False)
        steps[variant] = make_step(enc, opt, batch, device, seed=1)
    for step in steps.values():
        step()                                       # warm-up, the optimizer's state made
        step()                                       # (and LazyAdam's one-time tables)
    times = {variant: [] for variant in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            times[variant].append(step())
    result = {}
    for variant, pairs in times.items():
        totals = [a + b for a, b in pairs]
        result[variant] = (statistics.median(totals), statistics.median(a for a, _ in pairs),
                           statistics.median(b for _, b in pairs))
    return result


def determinism(device: str, log2_t: int, batch: int, runs: int = 3, grid=None) -> dict:
    """Whether the table's gradient has the same bits on every run of one backward (device
    branch), sparse and dense: {"sparse": (identical, largest difference), "dense": ...}."""
    enc = encoder(log2_t, device, True, grid=grid)
    x = torch.rand(batch, enc.input_dim, device=device,
                   generator=torch.Generator(device=device).manual_seed(2))
    result = {}
    for sparse in (True, False):
        enc.sparse = sparse
        grads = []
        for _ in range(runs):
            enc.zero_grad(set_to_none=True)
            enc(x).square().mean().backward()
            grad = enc.embedding.weight.grad
            grads.append(torch.cat([grad._indices()[0].double(), grad._values().flatten()
                                    .double()]) if sparse else grad.flatten().clone())
        same = all(torch.equal(g, grads[0]) for g in grads[1:])
        diff = max(float((g - grads[0]).abs().max()) if g.shape == grads[0].shape
                   else float("inf") for g in grads[1:])
        result["sparse" if sparse else "dense"] = (same, diff)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log2_t", type=int, nargs="+", default=[19, 22, 24])
    p.add_argument("--log2_batch", type=int, nargs="+", default=[16, 18])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-clock", dest="clock", action="store_false")
    p.add_argument("--no-counts", dest="counts", action="store_false")
    p.add_argument("--determinism", action="store_true",
                   help="also check that the sparse gradient's bits repeat run to run (and "
                   "whether the dense one's do)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "step.json"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        keep_freed_memory()     # as train.py: the dense step's 470 MB gradient page-faults else
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name")), "")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(f"torch {torch.__version__}, {args.device} ({where}), {torch.get_num_threads()} "
          f"threads, float32; Tokyo-half grid; one step = fwd + bwd + optimizer + zero_grad")
    rows, clocks, checks = [], [], []
    for log2_t in args.log2_t:
        for log2_batch in args.log2_batch:
            batch = 2 ** log2_batch
            if args.counts:
                for variant in VARIANTS:
                    rows.append(count(variant, log2_t, batch, args.device))
                    gc.collect()
            if args.determinism:
                checks.append(dict(log2_t=log2_t, batch=batch,
                                   **determinism(args.device, log2_t, batch)))
            if args.clock:
                clocks.append(dict(log2_t=log2_t, batch=batch,
                                   seconds=clock(log2_t, batch, args.device, args.repeats)))
                gc.collect()
    if rows:
        print("\nbytes written per step (device branch), peak extra allocation")
        print(f"| T | batch | step | bytes/step | bytes/point | x T=2^{args.log2_t[0]} | "
              "peak MiB | largest writers |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            first = next(r for r in rows if r["variant"] == row["variant"]
                         and r["batch"] == row["batch"] and r["log2_t"] == args.log2_t[0])
            top = ", ".join(f"{name} {value / 1e9:.2f} GB" for name, value in row["top"][:3])
            print(f"| 2^{row['log2_t']} | 2^{row['batch'].bit_length() - 1} | {row['variant']} "
                  f"| {row['bytes'] / 1e9:.3f} GB | {row['bytes'] / row['batch']:,.0f} "
                  f"| {row['bytes'] / first['bytes']:.2f} | {row['peak_bytes'] / 2**20:,.0f} "
                  f"| {top} |")
    if clocks:
        print(f"\nseconds per step (implementation='fast', median of {args.repeats}, "
              "interleaved): total (fwd+bwd / optimizer)")
        print("| T | batch | " + " | ".join(VARIANTS) + " |")
        print("|---|---|" + "---|" * len(VARIANTS))
        for entry in clocks:
            cells = [f"{total * 1e3:.0f} ms ({fb * 1e3:.0f} / {o * 1e3:.0f})"
                     for total, fb, o in (entry["seconds"][v] for v in VARIANTS)]
            print(f"| 2^{entry['log2_t']} | 2^{entry['batch'].bit_length() - 1} | "
                  + " | ".join(cells) + " |")
    for check in checks:
        print(f"\ndeterminism, T = 2^{check['log2_t']}, batch {check['batch']}: " + ", ".join(
            f"{kind} {'bit-identical' if same else f'differs (up to {diff:.2g})'}"
            for kind, (same, diff) in ((k, check[k]) for k in ("sparse", "dense"))))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    partial = args.out + ".partial"
    with open(partial, "w") as f:
        json.dump(dict(torch=torch.__version__, device=args.device, where=where,
                       threads=torch.get_num_threads(), counts=rows, clocks=clocks,
                       determinism=checks), f, indent=1)
    os.replace(partial, args.out)
    print(f"\nwrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
