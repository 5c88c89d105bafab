"""images.py: format round-trips, sRGB <-> linear against the IEC 61966-2-1 formulas,
memory mapping, and one-line errors naming the file."""


import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageOps

import images
import outputs
from conftest import psnr, write_16bit
from images import ImageError, read_image, write_image


def noise(shape, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


def smooth(height=48, width=64):
    """(H, W, 3) uint8 gradients: lossy codecs reproduce these closely."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = [x / (width - 1), y / (height - 1), 0.5 + 0.4 * np.sin(x / 7.0) * np.cos(y / 5.0)]
    return np.rint(np.stack(rgb, axis=2) * 255).astype(np.uint8)


def srgb_to_linear_ref(c):
    """The IEC 61966-2-1 decoding formula, scalar float64, written out independently."""
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def linear_to_srgb_ref(v):
    return 12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055


def assert_one_line_naming(error, path):
    message = str(error.value)
    assert str(path) in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff", ".bmp", ".npy"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_lossless_uint8_round_trip_is_exact(tmp_path, ext, channels):
    array = noise((13, 17, channels))
    path = tmp_path / f"x{ext}"
    write_image(path, array)
    back = read_image(path, keep_alpha=True)
    if ext == ".bmp" and channels == 4:
        array = array[:, :, :3]  # PIL reads 32-bit BMPs as RGB: the colour must survive
    assert back.dtype == np.uint8 and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_two_dimensional_array_reads_back_with_one_channel(tmp_path):
    array = noise((9, 11))
    write_image(tmp_path / "g.png", array)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), array[:, :, None])


@pytest.mark.parametrize("ext,quality,min_psnr", [(".jpg", 95, 38.0), (".jpeg", 95, 38.0),
                                                   (".webp", 95, 33.0)])
def test_lossy_round_trip_psnr(tmp_path, ext, quality, min_psnr):
    array = smooth()
    write_image(tmp_path / f"x{ext}", array, quality=quality)
    back = read_image(tmp_path / f"x{ext}")
    assert back.dtype == np.uint8 and back.shape == array.shape
    assert psnr(back, array) >= min_psnr


@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_sixteen_bit_round_trip_keeps_all_bits(tmp_path, ext, channels):
    array = noise((7, 10, channels), np.uint16, seed=channels)
    write_16bit(tmp_path / f"x{ext}", array)
    back = read_image(tmp_path / f"x{ext}", keep_alpha=True)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, array)


def test_sixteen_bit_read_drops_alpha_unless_asked(tmp_path):
    array = noise((5, 6, 4), np.uint16)
    write_16bit(tmp_path / "a.png", array)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), array[:, :, :3])


def test_alpha_dropped_unless_asked(tmp_path):
    array = noise((5, 6, 4))
    write_image(tmp_path / "a.png", array)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), array[:, :, :3])


def test_palette_and_gray_alpha_images_are_normalised(tmp_path):
    codes = noise((6, 8), seed=3) % 4
    palette = [10, 20, 30, 200, 100, 0, 0, 255, 0, 255, 255, 255]
    im = Image.fromarray(codes.astype(np.uint8), "P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png")
    expected = np.array(palette, np.uint8).reshape(4, 3)[codes]
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)

    gray_alpha = noise((6, 8, 2), seed=4)
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), gray_alpha[:, :, :1])


def test_float_array_is_written_as_srgb_of_the_linear_values(tmp_path):
    linear = np.random.default_rng(1).random((6, 7, 3)).astype(np.float32)
    write_image(tmp_path / "f.png", linear)
    expected = [[[round(linear_to_srgb_ref(float(v)) * 255) for v in px] for px in row]
                for row in linear]
    np.testing.assert_array_equal(read_image(tmp_path / "f.png"), np.array(expected))


def test_float_npy_stays_linear_float_and_is_memory_mapped(tmp_path):
    linear = np.random.default_rng(2).random((5, 4, 3)).astype(np.float16)
    write_image(tmp_path / "f.npy", linear)
    back = read_image(tmp_path / "f.npy")
    assert isinstance(back, np.memmap) and back.dtype == np.float16
    np.testing.assert_array_equal(back, linear)


def test_npy_is_a_read_only_memmap_and_2d_becomes_a_view(tmp_path):
    np.save(tmp_path / "g.npy", noise((6, 5)))
    back = read_image(tmp_path / "g.npy")
    assert isinstance(back, np.memmap) and back.shape == (6, 5, 1)
    assert not back.flags.writeable
    assert str(back.filename).endswith("g.npy")  # backed by the file, not a copy
    np.save(tmp_path / "a.npy", noise((6, 5, 4)))
    rgb = read_image(tmp_path / "a.npy")
    assert isinstance(rgb, np.memmap) and rgb.shape == (6, 5, 3)


def test_write_image_creates_parent_folder(tmp_path):
    path = tmp_path / "new" / "deeper" / "x.png"
    write_image(path, noise((3, 4, 3)))
    assert read_image(path).shape == (3, 4, 3)


# ----------------------------------------------------------------------------- colour

def test_srgb_transfer_functions_match_the_formulas_in_float64():
    grid = np.concatenate([np.linspace(0, 1, 2001), [0.04045, 0.0031308, 0.04045 + 1e-12]])
    to_lin = np.array([srgb_to_linear_ref(float(c)) for c in grid])
    to_srgb = np.array([linear_to_srgb_ref(float(v)) for v in grid])
    np.testing.assert_allclose(images.srgb_to_linear(grid), to_lin, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(images.linear_to_srgb(grid), to_srgb, rtol=1e-14, atol=1e-16)
    # The standard's two thresholds do not quite meet (0.04045 / 12.92 > 0.0031308), so
    # the round trip is exact only to ~3e-8 right at the knee.
    np.testing.assert_allclose(images.linear_to_srgb(images.srgb_to_linear(grid)), grid,
                               atol=5e-8)


def test_lut_equals_the_formula_for_every_code():
    lut = images.SRGB_TO_LINEAR_LUT
    assert lut.dtype == np.float32 and lut.shape == (256,)
    expected = np.array([srgb_to_linear_ref(k / 255) for k in range(256)], np.float32)
    np.testing.assert_array_equal(lut, expected)
    assert lut[0] == 0 and lut[255] == 1


def test_torch_and_numpy_agree_and_gradients_stay_finite():
    x64 = np.linspace(-0.1, 1.1, 241)
    t = torch.tensor(x64, requires_grad=True)
    for fn in (images.srgb_to_linear, images.linear_to_srgb):
        out = fn(t)
        assert isinstance(out, torch.Tensor)
        np.testing.assert_allclose(out.detach().numpy(), fn(x64), rtol=1e-12, atol=1e-15)
        (grad,) = torch.autograd.grad(out.sum(), t)
        assert torch.isfinite(grad).all()


def test_transfer_functions_keep_float32():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    assert images.srgb_to_linear(x).dtype == np.float32
    assert images.linear_to_srgb(torch.from_numpy(x)).dtype == torch.float32


def test_transfer_functions_refuse_integers():
    with pytest.raises(TypeError):
        images.srgb_to_linear(np.arange(3, dtype=np.uint8))


def test_to_linear_for_every_dtype_read_image_returns():
    codes8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    np.testing.assert_array_equal(images.to_linear(codes8), images.SRGB_TO_LINEAR_LUT[codes8])
    codes16 = np.array([0, 1, 1000, 2651, 40000, 65535], np.uint16)
    expected16 = [srgb_to_linear_ref(c / 65535) for c in codes16.tolist()]
    np.testing.assert_allclose(images.to_linear(codes16), expected16, rtol=1e-6, atol=1e-9)
    linear = np.array([0.25, 0.5], np.float16)
    out = images.to_linear(linear)
    assert out.dtype == np.float32 and np.array_equal(out, linear.astype(np.float32))
    torch_out = images.to_linear(torch.from_numpy(codes8))
    np.testing.assert_array_equal(torch_out.numpy(), images.SRGB_TO_LINEAR_LUT[codes8])


def test_linear_to_uint8_inverts_the_lut_and_clips():
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(images.linear_to_uint8(images.SRGB_TO_LINEAR_LUT), codes)
    tensor = images.linear_to_uint8(torch.from_numpy(images.SRGB_TO_LINEAR_LUT.copy()))
    assert tensor.dtype == torch.uint8 and np.array_equal(tensor.numpy(), codes)
    np.testing.assert_array_equal(images.linear_to_uint8(np.array([-0.5, 2.0])), [0, 255])
    # 0.5 linear is sRGB 0.7354 -> 187.5... -> 188
    assert images.linear_to_uint8(np.array([0.5]))[0] == round(linear_to_srgb_ref(0.5) * 255)


# ----------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    for name in ("nope.png", "nope.npy"):
        with pytest.raises(ImageError, match="no such file") as error:
            read_image(tmp_path / name)
        assert_one_line_naming(error, tmp_path / name)


def test_unsupported_extension_on_read_and_write(tmp_path):
    path = tmp_path / "x.gif"
    path.write_bytes(b"GIF89a")
    with pytest.raises(ImageError, match="unsupported") as error:
        read_image(path)
    assert_one_line_naming(error, path)
    with pytest.raises(ImageError, match="unsupported") as error:
        write_image(tmp_path / "y.gif", noise((2, 2, 3)))
    assert_one_line_naming(error, tmp_path / "y.gif")


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_image(tmp_path, ext):
    path = tmp_path / f"t{ext}"
    write_image(path, noise((64, 64, 3)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as error:
        read_image(path)
    assert_one_line_naming(error, path)


def test_garbage_bytes_are_unreadable(tmp_path):
    for name in ("bad.png", "bad.npy"):
        path = tmp_path / name
        path.write_bytes(b"this is not an image\n" * 10)
        with pytest.raises(ImageError) as error:
            read_image(path)
        assert_one_line_naming(error, path)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 3), (4, 4, 2), (4, 4, 5), (0, 4, 3)])
def test_wrong_rank_or_channels(tmp_path, shape):
    array = np.zeros(shape, np.uint8)
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ImageError, match="expected an") as error:
        read_image(tmp_path / "bad.npy")
    assert_one_line_naming(error, tmp_path / "bad.npy")
    with pytest.raises(ImageError, match="expected an") as error:
        write_image(tmp_path / "bad.png", array)
    assert_one_line_naming(error, tmp_path / "bad.png")


def test_unsupported_dtypes(tmp_path):
    with pytest.raises(ImageError, match="16-bit") as error:
        write_image(tmp_path / "x.jpg", np.zeros((2, 2, 3), np.uint16))
    assert_one_line_naming(error, tmp_path / "x.jpg")
    np.save(tmp_path / "i.npy", np.zeros((2, 2, 3), np.int32))
    with pytest.raises(ImageError, match="dtype") as error:
        read_image(tmp_path / "i.npy")
    assert_one_line_naming(error, tmp_path / "i.npy")


def test_pixel_limit_is_explicit_and_can_be_lifted(tmp_path):
    path = tmp_path / "big.png"
    write_image(path, noise((20, 30, 3)))
    with pytest.raises(ImageError, match="600 pixels exceeds the limit of 599") as error:
        read_image(path, max_pixels=599)
    assert_one_line_naming(error, path)
    assert read_image(path, max_pixels=None).shape == (20, 30, 3)
    assert images.MAX_IMAGE_PIXELS == 2**32
    saved = Image.MAX_IMAGE_PIXELS
    read_image(path)
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's global is left as it was


def test_to_srgb8_requantises_16_bit_and_encodes_linear_float():
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    # a 16-bit sRGB value v * 257 is exactly the 8-bit code v; a linear float is its LUT value
    np.testing.assert_array_equal(images.to_srgb8(codes.astype(np.uint16) * 257), codes)
    np.testing.assert_array_equal(images.to_srgb8(images.SRGB_TO_LINEAR_LUT[codes]), codes)
    assert images.to_srgb8(codes) is codes


# --- orientation, TIFF through tifffile, wide outputs ------------------------------------

def save_with_orientation(path, array, orientation):
    """An image file whose EXIF says to show `array` turned by `orientation` (1..8)."""
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[images.ORIENTATION_TAG] = orientation
    im.save(path, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_shows_it(tmp_path, orientation):
    stored = noise((5, 7, 3))
    path = tmp_path / "photo.png"
    save_with_orientation(path, stored, orientation)
    with Image.open(path) as im:
        shown = np.asarray(ImageOps.exif_transpose(im))
    back = read_image(path)
    np.testing.assert_array_equal(back, shown)
    assert back.shape == ((7, 5, 3) if orientation >= 5 else (5, 7, 3))


def test_tiff_orientation_tag_is_applied(tmp_path):
    stored = noise((5, 7, 3))
    path = tmp_path / "turned.tif"
    tifffile.imwrite(path, stored, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    np.testing.assert_array_equal(read_image(path), np.rot90(stored, -1))   # 90 degrees clockwise


def write_tiff(path, array, layout):
    """(H, W, C) array -> TIFF in one of the layouts scientists' tools write."""
    photometric = "minisblack" if array.shape[2] == 1 else "rgb"
    data = array[..., 0] if array.shape[2] == 1 else array
    extra = dict(extrasamples=("unassalpha",)) if array.shape[2] == 4 else {}
    options = {"contiguous": dict(), "bigtiff": dict(bigtiff=True),
               "strips": dict(rowsperstrip=3, compression="zlib"),
               "tiles": dict(tile=(16, 16), compression="zlib"),
               "planar": dict(planarconfig="separate", rowsperstrip=4)}[layout]
    if layout == "planar" and array.shape[2] > 1:
        data = np.moveaxis(array, 2, 0)
    tifffile.imwrite(path, data, photometric=photometric, **options, **extra)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "bigtiff", "strips", "tiles", "planar"])
