"""Render a fitted image field at any size, region or zoom, tile by tile.

A field maps normalised coordinates ``xy: (N, 2)`` in [0, 1] (x along the width, y along
the height) to linear colour ``(N, C)``. Rendering never materialises a full coordinate
buffer: each tile makes its own coordinates, so peak memory is one tile plus the 8-bit
output, and the output can be a ``np.memmap`` larger than RAM.

Command line: ``python render.py --ckpt last.ckpt -o out.png`` (see ``--help``).
"""
import itertools
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cli
import images
from field import CheckpointError, load_field

FULL = (0.0, 0.0, 1.0, 1.0)
STILL_EXTS = images.EXTENSIONS
ANIMATED_EXTS = (".gif", ".webp")
VIDEO_EXTS = (".mp4",)
# Below this many points some CPU BLAS kernels accumulate in another order than for large
# batches (measured with torch 2.13: batches of < 12 rows), which would make a tiny tile
# differ in the last bit from the same pixels rendered in a big tile.
MIN_FIELD_BATCH = 64
# Default longest side of zoom frames: a native-size frame of a gigapixel fit is no video.
ZOOM_MAX_SIDE = 1024
# Share of the zoom sequence spent in each phase: hold, zoom in, hold, zoom out.
ZOOM_PHASES = (1 / 6, 1 / 3, 1 / 6, 1 / 3)


def check_region(region):
    """Validate a normalised region ``(x0, y0, x1, y1)`` and return it as 4 floats.

    Raises ValueError unless ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``.
    """
    values = tuple(float(v) for v in region)
    if len(values) != 4:
        raise ValueError(f"region needs 4 numbers x0 y0 x1 y1, got {len(values)}")
    x0, y0, x1, y1 = values
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"region {values} is outside [0, 1]")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"region {values} is empty (need x0 < x1 and y0 < y1)")
    return values


def region_from_pixels(region_px, src_width, src_height):
    """Convert a region in source pixels ``(x0, y0, x1, y1)`` (pixel edges, 0..W and 0..H)
    to normalised coordinates, validated."""
    x0, y0, x1, y1 = (float(v) for v in region_px)
    try:
        return check_region((x0 / src_width, y0 / src_height, x1 / src_width, y1 / src_height))
    except ValueError:
        raise ValueError(f"pixel region ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or outside "
                         f"the {src_width}x{src_height} image") from None


def output_size(src_width, src_height, region=FULL, width=None, height=None, scale=None):
    """Output size ``(width, height)`` in pixels for rendering ``region`` of a
    ``src_width x src_height`` image.

    Both width and height: used as given. One of them: the other keeps the region's aspect
    in source pixels. ``scale``: the region's size in source pixels times scale. Nothing:
    scale 1 (native resolution). Derived sides are at least 1 pixel.
    """
    x0, y0, x1, y1 = check_region(region)
    region_w = (x1 - x0) * src_width
    region_h = (y1 - y0) * src_height
    for name, value in (("width", width), ("height", height)):
        if value is not None and value < 1:
            raise ValueError(f"output {name} must be a positive number of pixels, got {value}")
    if scale is not None:
        if width is not None or height is not None:
            raise ValueError("give either scale or width/height, not both")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale}")
        return _side(region_w * scale), _side(region_h * scale)
    if width is not None and height is not None:
        return int(width), int(height)
    if width is not None:
        return int(width), _side(width * region_h / region_w)
    if height is not None:
        return _side(height * region_w / region_h), int(height)
    return _side(region_w), _side(region_h)


def _side(length):
    """Round a derived side length to whole pixels, at least 1."""
    return max(1, int(math.floor(length + 0.5)))


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


