"""Throughput and memory of MultiResHashGrid, side by side with other implementations.

    python bench/encoding.py                                     # ours only
    python bench/encoding.py --vs ../peers/upstream_encoding.py:MultiResHashGrid
    python bench/encoding.py --traffic [--vs ...]                # ops and bytes, any machine
    python bench/encoding.py --eikonal [--traffic] [--vs ...]    # second order: an SDF's step

--traffic counts, for one forward+backward step (loss y.square().mean()), the aten ops and the
bytes their outputs write per point (views and allocations excluded: they write nothing; an
in-place op counts the whole tensor it writes into), for ours' device branch (what GPUs and
torch.compile run), ours' CPU branch and each peer, and the peak allocated memory of that
step. These are counts, the same on any machine; the M points/s of the timing table are this
machine's. Compiled, it reports inductor's kernel count and bytes accessed per point, whether
the graph compiled whole (fullgraph=True), and its peak memory.

Every implementation is timed interleaved with ours in the same process (step by step, so
machine noise hits all alike) and reported as points/second and as a ratio to ours. Peak
memory of one forward+backward step, parameter gradients included, each measured in a fresh
child process: the extra allocated tensor bytes (CUDA: the caching allocator's peak; CPU: the
profiler's allocation counter), and on CPU also the extra resident memory (RSS), which adds
what malloc keeps and the library code pages a first step touches. Peers are built from our
constructor arguments, matched by parameter name (dim, n_levels / num_levels,
n_features_per_level / features_per_level, log2_hashmap_size, base_resolution / min_res,
finest_resolution / max_res).
"""
import argparse
import gc
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (dim, n_levels, n_features_per_level, log2_hashmap_size, base, finest, batch)
WORKLOADS = {
    "2d": (2, 16, 2, 19, 16, 8192, 2**18),
    "3d": (3, 16, 2, 19, 16, 2048, 2**18),
    "5d": (5, 8, 2, 16, 4, 64, 2**15),
}
SYNONYMS = {
    "dim": ("dim", "in_dim", "input_dim", "n_input_dims"),
    "n_levels": ("n_levels", "num_levels"),
    "n_features_per_level": ("n_features_per_level", "features_per_level"),
    "log2_hashmap_size": ("log2_hashmap_size",),
    "base_resolution": ("base_resolution", "min_res"),
    "finest_resolution": ("finest_resolution", "max_res"),
}
OURS = "ours"
OURS_CPU = "ours (CPU branch)"
OURS_DEVICE = "ours (device branch)"
OURS_RECOMPUTE = "ours (device branch, recomputing)"
OUR_SPECS = (OURS, OURS_CPU, OURS_DEVICE, OURS_RECOMPUTE)


