"""Image files <-> numpy arrays, and sRGB <-> linear light. (What every long output shares,
all-or-nothing files, progress bars, a clean stop on signals, is outputs.py.)

Pixels stay in the file's own precision (uint8 / uint16 sRGB, or float linear for `.npy`
and TIFF) so that a gigapixel image costs 3 bytes per pixel, not 12 or 16; training
converts the sampled batch to linear light with one table look-up (`SRGB_TO_LINEAR_LUT`).
Images come back the way they are shown (EXIF / TIFF orientation applied).

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

from cli import one_line
from outputs import progress_bar, shown_name

# Ceiling for PIL's decompression-bomb check: 2**32 pixels (4.3 gigapixels, e.g. 65536 x
# 65536), enough for the 1.22-gigapixel Tokyo photo while still refusing absurd headers.
# Pass max_pixels=None to read_image (or --max-pixels 0 to convert.py) to lift it.
MAX_IMAGE_PIXELS = 2**32

PIL_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF",
               ".tiff": "TIFF", ".webp": "WEBP", ".bmp": "BMP"}
EXTENSIONS = tuple(PIL_FORMATS) + (".npy",)
TIFF_EXTENSIONS = (".tif", ".tiff")
# What each format stores besides uint8 sRGB: 16-bit sRGB, float linear light.
WIDE_EXTENSIONS = {"uint16": (".png", ".tif", ".tiff", ".npy"),
                   "float16": (".tif", ".tiff", ".npy"), "float32": (".tif", ".tiff", ".npy")}
# Rows converted at a time when copying between PIL and numpy: bounds the temporary
# copies to a few MB whatever the image size.
_BAND_PIXELS = 1 << 22


class ImageError(Exception):
    """A file could not be read or written; the message is one line naming the file."""

    def __init__(self, path, reason):
        super().__init__(f"{os.fspath(path)}: {one_line(reason)}")


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


# EXIF / TIFF Orientation (tag 274): how the stored rows must turn to be seen upright.
ORIENTATION_TAG = 274


def orient(array, orientation):
    """(H, W, C) array as stored -> as shown, for EXIF/TIFF orientation 1..8 (a view: flips
    and transposes only). 5..8 swap width and height (phones' portrait shots are 6)."""
    if orientation in (5, 6, 7, 8):
        array = array.swapaxes(0, 1)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]   # transpose, then as 1..4
    if orientation in (2, 3):
        array = array[:, ::-1]
    if orientation in (3, 4):
        array = array[::-1]
    return array


