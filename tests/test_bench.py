"""bench/encoding.py --traffic: the byte counter counts what ops write, nothing else."""
import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_encoding", os.path.join(ROOT, "bench", "encoding.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_write_counter_counts_outputs_not_views_or_allocations():
    a, b = torch.ones(100), torch.ones(100, dtype=torch.float64)
    with bench.WriteCounter() as counter:
        c = a + 1                      # 400 bytes
        c.view(10, 10).t()             # views: nothing written
        d = torch.empty(1000)          # an allocation writes nothing
        d[:10].copy_(a[:10])           # in place: the tensor written into, 40 bytes
        b.mul_(2)                      # in place: 800 bytes
        (c > 0).any()                  # 100 bytes of bools, then 1
    assert counter.ops == 5
    assert counter.bytes == 400 + 40 + 800 + 100 + 1
    assert counter.by_op["add.Tensor"] == 400


def test_traffic_of_a_step_is_deterministic_and_the_device_branch_is_leaner():
    counts = []
    for spec in (bench.OURS_DEVICE, bench.OURS_DEVICE, bench.OURS_RECOMPUTE):
        enc = bench.load_class(spec)(3, 4, 2, 10, 4, 64, implementation="device")
        enc.DEVICE_KEEP = spec == bench.OURS_DEVICE
        counter = bench.count_traffic(enc, 4096, 3, "cpu")
        counts.append((counter.ops, counter.bytes))
    assert counts[0] == counts[1]
    assert counts[0][1] < counts[2][1]        # keeping rows and fractions writes less
