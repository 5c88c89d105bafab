"""Render a fitted image field at any size, region or zoom, tile by tile: stills, zoom
sequences (frames, GIF, WebP, MP4) and Deep Zoom pyramids. The rendering itself (regions,
tiles, resumable .npy files, animations) is tiles.py; this file adds the output geometry,
zooms, Deep Zoom and the command line.

Command line: ``python render.py --ckpt last.ckpt -o out.png`` (see ``--help``).
"""
import itertools
import math
import os
import shutil
import subprocess
import sys

import numpy as np

import cli
import images
import outputs
from field import CheckpointError, load_field
from hardware import DEVICE_HELP, resolve_device
from tiles import (DZI_DEFAULTS, FULL, check_region, dzi_levels, dzi_tiles, dzi_xml,
                   field_fingerprint, render_region, render_to_file, write_animation)

STILL_EXTS = images.EXTENSIONS
ANIMATED_EXTS = (".gif", ".webp")
VIDEO_EXTS = (".mp4",)
# Default longest side of zoom frames: a native-size frame of a gigapixel fit is no video.
ZOOM_MAX_SIDE = 1024
# Share of the zoom sequence spent in each phase: hold, zoom in, hold, zoom out.
ZOOM_PHASES = (1 / 6, 1 / 3, 1 / 6, 1 / 3)


def region_from_pixels(region_px, src_width, src_height, periodic=""):
    """Convert a region in source pixels ``(x0, y0, x1, y1)`` (pixel edges, 0..W and 0..H)
    to normalised coordinates, validated (see check_region for ``periodic``)."""
    x0, y0, x1, y1 = (float(v) for v in region_px)
    try:
        return check_region((x0 / src_width, y0 / src_height, x1 / src_width, y1 / src_height),
                            periodic)
    except ValueError:
        raise ValueError(f"pixel region ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or outside "
                         f"the {src_width}x{src_height} image") from None


def output_size(src_width, src_height, region=FULL, width=None, height=None, scale=None,
                periodic=""):
    """Output size ``(width, height)`` in pixels for rendering ``region`` of a
    ``src_width x src_height`` image.

    Both width and height: used as given. One of them: the other keeps the region's aspect
    in source pixels. ``scale``: the region's size in source pixels times scale. Nothing:
    scale 1 (native resolution). Derived sides are at least 1 pixel.
    """
    x0, y0, x1, y1 = check_region(region, periodic)
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


def zoom_regions(n_frames, zoom, center=None, base=FULL, periodic=""):
    """Regions of a zoom sequence into ``center`` (normalised image coordinates).

    At zoom z the window is ``base`` shrunk by z. Its centre moves linearly with the window
    size from the centre of ``base`` (z = 1) to ``center`` (full zoom), where ``center`` is
    first pulled inward just enough for the smallest window to fit in ``base``; since both
    ends fit, every window in between does too. Default center: the centre of ``base``.
    Returns a list of ``n_frames`` regions ``(x0, y0, x1, y1)``.
    """
    bx0, by0, bx1, by1 = check_region(base, periodic)
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
    with outputs.progress_bar(len(regions), "zoom", "frame", progress) as bar:
        for region in regions:
            yield render_region(field, width, height, region, max_batch=max_batch)
            bar.update(1)