def oriented_size(width, height, orientation):
    """(width, height) of a stored width x height image as shown."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def pil_orientation(im):
    """The EXIF orientation of an opened PIL image (1: as stored)."""
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:                  # a broken EXIF block: show the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


class TiffBands:
    """A TIFF's first image, read band by band with tifffile: `shape` (H, W, C) as stored,
    `dtype`, `orientation`, `rows(y0, y1)` and, for an uncompressed contiguous file,
    `memmap()`. Strips or tiles are decoded one row of segments at a time (the last two
    are kept: bands a resampler reads overlap a little), so memory stays at a band."""

    DTYPES = ("uint8", "uint16", "float16", "float32", "float64")

    def __init__(self, path):
        import tifffile
        self.path = path
        try:
            self.file = tifffile.TiffFile(path)
            page = self.file.pages.first
            self.page, self.dtype = page, np.dtype(page.dtype).newbyteorder("=")
            self.separate = page.planarconfig == 2 and page.samplesperpixel > 1
            self.shape = (page.imagelength, page.imagewidth, page.samplesperpixel)
            self.orientation = int(page.tags.valueof(ORIENTATION_TAG, 1) or 1)
            self.decode = page.decode
        except Exception as e:          # tifffile raises TiffFileError, ValueError, ...
            raise ImageError(path, f"cannot read TIFF ({e})") from None
        self.blocks = {}

    @staticmethod
    def usable(path):
        """TiffBands(path) when tifffile reads it as plain pixels (gray or RGB(A), uint8 /
        uint16 / float, 1-4 channels, one depth plane, a codec it has), else None: PIL then
        reads what is left (palette, CMYK, YCbCr, LZW / JPEG compression)."""
        try:
            bands = TiffBands(path)
        except ImageError:
            return None
        from tifffile import PHOTOMETRIC, TIFF
        page = bands.page
        ok = (page.photometric in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.RGB)
              and str(page.dtype.newbyteorder("=")) in TiffBands.DTYPES
              and 1 <= page.samplesperpixel <= 4 and page.imagedepth == 1
              and page.imagelength > 0 and page.imagewidth > 0)
        try:
            ok = ok and (page.compression == 1 or TIFF.DECOMPRESSORS[page.compression])
        except (KeyError, ValueError):
            ok = False
        if not ok:
            bands.close()
            return None
        return bands

    def close(self):
        self.file.close()

    def contiguous(self):
        """(offset, nbytes) of the pixels when stored uncompressed in one run, else None."""
        page = self.page
        if page.compression != 1 or self.separate or page.is_tiled:
            return None
        offset, nbytes = page.dataoffsets[0], int(np.prod(self.shape)) * self.dtype.itemsize
        ends = page.dataoffsets[-1] + page.databytecounts[-1]
        return (offset, nbytes) if page.is_contiguous and ends == offset + nbytes else None

    def memmap(self):
        """The pixels as a read-only (H, W, C) np.memmap (contiguous files only)."""
        offset, nbytes = self.contiguous()
        if offset + nbytes > os.path.getsize(self.path):
            raise ImageError(self.path, "truncated image: the file ends before its last row")
        return np.memmap(self.path, dtype=self.page.dtype, mode="r", offset=offset,
                         shape=self.shape)

    def _segment_rows(self):
        page = self.page
        return page.tilelength if page.is_tiled else min(page.rowsperstrip or self.shape[0],
                                                         self.shape[0])

    def _block(self, index):
        """Decoded rows [index * s, (index + 1) * s) (s: rows per strip or tile row)."""
        if index in self.blocks:
            return self.blocks[index]
        page, (height, width, channels) = self.page, self.shape
        rows = self._segment_rows()
        y0, y1 = index * rows, min(height, (index + 1) * rows)
        block = np.zeros((y1 - y0, width, channels), self.dtype)
        per_row = -(-width // page.tilewidth) if page.is_tiled else 1
        per_plane = -(-height // rows) * per_row
        fh = self.file.filehandle
        for plane in range(channels if self.separate else 1):
            for k in range(per_row):
                segment = plane * per_plane + index * per_row + k
                offset, count = page.dataoffsets[segment], page.databytecounts[segment]
                if not count:
                    continue                        # an empty segment is zeros
                fh.seek(offset)
                data = fh.read(count)
                if len(data) < count:
                    raise ImageError(self.path, "truncated image: the file ends before its "
                                                "last row")
                try:
                    pixels = self.decode(data, segment)[0]
                except Exception as e:
                    raise ImageError(self.path, f"cannot decode image, truncated or corrupt "
                                                f"({e})") from None
                pixels = pixels.reshape(pixels.shape[-3:])        # (rows, cols, samples)
                x0 = k * page.tilewidth if page.is_tiled else 0
                h, w = min(pixels.shape[0], y1 - y0), min(pixels.shape[1], width - x0)
                target = block[:h, x0:x0 + w]
                if self.separate:
                    target[..., plane] = pixels[:h, :w, 0]
                else:
                    target[...] = pixels[:h, :w]
        if len(self.blocks) >= 2:
            self.blocks.pop(min(self.blocks))
        self.blocks[index] = block
        return block

    def rows(self, y0, y1):
        """Rows [y0, y1) as stored: (y1 - y0, W, C) in `dtype` (native byte order)."""
        span = self.contiguous()
        if span is not None:       # plain reads: a memory map would keep every page read
            row = self.shape[1] * self.shape[2]
            with open(self.path, "rb") as f:
                f.seek(span[0] + y0 * row * self.dtype.itemsize)
                data = np.fromfile(f, dtype=self.page.dtype, count=(y1 - y0) * row)
            if data.size < (y1 - y0) * row:
                raise ImageError(self.path, "truncated image: the file ends before its last row")
            return data.astype(self.dtype, copy=False).reshape(y1 - y0, *self.shape[1:])
        rows = self._segment_rows()
        return np.concatenate([self._block(i)[max(y0, i * rows) - i * rows:
                                              min(y1, (i + 1) * rows) - i * rows]
                               for i in range(y0 // rows, (y1 - 1) // rows + 1)])


def _read_tiff(path, bands, keep_alpha, max_pixels, progress):
    """read_image for a TIFF tifffile reads (see TiffBands.usable)."""
    height, width, channels = bands.shape
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(path, f"{width}x{height} = {width * height} pixels exceeds the limit "
                               f"of {max_pixels} pixels (raise max_pixels / --max-pixels)")
    if bands.contiguous() is not None and bands.dtype == bands.page.dtype:
        array = bands.memmap()
    else:
        free, needed = available_memory(), height * width * channels * bands.dtype.itemsize
        if free is not None and needed > free:
            raise ImageError(path, f"decoding {width}x{height} pixels needs about "
                                   f"{_size(needed)} of memory, {_size(free)} is available")
        array = np.empty(bands.shape, bands.dtype)
        with progress_bar(height, f"read {os.path.basename(path)}", "row", progress) as bar:
            for y0, y1 in _row_bands(height, width):
                array[y0:y1] = bands.rows(y0, y1)
                bar.update(y1 - y0)
    if channels == 2:              # gray + alpha
        array = array[:, :, [0, 0, 0, 1]] if keep_alpha else array[:, :, :1]
    elif channels == 4 and not keep_alpha:
        array = array[:, :, :3]
    return orient(array, bands.orientation)


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


class _CountingFile:
    """A file PIL decodes from that moves a progress bar by the bytes read: PIL decodes in
    one call with no progress of its own, but reads the compressed data as it goes."""

    def __init__(self, file, bar):
        self._file, self._bar = file, bar

    def read(self, *args):
        data = self._file.read(*args)
        self._bar.update(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._file, name)


def decode(im, path, progress=None):
    """im.load() of an opened PIL image with a progress bar over the file's bytes."""
    size = os.path.getsize(path)
    with progress_bar(size, f"decode {os.path.basename(path)}", "B", progress) as bar:
        if getattr(im, "fp", None) is not None:
            bar.update(im.fp.tell())
            im.fp = _CountingFile(im.fp, bar)
        im.load()


