"""What the encoding's output layout costs: row-major (the default) against feature-major
(MultiResHashGrid(..., feature_major=True)), timed interleaved step by step in one process.

    python bench/layout.py                    # train.py's default Field on albert's size
    python bench/layout.py --batch 16384 --repeats 30

Steps: "field": train.py's training step without the optimizer (Field forward, L2 loss,
backward), in float32 and under bf16 autocast (what --precision bf16-mixed runs); "3-D
eikonal": the encoding with a 32-64-1 MLP, the loss on d(mlp)/dx (create_graph) and backward;
"encoding": the bare encoding's forward+backward with loss y.square().mean().
Prints the median milliseconds of each layout and the ratio feature-major / row-major.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encoding import MultiResHashGrid  # noqa: E402  (after the repository root is on sys.path)
from field import FieldConfig  # noqa: E402


def field_step(model, x, target, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = (model(x).float() - target).square().mean()
    loss.backward()


def eikonal_step(model, x, target, autocast):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    ((grad.norm(dim=-1) - 1) ** 2).mean().backward()


def encoding_step(model, x, target, autocast):
    model(x).square().mean().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2 ** 16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--width", type=int, default=3250)
    parser.add_argument("--height", type=int, default=4333)
    parser.add_argument("--cases", nargs="+", default=["field", "encoding", "eikonal"],
                        choices=["field", "encoding", "eikonal"])
    args = parser.parse_args()
    torch.manual_seed(0)
    field = FieldConfig(width=args.width, height=args.height, channels=1).build()
    enc3 = MultiResHashGrid(3, 16, 2, 19, 16, 2048)
    mlp3 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Softplus(beta=100),
                               torch.nn.Linear(64, 1))
    sdf = torch.nn.Sequential(enc3, mlp3)
    cases = [("field fp32", field, field_step, False, 2),
             ("field bf16", field, field_step, True, 2),
             ("encoding 2-D", field.encoder, encoding_step, False, 2),
             ("3-D eikonal", sdf, eikonal_step, False, 3)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats}, interleaved")
    for name, model, step, autocast, dim in cases:
        if not any(case in name for case in args.cases):
            continue
        row_major, feature_major = model, copy.deepcopy(model)
        for m in feature_major.modules():
            if isinstance(m, MultiResHashGrid):
                m.feature_major = True
        x = torch.rand(args.batch, dim)
        target = torch.rand(args.batch, 1)
        times = {False: [], True: []}
        for i in range(args.repeats + 2):
            for major, m in ((False, row_major), (True, feature_major)):
                m.zero_grad(set_to_none=True)
                start = time.perf_counter()
                step(m, x, target, autocast)
                if i >= 2:        # warm-up
                    times[major].append(time.perf_counter() - start)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:14s} row-major {a * 1e3:8.1f} ms   feature-major {b * 1e3:8.1f} ms   "
              f"feature-major / row-major {b / a:.3f}")


if __name__ == "__main__":
    main()
