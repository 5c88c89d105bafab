"""Shared test helpers. The repository root goes on sys.path so tests import the modules the
way a user's copy-paste project does (``import encoding``), without installing a package."""
import math
import os
import re
import resource
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tifffile
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import images  # noqa: E402  (after the path set-up)
from encoding import MultiResHashGrid  # noqa: E402

# bench/device.py runs the encoding tests on a GPU: every tensor the tests make without naming
# a device lands there, so the device branch of the encoding runs where users run it.
if os.environ.get("HASHGRID_TEST_DEVICE"):
    torch.set_default_device(os.environ["HASHGRID_TEST_DEVICE"])


def encoder(*args, implementation="fast", **kwargs):
    """MultiResHashGrid(*args, **kwargs); implementation "device": the device branch (what GPUs
    run) on this CPU, through the module's private hook (checked: a renamed hook would test
    the CPU branch twice, silently)."""
    device = implementation == "device"
    enc = MultiResHashGrid(*args, implementation="fast" if device else implementation, **kwargs)
    enc._device_branch = device
    assert not device or not enc._mode(torch.zeros(1, enc.input_dim), enc.embedding.weight).cpu
    return enc


def n_passes(enc, n_points):
    """The passes enc's forward makes over n_points points, its private knobs as set now."""
    return len(enc._mode(torch.zeros(1, enc.input_dim), enc.embedding.weight).split(n_points))


# the scripts run in a subprocess on one thread each: two shared cores
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def expect_error(capsys, main, argv, needle, status=2, prog="train.py"):
    """main(argv) exits `status` with exactly one stderr line `prog: error: ...needle...`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and needle in err, err
    return err


def prog_lines(stderr, prog="train.py"):
    """The lines a script printed itself (Lightning's banners and tqdm's \\r bars left out)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith(f"{prog}:")]


def limited(limit):
    """preexec_fn: files the child writes may not exceed `limit` bytes (a "full disk")."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_limited(cmd, limit, cwd):
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180,
                          preexec_fn=limited(limit))


def nan_image(path):
    array = images.to_linear(np.linspace(0, 255, 24 * 40 * 3).astype(np.uint8).reshape(24, 40, 3))
    array[3, 5, 0] = np.nan
    array[7, 1, 2] = np.nan
    array[20, 39, 1] = np.inf
    np.save(path, array)
    return str(path)


def leftovers(folder):
    """Temporary files outputs.atomic_output leaves behind when it fails to clean up."""
    return [name for name in os.listdir(folder) if ".partial" in name]


def psnr(a, b, peak=255.0):
    """PSNR in dB of two arrays of the same shape, computed in float64."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def reference_render(field, width, height):
    """A field on every training pixel centre ((c + 0.5) / W, (r + 0.5) / H) in one float32
    batch, quantised to sRGB: (H, W, C) uint8. What every renderer must reproduce."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    xy = np.stack([(cols + 0.5) / width, (rows + 0.5) / height], -1).reshape(-1, 2)
    with torch.no_grad():
        colour = field(torch.from_numpy(xy).float())
    return images.linear_to_uint8(colour).numpy().reshape(height, width, -1)


def mlp_field(channels=3, seed=0):
    """A small deterministic MLP xy (N, 2) -> (N, channels) with plenty of structure (sin
    features, a full [0, 1] output range), standing in for a trained field."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 32), _Sin(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, channels), torch.nn.Sigmoid())
    with torch.no_grad():
        net[0].weight.mul_(12.0)
        net[4].weight.mul_(10.0)
    return net.eval()


class _Sin(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x)


def write_16bit(path, array):
    """(H, W, C) uint16 -> a 16-bit .tif (tifffile) or .png, as test input for the readers
    (the project itself writes 16-bit data only as .npy)."""
    path = os.fspath(path)
    if path.endswith(".tif"):
        tifffile.imwrite(path, array[..., 0] if array.shape[2] == 1 else array,
                         photometric="minisblack" if array.shape[2] == 1 else "rgb")
    else:
        _write_png16(path, array)


def _write_png16(path, array):
    """Minimal 16-bit PNG (no filtering, one IDAT): PIL cannot write 16-bit colour."""
    height, width, channels = array.shape
    rows = np.ascontiguousarray(array, dtype=">u2").view(np.uint8).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 3: 2, 4: 6}[channels], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        for kind, data in ((b"IHDR", header), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")):
            f.write(struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data)))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A real train.py checkpoint (3 steps on a 40 x 24 RGB gradient, a 4-level grid): its
    path. Made once per test session; tests only read it."""
    import train
    folder = tmp_path_factory.mktemp("fit")
    y, x = np.mgrid[0:24, 0:40]
    source = np.stack([x * 6, y * 10, (x + y) * 3], -1).astype(np.uint8)
    images.write_image(str(folder / "src.png"), source)
    summary = train.main(["-i", str(folder / "src.png"), "--root", str(folder / "logs"),
                          "--max_steps", "3", "--batch_size", "256", "--n_levels", "4",
                          "--log2_hashmap_size", "8", "--ckpt_every", "0", "--val_every", "3"])
    return summary["checkpoint"]


@pytest.fixture(scope="session")
def fitted(checkpoint):
    """The `checkpoint` fit, loaded (a 40 x 24 RGB field); tests only read it."""
    from field import load_field
    field, info = load_field(checkpoint)
    assert (info["width"], info["height"], info["channels"]) == (40, 24, 3)
    return field
