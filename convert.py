"""Convert (and downscale) an image to a training-ready `.npy`, or write a test chart.

    python convert.py -i data/tokyo.jpg -o data/tokyo.npy --scale 0.5
    python convert.py --chart 65536x24576 -o data/chart.npy

Memory stays near one decoded copy of the (already reduced) input plus the output:
JPEGs decode straight at 1/2, 1/4 or 1/8 size (`draft`, the power-of-two part of the
reduction), TIFFs are read band by band (tifffile: plain reads of an uncompressed file, one
row of strips or tiles at a time otherwise), the rest is resampled band by band with PIL
(area-averaging box filter by default), and `.npy` output is streamed to disk band by band.
Images are turned as their EXIF / TIFF orientation says; SIGINT / SIGTERM stop it cleanly.
"""
import argparse
import math
import os
import re
import sys
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
from PIL import Image

import cli
from images import (MAX_IMAGE_PIXELS, MODE_CHANNELS, SRGB_TO_LINEAR_LUT, TIFF_EXTENSIONS,
                    ImageError, TiffBands, available_memory, check_free_space, decode,
                    extension, linear_to_uint8, open_image, oriented_size, pil_orientation,
                    pil_rows, pixel_mode, read_image, srgb_to_linear, to_linear, write_image)
from outputs import atomic_output, check_output, progress_bar, stop_on_signals

# Resampling filters: PIL filter and its kernel radius in source pixels at scale 1.
# "box" averages each output pixel's exact footprint (area-correct, and what JPEG draft
# decoding approximates for the power-of-two part); "lanczos" is sharper but rings.
FILTERS = {"box": (Image.Resampling.BOX, 0.5), "lanczos": (Image.Resampling.LANCZOS, 3.0)}
BAND_PIXELS = 1 << 18  # output pixels resampled per band: bounds the temporaries
CHART_CELL = 256       # side of one chart feature cell, pixels
CHART_RING_PERIOD = 512  # period of the chart-wide rings at the corners, pixels
CHART_IMAGE_LIMIT = 1 << 28  # charts larger than this must go to .npy (streamed)


# ----------------------------------------------------------------------------- sizes

