"""What the machine offers a run: the device (--device, one meaning in every script), the
accelerator, the precision it computes fast, fused Adam, and (glibc) reuse of freed memory.
Needs torch only.
"""
import ctypes
from typing import Tuple

import torch

from cli import UsageError, one_line


def resolve_precision(precision: str, accelerator: str) -> str:
    """--precision auto: "bf16-mixed" where the hardware computes bfloat16 natively (CUDA
    GPUs that support it; CPUs with AVX512-BF16 or AMX), else "32-true". Under bf16-mixed
    the hidden layers' matmuls run in bfloat16 (the paper runs its MLP in half precision);
    the table, the encoding, the output layer, the loss, the weights and Adam stay float32.
    Albert on 2 AVX512-BF16 cores: 77 vs 129 ms per step, 41.3 vs 41.4 dB at step 1000 (one
    thread, MLP rate 1e-2). Emulated bfloat16 would be slower than float32, hence the
    hardware test."""
    if precision != "auto":
        return precision
    if accelerator == "mps":
        return "32-true"
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    native = [getattr(torch.cpu, name, lambda: False)()
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16-mixed" if any(native) else "32-true"


# --device of every script (train.py, render.py, view.py): one meaning.
DEVICE_HELP = ("auto: a GPU if torch sees one, else the CPU; or a torch device: cpu, cuda, "
               "cuda:1, mps, ...; or a GPU index N (cuda:N)")
LIGHTNING_NAMES = {"cpu": "cpu", "cuda": "gpu", "mps": "mps"}   # torch's device types -> its


def resolve_device(name: str) -> torch.device:
    """--device: "auto" -> the GPU if torch.cuda.is_available() else the CPU; a GPU index "N"
    -> cuda:N; otherwise the named torch device, checked usable. ValueError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(int(name) if name.isdigit() else name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device {name!r} is not usable: {one_line(error)}") from None
    return device


def resolve_accelerator(name: str, device: str = "auto") -> Tuple[str, int]:
    """(accelerator, index) for train.py's --accelerator and --device: Lightning's "cpu",
    "gpu" or "mps", and which device of it (a GPU index; --device cuda:1 and 1 are GPU 1).
    UsageError when the one asked for is not available to torch, or the two flags disagree."""
    index = int(device) if device.isdigit() else 0
    if device != "auto" and not device.isdigit():
        try:
            asked = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device}: expected {DEVICE_HELP}") from None
        kind = LIGHTNING_NAMES.get(asked.type)
        if kind is None or name not in ("auto", kind):
            raise UsageError(f"--device {device} is not a device of --accelerator {name}")
        name, index = kind, asked.index or 0
    available = dict(gpu=torch.cuda.is_available(), mps=torch.backends.mps.is_available(),
                     cpu=True)
    if name == "auto":
        return next(kind for kind, there in available.items() if there), index
    if not available[name]:
        what = "GPU" if name == "gpu" else "MPS device (Apple GPU)"
        raise UsageError(f"--accelerator {name}: no {what} is available to torch")
    return name, index


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap and keep what is freed there, rather
    than mapping fresh pages for each large tensor and unmapping them when it is freed. A CPU
    step's large temporaries (the 34 MB table gradient, 16 MB activations) then reuse memory
    instead of page-faulting it in every step: albert on 2 cores, 66-68 vs 72-73 ms per step.
    The process keeps its peak memory until it exits. False (nothing done) elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return all(mallopt(option, value) == 1 for option, value in
               ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**28)))


def fused_adam(device: torch.device) -> bool:
    """Whether torch has a fused Adam for parameters on `device` (CUDA; CPUs since torch 2.4):
    one kernel over all parameters instead of several passes over the 8.4 M-value table per
    step (albert on 2 CPU cores: 4.4 vs 36 ms per step)."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True