def read_image(path, keep_alpha=False, max_pixels=MAX_IMAGE_PIXELS, progress=None):
    """Read an image file as an (H, W, C) array, C in {1, 3, 4}, in the orientation it is
    shown in (EXIF / TIFF Orientation applied).

    .jpg/.jpeg/.png/.webp/.bmp: uint8 sRGB (uint16 for 16-bit PNG); palette, CMYK, ... become
    RGB; alpha is dropped unless keep_alpha. .tif/.tiff through tifffile: uint8 / uint16 sRGB
    or float LINEAR light as stored, 1-4 channels, BigTIFF; an uncompressed one comes back
    memory-mapped, a striped or tiled one is decoded band by band (TIFFs tifffile does not
    read as plain pixels, e.g. palette or LZW, go through PIL as 8-bit). More than
    `max_pixels` pixels (None: no limit) is refused before decoding.
    .npy: memory-mapped read-only (np.memmap, no copy), dtype as stored: uint8/uint16 sRGB
    or float LINEAR light; an (H, W) array comes back as an (H, W, 1) view.
    progress: see progress_bar (decoding a large file). Raises ImageError (one line naming
    the file) for every failure.
    """
    ext = extension(path)
    if ext == ".npy":
        if not os.path.isfile(path):
            raise ImageError(path, "no such file")
        return _read_npy(path, keep_alpha)
    if ext in TIFF_EXTENSIONS and os.path.isfile(path):
        bands = TiffBands.usable(path)
        if bands is not None:
            with contextlib.closing(bands):
                return _read_tiff(path, bands, keep_alpha, max_pixels, progress)
    im = open_image(path, max_pixels)
    try:
        with im:
            mode = pixel_mode(im, keep_alpha)
            if mode is None:
                raise ImageError(path, f"unsupported pixel mode {im.mode}")
            _check_memory(path, im, mode)
            if mode in ("RGB;16", "RGBA;16"):
                array = _read_wide_colour(path, im, _wide_colour_tiles(im), mode[:-3])
            else:
                decode(im, path, progress)
                if im.format == "PNG" and not _png_data_complete(path):
                    raise ImageError(path, "truncated image: its pixel data stops before the "
                                           "last row (the file ends properly, but rows are "
                                           "missing)")
                array = _pil_to_array(im, mode)
            orientation = pil_orientation(im)     # after decoding: PNG's EXIF may follow the pixels
        return array if orientation == 1 else np.ascontiguousarray(orient(array, orientation))
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
    bar = progress_bar(height, "to 8-bit sRGB", "row")
    for y0, y1 in _row_bands(height, width):
        band = np.asarray(array[y0:y1])
        if np.issubdtype(band.dtype, np.floating):
            bad += int(band.size - np.count_nonzero(np.isfinite(band)))
        else:
            band = to_linear(band)
        if not bad:                 # past the first bad band: only counting (no cast warning)
            out[y0:y1] = linear_to_uint8(band)
        bar.update(y1 - y0)
    bar.close()
    if bad:
        raise ValueError(f"{bad} of {array.size} values are NaN or infinite; replace them "
                         f"(e.g. numpy.nan_to_num) before using the image")
    return out


