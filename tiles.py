"""A field rendered into pixels tile by tile: arrays, image files, animations.

    image = render_region(field, 800, 600, (0.25, 0.25, 0.75, 0.75))   # (600, 800, C) uint8
    render_to_file(field, 3250, 4333, 3, "fit.npy", resume=True)       # bounded memory
    write_animation("zoom.gif", frames, duration=33)

A field maps normalised coordinates ``xy: (N, 2)`` in [0, 1] (x along the width, y along
the height) to linear colour ``(N, C)``. Rendering never materialises a full coordinate
buffer: each tile makes its own coordinates, so peak memory is one tile plus the 8-bit
output, and the output can be a ``np.memmap`` larger than RAM. What render.py, pixels.py
(scoring), previews.py and tileserver.py draw with, and the Deep Zoom pyramids' geometry; needs
torch, numpy and PIL, no Lightning.
"""
import hashlib
import math
import os
import time

import numpy as np
import torch
from PIL import Image

import images
import outputs

FULL = (0.0, 0.0, 1.0, 1.0)
# Below this many points some CPU BLAS kernels accumulate in another order than for large
# batches (measured with torch 2.13: batches of < 12 rows), which would make a tiny tile
# differ in the last bit from the same pixels rendered in a big tile.
MIN_FIELD_BATCH = 64
# Seconds between saves of a resumable .npy render's progress (a kill -9 loses at most this).
RESUME_SAVE_SECONDS = 30.0


def check_region(region, periodic=""):
    """Validate a normalised region ``(x0, y0, x1, y1)`` and return it as 4 floats.

    Raises ValueError unless ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``. Along an axis
    named in ``periodic`` ("x", "y" or "xy": a field that wraps around, e.g. a 360-degree
    panorama) the region may extend past 0 and 1 and cross the seam, e.g. x from 0.9 to 1.1.
    """
    values = tuple(float(v) for v in region)
    if len(values) != 4:
        raise ValueError(f"region needs 4 numbers x0 y0 x1 y1, got {len(values)}")
    x0, y0, x1, y1 = values
    inside = [axis in periodic or 0.0 <= v <= 1.0 for v, axis in zip(values, "xyxy")]
    if not all(math.isfinite(v) for v in values) or not all(inside):
        raise ValueError(f"region {values} is outside [0, 1]")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"region {values} is empty (need x0 < x1 and y0 < y1)")
    return values


def pixel_centres(region, width, height, rows, cols):
    """Coordinates of output pixel centres, row-major.

    Pixel (r, c) of a ``width x height`` render of ``region = (x0, y0, x1, y1)`` samples
    ``x = x0 + (c + 0.5) * (x1 - x0) / width``, ``y = y0 + (r + 0.5) * (y1 - y0) / height``,
    evaluated in float64 from the integer indices, so a pixel's coordinates do not depend
    on which tile it is in.

    rows, cols: ``(start, stop)`` index ranges. Returns ``(n_rows * n_cols, 2)`` float64.
    """
    x0, y0, x1, y1 = region
    xs = (np.arange(*cols, dtype=np.float64) + 0.5) * (x1 - x0) / width + x0
    ys = (np.arange(*rows, dtype=np.float64) + 0.5) * (y1 - y0) / height + y0
    xy = np.empty((len(ys), len(xs), 2), dtype=np.float64)
    xy[..., 0] = xs[None, :]
    xy[..., 1] = ys[:, None]
    return xy.reshape(-1, 2)


def tiles(width, height, max_batch):
    """Yield tiles ``((row0, row1), (col0, col1))`` covering a ``width x height`` output in
    raster order, each of at most ``max_batch`` pixels: blocks of whole rows, or pieces of
    one row when a row alone is longer than ``max_batch``."""
    if width <= max_batch:
        step = max_batch // width
        for r0 in range(0, height, step):
            yield (r0, min(r0 + step, height)), (0, width)
    else:
        for r in range(height):
            for c0 in range(0, width, max_batch):
                yield (r, r + 1), (c0, min(c0 + max_batch, width))


def field_device(field):
    """Device of the field's first parameter (or buffer); CPU for a plain callable."""
    if isinstance(field, torch.nn.Module):
        for tensor in (*field.parameters(), *field.buffers()):
            return tensor.device
    return torch.device("cpu")