def load_class(spec: str):
    """'ours' or 'path/to/file.py:ClassName' -> the class."""
    if spec in OUR_SPECS:
        import encoding
        return encoding.MultiResHashGrid
    path, _, name = spec.rpartition(":")
    if not path or not os.path.isfile(path):
        raise SystemExit(f"bench/encoding.py: error: --vs wants path/to/file.py:ClassName, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location(f"peer_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def build(cls, workload: str, device: str, spec: str = OURS):
    dim, levels, features, log2_t, base, finest, _ = WORKLOADS[workload]
    ours = dict(dim=dim, n_levels=levels, n_features_per_level=features, log2_hashmap_size=log2_t,
                base_resolution=base, finest_resolution=finest)
    params = inspect.signature(cls).parameters
    kwargs = {}
    for key, value in ours.items():
        name = next((n for n in SYNONYMS[key] if n in params), None)
        if name is not None:
            kwargs[name] = value
        elif key == "dim" and dim != 3:
            raise TypeError(f"{cls.__name__} takes no input dimension (3-D only?)")
    if (spec not in OUR_SPECS and "implementation" in params
          and params["implementation"].default != "fast"):   # (not another copy of ours)
        kwargs["implementation"] = "torch"     # nerfstudio's pure-torch path
    return set_branch(cls(**kwargs).to(device), spec)


def set_branch(module, spec: str):
    """module (ours) set to run spec's branch, through its private test hooks: OURS_DEVICE the
    device branch keeping corner rows for backward, OURS_RECOMPUTE recomputing them."""
    if spec in (OURS_DEVICE, OURS_RECOMPUTE):
        module._device_branch, module._device_keep = True, spec == OURS_DEVICE
    return module


LOSSES = {"square_mean": lambda y: y.float().square().mean(), "sum": lambda y: y.float().sum()}


def make_step(module, batch: int, dim: int, device: str, backward: bool,
              loss: str = "square_mean"):
    x = torch.rand(batch, dim, device=device)

    def step():
        if backward:
            module.zero_grad(set_to_none=True)
            LOSSES[loss](module(x)).backward()
        else:
            with torch.no_grad():
                module(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return step


# --eikonal: an SDF's step, 3-D at 2^16 points, MLP 32-64-1 with Softplus
EIKONAL_BATCH = 2**16


def make_mlp(module, device: str):
    torch.manual_seed(0)
    width = module(torch.rand(1, module_dim(module), device=device)).shape[-1]
    return torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.Softplus(),
                               torch.nn.Linear(64, 1)).to(device)


def module_dim(module) -> int:
    return getattr(module, "input_dim", None) or getattr(module, "dim", 3)


def make_eikonal_step(module, mlp, batch: int, dim: int, device: str, second_order: bool):
    """second_order: y = enc(x); g = d(mlp(y).sum())/dx (create_graph); ((|g| - 1)^2).mean()
    backward. Else the first-order step on the same model: mlp(enc(x)).abs().mean() backward."""
    x = torch.rand(batch, dim, device=device)

    def step():
        module.zero_grad(set_to_none=True)
        mlp.zero_grad(set_to_none=True)
        if second_order:
            points = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(mlp(module(points)).sum(), points, create_graph=True)
            ((grad.norm(dim=-1) - 1) ** 2).mean().backward()
        else:
            mlp(module(x)).abs().mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return step


def eikonal_main(args):
    specs = [OURS] + args.vs
    workloads = [w for w in args.workloads if w == "3d"] or ["3d"]
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; {EIKONAL_BATCH} points, MLP 32-64-1 (Softplus), eager")
    rows = []
    for workload in workloads:
        dim = WORKLOADS[workload][0]
        steps = {}
        for spec in specs:
            module = build(load_class(spec), workload, args.device, spec)
            mlp = make_mlp(module, args.device)
            for second in (False, True):
                steps[(spec, second)] = make_eikonal_step(module, mlp, EIKONAL_BATCH, dim,
                                                          args.device, second)
        seconds = time_interleaved(steps, args.repeats)
        for spec in specs:
            first, second = seconds[(spec, False)], seconds[(spec, True)]
            rows.append(dict(workload=workload, impl=spec, first_order_s=first, eikonal_s=second,
                             eikonal_over_first=second / first,
                             ours_faster=second / seconds[(OURS, True)]))
    print(f"\n{'workload':8} {'implementation':44} {'1st-order ms':>12} {'eikonal ms':>10} "
          f"{'ratio':>6} {'ours is':>8}")
    for row in rows:
        name = row["impl"] if len(row["impl"]) <= 44 else "..." + row["impl"][-41:]
        faster = f"{row['ours_faster']:.2f}x" if row["impl"] != OURS else ""
        print(f"{row['workload']:8} {name:44} {row['first_order_s'] * 1e3:12.1f} "
              f"{row['eikonal_s'] * 1e3:10.1f} {row['eikonal_over_first']:5.2f}x {faster:>8}")
    out = args.out.replace(".json", "_eikonal.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(torch=torch.__version__, device=args.device,
                       threads=torch.get_num_threads(), rows=rows), f, indent=1)
    print(f"\nwrote {os.path.relpath(out)}")


