"""Image files <-> numpy arrays, and sRGB <-> linear light.

Pixels stay in the file's own precision (uint8 / uint16 sRGB, or float linear for
`.npy`) so that a gigapixel image costs 3 bytes per pixel, not 12 or 16; training
converts the sampled batch to linear light with one table look-up (`SRGB_TO_LINEAR_LUT`).

Conventions
- Arrays are `(H, W, C)` with C in {1, 3, 4}; grayscale stays C = 1.
- uint8 / uint16 arrays hold sRGB-encoded values; float arrays hold LINEAR light in [0, 1]
  (the upstream `.npy` convention). A uint8 `.npy` is therefore sRGB, a float `.npy` linear.
"""
import contextlib
import os
import shutil
import struct
import sys
import zlib

import numpy as np
from PIL import Image

# Ceiling for PIL's decompression-bomb check: 2**32 pixels (4.3 gigapixels, e.g. 65536 x
# 65536), enough for the 1.22-gigapixel Tokyo photo while still refusing absurd headers.
# Pass max_pixels=None to read_image (or --max-pixels 0 to convert.py) to lift it.
MAX_IMAGE_PIXELS = 2**32

PIL_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF",
               ".tiff": "TIFF", ".webp": "WEBP", ".bmp": "BMP"}
EXTENSIONS = tuple(PIL_FORMATS) + (".npy",)

# Rows converted at a time when copying between PIL and numpy: bounds the temporary
# copies to a few MB whatever the image size.
_BAND_PIXELS = 1 << 22


class ImageError(Exception):
    """A file could not be read or written; the message is one line naming the file."""

    def __init__(self, path, reason):
        reason = " ".join(str(reason).split())  # PIL/numpy messages may span lines
        super().__init__(f"{os.fspath(path)}: {reason}")


