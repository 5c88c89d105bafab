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
        enc = bench.set_branch(bench.load_class(spec)(3, 4, 2, 10, 4, 64), spec)
        counter = bench.count_traffic(enc, 4096, 3, "cpu")
        counts.append((counter.ops, counter.bytes))
    assert counts[0] == counts[1]
    assert counts[0][1] < counts[2][1]        # keeping rows and fractions writes less


_step_spec = importlib.util.spec_from_file_location("bench_step",
                                                  os.path.join(ROOT, "bench", "step.py"))
step_bench = importlib.util.module_from_spec(_step_spec)
_step_spec.loader.exec_module(step_bench)
_device_spec = importlib.util.spec_from_file_location("bench_device",
                                                    os.path.join(ROOT, "bench", "device.py"))
device_bench = importlib.util.module_from_spec(_device_spec)
_device_spec.loader.exec_module(device_bench)


def test_step_counter_counts_the_rows_a_scatter_writes_and_sparse_values():
    table = torch.zeros(1000, 2)
    rows = torch.tensor([3, 7, 9])
    with step_bench.StepCounter() as counter:
        table.index_add_(0, rows, torch.ones(3, 2))          # 3 rows of 8 bytes
        table.index_copy_(0, rows, torch.ones(3, 2))         # 24 more
        sparse = torch.sparse_coo_tensor(rows[None], torch.ones(3, 2), (1000, 2))
        table.add_(sparse)                                  # dense += sparse: its 24 bytes
    assert counter.by_op["index_add_.default"] == 24
    assert counter.by_op["index_copy_.default"] == 24
    assert counter.by_op["add_.Tensor"] == 24
    assert counter.bytes < 1000 * 8                          # never the whole table


def test_step_bench_lazy_step_writes_less_at_a_larger_table_and_its_checks():
    small = step_bench.count("lazy_adam", 13, 2048, "cpu")
    dense = step_bench.count("dense", 18, 2048, "cpu")
    large = step_bench.count("lazy_adam", 18, 2048, "cpu")
    # (2^18 rows: 34 parameters per lookup of this batch, past the crossover train.py uses;
    # a 32x larger table, as T = 2^24 against 2^19: 51.5 MB against 41.1 MB, dense 79.2 MB)
    assert large["bytes"] < 1.5 * small["bytes"] and large["bytes"] < dense["bytes"]
    grid = dict(dim=2, n_levels=4, n_features_per_level=2, base_resolution=4,
                finest_resolution=256)
    same = step_bench.determinism("cpu", 10, 5000, runs=2, grid=grid)
    assert same["sparse"] == (True, 0.0)
    result = dict(counts=[small], clocks=[dict(log2_t=13, batch=2048,
                                               seconds={"lazy_adam": (0.01, 0.008, 0.002)})],
                  determinism=[dict(log2_t=10, batch=5000, **same)])
    checks = device_bench.step_checks(result, 3.0)
    assert checks[0]["result"].endswith("10.0 ms/step") and checks[-1]["ok"]
    result["determinism"][0]["sparse"] = (False, 1e-7)
    assert not device_bench.step_checks(result, 3.0)[-1]["ok"]


_opt_spec = importlib.util.spec_from_file_location("bench_optimizers",
                                                 os.path.join(ROOT, "bench", "optimizers.py"))
optimizers_bench = importlib.util.module_from_spec(_opt_spec)
_opt_spec.loader.exec_module(optimizers_bench)


def test_optimizers_bench_joins_a_resumed_runs_curves_and_plots_both(tmp_path, capsys):
    for version, rows in ((0, [(100, 20.5), (200, 22.0)]), (1, [(300, 23.25)])):
        for optimizer, shift in (("adam", 0.0), ("sparse_adam", -0.125), ("touch", -0.25)):
            folder = tmp_path / f"img_{optimizer}" / "img" / f"version_{version}"
            folder.mkdir(parents=True)
            lines = ["step,train/loss,val/psnr", "50.0,0.1,"]
            lines += [f"{s}.0,,{p + shift}" for s, p in rows]
            (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert optimizers_bench.curve(str(tmp_path), "img_sparse_adam") == [
        (100, 20.375), (200, 21.875), (300, 23.125)]
    out = tmp_path / "plot.png"
    optimizers_bench.main(["--root", str(tmp_path), "plot", "img", "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "img sparse_adam: 100: 20.38, 200: 21.88, 300: 23.12" in printed
    assert "img touch: 100: 20.25, 200: 21.75, 300: 23.00" in printed and "img skip: \n" in printed
