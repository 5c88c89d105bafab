"""The pixels a fit learns from, and how a fit is scored against them.

    array = load_source("albert.jpg")               # (H, W, C) uint8 sRGB, a memmap is fine
    source = PixelSource(array)
    xy, target = source.sample(65536, generator)   # coordinates in [0, 1]^2, linear colour
    sse, count = PsnrProbe(array).sse(field)       # squared 8-bit sRGB errors of a field
    colour = source(xy)                            # the image as a field (bilinear, linear)

The image stays 8-bit (3 bytes per pixel; a memory-mapped `.npy` stays on disk) on the
training device when it fits, else in host memory; batches are drawn where the pixels are and
converted to linear light by one table look-up per value. Needs torch and numpy, no Lightning.
"""
import hashlib
import math
import warnings

import numpy as np
import torch
from torch import nn

import images
import outputs
import tiles
from cli import UsageError

PSNR_MAX_PIXELS = 2 ** 22              # larger images are scored on this many random pixels
EVAL_BATCH = 2 ** 18                   # points per forward pass when rendering / scoring
DEVICE_MEMORY_SHARE = 0.5              # pixels stay on a GPU within this share of free memory


def load_source(path: str) -> np.ndarray:
    """(H, W, C) uint8 sRGB of `path`; UsageError when it cannot be used."""
    try:
        array = images.read_image(path)
        return images.to_srgb8(array)
    except images.ImageError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def source_digest(source: np.ndarray) -> str:
    """A fingerprint of an image (its size and 64 rows spread over it): a resumed run warns
    when its checkpoint was trained on another image of the same size."""
    digest = hashlib.sha1(repr(source.shape).encode())
    for row in np.linspace(0, source.shape[0] - 1, 64).astype(np.int64):
        digest.update(np.ascontiguousarray(source[row]).tobytes())
    return digest.hexdigest()[:16]