def render_region(field, width, height, region=FULL, *, max_batch=2**18, out=None,
                  progress=False):
    """Render ``region = (x0, y0, x1, y1)`` (normalised) of ``field`` at ``width x height``.

    field: callable ``xy: (N, 2) float32 in [0, 1] -> linear colour (N, C)``; runs on the
        device of its parameters (CPU for a parameter-less callable), under no_grad.
        Its train/eval mode is left as the caller set it.
    max_batch: at most this many pixels per field call (the tile size).
    out: optional preallocated ``(height, width, C)`` uint8 array or np.memmap to fill.
    progress: show a tqdm bar (pixels).
    Returns the ``(height, width, C)`` uint8 sRGB image (``out`` when given).
    """
    region = check_region(region)
    if width < 1 or height < 1:
        raise ValueError(f"output size {width}x{height} is empty")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if out is not None and (out.dtype != np.uint8 or out.ndim != 3
                            or out.shape[:2] != (height, width)):
        raise ValueError(f"out must be a uint8 array of shape ({height}, {width}, C), "
                         f"got {out.dtype} {out.shape}")
    device = field_device(field)
    with torch.no_grad(), tqdm(total=width * height, unit="px", unit_scale=True,
                               desc="render", disable=not progress) as bar:
        for rows, cols in tiles(width, height, max_batch):
            xy = torch.from_numpy(pixel_centres(region, width, height, rows, cols))
            # float32 on the CPU first: not every accelerator has float64.
            colour = _evaluate(field, xy.float().to(device))
            tile = images.linear_to_uint8(colour).cpu().numpy()
            tile = tile.reshape(rows[1] - rows[0], cols[1] - cols[0], -1)
            if out is None:
                out = np.empty((height, width, tile.shape[2]), dtype=np.uint8)
            elif out.shape[2] != tile.shape[2]:
                raise ValueError(f"out has {out.shape[2]} channels, the field gives "
                                 f"{tile.shape[2]}")
            out[rows[0]:rows[1], cols[0]:cols[1]] = tile
            bar.update(tile.shape[0] * tile.shape[1])
    return out


def _ease(t):
    """Cosine ease-in-out on [0, 1]: zero slope at both ends."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(t, 0.0, 1.0))


def zoom_factors(n_frames, zoom):
    """Zoom factor of each frame: hold at 1, ease in to ``zoom``, hold, ease out to 1.

    The window size is interpolated geometrically (``zoom ** eased_time``) so the apparent
    zoom speed is even. Frame i sits at time i / n_frames, so a looping animation does not
    show the first frame twice. Returns ``(n_frames,)`` float64.
    """
    if n_frames < 2:
        raise ValueError(f"a zoom sequence needs at least 2 frames, got {n_frames}")
    if not (math.isfinite(zoom) and zoom >= 1.0):
        raise ValueError(f"zoom factor must be a number >= 1, got {zoom}")
    hold_in, zoom_in, hold_out, zoom_out = ZOOM_PHASES
    u = np.arange(n_frames) / n_frames
    going_in = _ease((u - hold_in) / zoom_in)
    going_out = _ease((u - hold_in - zoom_in - hold_out) / zoom_out)
    return zoom ** (going_in - going_out)


def zoom_regions(n_frames, zoom, center=None, base=FULL):
    """Regions of a zoom sequence into ``center`` (normalised image coordinates).

    At zoom z the window is ``base`` shrunk by z. Its centre moves linearly with the window
    size from the centre of ``base`` (z = 1) to ``center`` (full zoom), where ``center`` is
    first pulled inward just enough for the smallest window to fit in ``base``; since both
    ends fit, every window in between does too. Default center: the centre of ``base``.
    Returns a list of ``n_frames`` regions ``(x0, y0, x1, y1)``.
    """
    bx0, by0, bx1, by1 = check_region(base)
    size = np.array([bx1 - bx0, by1 - by0])
    lo, hi = np.array([bx0, by0]), np.array([bx1, by1])
    middle = (lo + hi) / 2
    factors = zoom_factors(n_frames, zoom)
    target = middle if center is None else np.asarray(center, dtype=np.float64)
    if target.shape != (2,) or not np.all((target >= lo) & (target <= hi)):
        raise ValueError(f"zoom center {tuple(target.tolist())} is outside the region "
                         f"{(bx0, by0, bx1, by1)}")
    half_min = size / (2 * zoom)
    target = np.clip(target, lo + half_min, hi - half_min)
    regions = []
    for z in factors:
        # t = 1 at zoom 1, 0 at full zoom; linear in the window size 1/z.
        t = 1.0 if zoom == 1.0 else (1 / z - 1 / zoom) / (1 - 1 / zoom)
        centre = t * middle + (1 - t) * target
        half = size / (2 * z)
        a = np.clip(centre - half, lo, hi)
        b = np.clip(centre + half, lo, hi)
        regions.append((float(a[0]), float(a[1]), float(b[0]), float(b[1])))
    return regions


def render_frames(field, width, height, regions, *, max_batch=2**18, progress=False):
    """Yield one ``(height, width, C)`` uint8 frame per region (see render_region)."""
    for region in tqdm(regions, unit="frame", desc="zoom", disable=not progress):
        yield render_region(field, width, height, region, max_batch=max_batch)


def write_frames(folder, frames):
    """Write frames as ``folder/frame_000000.png``, ... ; returns the number written."""
    os.makedirs(folder, exist_ok=True)
    count = 0
    for count, frame in enumerate(frames, start=1):
        images.write_image(os.path.join(folder, f"frame_{count - 1:06d}.png"), frame)
    return count


def _pil_frame(frame):
    """(H, W, C) uint8 -> PIL image (C = 1 grayscale, 3 RGB, 4 RGBA)."""
    return Image.fromarray(frame[..., 0] if frame.shape[2] == 1 else frame)


def write_animation(path, frames, fps, quality=95):
    """Write frames as a looping animated GIF or WebP (by extension) at ``fps``; ``quality``
    applies to WebP. All frames are held in memory (Pillow writes them in one go).

    Pillow merges consecutive identical frames (the holds) into one longer frame; the
    total duration stays ``len(frames) / fps``. Returns the number of frames given.
    """
    pictures = [_pil_frame(frame) for frame in frames]
    pictures[0].save(path, save_all=True, append_images=pictures[1:],
                     duration=1000.0 / fps, loop=0, quality=quality)
    return len(pictures)


def video_encoder():
    """Path of an ffmpeg executable (on PATH, or bundled with imageio-ffmpeg) or None."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    return imageio_ffmpeg.get_ffmpeg_exe()