def extension(path, role="file"):
    """Lower-case extension of `path`, or ImageError if it is not a supported format
    (`role` names the file in the message: "input", "output", ...)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in EXTENSIONS:
        raise ImageError(path, f"unsupported {role} extension {ext or '(none)'!r}; "
                               f"expected one of {', '.join(EXTENSIONS)}")
    return ext


def _row_bands(height, width):
    """Yield (y0, y1) row ranges of about _BAND_PIXELS pixels covering `height` rows."""
    step = max(1, _BAND_PIXELS // max(1, width))
    for y0 in range(0, height, step):
        yield y0, min(height, y0 + step)


# ----------------------------------------------------------------------------- output files

@contextlib.contextmanager
def atomic_output(path):
    """Write a file all or nothing: yields a temporary name in `path`'s folder (same
    extension, so writers pick the same format), flushed to disk and renamed onto `path` when
    the block succeeds, removed when it fails or is interrupted. A crash, Ctrl-C or a full
    disk therefore never leaves a partial file under the real name, nor destroys the
    previous one. Creates the folder. Two processes writing one path each use their own
    temporary name; the last rename wins with a complete file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    root, ext = os.path.splitext(os.path.basename(path))
    partial = os.path.join(folder, f".{root}.{os.getpid()}-{os.urandom(3).hex()}.partial{ext}")
    try:
        yield partial
        with open(partial, "rb+") as f:   # data on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(partial, path)
    except ImageError as exc:             # errors name the file asked for, not the temporary
        exc.args = tuple(a.replace(partial, path) if isinstance(a, str) else a for a in exc.args)
        raise
    except OSError as exc:                # e.g. a full disk: same errno (and subclass)
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def same_file(a, b):
    """Whether two paths name one file (also through symbolic or hard links); either may not
    exist yet. Outputs use it to refuse to replace their input."""
    return os.path.realpath(a) == os.path.realpath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_free_space(path, nbytes, what="output"):
    """ImageError unless the file system holding `path` has `nbytes` free (memory-mapped or
    sparse writes would otherwise die with SIGBUS, or fill the disk hours into a run)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.isdir(folder):     # the folder may not exist yet
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise ImageError(path, f"the {what} needs {_size(nbytes)} but only {_size(free)} is "
                               f"free there")


def _size(nbytes):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


# ----------------------------------------------------------------------------- colour

def _is_torch(x):
    # torch is only looked up when the caller already imported it, so the numpy-only
    # tools (convert.py) never pay for importing torch.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _float_input(x, name):
    if _is_torch(x):
        if not x.is_floating_point():
            raise TypeError(f"{name} expects a float tensor in [0, 1]; use to_linear for integers")
        return x
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} expects a float array in [0, 1]; use to_linear for integers")
    return x


def srgb_to_linear(x):
    """sRGB-encoded values -> linear light (IEC 61966-2-1), elementwise.

    x: float numpy array or torch tensor, any shape, nominally in [0, 1]. Same type back.
    """
    x = _float_input(x, "srgb_to_linear")
    if _is_torch(x):
        import torch
        # Clamping the power branch keeps its gradient finite where it is not selected.
        curve = ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4
        return torch.where(x <= 0.04045, x / 12.92, curve)
    curve = ((np.maximum(x, 0.04045) + 0.055) / 1.055) ** 2.4
    return np.where(x <= 0.04045, x / 12.92, curve).astype(x.dtype, copy=False)


def linear_to_srgb(x):
    """Linear light -> sRGB-encoded values (IEC 61966-2-1), elementwise.

    x: float numpy array or torch tensor, any shape, nominally in [0, 1]. Same type back.
    """
    x = _float_input(x, "linear_to_srgb")
    if _is_torch(x):
        import torch
        curve = 1.055 * x.clamp(min=0.0031308) ** (1 / 2.4) - 0.055
        return torch.where(x <= 0.0031308, x * 12.92, curve)
    curve = 1.055 * np.maximum(x, 0.0031308) ** (1 / 2.4) - 0.055
    return np.where(x <= 0.0031308, x * 12.92, curve).astype(x.dtype, copy=False)


# Linear value of every 8-bit sRGB code, computed in float64 then stored as float32.
SRGB_TO_LINEAR_LUT = srgb_to_linear(np.arange(256, dtype=np.float64) / 255).astype(np.float32)
SRGB_TO_LINEAR_LUT.setflags(write=False)


def to_linear(array):
    """Any array read_image returns -> float32 linear light, same shape.

    uint8 goes through SRGB_TO_LINEAR_LUT (one gather), uint16 through the formula,
    float is taken as already linear. Accepts numpy arrays or torch tensors.
    """
    if _is_torch(array):
        import torch
        if array.dtype == torch.uint8:
            lut = torch.from_numpy(SRGB_TO_LINEAR_LUT.copy()).to(array.device)
            return lut[array.long()]
        if array.is_floating_point():
            return array.float()
        return srgb_to_linear(array.double() / 65535).float()
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return SRGB_TO_LINEAR_LUT[array]
    if array.dtype == np.uint16:
        return srgb_to_linear(array / 65535.0).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise TypeError(f"to_linear: unsupported dtype {array.dtype}")


def linear_to_uint8(x):
    """Linear light -> sRGB uint8 (clipped to [0, 1], rounded to nearest); numpy or torch."""
    if _is_torch(x):
        import torch
        srgb = linear_to_srgb(x.float().clamp(0.0, 1.0))
        return torch.round(srgb * 255).to(torch.uint8)
    srgb = linear_to_srgb(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0))
    return np.rint(srgb * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- reading

@contextlib.contextmanager
def _pil_bomb_check_off():
    # PIL's limit is a module global; read_image applies its own per-call max_pixels
    # instead, so the global is only switched off around Image.open.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(path, max_pixels=MAX_IMAGE_PIXELS):
    """Open an image file lazily (header only; pixels decode on first access).

    Returns a PIL.Image.Image. Raises ImageError for an unsupported extension, a missing
    or unreadable file, or more than `max_pixels` pixels (None: no limit).
    """
    ext = extension(path)
    if ext == ".npy":
        raise ImageError(path, "is a .npy array, not an image file; use read_image")
    if not os.path.isfile(path):
        raise ImageError(path, "no such file")
    try:
        with _pil_bomb_check_off():
            im = Image.open(path)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"cannot read image ({e})") from None
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise ImageError(path, f"{width}x{height} = {width * height} pixels exceeds the limit "
                               f"of {max_pixels} pixels (raise max_pixels / --max-pixels)")
    return im


MODE_CHANNELS = {"L": 1, "I;16": 1, "RGB": 3, "RGBA": 4}


def _target_mode(im, keep_alpha):
    """PIL mode the pixels are converted to: L, RGB, RGBA, I;16 (16-bit gray) or None."""
    mode = im.mode
    if mode.startswith("I;16"):
        return "I;16"
    if mode in ("1", "L"):
        return "L"
    if mode in ("LA", "La"):
        return "RGBA" if keep_alpha else "L"
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return "RGBA" if keep_alpha else "RGB"
    if mode in ("P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return "RGB"
    return None


def pixel_mode(im, keep_alpha=False):
    """How read_image returns an opened PIL image: "L", "RGB", "RGBA" (uint8), "I;16"
    (uint16 gray), "RGB;16" / "RGBA;16" (uint16 colour), or None when unsupported."""
    mode = _target_mode(im, keep_alpha)
    if mode in ("RGB", "RGBA") and _wide_colour_tiles(im) is not None:
        return mode + ";16"
    return mode


def pil_rows(im, y0, y1, mode):
    """Rows [y0, y1) of a PIL image as a (y1 - y0, W, C) array in `mode` (see MODE_CHANNELS).

    Converting a band at a time keeps the extra memory to one band rather than a second
    full copy of the image (PIL stores RGB with 4 bytes per pixel).
    """
    band = im.crop((0, y0, im.width, y1))
    if mode == "I;16":
        rows = np.asarray(band).astype(np.uint16, copy=False)  # I;16B arrives big-endian
    else:
        rows = np.asarray(band if band.mode == mode else band.convert(mode))
    return rows.reshape(y1 - y0, im.width, MODE_CHANNELS[mode])


def _pil_to_array(im, mode):
    """Whole decoded PIL image -> (H, W, C) uint8 / uint16 array, band by band."""
    width, height = im.size
    dtype = np.uint16 if mode == "I;16" else np.uint8
    out = np.empty((height, width, MODE_CHANNELS[mode]), dtype)
    for y0, y1 in _row_bands(height, width):
        out[y0:y1] = pil_rows(im, y0, y1, mode)
    return out


def _wide_colour_tiles(im):
    """For a 16-bit-per-channel RGB(A) image, its tiles decoding the LOW bytes, else None.

    PIL has no 16-bit colour mode: it decodes such PNG/TIFF files keeping only the high
    byte of each sample (raw modes like "RGB;16B"). Decoding the same tiles a second time
    with the byte order swapped yields the low bytes, so the full 16 bits come back with
    PIL alone.
    """
    if im.mode not in ("RGB", "RGBA") or not im.tile:
        return None
    swap = {"B": "L", "L": "B", "N": "L" if sys.byteorder == "big" else "B"}
    tiles = []
    for tile in im.tile:
        args = tile[3]
        rawmode = args if isinstance(args, str) else args[0]
        if not (isinstance(rawmode, str) and rawmode[-4:-1] == ";16" and rawmode[-1] in swap):
            return None
        low = rawmode[:-1] + swap[rawmode[-1]]
        args = low if isinstance(args, str) else (low, *args[1:])
        tiles.append(tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args))
    return tiles


def _read_wide_colour(path, im, low_tiles, mode):
    """Both byte halves of a 16-bit colour image -> (H, W, C) uint16 (C from `mode`)."""
    high = _pil_to_array(im, mode)
    with open_image(path, None) as low_im:
        low_im.tile = low_tiles
        try:
            low_im.load()
        except ValueError:
            # No byte-swapped unpacker for this layout in PIL (e.g. 16-bit gray + alpha):
            # keep the 8-bit data PIL gives rather than failing.
            return high
        low = _pil_to_array(low_im, mode)
    out = high.astype(np.uint16)
    out <<= 8
    out |= low
    return out


def _as_hwc(array, path):
    """(H, W) or (H, W, C) uint8 / uint16 / float array -> (H, W, C) view, C in {1, 3, 4};
    ImageError naming `path` for any other shape or dtype."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise ImageError(path, f"expected an (H, W) or (H, W, C) array with C in 1, 3, 4, "
                               f"got shape {tuple(array.shape)}")
    if not (array.dtype in (np.uint8, np.uint16) or np.issubdtype(array.dtype, np.floating)):
        raise ImageError(path, f"unsupported dtype {array.dtype}; expected uint8, uint16 or float")
    return array