def _evaluate(field, xy):
    """Field colours for ``xy: (n, 2)`` -> ``(n, C)``, padding tiny batches (see
    MIN_FIELD_BATCH) with copies of the last point so every call takes the large-batch
    kernels."""
    n = xy.shape[0]
    if n < MIN_FIELD_BATCH:
        xy = torch.cat([xy, xy[-1:].expand(MIN_FIELD_BATCH - n, -1)])
    colour = field(xy)[:n]
    return colour.reshape(n, -1)


def render_region(field, width, height, region=FULL, *, window=None, max_batch=2**18,
                  out=None, progress=False, dtype="uint8"):
    """Render ``region = (x0, y0, x1, y1)`` (normalised) of ``field`` at ``width x height``.

    field: callable ``xy: (N, 2) float32 in [0, 1] -> linear colour (N, C)``; runs on the
        device of its parameters (CPU for a parameter-less callable), under no_grad.
        Its train/eval mode is left as the caller set it.
    window: optional ``((row0, row1), (col0, col1))``: only that block of the render, with
        the same pixel coordinates and so the same values, bit for bit (Deep Zoom tiles).
    max_batch: at most this many pixels per field call (the tile size).
    out: optional preallocated ``(h, w, C)`` array or np.memmap of ``dtype`` to fill (h, w:
        the window's size, else height, width).
    progress: see outputs.progress_bar (pixels).
    dtype: "uint8" / "uint16" sRGB or "float16" / "float32" linear light (images.from_linear).
    Returns the ``(h, w, C)`` image (``out`` when given).
    """
    region = check_region(region, getattr(field, "periodic", ""))
    if width < 1 or height < 1:
        raise ValueError(f"output size {width}x{height} is empty")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    (row0, row1), (col0, col1) = window or ((0, height), (0, width))
    out_h, out_w = row1 - row0, col1 - col0
    if out is not None and (out.dtype != np.dtype(dtype) or out.ndim != 3
                            or out.shape[:2] != (out_h, out_w)):
        raise ValueError(f"out must be a {dtype} array of shape ({out_h}, {out_w}, C), "
                         f"got {out.dtype} {out.shape}")
    device = field_device(field)
    with torch.no_grad(), outputs.progress_bar(out_w * out_h, "render", "px", progress) as bar:
        for (r0, r1), (c0, c1) in tiles(out_w, out_h, max_batch):
            xy = pixel_centres(region, width, height, (row0 + r0, row0 + r1),
                               (col0 + c0, col0 + c1))
            # float32 on the CPU first: not every accelerator has float64.
            colour = _evaluate(field, torch.from_numpy(xy).float().to(device))
            tile = images.from_linear(colour, dtype).cpu().numpy().astype(dtype, copy=False)
            tile = tile.reshape(r1 - r0, c1 - c0, -1)
            if out is None:
                out = np.empty((out_h, out_w, tile.shape[2]), dtype=dtype)
            elif out.shape[2] != tile.shape[2]:
                raise ValueError(f"out has {out.shape[2]} channels, the field gives "
                                 f"{tile.shape[2]}")
            out[r0:r1, c0:c1] = tile
            bar.update(tile.shape[0] * tile.shape[1])
    return out


def field_fingerprint(field):
    """sha256 (hex) of a module's weights (names, shapes, values), or None for a plain
    callable: tells apart two fits that stopped at the same step."""
    if not isinstance(field, torch.nn.Module):
        return None
    digest = hashlib.sha256()
    for name, tensor in field.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def partial_paths(path):
    """Where a resumable .npy render keeps its work: ``fit.npy`` -> (``fit.partial.npy``,
    ``fit.partial.json``), visible next to the output."""
    root = os.path.splitext(os.fspath(path))[0]
    return root + ".partial.npy", root + ".partial.json"