def from_linear(x, dtype):
    """Linear light (numpy or torch, any shape) -> `dtype`: "uint8" / "uint16" sRGB codes
    (clipped to [0, 1], rounded to nearest) or "float16" / "float32" linear light as is.
    A torch "uint16" comes back as int32 holding the codes (not every device casts to
    uint16); numpy() then astype(uint16) is exact."""
    if dtype == "uint8":
        return linear_to_uint8(x)
    if _is_torch(x):
        import torch
        if dtype == "uint16":
            srgb = linear_to_srgb(x.float().clamp(0.0, 1.0))
            return torch.round(srgb * 65535).to(torch.int32)
        return x.to(getattr(torch, dtype))
    if dtype == "uint16":
        srgb = linear_to_srgb(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0))
        return np.rint(srgb * 65535).astype(np.uint16)
    return np.asarray(x).astype(dtype)


def check_dtype(path, dtype):
    """ImageError unless `path`'s format stores `dtype` (WIDE_EXTENSIONS)."""
    ext = extension(path, "output")
    if dtype != "uint8" and ext not in WIDE_EXTENSIONS.get(dtype, ()):
        raise ImageError(path, f"{dtype} images can be written as "
                               f"{', '.join(WIDE_EXTENSIONS.get(dtype, ('.npy',)))}, not {ext}")


def _png_chunk(f, kind, data):
    f.write(struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))


def _paeth(raw, up, bpp):
    """PNG filter type 4 of rows `raw` ((h, n) uint8) with the row above the first `up`."""
    a = np.zeros_like(raw, np.int16)
    a[:, bpp:] = raw[:, :-bpp]
    b = np.empty_like(a)
    b[0], b[1:] = up, raw[:-1]
    c = np.zeros_like(a)
    c[:, bpp:] = b[:, :-bpp]
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    predicted = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return (raw - predicted).astype(np.uint8)