def _read_npy(path, keep_alpha):
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ImageError(path, f"not a readable .npy array ({e})") from None
    array = _as_hwc(array, path)
    return array if keep_alpha or array.shape[2] != 4 else array[:, :, :3]


def available_memory():
    """Bytes of memory the system can still hand out without swapping (Linux's MemAvailable),
    or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(path, im, mode):
    """ImageError, before decoding, when decoding `im` cannot fit in memory: PIL's decoded
    copy plus the returned array. (A MemoryError mid-decode says nothing useful, and with
    overcommit the process may be killed instead.)"""
    # PIL holds L in 1 byte, I;16 in 2 and colour in 4 (16-bit colour: two 8-bit decodes)
    pil_bytes = {"L": 1, "I;16": 2, "RGB;16": 8, "RGBA;16": 8}.get(mode, 4)
    out_bytes = {"L": 1, "I;16": 2, "RGB": 3, "RGBA": 4, "RGB;16": 6, "RGBA;16": 8}[mode]
    needed = im.width * im.height * (pil_bytes + out_bytes)
    free = available_memory()
    if free is not None and needed > free:
        raise ImageError(path, f"decoding {im.width}x{im.height} pixels needs about "
                               f"{_size(needed)} of memory, {_size(free)} is available; convert "
                               f"it to .npy with convert.py (bounded memory) and use that")


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}    # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))                            # x0, y0, dx, dy of the 7 interlace passes


def _png_data_complete(path):
    """Whether a PNG's compressed pixel data holds every row. PIL accepts a file whose zlib
    stream ends properly but early (the missing rows come back black), so the stream is
    inflated once more and its length compared with what the header promises."""
    with open(path, "rb") as f:
        f.read(8)
        inflate, size, expected = zlib.decompressobj(), 0, None
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            data = f.read(length)
            f.read(4)                                    # CRC: PIL checked it
            if kind == b"IHDR":
                width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB",
                                                                             data[:13])
                bits = depth * _PNG_CHANNELS.get(colour, 1)
                passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
                expected = 0
                for x0, y0, dx, dy in passes:
                    cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
                    if cols > 0 and rows > 0:
                        expected += rows * (1 + -(-(cols * bits) // 8))
            elif kind == b"IDAT":
                while data:                              # bounded output per call
                    size += len(inflate.decompress(data, 1 << 20))
                    data = inflate.unconsumed_tail
            elif kind == b"IEND":
                break
    return expected is None or size >= expected


def read_image(path, keep_alpha=False, max_pixels=MAX_IMAGE_PIXELS):
    """Read an image file as an (H, W, C) array, C in {1, 3, 4}.

    .jpg/.jpeg/.png/.tif/.tiff/.webp/.bmp: uint8 sRGB (uint16 for 16-bit PNG/TIFF); palette,
    CMYK, ... become RGB; alpha is dropped unless keep_alpha. More than `max_pixels` pixels
    (None: no limit) is refused before decoding.
    .npy: memory-mapped read-only (np.memmap, no copy), dtype as stored: uint8/uint16 sRGB
    or float LINEAR light; an (H, W) array comes back as an (H, W, 1) view.
    Raises ImageError (one line naming the file) for every failure.
    """
    if extension(path) == ".npy":
        if not os.path.isfile(path):
            raise ImageError(path, "no such file")
        return _read_npy(path, keep_alpha)
    im = open_image(path, max_pixels)
    try:
        with im:
            mode = pixel_mode(im, keep_alpha)
            if mode is None:
                raise ImageError(path, f"unsupported pixel mode {im.mode}")
            _check_memory(path, im, mode)
            if mode in ("RGB;16", "RGBA;16"):
                return _read_wide_colour(path, im, _wide_colour_tiles(im), mode[:-3])
            im.load()
            if im.format == "PNG" and not _png_data_complete(path):
                raise ImageError(path, "truncated image: its pixel data stops before the last "
                                       "row (the file ends properly, but rows are missing)")
            return _pil_to_array(im, mode)
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, ...
        raise ImageError(path, f"cannot decode image, truncated or corrupt ({e})") from None


# ----------------------------------------------------------------------------- writing

def to_srgb8(array):
    """(H, W, C) array as read_image returns it -> sRGB uint8, band by band to bound the
    temporaries: uint8 as is (a memmap stays a memmap), uint16 requantised, float (linear)
    encoded. ValueError for NaN or infinite values, which have no colour to encode."""
    if array.dtype == np.uint8:
        return array
    height, width = array.shape[:2]
    out = np.empty(array.shape, np.uint8)
    bad = 0
    for y0, y1 in _row_bands(height, width):
        band = np.asarray(array[y0:y1])
        if np.issubdtype(band.dtype, np.floating):
            bad += int(band.size - np.count_nonzero(np.isfinite(band)))
        else:
            band = to_linear(band)
        if not bad:                 # past the first bad band: only counting (no cast warning)
            out[y0:y1] = linear_to_uint8(band)
    if bad:
        raise ValueError(f"{bad} of {array.size} values are NaN or infinite; replace them "
                         f"(e.g. numpy.nan_to_num) before using the image")
    return out


def _write_pil(path, ext, array, quality):
    if ext in (".jpg", ".jpeg") and array.shape[2] == 4:
        array = array[:, :, :3]  # JPEG has no alpha channel
    pixels = array[:, :, 0] if array.shape[2] == 1 else array
    im = Image.fromarray(np.ascontiguousarray(pixels))
    options = {}
    if ext in (".jpg", ".jpeg"):
        options = {"quality": quality, "subsampling": 0}  # 4:4:4 keeps fine colour detail
    elif ext == ".webp":
        options = {"quality": quality}
    im.save(path, format=PIL_FORMATS[ext], **options)


def write_image(path, array, quality=95):
    """Write an (H, W) or (H, W, C) array, C in {1, 3, 4}, to any supported format.

    uint8 is sRGB and written as is; float is linear light, converted to sRGB uint8
    (except .npy, which stores the array unchanged, so float .npy stays linear);
    uint16 (sRGB) can only go to .npy (PIL writes no 16-bit colour). JPEG drops alpha; `quality`
    applies to .jpg and .webp. Creates the parent folder. Raises ImageError.
    """
    ext = extension(path)
    if _is_torch(array):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    array = _as_hwc(array, path)
    if array.dtype == np.uint16 and ext != ".npy":
        raise ImageError(path, "16-bit images can only be written as .npy")
    folder = os.path.dirname(os.fspath(path))
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        if ext == ".npy":
            np.save(path, array)
        else:
            _write_pil(path, ext, to_srgb8(array), quality)
    except OSError as e:
        raise ImageError(path, f"cannot write ({e.strerror or e})") from None