def render_to_file(field, width, height, channels, path, region=FULL, *, max_batch=2**18,
                   quality=95, progress=None, dtype="uint8", resume=False, stamp=None):
    """Render ``region`` at ``width x height`` into the image file ``path`` (``dtype``: see
    render_region; images.check_dtype says which formats hold it), all or nothing: an
    interrupted or failed render leaves any previous file intact.

    A .npy output is rendered straight into a memory-mapped file (outputs bigger than RAM),
    after checking that the disk can hold it, under a temporary name (outputs.atomic_output),
    or with ``resume`` into ``partial_paths(path)``: the partial file plus a manifest (the
    geometry, the field's fingerprint, ``stamp`` and the tiles done, saved on a signal and
    every RESUME_SAVE_SECONDS), so the same call continues where a stopped one left off and
    gives the same bytes as an uninterrupted one (each tile is rendered in the same batch).
    Anything else goes through one buffer to images.write_image."""
    images.check_dtype(path, dtype)
    if os.path.splitext(os.fspath(path))[1].lower() != ".npy":
        image = render_region(field, width, height, region, max_batch=max_batch,
                              progress=progress, dtype=dtype)
        with outputs.atomic_output(path) as partial:
            images.write_image(partial, image, quality=quality, progress=progress)
        return
    shape, nbytes = (height, width, channels), height * width * channels * np.dtype(dtype).itemsize
    if not resume:
        # a memory-mapped file is sparse until written: a full disk would show up as SIGBUS
        # hours later, so the space is checked first (plus a page for the header)
        images.check_free_space(path, nbytes + 4096)
        with outputs.atomic_output(path) as partial:
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
            render_region(field, width, height, region, max_batch=max_batch, out=out,
                          progress=progress, dtype=dtype)
            out.flush()
            del out
        return
    _render_resumable(field, shape, path, check_region(region, getattr(field, "periodic", "")),
                      max_batch, progress, dtype, nbytes, stamp)


def _render_into_partial(field, shape, path, region, max_batch, progress, dtype, nbytes,
                         stamp):
    height, width, channels = shape
    partial, manifest_path = partial_paths(path)
    manifest = dict(kind="hashgrid render", width=width, height=height, channels=channels,
                    dtype=dtype, region=list(region), max_batch=int(max_batch),
                    fingerprint=field_fingerprint(field), **(stamp or {}))
    work = list(tiles(width, height, max_batch))
    found = outputs.check_manifest(manifest_path, manifest, partial, ignore=("tiles_done",))
    if found is None and os.path.exists(partial):
        raise ValueError(f"{partial} exists without its manifest {manifest_path}; delete it "
                         f"or pick another output name")
    done = 0
    if found is not None and os.path.exists(partial):
        done = int(found.get("tiles_done", 0))
        out = np.lib.format.open_memmap(partial, mode="r+")
        if out.shape != shape or out.dtype != np.dtype(dtype):
            raise ValueError(f"{partial} is not the partial render its manifest describes; "
                             f"delete it and {manifest_path}")
    else:
        images.check_free_space(path, nbytes + 4096)
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)

    def save():
        out.flush()                            # the pixels first, then the count that vouches
        outputs.save_manifest(manifest_path, dict(manifest, tiles_done=done))
    save()
    pixels_done = sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in work[:done])
    last_save = time.monotonic()
    try:
        with outputs.progress_bar(width * height, "render", "px", progress,
                                 initial=pixels_done) as bar:
            for (r0, r1), (c0, c1) in work[done:]:
                render_region(field, width, height, region, window=((r0, r1), (c0, c1)),
                              max_batch=max_batch, out=out[r0:r1, c0:c1], dtype=dtype)
                done += 1
                bar.update((r1 - r0) * (c1 - c0))
                if time.monotonic() - last_save > RESUME_SAVE_SECONDS:
                    save()
                    last_save = time.monotonic()
    except outputs.Stopped as stop:
        save()
        rows = work[done][0][0] if done < len(work) else height
        stop.left = (f"{path} not finished: {rows} of {height} rows are in {partial} (manifest "
                     f"{manifest_path}); run the same command again to continue, or delete "
                     f"both to discard them")
        raise
    out.flush()
    del out
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
    os.remove(manifest_path)