def resized_size(width, height, scale=None, out_width=None, out_height=None):
    """Target (width, height): explicit sizes win; one of them keeps the aspect ratio;
    otherwise floor(size * scale) like the upstream tool. Raises ValueError for a size
    or scale <= 0, or a result of 0 pixels."""
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"--scale must be > 0 and finite, got {scale:g}")
    for name, value in (("--width", out_width), ("--height", out_height)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if out_width is not None and out_height is not None:
        size = (out_width, out_height)
    elif out_width is not None:
        size = (out_width, round(height * out_width / width))
    elif out_height is not None:
        size = (round(width * out_height / height), out_height)
    else:
        scale = 0.5 if scale is None else scale
        # The epsilon keeps e.g. 100 * 0.29 = 28.999999999999996 from flooring to 28.
        size = (int(width * scale + 1e-9), int(height * scale + 1e-9))
    if min(size) < 1:
        raise ValueError(f"output size {size[0]}x{size[1]} has 0 pixels "
                         f"(input {width}x{height})")
    return size


# ----------------------------------------------------------------------------- sources

class _Source(NamedTuple):
    """Pixels to resample, read band by band.

    size: (w, h) of what rows returns; rows(y0, y1) -> (y1 - y0, w, channels) array;
    box: the region of those pixels that covers the original image (a JPEG drafted at
    1/s covers (0, 0, W / s, H / s)); kind: "srgb8", "srgb16" or "linear" values;
    pil_image: the decoded image when PIL can resample it as is, else None.
    """
    size: tuple
    rows: Callable
    box: tuple
    channels: int
    kind: str
    pil_image: Optional[Image.Image] = None


def _open_source(path, max_pixels, out_size_of, draft, filter_name, progress):
    """Open `path` -> (_Source, (in_w, in_h), (out_w, out_h)), out_size_of(w, h) giving
    the target size (needed before decoding, to pick the JPEG draft scale). Sizes are as
    the image is shown (EXIF / TIFF orientation applied)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        array = read_image(path)
        return _array_source(array, out_size_of, _npy_row_reader(path, array))
    if ext in TIFF_EXTENSIONS:
        bands = TiffBands.usable(path)
        if bands is not None and bands.orientation == 1 and bands.shape[2] in (1, 3, 4):
            height, width = bands.shape[:2]
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(path, f"{width}x{height} = {width * height} pixels exceeds "
                                       f"the limit of {max_pixels} pixels (raise --max-pixels)")
            return _array_source(bands, out_size_of, lambda y0, y1: bands.rows(y0, y1)[:, :, :3])
        if bands is not None:       # turned or gray + alpha: read whole (a view if mapped)
            bands.close()
            return _array_source(read_image(path, max_pixels=max_pixels, progress=progress),
                                 out_size_of)
    im = open_image(path, max_pixels)
    mode = pixel_mode(im)
    if mode not in ("L", "RGB", "RGBA"):
        im.close()  # 16-bit (or unsupported) data: read_image reads or rejects it whole
        return _array_source(read_image(path, max_pixels=max_pixels, progress=progress),
                             out_size_of)
    orientation = pil_orientation(im)
    in_size = oriented_size(*im.size, orientation)
    out_size = out_size_of(*in_size)
    stored_out = oriented_size(*out_size, orientation)
    box = (0.0, 0.0, float(im.size[0]), float(im.size[1]))
    if draft:
        # JPEG decodes directly at a power-of-two reduction no smaller than the target
        # (libjpeg's scaled IDCT: close to, not exactly, box averaging). Lanczos keeps a
        # factor of 2 above the target so its own antialiasing still does the last octave.
        gap = 1 if filter_name == "box" else 2
        drafted = im.draft(im.mode, (stored_out[0] * gap, stored_out[1] * gap))
        if drafted is not None:
            box = tuple(float(v) for v in drafted[1])
    try:
        decode(im, path, progress)
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, ...
        raise ImageError(path, f"cannot decode image, truncated or corrupt ({e})") from None
    if orientation != 1:
        box = _oriented_box(box, im.size, orientation)
        im = im.transpose(_PIL_TURNS[orientation])

    def rows(y0, y1):
        return pil_rows(im, y0, y1, mode)
    source = _Source(im.size, rows, box, MODE_CHANNELS[mode], "srgb8",
                     im if im.mode == mode else None)
    return source, in_size, out_size


# PIL's turn for each EXIF orientation (what ImageOps.exif_transpose does).
_PIL_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _oriented_box(box, size, orientation):
    """A (x0, y0, x1, y1) region of a stored w x h image -> the same region once turned."""
    corners = np.array([[box[0], box[1]], [box[2], box[3]]])
    # orient() turns pixel arrays; the corners follow the same flips and transpose
    width, height = size
    if orientation in (5, 6, 7, 8):
        corners, (width, height) = corners[:, ::-1], (height, width)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        corners[:, 0] = width - corners[:, 0]
    if orientation in (3, 4):
        corners[:, 1] = height - corners[:, 1]
    (x0, x1), (y0, y1) = sorted(corners[:, 0]), sorted(corners[:, 1])
    return (float(x0), float(y0), float(x1), float(y1))


def _npy_row_reader(path, array):
    """rows(y0, y1) for a C-order .npy, read with plain file reads.

    Slicing the memory map would leave every page read resident in this process (the
    whole input by the end); file reads keep only the current band. Returns None for a
    Fortran-order file, which is then sliced through the map.
    """
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if fortran_order:
        return None
    row_items = int(np.prod(shape[1:]))  # W * C_file; C_file may be 4 when alpha is dropped

    def rows(y0, y1):
        with open(path, "rb") as f:
            f.seek(offset + y0 * row_items * dtype.itemsize)
            data = np.fromfile(f, dtype=dtype, count=(y1 - y0) * row_items)
        return data.reshape(y1 - y0, shape[1], -1)[:, :, :array.shape[2]]
    return rows


def _array_source(array, out_size_of, rows=None):
    """Source over an (H, W, C) array; rows(y0, y1) overrides slicing it."""
    height, width, channels = array.shape[0], array.shape[1], min(array.shape[2], 3)
    kind = "srgb8" if array.dtype == np.uint8 else "srgb16" if array.dtype.kind == "u" else "linear"
    source = _Source((width, height), rows or (lambda y0, y1: np.asarray(array[y0:y1])),
                     (0.0, 0.0, float(width), float(height)), channels, kind)
    return source, (width, height), out_size_of(width, height)


# ----------------------------------------------------------------------------- resampling

class _NonFinite(ValueError):
    """A float source holds NaN or infinite values (convert counts them for the message)."""


def _count_non_finite(source):
    """(NaN or infinite values, all values) of a source, read band by band."""
    (width, height), step = source.size, max(1, BAND_PIXELS // source.size[0])
    bad = 0
    for y0 in range(0, height, step):
        block = source.rows(y0, min(height, y0 + step))
        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
    return bad, width * height * source.channels


def _as_float(block, kind, linear):
    """(h, w, C) block -> float32 in the resampling domain (linear light if `linear`)."""
    if kind == "linear" and not np.isfinite(block).all():
        raise _NonFinite("the input holds NaN or infinite values")
    if kind == "linear" or linear:
        return to_linear(block)
    return block.astype(np.float32) / (65535.0 if kind == "srgb16" else 255.0)


def _resample_image(im, size, x_span, y_span, resample):
    """Resample the region x_span x y_span (source pixels, floats) of PIL image `im` to
    size (w, h): the horizontal pass, then the vertical one, as two PIL calls.

    In one call PIL picks the pass order from the region's shape, and 8-bit passes clip
    in between, so a band could differ from the same rows of a whole-image resize;
    a fixed order makes bands join exactly.
    """
    wide = im.resize((size[0], im.height), resample, box=(x_span[0], 0, x_span[1], im.height))
    return wide.resize(size, resample, box=(0, y_span[0], size[0], y_span[1]))


def _resize(block, size, x_span, y_span, resample):
    """_resample_image for an (h, w, C) uint8 or float32 block -> (size[1], size[0], C)."""
    if block.dtype == np.uint8:
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[block.shape[2]]
        pixels = block[:, :, 0] if mode == "L" else block
        out = _resample_image(Image.fromarray(np.ascontiguousarray(pixels), mode), size,
                              x_span, y_span, resample)
        return np.asarray(out).reshape(size[1], size[0], block.shape[2])
    channels = [np.asarray(_resample_image(Image.fromarray(np.ascontiguousarray(
        block[:, :, c]), "F"), size, x_span, y_span, resample)) for c in range(block.shape[2])]
    return np.stack(channels, axis=2)


def _encode(values, domain, dtype):
    """Resampled values -> output dtype: uint8 sRGB, or float16 LINEAR (upstream layout).

    domain: "srgb8" (uint8 codes), "srgb" (float sRGB in [0, 1]) or "linear" (float).
    """
    if dtype == "uint8":
        if domain == "srgb8":
            return values
        if domain == "srgb":
            return np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
        return linear_to_uint8(values)
    if domain == "srgb8":
        return SRGB_TO_LINEAR_LUT[values].astype(np.float16)
    if domain == "srgb":
        values = srgb_to_linear(np.clip(values, 0.0, 1.0))
    return np.clip(values, 0.0, 1.0).astype(np.float16)


def _resampled_bands(source, out_size, linear, dtype, filter_name):
    """Yield (y0, block) covering the output, block (y1 - y0, out_w, C) in `dtype`."""
    (src_w, src_h), rows, box, _, kind, pil_image = source
    out_w, out_h = out_size
    x0, y0_box, x1, y1_box = box
    fy = (y1_box - y0_box) / out_h
    identity = (src_w, src_h) == out_size and box == (0.0, 0.0, float(src_w), float(src_h))
    resample, support = FILTERS[filter_name]
    # Rows beyond the band that the kernel reaches (its radius grows with the reduction
    # factor); +2 covers PIL's rounding of the kernel bounds.
    margin = math.ceil(support * max(fy, 1.0)) + 2
    float_path = kind != "srgb8" or linear
    domain = ("linear" if linear or kind == "linear" else "srgb") if float_path else "srgb8"
    # A box enlargement is nearest-neighbour whose ties (an output centre exactly on a
    # source pixel edge) break by the float rounding of each band's offset: one piece.
    enlarging_box = filter_name == "box" and fy < 1
    step = out_h if enlarging_box else max(1, BAND_PIXELS // out_w)
    for oy0 in range(0, out_h, step):
        oy1 = min(out_h, oy0 + step)
        size = (out_w, oy1 - oy0)
        if identity:
            block = rows(oy0, oy1)
            yield oy0, _encode(_as_float(block, kind, linear) if float_path else block,
                               domain, dtype)
            continue
        sy0, sy1 = y0_box + oy0 * fy, y0_box + oy1 * fy
        r0, r1 = max(0, math.floor(sy0) - margin), min(src_h, math.ceil(sy1) + margin)
        y_span = (sy0 - r0, sy1 - r0)
        if pil_image is not None and not float_path:
            # Straight from the decoded image: no round trip through numpy.
            band = _resample_image(pil_image.crop((0, r0, src_w, r1)), size, (x0, x1),
                                   y_span, resample)
            values = np.asarray(band).reshape(size[1], size[0], -1)
        else:
            block = rows(r0, r1)
            values = _resize(_as_float(block, kind, linear) if float_path else block,
                             size, (x0, x1), y_span, resample)
        yield oy0, _encode(values, domain, dtype)


# ----------------------------------------------------------------------------- output

class _NpyStream:
    """Write an (H, W, C) .npy band by band (rows in order) without mapping it: the
    header comes from numpy's own open_memmap, the pixels are plain sequential writes."""

    def __init__(self, path, shape, dtype):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.offset = header.offset
        del header
        self.file = open(path, "r+b")
        self.file.seek(self.offset)

    def write(self, block):
        self.file.write(np.ascontiguousarray(block))  # buffer protocol: no extra copy

    def close(self):
        self.file.close()


def _write_bands(path, shape, dtype, bands, quality, progress, label):
    """Consume (y0, block) bands into `path` (.npy streamed; other formats via an array)."""
    bar = progress_bar(shape[0], label, "row", progress)
    if path.lower().endswith(".npy"):
        out = _NpyStream(path, shape, dtype)
        try:
            for _, block in bands:
                out.write(block)
                bar.update(len(block))
        finally:
            out.close()
    else:
        image = np.empty(shape, dtype)
        for y0, block in bands:
            image[y0:y0 + len(block)] = block
            bar.update(len(block))
        bar.close()
        write_image(path, image, quality=quality, progress=progress)
    bar.close()


def convert(input_path, output_path, *, scale=None, width=None, height=None,
            dtype="uint8", linear=False, filter="box", draft=True,
            max_pixels=MAX_IMAGE_PIXELS, quality=95, progress=None):
    """Convert/resize an image file; returns ((in_w, in_h), (out_w, out_h)).

    Output .npy is (H, W, C) uint8 sRGB, or float16 LINEAR with dtype="float16".
    filter: "box" (area average) or "lanczos". Resampling is in sRGB for 8/16-bit
    sources unless `linear`; float .npy sources are linear already. draft: let JPEGs
    decode at a reduced size (memory, speed); off, or with `linear` (the reduction
    would average in sRGB), they decode at full size and match PIL's own resize.
    progress: see outputs.progress_bar (decoding, resampling, writing).
    Raises ImageError / ValueError with one-line messages.
    """
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    extension(input_path, "input")
    if not os.path.isfile(input_path):
        raise ImageError(input_path, "no such file")
    if extension(output_path, "output") != ".npy" and dtype == "float16":
        raise ImageError(output_path, "--dtype float16 needs a .npy output")
    check_output(output_path, input_path)

    def out_size_of(w, h):
        return resized_size(w, h, scale, width, height)
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; expected one of {', '.join(FILTERS)}")
    source, in_size, out_size = _open_source(
        input_path, max_pixels, out_size_of, draft and not linear, filter, progress)
    shape = (out_size[1], out_size[0], source.channels)
    np_dtype = np.uint8 if dtype == "uint8" else np.float16
    bands = _resampled_bands(source, out_size, linear, dtype, filter)
    _check_output_size(output_path, shape, np_dtype)
    try:
        with atomic_output(output_path) as partial:
            _write_bands(partial, shape, np_dtype, bands, quality, progress,
                         os.path.basename(output_path))
    except _NonFinite:
        bad, total = _count_non_finite(source)
        raise ImageError(input_path, f"{bad} of {total} values are NaN or infinite, which have "
                                     f"no colour; replace them (e.g. numpy.nan_to_num) "
                                     f"first") from None
    return in_size, out_size


def _check_output_size(path, shape, dtype):
    """ImageError before any work when the output cannot be written: a .npy is streamed to
    disk (it must fit there), any other format is assembled in memory first."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if path.lower().endswith(".npy"):
        check_free_space(path, nbytes + 4096)
        return
    free = available_memory()
    if free is not None and nbytes > free:
        raise ImageError(path, f"a {shape[1]}x{shape[0]} image needs {nbytes / 1e9:.1f} GB of "
                               f"memory to encode, {free / 1e9:.1f} GB is available; write "
                               f".npy (streamed to disk) or a smaller size")


# ----------------------------------------------------------------------------- chart

def _mix(h):
    """SplitMix64 finaliser on a uint64 array: a well-scrambled, platform-exact hash."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _hash(*coords):
    """Hash of integer coordinate arrays (broadcast) -> uint64 array."""
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for c in coords:
            h = _mix(h + np.asarray(c).astype(np.uint64) * np.uint64(0xD1B54A32D192ED03))
    return h


def _unit(h, shift):
    """8 bits of hash `h` starting at bit `shift` -> float64 in [0, 1]."""
    return ((h >> np.uint64(shift)) & np.uint64(255)).astype(np.float64) / 255.0


def _chart_cell(kind, y, x, u, v):
    """One feature over pixel rows y (h, 1) and columns x (1, w), local centred coordinates
    v, u (pixels from the cell centre). Returns (h, w) gray or (h, w, 3) colour in [0, 1]."""
    half = CHART_CELL / 2
    if kind == 0:  # zone plate: frequency rises linearly to Nyquist at the cell edge
        return 0.5 + 0.5 * np.cos(np.pi * (u * u + v * v) / CHART_CELL)
    if kind == 1:  # Siemens star, 48 spokes
        return (np.sin(48 * np.arctan2(v, u)) > 0).astype(np.float64)
    if kind == 2:  # text-like strokes: random 3x5 glyphs of 2-pixel bits in 8x12 boxes
        gx, gy, px, py = x // 8, y // 12, x % 8, y % 12
        inside = (px >= 1) & (px < 7) & (py >= 1) & (py < 11)
        bit = (np.clip(py - 1, 0, 9) // 2) * 3 + np.clip(px - 1, 0, 5) // 2
        ink = inside & (((_hash(gx, gy, 7) >> bit.astype(np.uint64)) & np.uint64(1)) == 1)
        return np.where(ink, 0.08, 0.92)
    if kind == 3:  # colour gradients with 1-pixel lines every 16 pixels
        ramp_u, ramp_v = (u + half) / CHART_CELL, (v + half) / CHART_CELL
        lines = ((x % 16) == 0) | ((y % 16) == 0)
        rgb = np.stack(np.broadcast_arrays(ramp_u, ramp_v, 1 - 0.5 * (ramp_u + ramp_v)), axis=2)
        return np.where(lines[:, :, None], 1.0 - rgb, rgb)
    if kind == 4:  # per-pixel seeded noise, independent channels
        h = _hash(x, y, 11)
        return np.stack([_unit(h, 0), _unit(h, 8), _unit(h, 16)], axis=2)
    # kind 5: gratings at the finest periods (1-3 pixels), rotated by the cell position
    period = 1 + (x // CHART_CELL + y // CHART_CELL) % 3
    return (((x // period) + (y // period)) % 2).astype(np.float64) * np.ones_like(u)


def _chart_rings(y, x, width, height):
    """Chart-wide zone plate on brightness, (h, w) in [0, 1]: ring frequency grows from
    the centre to one cycle per CHART_RING_PERIOD pixels at the corners, so a downscaled
    gigapixel chart still shows structure at every zoom level."""
    half_diagonal = math.hypot(width, height) / 2
    r2 = (x + 0.5 - width / 2) ** 2 + (y + 0.5 - height / 2) ** 2
    return 0.5 + 0.5 * np.cos(np.pi * r2 / (half_diagonal * CHART_RING_PERIOD))


def chart_tile(y0, y1, x0, x1, width, height):
    """Pixels [y0:y1, x0:x1] of the width x height test chart: (y1-y0, x1-x0, 3) uint8.

    A pure function of the pixel coordinates (and the chart size, for the chart-wide
    rings), so tiles of any shape join seamlessly and the chart is deterministic.
    Cells of CHART_CELL pixels each hold one hashed feature in a hashed colour.
    """
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    cell = CHART_CELL
    for cy in range(y0 // cell, (y1 - 1) // cell + 1):
        for cx in range(x0 // cell, (x1 - 1) // cell + 1):
            ty0, ty1 = max(y0, cy * cell), min(y1, (cy + 1) * cell)
            tx0, tx1 = max(x0, cx * cell), min(x1, (cx + 1) * cell)
            y = np.arange(ty0, ty1, dtype=np.int64)[:, None]
            x = np.arange(tx0, tx1, dtype=np.int64)[None, :]
            v = (y - cy * cell) + 0.5 - cell / 2
            u = (x - cx * cell) + 0.5 - cell / 2
            h = _hash(np.int64(cx), np.int64(cy), 3)
            value = _chart_cell(int(h % np.uint64(6)), y, x, u, v)
            if value.ndim == 2:
                value = value[:, :, None]
            tint = 0.2 + 0.8 * np.array([_unit(h, 8), _unit(h, 16), _unit(h, 24)])
            light = 0.6 + 0.4 * _chart_rings(y, x, width, height)[:, :, None]
            out[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] = np.rint(
                np.clip(value * tint * light, 0.0, 1.0) * 255)
    return out


def chart_bands(width, height, band_rows=None):
    """Yield (y0, (rows, width, 3) uint8) bands of the chart: one row of cells, or fewer
    rows for very wide charts (memory stays near 4 Mpx per band)."""
    band_rows = band_rows or max(1, min(CHART_CELL, (1 << 22) // width))
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        yield y0, chart_tile(y0, y1, 0, width, width, height)


def write_chart(path, width, height, progress=None):
    """Write the width x height chart to `path`: .npy streams band by band (memory bounded
    by a band, any size); image formats are built in memory, so limited to
    CHART_IMAGE_LIMIT pixels."""
    path = os.fspath(path)
    ext = extension(path, "output")
    if ext != ".npy" and width * height > CHART_IMAGE_LIMIT:
        raise ImageError(path, f"a {width}x{height} chart is too large for {ext}; write .npy")
    _check_output_size(path, (height, width, 3), np.uint8)
    with atomic_output(path) as partial:
        _write_bands(partial, (height, width, 3), np.uint8, chart_bands(width, height), 95,
                     progress, os.path.basename(path))


# ----------------------------------------------------------------------------- CLI

def _chart_size(text):
    match = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT with sizes >= 1, got {text!r}")
    return int(match[1]), int(match[2])


def build_parser():
    p = cli.ArgumentParser(prog="convert.py", description="Convert/downscale an image to a training-"
                       "ready .npy (uint8 sRGB by default), or write a synthetic test chart.")
    p.add_argument("-i", "--input", help="input image (.jpg .jpeg .png .tif .tiff .webp .bmp .npy)")
    p.add_argument("-o", "--output", help="output file (.npy or an image format); "
                   "default: the input name with .npy")
    p.add_argument("-s", "--scale", type=float, default=None,
                   help="resize factor (default 0.5; not with --width/--height)")
    p.add_argument("--width", type=int, help="output width (height keeps the aspect ratio "
                   "unless --height is given too)")
    p.add_argument("--height", type=int, help="output height")
    p.add_argument("--dtype", choices=("uint8", "float16"), default="uint8",
                   help="npy dtype: uint8 sRGB (default) or float16 linear (upstream layout)")
    p.add_argument("--linear", action="store_true", help="resample in linear light")
    p.add_argument("--filter", choices=tuple(FILTERS), default="box",
                   help="resampling filter: box = area average (default), lanczos = sharper")
    p.add_argument("--no-draft", dest="draft", action="store_false",
                   help="decode JPEGs at full size: exactly PIL's resize, ~4 B/px more memory")
    p.add_argument("--quality", type=cli.integer(1, 100), default=95,
                   help="JPEG/WebP output quality, 1..100 (95)")
    p.add_argument("--max-pixels", type=cli.integer(0), default=MAX_IMAGE_PIXELS,
                   help=f"refuse inputs with more pixels (default {MAX_IMAGE_PIXELS}; 0: no limit)")
    p.add_argument("--chart", type=_chart_size, metavar="WIDTHxHEIGHT",
                   help="write a synthetic test chart of this size to -o instead")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.chart is not None:
            if args.input is not None or args.output is None:
                parser.error("--chart needs -o/--output and no -i/--input")
            start = time.perf_counter()
            with stop_on_signals("convert.py", f"{args.output} was not written"):
                write_chart(args.output, *args.chart)
            print(f"chart {args.chart[0]}x{args.chart[1]} -> {args.output} "
                  f"({time.perf_counter() - start:.1f} s)")
            return 0
        if args.input is None:
            parser.error("-i/--input is required (or --chart)")
        if args.scale is not None and (args.width is not None or args.height is not None):
            parser.error("--scale cannot be combined with --width/--height")
        output = args.output or os.path.splitext(args.input)[0] + ".npy"
        start = time.perf_counter()
        with stop_on_signals("convert.py", f"{output} was not written"):
            in_size, out_size = convert(
                args.input, output, scale=args.scale, width=args.width, height=args.height,
                dtype=args.dtype, linear=args.linear, filter=args.filter, draft=args.draft,
                max_pixels=args.max_pixels or None, quality=args.quality)
        print(f"{args.input} {in_size[0]}x{in_size[1]} -> {output} {out_size[0]}x{out_size[1]} "
              f"{args.dtype} ({time.perf_counter() - start:.1f} s)")
        return 0
    except (ImageError, ValueError, OSError) as e:
        parser.error(e)
    except MemoryError:
        parser.error("out of memory; try a smaller --scale or free some RAM")


if __name__ == "__main__":
    sys.exit(main())