def time_interleaved(steps: dict, repeats: int) -> dict:
    """steps: label -> callable. Median seconds per call, all labels interleaved."""
    for step in steps.values():   # warm-up (and compilation)
        step()
    times = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _peak_allocated_cpu(step) -> int:
    """Peak of the tensor bytes allocated and still alive during step(), from the profiler's
    allocation counter (it starts at 0 when profiling starts)."""
    from torch.profiler import profile
    with profile(profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    return max((event["args"]["Total Allocated"] for event in events if event.get("name") == "[memory]"), default=0)


def measure_memory_here(spec: str, workload: str, device: str, kind: str,
                        compiled: bool = False) -> int:
    """Extra memory (bytes) of one forward+backward step, in this process. kind: "allocated"
    (tensor bytes) or "rss" (resident memory, CPU)."""
    module = build(load_class(spec), workload, device, spec)
    if compiled:
        module = torch.compile(module, fullgraph=True)
    step = make_step(module, WORKLOADS[workload][6], WORKLOADS[workload][0], device, backward=True)
    if compiled:
        step()        # compilation first: its own memory is not the step's
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    if kind == "allocated":
        return _peak_allocated_cpu(step)
    before = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:   # resets the peak (VmHWM) to now
        refs.write("5")
    step()
    return _rss_bytes("VmHWM") - before


def measure_memory(spec: str, workload: str, device: str, kind: str, compiled: bool = False):
    """Fresh child process per measurement, so one implementation's freed memory cannot hide
    another's peak. None for RSS on CUDA or where the platform has no /proc."""
    if device.startswith("cuda") and not compiled:
        return measure_memory_here(spec, workload, device, kind) if kind == "allocated" else None
    if kind == "rss" and not os.path.exists("/proc/self/clear_refs"):
        return None
    out = subprocess.run([sys.executable, __file__, "--_memory", spec, workload, device, kind,
                          str(int(compiled))], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"  (memory of {spec} on {workload} failed: {out.stderr.strip().splitlines()[-1:]})")
        return None
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vs", action="append", default=[], metavar="FILE.py:CLASS",
                        help="another implementation to time against ours (repeatable)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "encoding.json"))
    parser.add_argument("--loss", choices=list(LOSSES), default="square_mean",
                        help="the fwd+bwd step's loss on the features (default: %(default)s)")
    parser.add_argument("--traffic", action="store_true",
                        help="count ops, bytes written and peak memory instead of timing")
    parser.add_argument("--eikonal", action="store_true",
                        help="time (with --traffic: count) the second-order step of an SDF "
                        "(3-D, 2^16 points): y = enc(x); g = d(mlp(y).sum())/dx "
                        "(create_graph); ((|g| - 1)^2).mean().backward(), against the "
                        "first-order step mlp(enc(x)).abs().mean().backward()")
    parser.add_argument("--_memory", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        *memory_args, compiled = args._memory
        print(measure_memory_here(*memory_args, compiled=compiled == "1"))
        return
    if args.traffic:
        return traffic_main(args)
    if args.eikonal:
        return eikonal_main(args)

    specs = [OURS] + args.vs
    classes = {spec: load_class(spec) for spec in specs}
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, fwd+bwd loss {args.loss}")
    rows = []
    for workload in args.workloads:
        dim, batch = WORKLOADS[workload][0], WORKLOADS[workload][6]
        modules = {}
        for spec in specs:
            try:
                modules[spec] = build(classes[spec], workload, args.device, spec)
            except Exception as error:  # a peer may not support this workload (e.g. 3-D only)
                print(f"  {spec} on {workload}: n/a ({type(error).__name__}: {error})")
        for mode in args.modes:
            for backward in (False, True):
                steps = {}
                for spec, module in modules.items():
                    runner = torch.compile(module) if mode == "compiled" else module
                    steps[spec] = make_step(runner, batch, dim, args.device, backward, args.loss)
                seconds = time_interleaved(steps, args.repeats)
                for spec, value in seconds.items():
                    rows.append(dict(workload=workload, mode=mode, step="fwd+bwd" if backward else "fwd",
                                     impl=spec, points_per_second=batch / value,
                                     ratio_ours_over_impl=value / seconds[OURS]))
        if not args.no_memory:
            for spec in modules:
                rows.append(dict(workload=workload, mode="eager", step="memory", impl=spec,
                                 extra_bytes=measure_memory(spec, workload, args.device, "allocated"),
                                 extra_rss_bytes=measure_memory(spec, workload, args.device, "rss")))

    print(f"\n{'workload':8} {'mode':9} {'step':8} {'implementation':44} {'M points/s':>11} {'ours is':>9}")
    for row in rows:
        if row["step"] == "memory":
            continue
        name = row["impl"] if len(row["impl"]) <= 44 else "..." + row["impl"][-41:]
        ratio = f"{row['ratio_ours_over_impl']:.2f}x" if row["impl"] != OURS else ""
        print(f"{row['workload']:8} {row['mode']:9} {row['step']:8} {name:44} "
              f"{row['points_per_second'] / 1e6:11.3f} {ratio:>9}")
    memory_rows = [row for row in rows if row["step"] == "memory"]
    if memory_rows:
        print(f"\n{'workload':8} {'implementation':44} {'extra MiB, one fwd+bwd step:':>28}")
        print(f"{'':8} {'':44} {'allocated':>11} {'ours is':>9} {'RSS':>7}")
        mib = lambda value: "n/a" if value is None else f"{value / 2**20:.0f}"
        ours = {row["workload"]: row["extra_bytes"] for row in memory_rows if row["impl"] == OURS}
        for row in memory_rows:
            name = row["impl"] if len(row["impl"]) <= 44 else "..." + row["impl"][-41:]
            theirs = row["extra_bytes"]
            mine = ours[row["workload"]]
            ratio = f"{mine / theirs:.2f}x" if row["impl"] != OURS and mine and theirs else ""
            print(f"{row['workload']:8} {name:44} {mib(row['extra_bytes']):>11} {ratio:>9} "
                  f"{mib(row['extra_rss_bytes']):>7}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump(dict(torch=torch.__version__, device=args.device, threads=torch.get_num_threads(),
                       rows=rows), out, indent=1)
    print(f"\nwrote {os.path.relpath(args.out)}")


# --- traffic: what does not depend on the machine ------------------------------------------

TRAFFIC_WORKLOADS = ("2d", "3d")


class WriteCounter(TorchDispatchMode):
    """Counts the aten ops that run and the bytes their outputs hold: views (every output
    aliases an input, unwritten) and allocations (empty*: nothing written) excluded; an
    in-place or out= op counts the tensor it writes into."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0
        self.by_op = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write
                           for r in returns):
            return out
        if func.__name__.startswith(("empty", "new_empty")):
            return out
        written = self.written(func, args, out)
        self.ops += 1
        self.bytes += written
        self.by_op[func.__name__] = self.by_op.get(func.__name__, 0) + written
        return out

    def written(self, func, args, out) -> int:
        """The bytes an op that writes wrote: its outputs'."""
        return sum(t.numel() * t.element_size() for t in tree_flatten(out)[0]
                   if isinstance(t, torch.Tensor))


def count_traffic(module, batch: int, dim: int, device: str, eikonal: bool = False
                  ) -> WriteCounter:
    """The ops and bytes of one forward+backward step (eikonal: of the eikonal step, MLP
    included), after a warm-up step."""
    if eikonal:
        step = make_eikonal_step(module, make_mlp(module, device), batch, dim, device, True)
    else:
        step = make_step(module, batch, dim, device, backward=True)
    step()
    with WriteCounter() as counter:
        step()
    return counter


def compiled_traffic(module, batch: int, dim: int, device: str) -> dict:
    """torch.compile(fullgraph=True) of one forward+backward step: whether it compiled whole,
    inductor's generated kernels and their estimated bytes accessed."""
    from torch._inductor import metrics
    torch._dynamo.reset()
    metrics.reset()
    runner = torch.compile(module, fullgraph=True)
    try:
        make_step(runner, batch, dim, device, backward=True)()
    except Exception as error:   # a graph break under fullgraph=True
        return dict(fullgraph=False, error=f"{type(error).__name__}: {str(error)[:200]}")
    return dict(fullgraph=True, kernels=metrics.generated_kernel_count,
                bytes_accessed=metrics.num_bytes_accessed)


def traffic_main(args):
    specs = [OURS_DEVICE, OURS_RECOMPUTE, OURS_CPU] + args.vs
    workloads = [w for w in args.workloads if w in TRAFFIC_WORKLOADS] or list(TRAFFIC_WORKLOADS)
    what = "one fwd+bwd step, loss y.square().mean()"
    if args.eikonal:   # (eager only; no memory column)
        workloads, args.modes, args.no_memory = ["3d"], ["eager"], True
        what = f"one eikonal step (--eikonal), {EIKONAL_BATCH} points"
    print(f"torch {torch.__version__}, device {args.device}; {what}; bytes written by non-view "
          "aten ops, per point")
    rows = []
    for workload in workloads:
        dim, batch = WORKLOADS[workload][0], WORKLOADS[workload][6]
        batch = EIKONAL_BATCH if args.eikonal else batch
        for spec in specs:
            try:
                module = build(load_class(spec), workload, args.device, spec)
            except Exception as error:
                print(f"  {spec} on {workload}: n/a ({type(error).__name__}: {error})")
                continue
            counter = count_traffic(module, batch, dim, args.device, args.eikonal)
            row = dict(workload=workload, impl=spec, ops=counter.ops,
                       bytes_per_point=counter.bytes / batch,
                       top=sorted(counter.by_op.items(), key=lambda kv: -kv[1])[:6])
            if not args.no_memory:
                row["peak_bytes"] = measure_memory(spec, workload, args.device, "allocated")
            if "compiled" in args.modes and spec != OURS_CPU:
                compiled = compiled_traffic(module, batch, dim, args.device)
                row["compiled"] = compiled
                if compiled["fullgraph"] and not args.no_memory:
                    row["compiled_peak_bytes"] = measure_memory(spec, workload, args.device,
                                                                "allocated", compiled=True)
            rows.append(row)
            del module
            gc.collect()
    mib = lambda value: "n/a" if value is None else f"{value / 2**20:.0f}"  # noqa: E731
    print(f"\n{'workload':8} {'implementation':34} {'ops':>5} {'B/point':>8} {'peak MiB':>9}   "
          f"{'compiled: whole graph, kernels, B/point accessed, peak MiB'}")
    for row in rows:
        name = row["impl"] if len(row["impl"]) <= 34 else "..." + row["impl"][-31:]
        compiled = row.get("compiled")
        if compiled is None:
            after = ""
        elif not compiled["fullgraph"]:
            after = f"graph break: {compiled['error']}"
        else:
            batch = EIKONAL_BATCH if args.eikonal else WORKLOADS[row["workload"]][6]
            accessed = compiled["bytes_accessed"]   # (inductor's C++ backend reports none)
            accessed = f"{accessed / batch:,.0f}" if accessed else "n/a"
            after = (f"yes, {compiled['kernels']}, {accessed}, "
                     f"{mib(row.get('compiled_peak_bytes'))}")
        print(f"{row['workload']:8} {name:34} {row['ops']:5d} {row['bytes_per_point']:8,.0f} "
              f"{mib(row.get('peak_bytes')):>9}   {after}")
    out = args.out.replace(".json", "_eikonal_traffic.json" if args.eikonal else "_traffic.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(torch=torch.__version__, device=args.device, rows=rows), f, indent=1)
    print(f"\nwrote {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