def _render_resumable(field, shape, path, region, max_batch, progress, dtype, nbytes, stamp):
    """_render_into_partial, whose files go when writing them fails (a full disk, say: like
    every other output, nothing is left behind; only a signal keeps them), its errors naming
    `path`."""
    try:
        _render_into_partial(field, shape, path, region, max_batch, progress, dtype, nbytes,
                             stamp)
    except OSError as exc:
        for leftover in partial_paths(path):
            if os.path.exists(leftover):
                os.remove(leftover)
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None


def _pil_frame(frame):
    """(H, W, C) uint8 -> PIL image (C = 1 grayscale, 3 RGB, 4 RGBA)."""
    return Image.fromarray(frame[..., 0] if frame.shape[2] == 1 else frame)


def write_animation(path, frames, duration, quality=95):
    """Write (H, W, C) uint8 frames as a looping animated GIF or WebP (by extension), all or
    nothing; ``duration``: milliseconds per frame, one number or one per frame; ``quality``
    applies to WebP. All frames are held in memory (Pillow writes them in one go; a GIF's
    colour frames get an adaptive palette each).

    Pillow merges consecutive identical frames (the holds) into one longer frame; the total
    duration stays the sum of the durations. Returns the number of frames given.
    """
    pictures = [_pil_frame(frame) for frame in frames]
    with outputs.atomic_output(path) as partial:
        pictures[0].save(partial, format=os.path.splitext(path)[1][1:].upper(), save_all=True,
                         append_images=pictures[1:], duration=duration, loop=0,
                         quality=quality)
    return len(pictures)


# --- Deep Zoom pyramids (.dzi): their geometry, shared by render.py and tileserver.py --
#
# The layout OpenSeadragon and other gigapixel viewers read (Microsoft's Deep Zoom, as libvips
# dzsave writes it): ``name.dzi`` (XML: tile size, overlap, format, full size) next to
# ``name_files/<level>/<col>_<row>.<format>``. Level L of a W x H image is
# ceil(W / 2**(M - L)) x ceil(H / 2**(M - L)) with M = ceil(log2(max(W, H))), so level M is
# full size and level 0 is 1 x 1. Each level is cut into TileSize squares; a tile also
# carries Overlap pixels of its neighbours on each interior side, and edge tiles are
# smaller. Every level is rendered from the field at its own resolution, never downsampled.

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"
DZI_DEFAULTS = dict(tile_size=254, overlap=1, tile_format="jpg")   # dzsave's defaults


def dzi_levels(width, height):
    """Size ``(w, h)`` of every Deep Zoom level, level 0 (1 x 1) first, the full
    ``width x height`` last: ceil(log2(max(width, height))) + 1 levels."""
    if width < 1 or height < 1:
        raise ValueError(f"pyramid size {width}x{height} is empty")
    top = (max(width, height) - 1).bit_length()       # ceil(log2(n)) for integers n >= 1
    return [(-(-width // 2 ** (top - level)), -(-height // 2 ** (top - level)))
            for level in range(top + 1)]


def dzi_tiles(width, height, tile_size, overlap):
    """Tiles of one ``width x height`` level: a list of ``(col, row, x0, y0, x1, y1)``,
    pixels [x0, x1) x [y0, y1), in raster order. Tile (col, row) covers the
    ``tile_size`` square at (col * tile_size, row * tile_size) plus ``overlap`` pixels on
    each side that has a neighbour, clipped to the level."""
    if tile_size < 1 or not 0 <= overlap <= tile_size:
        raise ValueError(f"need tile size >= 1 and 0 <= overlap <= tile size, got tile size "
                         f"{tile_size}, overlap {overlap}")

    def spans(length):
        return [(i * tile_size - (overlap if i else 0),
                 min(length, (i + 1) * tile_size + overlap))
                for i in range(-(-length // tile_size))]

    return [(col, row, x0, y0, x1, y1)
            for row, (y0, y1) in enumerate(spans(height))
            for col, (x0, x1) in enumerate(spans(width))]


def dzi_xml(width, height, tile_size, overlap, tile_format):
    """The ``.dzi`` descriptor of a ``width x height`` pyramid (text)."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="{DZI_NAMESPACE}" TileSize="{int(tile_size)}" '
            f'Overlap="{int(overlap)}" Format="{tile_format}">\n'
            f'  <Size Width="{int(width)}" Height="{int(height)}"/>\n'
            f'</Image>\n')