def bilinear_sample(pixels: torch.Tensor, lut: torch.Tensor, xy: torch.Tensor,
                    periodic: str = "") -> torch.Tensor:
    """Linear colour of an 8-bit image at continuous coordinates.

    pixels: (H, W, C) uint8 sRGB; lut: (256,) float32 linear value of each code; xy: (N, 2)
    in [0, 1], pixel (r, c) centred at ((c+.5)/W, (r+.5)/H); all on one device.
    Returns (N, C) float32: the 4 neighbouring pixels converted through `lut`, then blended
    bilinearly. Edge pixels extend to the border, except along the axes in `periodic` ("x",
    "y" or "xy": a 360-degree panorama), where the first and last pixels are neighbours.
    """
    height, width, channels = pixels.shape
    flat = pixels.view(height * width, channels)
    u = xy[:, 0] * width - 0.5
    v = xy[:, 1] * height - 0.5
    u0, v0 = u.floor(), v.floor()
    fx, fy = (u - u0).unsqueeze(1), (v - v0).unsqueeze(1)
    x0, y0 = u0.long(), v0.long()
    x1, y1 = x0 + 1, y0 + 1
    for low, high, size, axis in ((x0, x1, width, "x"), (y0, y1, height, "y")):
        if axis in periodic:
            low.remainder_(size)
            high.remainder_(size)
        else:
            low.clamp_(0, size - 1)
            high.clamp_(0, size - 1)
    row0, row1 = y0 * width, y1 * width

    def corner(index):
        return lut[flat[index].long()]

    top = torch.lerp(corner(row0 + x0), corner(row0 + x1), fx)
    bottom = torch.lerp(corner(row1 + x0), corner(row1 + x1), fx)
    return torch.lerp(top, bottom, fy)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` of pixels may live on `device` (always on the CPU: host memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_MEMORY_SHARE * free


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of a uint8 (H, W, C) array; a read-only memmap stays paged from
    disk (never written through)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable" memmap: only read
        return torch.from_numpy(np.ascontiguousarray(array))


class PixelSource:
    """The training image (H, W, C) uint8 sRGB plus the random batches drawn from it
    (`periodic`: the axes along which it wraps around, see bilinear_sample); called on xy it is
    a field, what training samples, so its render at the source resolution is its pixels."""

    def __init__(self, array: np.ndarray, periodic: str = ""):
        self.array, self.periodic = array, periodic
        self.height, self.width, self.channels = array.shape
        self.pixels = host_tensor(array)
        self.lut = torch.tensor(images.SRGB_TO_LINEAR_LUT, dtype=torch.float32)
        self.device = self.pixels.device

    def mean_colour(self, max_pixels: int = 1 << 20) -> torch.Tensor:
        """(C,) float32 mean linear colour, over an even grid of at most about `max_pixels`
        pixels (whole rows of a memory-mapped source are read, never all of it)."""
        step = max(1, math.isqrt(self.height * self.width // max_pixels))
        grid = np.asarray(self.array[::step, ::step]).reshape(-1, self.channels)
        counts = np.stack([np.bincount(grid[:, c], minlength=256) for c in range(self.channels)])
        lut = self.lut.cpu().double().numpy()
        return torch.from_numpy(counts @ lut / len(grid)).float()

    def to(self, device) -> "PixelSource":
        """Batches go to `device`; the pixels go there too when they fit, else they stay in
        host memory and each batch is gathered there."""
        self.device = torch.device(device)
        if self.device != self.pixels.device and fits_on_device(self.array.nbytes, self.device):
            self.pixels = self._copy_to(self.device)
        self.lut = self.lut.to(self.pixels.device)
        return self

    def _copy_to(self, device: torch.device, rows_per_chunk: int = 4096) -> torch.Tensor:
        """Row bands, so a memory-mapped source is never read into host memory whole."""
        out = torch.empty(self.array.shape, dtype=torch.uint8, device=device)
        for r in range(0, self.height, rows_per_chunk):
            out[r:r + rows_per_chunk].copy_(host_tensor(self.array[r:r + rows_per_chunk]))
        return out

    def __call__(self, xy: torch.Tensor) -> torch.Tensor:
        """xy: (N, 2) in [0, 1]^2 on the pixels' device -> (N, C) float32 linear colour."""
        return bilinear_sample(self.pixels, self.lut, xy, self.periodic)

    def sample(self, n: int, generator: torch.Generator):
        """xy: (n, 2) uniform in [0, 1]^2 and target: (n, C) linear colour there, on
        `self.device`. `generator` lives with the pixels; host-resident pixels send the batch
        through pinned memory without blocking."""
        xy = torch.rand(n, 2, generator=generator, device=self.pixels.device)
        target = self(xy)
        if self.pixels.device != self.device:
            staged = torch.cat([xy, target], 1).pin_memory().to(self.device, non_blocking=True)
            xy, target = staged[:, :2], staged[:, 2:]
        return xy, target


def uint8_sse(a: np.ndarray, b: np.ndarray):
    """(sum of squared differences, number of values) of two uint8 arrays of one shape; the
    sum exact (int64)."""
    diff = (a.astype(np.int32) - np.asarray(b, dtype=np.int32)).ravel()
    return int(np.einsum("i,i->", diff, diff, dtype=np.int64)), diff.size


def sampling_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank's batch stream: distinct per rank (each draws its own pixels) and per
    starting step (a resumed run does not replay the first run's batches)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class PsnrProbe:
    """Squared 8-bit sRGB error of a field against the source: every pixel when the image
    has at most `max_pixels`, else a fixed random set of `max_pixels` pixel centres."""

    def __init__(self, source: np.ndarray, max_pixels: int = PSNR_MAX_PIXELS, seed: int = 0):
        self.source = source
        height, width, channels = source.shape
        self.index = None
        if height * width > max_pixels:
            rng = np.random.default_rng(seed)
            # sorted: a memory-mapped source is then read front to back, once
            self.index = np.sort(rng.integers(0, height * width, max_pixels))
            flat = source.reshape(height * width, channels)
            targets = np.empty((max_pixels, channels), source.dtype)
            with outputs.progress_bar(max_pixels, "psnr pixels", "px") as bar:
                for start in range(0, max_pixels, EVAL_BATCH):      # a memmap: read in order
                    stop = min(start + EVAL_BATCH, max_pixels)
                    targets[start:stop] = flat[self.index[start:stop]]
                    bar.update(stop - start)
            self.targets = torch.from_numpy(targets)

    def sse(self, field: nn.Module, rank: int = 0, world: int = 1, max_batch: int = EVAL_BATCH,
            progress=None):
        """(sum of squared 8-bit errors, number of values) over this rank's share; a
        progress bar (outputs.progress_bar) when scoring takes more than a moment."""
        height, width, _ = self.source.shape
        if self.index is None:
            band = max(1, max_batch // width)
            starts = range(rank * band, height, world * band)
            total = sum(min(height, r0 + band) - r0 for r0 in starts) * width
        else:
            bounds = np.linspace(0, len(self.index), world + 1).astype(np.int64)
            total = int(bounds[rank + 1] - bounds[rank])
        with outputs.progress_bar(total, "psnr", "px", progress) as bar:
            if self.index is None:
                return self._sse_rows(field, starts, band, max_batch, bar)
            return self._sse_subset(field, bounds[rank], bounds[rank + 1], max_batch, bar)

    def _sse_rows(self, field, starts, band, max_batch, bar):
        height, width, channels = self.source.shape
        sse, count = 0, 0
        for r0 in starts:
            r1 = min(height, r0 + band)
            fit = tiles.render_region(field, width, r1 - r0, (0.0, r0 / height, 1.0, r1 / height),
                                       max_batch=max_batch)
            band_sse, band_count = uint8_sse(fit, self.source[r0:r1])
            sse += band_sse
            count += band_count
            bar.update((r1 - r0) * width)
        return float(sse), count

    @torch.no_grad()
    def _sse_subset(self, field, first, stop_at, max_batch, bar):
        height, width, channels = self.source.shape
        device = tiles.field_device(field)
        self.targets = self.targets.to(device)       # once: validation runs repeatedly
        sse = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(first, stop_at, max_batch):
            stop = min(start + max_batch, stop_at)
            index = torch.from_numpy(self.index[start:stop])
            xy = torch.stack([(index % width).double().add_(0.5).div_(width),
                              (index // width).double().add_(0.5).div_(height)], 1)
            fit = images.linear_to_uint8(field(xy.float().to(device)))
            diff = fit.int() - self.targets[start:stop].int()
            sse += diff.square().sum(dtype=torch.float64)
            bar.update(stop - start)
        return float(sse), int(stop_at - first) * channels


def psnr_from_sse(sse: float, count: int) -> float:
    """PSNR in dB of 8-bit values from a sum of squared errors over `count` values."""
    if sse == 0:
        return math.inf
    return 10.0 * math.log10(255.0 ** 2 * count / sse)