def test_tiff_reads_every_dtype_channel_count_and_layout(tmp_path, dtype, channels, layout):
    rng = np.random.default_rng(channels)
    if np.issubdtype(dtype, np.floating):
        array = rng.random((37, 21, channels)).astype(dtype)
    else:
        array = rng.integers(0, np.iinfo(dtype).max, (37, 21, channels), endpoint=True)
        array = array.astype(dtype)
    path = tmp_path / "x.tif"
    write_tiff(path, array, layout)
    back = read_image(path, keep_alpha=True)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, array)
    mapped = layout in ("contiguous", "bigtiff") or (layout == "planar" and channels == 1)
    assert isinstance(back, np.memmap) == mapped           # uncompressed, in one run
    if channels == 4:
        np.testing.assert_array_equal(read_image(path), array[:, :, :3])


def test_tiff_bands_decode_rows_across_strip_and_tile_edges(tmp_path):
    array = noise((50, 40, 3), np.uint16)
    for layout in ("strips", "tiles", "planar"):
        write_tiff(tmp_path / f"{layout}.tif", array, layout)
        bands = images.TiffBands.usable(str(tmp_path / f"{layout}.tif"))
        for y0, y1 in ((0, 1), (2, 19), (15, 17), (30, 50), (0, 50)):
            np.testing.assert_array_equal(bands.rows(y0, y1), array[y0:y1])
        bands.close()