def _write_png(path, array, progress):
    """8- or 16-bit PNG (gray, RGB, RGBA) written band by band: Paeth-filtered rows through
    one zlib stream, so memory stays at a band, a progress bar shows the way, and a signal
    stops it between bands (PIL writes no 16-bit colour, and encodes in one call)."""
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    bpp = channels * depth // 8
    header = struct.pack(">IIBBBBB", width, height, depth, {1: 0, 3: 2, 4: 6}[channels], 0, 0, 0)
    packer = zlib.compressobj(6)
    up = np.zeros(width * bpp, np.int16)
    with open(path, "wb") as f, progress_bar(height, f"write {shown_name(path)}", "row",
                                             progress) as bar:
        f.write(b"\x89PNG\r\n\x1a\n")
        _png_chunk(f, b"IHDR", header)
        for y0, y1 in _row_bands(height, width // 4 + 1):       # about 1 M pixels a band
            band = np.asarray(array[y0:y1], ">u2" if depth == 16 else np.uint8)
            raw = np.ascontiguousarray(band).view(np.uint8).reshape(y1 - y0, -1)
            rows = np.empty((y1 - y0, raw.shape[1] + 1), np.uint8)
            rows[:, 0] = 4
            rows[:, 1:] = _paeth(raw.astype(np.int16), up, bpp)
            up = raw[-1].astype(np.int16)
            data = packer.compress(rows)
            if data:
                _png_chunk(f, b"IDAT", data)
            bar.update(y1 - y0)
        _png_chunk(f, b"IDAT", packer.flush())
        _png_chunk(f, b"IEND", b"")


def _write_tiff(path, array, progress):
    """Uncompressed (Big)TIFF through tifffile, in strips of about 1 MB written as they
    come: uint8 / uint16 sRGB or float linear as given (read_image memory-maps it back)."""
    import tifffile
    height, width, channels = array.shape
    if array.dtype == np.float64:
        array = array.astype(np.float32)      # TIFF readers rarely take float64
    rows = max(1, (1 << 20) // (width * channels * array.dtype.itemsize))
    bar = progress_bar(height, f"write {shown_name(path)}", "row", progress)

    def strips():
        for y0 in range(0, height, rows):
            strip = np.ascontiguousarray(array[y0:y0 + rows])
            bar.update(len(strip))
            yield strip[..., 0] if channels == 1 else strip
    try:
        with bar:
            tifffile.imwrite(path, strips(), shape=(height, width) if channels == 1 else
                             array.shape, dtype=array.dtype, rowsperstrip=rows,
                             photometric="minisblack" if channels == 1 else "rgb",
                             extrasamples=("unassalpha",) if channels == 4 else None,
                             bigtiff=array.nbytes > 2**32 - 2**26)
    except OSError as exc:
        if exc.errno is None:   # numpy reports a short write without its reason: ask the file
            with open(path, "ab") as f:
                f.write(b"\0")     # a full disk or a size limit raises here, with its errno
        raise


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


def write_image(path, array, quality=95, progress=None):
    """Write an (H, W) or (H, W, C) array, C in {1, 3, 4}, to any supported format.

    uint8 is sRGB and written as is. uint16 (sRGB) goes to .png (16-bit), .tif and .npy as
    is. Float is linear light: .tif and .npy store it unchanged (float64 as float32 in a
    TIFF), other formats get it encoded to sRGB uint8. JPEG drops alpha; `quality` applies
    to .jpg and .webp. .png and .tif are written band by band (progress: see
    progress_bar). Creates the parent folder. Raises ImageError.
    """
    ext = extension(path)
    if _is_torch(array):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    array = _as_hwc(array, path)
    if array.dtype == np.uint16 and ext not in WIDE_EXTENSIONS["uint16"]:
        raise ImageError(path, f"16-bit images can be written as "
                               f"{', '.join(WIDE_EXTENSIONS['uint16'])}, not {ext}")
    folder = os.path.dirname(os.fspath(path))
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        if ext == ".npy":
            np.save(path, array)
        elif ext in TIFF_EXTENSIONS:
            _write_tiff(path, array, progress)
        elif ext == ".png":
            _write_png(path, array if array.dtype == np.uint16 else to_srgb8(array), progress)
        else:
            _write_pil(path, ext, to_srgb8(array), quality)
    except OSError as e:
        raise ImageError(path, f"cannot write ({e.strerror or e})") from None