def write_frames(folder, frames):
    """Write frames as ``folder/frame_000000.png``, ... ; returns the number written."""
    os.makedirs(folder, exist_ok=True)
    count = 0
    for count, frame in enumerate(frames, start=1):
        with outputs.atomic_output(os.path.join(folder, f"frame_{count - 1:06d}.png")) as partial:
            images.write_image(partial, frame)
    return count


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
    codec needs), all or nothing (outputs.atomic_output). Returns the number of frames."""
    with outputs.atomic_output(path) as partial:
        return _encode_video(partial, frames, fps, encoder)


def _encode_video(path, frames, fps, encoder):
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


# --- Deep Zoom pyramid (.dzi): the geometry (levels, tiles, descriptor) is tiles.py's -----

DZI_FORMATS = ("jpg", "png")
# Written in the tiles folder at the start: what the tiles there are a pyramid of.
DZI_MANIFEST = ".pyramid.json"
# Free-space estimate per pixel and channel of a tile not yet written (PNG about the raw
# size at worst, JPEG q95 4:4:4 about a quarter), plus a file-system block per tile.
DZI_BYTES_PER_SAMPLE = {"png": 1.0, "jpg": 0.25}
DZI_BYTES_PER_FILE = 4096


def dzi_files_folder(path):
    """Tiles folder of a ``.dzi`` path: ``fit.dzi`` -> ``fit_files``."""
    return os.path.splitext(os.fspath(path))[0] + "_files"


def _check_dzi_manifest(folder, wanted):
    """Check the tiles folder's manifest matches ``wanted``; returns the manifest path when
    there is none yet (a new pyramid: the caller writes it), else None.

    A folder with tiles but another (or no, or an unreadable) manifest belongs to another
    pyramid: ValueError rather than mixing tiles."""
    path = os.path.join(folder, DZI_MANIFEST)
    if outputs.check_manifest(path, wanted, folder) is not None:
        return None
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{folder} exists and was not written by render.py; delete it or "
                         f"pick another output name")
    return path


def write_deep_zoom(field, width, height, channels, path, region=FULL, *,
                    tile_size=254, overlap=1, tile_format="jpg", quality=95,
                    max_batch=2**18, progress=False, stamp=None):
    """Write the Deep Zoom pyramid of ``region`` at ``width x height`` (the top level):
    tiles ``<path minus .dzi>_files/<level>/<col>_<row>.<tile_format>``, then the ``.dzi``.

    Every tile is rendered straight from the field at its level's resolution (render_region
    with a window: a level's tiles are exactly the pixels of its render at that size), one tile
    at a time (peak memory: one tile), and written atomically; the ``.dzi`` comes last, so
    its presence means a complete pyramid. Resumable: tiles already on disk are skipped. A
    manifest (DZI_MANIFEST, with ``stamp``, e.g. the checkpoint's global_step, and the
    field's weights fingerprint) makes a tiles folder of another pyramid an error instead
    of a mix. ``quality`` applies to jpg. Free space for the missing tiles is estimated
    roughly (DZI_BYTES_PER_SAMPLE) and checked up front. Raises ValueError / ImageError.
    Returns ``(rendered, total)`` tile counts.
    """
    if tile_format not in DZI_FORMATS:
        raise ValueError(f"tile format must be one of {', '.join(DZI_FORMATS)}, "
                         f"got {tile_format!r}")
    region = check_region(region, getattr(field, "periodic", ""))
    levels = dzi_levels(width, height)
    work = [(level, w, h, tile) for level, (w, h) in enumerate(levels)
            for tile in dzi_tiles(w, h, tile_size, overlap)]   # validates the tile sizes
    folder = dzi_files_folder(path)
    manifest = dict(kind="hashgrid deep zoom", width=int(width), height=int(height),
                    channels=int(channels), region=list(region), tile_size=int(tile_size),
                    overlap=int(overlap), tile_format=tile_format,
                    quality=int(quality) if tile_format == "jpg" else None,
                    fingerprint=field_fingerprint(field), **(stamp or {}))
    new_manifest = _check_dzi_manifest(folder, manifest)
    present = {}
    for level in range(len(levels)):
        level_dir = os.path.join(folder, str(level))
        present[level] = set(os.listdir(level_dir)) if os.path.isdir(level_dir) else set()
    todo = [(level, w, h, tile) for level, w, h, tile in work
            if f"{tile[0]}_{tile[1]}.{tile_format}" not in present[level]]
    samples = sum((x1 - x0) * (y1 - y0) for *_, (_, _, x0, y0, x1, y1) in todo)
    samples *= min(channels, 3) if tile_format == "jpg" else channels
    images.check_free_space(path, int(samples * DZI_BYTES_PER_SAMPLE[tile_format])
                            + DZI_BYTES_PER_FILE * len(todo), what="Deep Zoom pyramid")
    if new_manifest:
        outputs.save_manifest(new_manifest, manifest)
    done = len(work) - len(todo)
    with outputs.progress_bar(len(work), "deep zoom", "tile", progress, initial=done) as bar:
        try:
            for level, w, h, (col, row, x0, y0, x1, y1) in todo:
                tile = render_region(field, w, h, region, window=((y0, y1), (x0, x1)),
                                     max_batch=max_batch)
                tile_path = os.path.join(folder, str(level), f"{col}_{row}.{tile_format}")
                with outputs.atomic_output(tile_path) as tmp:
                    images.write_image(tmp, tile, quality=quality)
                done += 1
                bar.update(1)
        except outputs.Stopped as stop:
            stop.left = (f"{os.fspath(path)} not finished: {done} of {len(work)} tiles are in "
                         f"{folder}; run the same command again to continue, or delete "
                         f"{folder} to discard them")
            raise
    with outputs.atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(dzi_xml(width, height, tile_size, overlap, tile_format))
    return len(todo), len(work)


def deep_zoom_options(args, kind):
    """The Deep Zoom flags as write_deep_zoom keywords (defaults filled in) for a .dzi
    output; ValueError when they are given for another output or do not fit."""
    given = {name: getattr(args, name) for name in DZI_DEFAULTS
             if getattr(args, name, None) is not None}
    if kind != "dzi":
        if given:
            raise ValueError("--tile_size, --overlap and --tile_format only apply to a .dzi "
                             "output")
        return None
    options = {**DZI_DEFAULTS, **given}
    dzi_tiles(1, 1, options["tile_size"], options["overlap"])   # validates the pair
    return options


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
                             "than RAM), or .dzi (a Deep Zoom tile pyramid for "
                             "OpenSeadragon & co.). With --zoom: .gif, .webp, .mp4 (needs "
                             "ffmpeg), or a folder of numbered PNG frames")
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
                        help=f"{DEVICE_HELP} [default: %(default)s]")
    parser.add_argument("--quality", type=cli.integer(1, 100), default=95,
                        help="JPEG/WebP quality, 1..100 [default: %(default)s]")
    parser.add_argument("--dtype", choices=("uint8", "uint16", "float16", "float32"),
                        default="uint8",
                        help="pixel type: uint8 / uint16 sRGB (uint16: .png .tif .npy) or "
                             "float16 / float32 linear light (.tif .npy) [default: uint8]")
    zoom = parser.add_argument_group("zoom sequence (hold, ease in, hold, ease out)")
    zoom.add_argument("--zoom", type=float, metavar="FACTOR",
                      help="render a zoom sequence into --center up to this factor (>= 1)")
    zoom.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"),
                      help="zoom target, normalised [0, 1] [default: centre of the region]")
    zoom.add_argument("--frames", type=int, help="number of frames [default: 150]")
    zoom.add_argument("--fps", type=float, help="frames per second [default: 30]")
    deep = parser.add_argument_group(
        "Deep Zoom (-o NAME.dzi)", "a tile pyramid: NAME.dzi plus NAME_files/LEVEL/COL_ROW."
        "FORMAT, every level rendered from the field; the output size sets the top level; "
        "an interrupted run resumes where it stopped")
    deep.add_argument("--tile_size", type=cli.integer(1), metavar="PX",
                      help=f"tile side in pixels [default: {DZI_DEFAULTS['tile_size']}]")
    deep.add_argument("--overlap", type=cli.integer(0), metavar="PX",
                      help="pixels each tile shares with its neighbours, per side "
                           f"[default: {DZI_DEFAULTS['overlap']}]")
    deep.add_argument("--tile_format", choices=DZI_FORMATS,
                      help=f"tile image format; --quality applies to jpg "
                           f"[default: {DZI_DEFAULTS['tile_format']}]")
    return parser


def output_kind(path, zoom):
    """What ``path`` asks for: 'still', 'npy', 'dzi' (Deep Zoom pyramid), 'animation',
    'video' or 'frames' (a folder). Raises ValueError for an extension that does not fit
    the mode."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".dzi":
        if zoom:
            raise ValueError("--zoom cannot write a Deep Zoom pyramid (.dzi); the viewer "
                             "zooms by itself")
        return "dzi"
    if not zoom:
        if ext not in STILL_EXTS:
            raise ValueError(f"cannot write {path!r}: use one of {' '.join(STILL_EXTS)} .dzi")
        return "npy" if ext == ".npy" else "still"
    if ext in ANIMATED_EXTS:
        return "animation"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in STILL_EXTS:
        raise ValueError(f"--zoom writes a folder of PNG frames, .gif, .webp or .mp4, "
                         f"not {path!r}")
    return "frames"


def main(argv=None):
    """Command-line entry point; returns 0, or exits 2 with a one-line error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with outputs.stop_on_signals("render.py", f"{args.output} was not written"):
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
    deep_zoom = deep_zoom_options(args, kind)
    if args.dtype != "uint8":
        if kind not in ("still", "npy"):
            raise ValueError("--dtype only applies to a single image (not --zoom or .dzi)")
        images.check_dtype(args.output, args.dtype)
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
    periodic = info["config"].periodic
    if args.region_px is not None:
        region = region_from_pixels(args.region_px, src_w, src_h, periodic)
    else:
        region = check_region(FULL if args.region is None else args.region, periodic)
    width, height = output_size(src_w, src_h, region, args.width, args.height, args.scale,
                                periodic)
    if zooming:
        regions = zoom_regions(frames, args.zoom, args.center, base=region, periodic=periodic)
        if args.width is None and args.height is None and args.scale is None \
                and max(width, height) > ZOOM_MAX_SIDE:
            width, height = output_size(src_w, src_h, region,
                                        scale=ZOOM_MAX_SIDE / max(width, height),
                                        periodic=periodic)
    parent = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(args.output if kind == "frames" else parent, exist_ok=True)
    if kind == "dzi":
        rendered, total = write_deep_zoom(
            field, width, height, channels, args.output, region, **deep_zoom,
            quality=args.quality, max_batch=args.max_batch, progress=True,
            stamp=dict(global_step=info["global_step"], source=info["source"]))
        print(f"render.py: wrote {args.output} ({width}x{height}, "
              f"{len(dzi_levels(width, height))} levels, {total} tiles, "
              f"{total - rendered} of them already there)")
        return
    if kind in ("still", "npy"):
        render_to_file(field, width, height, channels, args.output, region,
                       max_batch=args.max_batch, quality=args.quality, progress=True,
                       dtype=args.dtype, resume=kind == "npy",
                       stamp=dict(global_step=info["global_step"], source=info["source"]))
        print(f"render.py: wrote {args.output} ({width}x{height})")
        return
    sequence = render_frames(field, width, height, regions, max_batch=args.max_batch,
                             progress=True)
    if kind == "frames":
        count = write_frames(args.output, sequence)
    elif kind == "animation":
        count = write_animation(args.output, sequence, 1000.0 / fps, args.quality)
    else:
        count = write_video(args.output, sequence, fps, encoder)
    print(f"render.py: wrote {args.output} ({count} frames of {width}x{height})")


if __name__ == "__main__":
    sys.exit(main())