_FFMPEG_PIXEL_FORMATS = {1: "gray", 3: "rgb24", 4: "rgba"}


def write_video(path, frames, fps, encoder):
    """Pipe raw frames into ffmpeg (H.264, yuv420p; odd sides padded to even, which the
    codec needs). Returns the number of frames written."""
    frames = iter(frames)
    first = next(frames)
    height, width, channels = first.shape
    command = [encoder, "-y", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", _FFMPEG_PIXEL_FORMATS[channels],
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
               "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", path]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    count = 0
    try:
        for count, frame in enumerate(itertools.chain([first], frames), start=1):
            process.stdin.write(np.ascontiguousarray(frame).tobytes())
    except BrokenPipeError:
        pass  # ffmpeg quit early; its exit status and message are reported below
    _, stderr = process.communicate()  # closes stdin (tolerating a broken pipe), waits
    if process.returncode != 0:
        detail = " ".join(stderr.decode(errors="replace").split())[:200]
        raise OSError(f"ffmpeg failed writing {path}: {detail}")
    return count


def build_parser():
    """The command-line interface of render.py."""
    parser = cli.ArgumentParser(
        prog="render.py",
        description="Render a fit trained by train.py at any size, region or zoom; "
                    "needs only the checkpoint, not the source image.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("-o", "--output", required=True,
                        help="output file: .png .jpg .tif .webp .bmp, or .npy (rendered "
                             "straight into a memory-mapped file, for outputs larger "
                             "than RAM). With --zoom: .gif, .webp, .mp4 (needs ffmpeg), "
                             "or a folder of numbered PNG frames")
    size = parser.add_argument_group(
        "output size", "default: the region at the trained resolution; with --zoom, "
        f"scaled down to at most {ZOOM_MAX_SIDE} px on the longer side")
    size.add_argument("--width", type=int, help="output width in pixels (alone: the "
                                                "height keeps the region's aspect)")
    size.add_argument("--height", type=int, help="output height in pixels (alone: the "
                                                 "width keeps the region's aspect)")
    size.add_argument("--scale", type=float,
                      help="output pixels per source pixel, e.g. 0.25 or 4")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--region", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                       help="region to render, NORMALISED coordinates in [0, 1] "
                            "(x left->right, y top->bottom) [default: 0 0 1 1]")
    where.add_argument("--region_px", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                       help="region to render in SOURCE PIXELS (edges: 0..width, "
                            "0..height of the trained image)")
    parser.add_argument("--max_batch", type=int, default=2**18,
                        help="pixels per tile; bounds peak memory [default: %(default)s]")
    parser.add_argument("--device", default="auto",
                        help="'auto' (GPU if available, else CPU) or a torch device "
                             "string such as cpu, cuda, cuda:1 [default: %(default)s]")
    parser.add_argument("--quality", type=int, default=95,
                        help="JPEG/WebP quality [default: %(default)s]")
    zoom = parser.add_argument_group("zoom sequence (hold, ease in, hold, ease out)")
    zoom.add_argument("--zoom", type=float, metavar="FACTOR",
                      help="render a zoom sequence into --center up to this factor (>= 1)")
    zoom.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"),
                      help="zoom target, normalised [0, 1] [default: centre of the region]")
    zoom.add_argument("--frames", type=int, help="number of frames [default: 150]")
    zoom.add_argument("--fps", type=float, help="frames per second [default: 30]")
    return parser