def test_truncated_tiffs_are_one_line_errors(tmp_path):
    for layout in ("contiguous", "strips"):
        path = tmp_path / f"{layout}.tif"
        write_tiff(path, noise((64, 64, 3)), layout)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(ImageError, match="truncated") as error:
            read_image(path)
        assert_one_line_naming(error, path)


@pytest.mark.parametrize("ext, dtype", [(".png", np.uint16), (".tif", np.uint16),
                                        (".tif", np.float16), (".tif", np.float32),
                                        (".npy", np.float16), (".png", np.uint8)])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_wide_outputs_round_trip_exactly(tmp_path, ext, dtype, channels):
    rng = np.random.default_rng(3)
    if np.issubdtype(dtype, np.floating):
        array = rng.random((9, 300, channels)).astype(dtype)
    else:
        array = rng.integers(0, np.iinfo(dtype).max, (9, 300, channels), endpoint=True)
        array = array.astype(dtype)
    write_image(tmp_path / f"x{ext}", array)
    np.testing.assert_array_equal(read_image(tmp_path / f"x{ext}", keep_alpha=True), array)
    if ext == ".png":       # a PNG any reader takes: PIL decodes it to the same high bytes
        with Image.open(tmp_path / f"x{ext}") as im:
            assert im.size == (300, 9)
            assert im.mode in ("L", "I;16", "RGB", "RGBA", "I;16B", "I")


def test_formats_refuse_what_they_cannot_hold(tmp_path):
    for ext, dtype in ((".jpg", "uint16"), (".png", "float32"), (".webp", "float16")):
        with pytest.raises(ImageError, match=f"{dtype} images can be written as") as error:
            images.check_dtype(tmp_path / f"x{ext}", dtype)
        assert_one_line_naming(error, tmp_path / f"x{ext}")


def test_from_linear_matches_the_srgb_formula():
    linear = np.array([0.0, 0.001, 0.2, 0.5, 1.0, 1.5, -0.1])
    expected = [round(linear_to_srgb_ref(v) * 65535) for v in np.clip(linear, 0, 1).tolist()]
    np.testing.assert_array_equal(images.from_linear(linear, "uint16"), expected)
    np.testing.assert_array_equal(
        images.from_linear(torch.tensor(linear, dtype=torch.float32), "uint16").numpy(), expected)
    assert images.from_linear(linear, "float16").dtype == np.float16