def output_kind(path, zoom):
    """What ``path`` asks for: 'still', 'npy', 'animation', 'video' or 'frames' (a folder).
    Raises ValueError for an extension that does not fit the mode."""
    ext = os.path.splitext(path)[1].lower()
    if not zoom:
        if ext not in STILL_EXTS:
            raise ValueError(f"cannot write {path!r}: use one of {' '.join(STILL_EXTS)}")
        return "npy" if ext == ".npy" else "still"
    if ext in ANIMATED_EXTS:
        return "animation"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in STILL_EXTS:
        raise ValueError(f"--zoom writes a folder of PNG frames, .gif, .webp or .mp4, "
                         f"not {path!r}")
    return "frames"


def resolve_device(name):
    """'auto' -> the GPU if torch.cuda.is_available() else CPU; otherwise the named torch
    device, checked usable. Raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device {name!r} is not usable: {cli.one_line(error)}") from None
    return device


def main(argv=None):
    """Command-line entry point; returns 0, or exits 2 with a one-line error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except MemoryError:
        parser.error("out of memory for the output image; write a .npy (memory-mapped) "
                     "or render a smaller size/region")
    except (ValueError, OSError, images.ImageError, CheckpointError) as error:
        parser.error(error)
    return 0


def _run(args):
    """Render what the parsed arguments ask for; raises ValueError/OSError on bad input."""
    zooming = args.zoom is not None
    if not zooming and (args.center or args.frames is not None or args.fps is not None):
        raise ValueError("--center, --frames and --fps only apply with --zoom")
    if args.max_batch < 1:
        raise ValueError(f"--max_batch must be at least 1, got {args.max_batch}")
    kind = output_kind(args.output, zooming)
    encoder = video_encoder() if kind == "video" else None
    if kind == "video" and encoder is None:
        raise ValueError("writing .mp4 needs ffmpeg (on PATH, or pip install "
                         "imageio-ffmpeg); write .gif, .webp or a frames folder instead")
    frames = 150 if args.frames is None else args.frames
    fps = 30.0 if args.fps is None else args.fps
    if zooming:
        # Validate the zoom schedule before the (slow) checkpoint load.
        zoom_factors(frames, args.zoom)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"--fps must be a positive number, got {fps}")
    device = resolve_device(args.device)
    field, info = load_field(args.ckpt, device)
    src_w, src_h, channels = info["width"], info["height"], info["channels"]
    if args.region_px is not None:
        region = region_from_pixels(args.region_px, src_w, src_h)
    else:
        region = check_region(FULL if args.region is None else args.region)
    width, height = output_size(src_w, src_h, region, args.width, args.height, args.scale)
    if zooming:
        regions = zoom_regions(frames, args.zoom, args.center, base=region)
        if args.width is None and args.height is None and args.scale is None \
                and max(width, height) > ZOOM_MAX_SIDE:
            width, height = output_size(src_w, src_h, region,
                                        scale=ZOOM_MAX_SIDE / max(width, height))
    parent = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(args.output if kind == "frames" else parent, exist_ok=True)
    if kind in ("still", "npy"):
        render_to_file(field, width, height, channels, args.output, region,
                       max_batch=args.max_batch, quality=args.quality, progress=True)
        print(f"render.py: wrote {args.output} ({width}x{height})")
        return
    sequence = render_frames(field, width, height, regions, max_batch=args.max_batch,
                             progress=True)
    if kind == "frames":
        count = write_frames(args.output, sequence)
    elif kind == "animation":
        count = write_animation(args.output, sequence, fps, args.quality)
    else:
        count = write_video(args.output, sequence, fps, encoder)
    print(f"render.py: wrote {args.output} ({count} frames of {width}x{height})")


def render_to_file(field, width, height, channels, path, region=FULL, *, max_batch=2**18,
                   quality=95, progress=False):
    """Render ``region`` at ``width x height`` into the image file ``path``; a .npy output is
    rendered straight into a memory-mapped file (outputs bigger than RAM), anything else goes
    through one uint8 buffer to images.write_image."""
    if os.path.splitext(os.fspath(path))[1].lower() == ".npy":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(height, width, channels))
        render_region(field, width, height, region, max_batch=max_batch, out=out, progress=progress)
        out.flush()
        return
    image = render_region(field, width, height, region, max_batch=max_batch, progress=progress)
    images.write_image(path, image, quality=quality)


if __name__ == "__main__":
    sys.exit(main())
