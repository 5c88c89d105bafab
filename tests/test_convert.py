"""convert.py: resampling against PIL's own resize, sizes, dtypes, linear light, the CLI's
one-line errors, and the synthetic chart (deterministic, seamless, high-frequency)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps, JpegImagePlugin

import convert
import images
from conftest import expect_error, leftovers, nan_image, psnr, write_16bit
from convert import chart_tile, main, resized_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = Image.Resampling


@pytest.fixture
def chart_png(tmp_path):
    """A 240 x 180 detail-rich RGB image saved losslessly."""
    path = tmp_path / "chart.png"
    images.write_image(path, chart_tile(0, 180, 0, 240, 240, 180))
    return path


def run_main(argv, capsys):
    """main(argv) in-process -> (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_cli_error(status, err, *needles):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.py: error: ")
    for needle in needles:
        assert str(needle) in lines[0]


# ----------------------------------------------------------------------------- sizes

def test_resized_size_rules():
    assert resized_size(101, 51) == (50, 25)                  # default 0.5, floored (upstream)
    assert resized_size(100, 100, scale=0.29) == (29, 29)     # no float-rounding floor to 28
    assert resized_size(300, 200, out_width=150) == (150, 100)
    assert resized_size(300, 200, out_height=50) == (75, 50)
    assert resized_size(300, 200, out_width=7, out_height=9) == (7, 9)
    for kwargs in ({"scale": 0}, {"scale": -1}, {"out_width": 0}, {"scale": 0.001}):
        with pytest.raises(ValueError):
            resized_size(300, 200, **kwargs)


# ----------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("scale", [0.5, 0.3, 0.125, 1.5])
@pytest.mark.parametrize("filter_name,resample", [("box", R.BOX), ("lanczos", R.LANCZOS)])
def test_matches_pil_resize_of_the_whole_image(tmp_path, chart_png, monkeypatch, scale,
                                               filter_name, resample):
    monkeypatch.setattr(convert, "BAND_PIXELS", 1000)  # many bands: seams must not show
    out = tmp_path / "out.npy"
    convert.convert(chart_png, out, scale=scale, filter=filter_name)
    result = np.load(out)
    expected = np.asarray(Image.open(chart_png).resize(result.shape[1::-1], resample))
    assert result.dtype == np.uint8 and result.shape == expected.shape
    assert psnr(result, expected) >= 40


# (box enlargements are done in one band by design, so they are not in this list)
@pytest.mark.parametrize("scale,filter_name,tolerance", [(0.5, "box", 0), (0.3, "box", 0), (0.5, "lanczos", 1),
                                                         (0.3, "lanczos", 1), (1.5, "lanczos", 1)])
@pytest.mark.parametrize("linear", [False, True])
def test_bands_join_seamlessly(tmp_path, chart_png, monkeypatch, scale, filter_name,
                               tolerance, linear):
    results = []
    for band_pixels in (1000, 10**9):  # many bands vs one
        monkeypatch.setattr(convert, "BAND_PIXELS", band_pixels)
        out = tmp_path / f"out{band_pixels}.npy"
        convert.convert(chart_png, out, scale=scale, filter=filter_name, linear=linear)
        results.append(np.load(out).astype(np.int16))
    # Lanczos kernel positions differ by float rounding between bands: at most 1 code.
    assert np.abs(results[0] - results[1]).max() <= tolerance


def test_jpeg_draft_decoding_matches_pil_box_resize(tmp_path, monkeypatch):
    source = tmp_path / "chart.jpg"
    images.write_image(source, chart_tile(0, 256, 0, 320, 320, 256), quality=95)
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, *args, **kwargs):
        drafts.append(original(self, *args, **kwargs))
        return drafts[-1]

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    convert.convert(source, tmp_path / "out.npy", scale=0.5)
    assert any(box is not None for box in drafts)      # the JPEG really was decoded at 1/2
    result = np.load(tmp_path / "out.npy")
    expected = np.asarray(Image.open(source).resize((160, 128), R.BOX))
    assert result.shape == (128, 160, 3)
    assert psnr(result, expected) >= 40


def test_no_draft_is_exactly_pil_resize_of_the_decoded_jpeg(tmp_path, capsys):
    source = tmp_path / "chart.jpg"
    images.write_image(source, chart_tile(0, 256, 0, 320, 320, 256), quality=95)
    status, _, _ = run_main(["-i", source, "--scale", "0.25", "--no-draft"], capsys)
    assert status == 0
    expected = np.asarray(Image.open(source).resize((80, 64), R.BOX))
    np.testing.assert_array_equal(np.load(tmp_path / "chart.npy"), expected)


def checker(size=8):
    """Black/white 1-pixel checkerboard, (size, size, 3) uint8."""
    board = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


def test_linear_light_averaging(tmp_path):
    images.write_image(tmp_path / "c.png", checker())
    convert.convert(tmp_path / "c.png", tmp_path / "srgb.npy", scale=0.5)
    convert.convert(tmp_path / "c.png", tmp_path / "lin.npy", scale=0.5, linear=True)
    # Averaging codes 0 and 255 gives 127.5 -> 128; averaging light gives 0.5 linear,
    # whose sRGB code is round(255 * (1.055 * 0.5 ** (1 / 2.4) - 0.055)) = 188.
    assert np.all(np.load(tmp_path / "srgb.npy") == 128)
    assert np.all(np.load(tmp_path / "lin.npy") == round(255 * (1.055 * 0.5 ** (1 / 2.4) - 0.055)))


def test_float16_output_is_linear(tmp_path, chart_png):
    convert.convert(chart_png, tmp_path / "u8.npy", scale=0.5)
    convert.convert(chart_png, tmp_path / "f16.npy", scale=0.5, dtype="float16")
    u8, f16 = np.load(tmp_path / "u8.npy"), np.load(tmp_path / "f16.npy")
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, images.SRGB_TO_LINEAR_LUT[u8].astype(np.float16))


def test_float_npy_input_is_resampled_as_linear_light(tmp_path):
    linear = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
    np.save(tmp_path / "lin.npy", linear)
    convert.convert(tmp_path / "lin.npy", tmp_path / "out.npy", scale=0.5)
    block_means = linear.reshape(4, 2, 3, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"),
                                  images.linear_to_uint8(block_means))


def test_sixteen_bit_input(tmp_path):
    deep = np.random.default_rng(1).integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    write_16bit(tmp_path / "deep.png", deep)
    convert.convert(tmp_path / "deep.png", tmp_path / "out.npy", scale=0.5)
    block_means = deep.reshape(3, 2, 4, 2, 3).mean(axis=(1, 3)) / 65535
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), block_means * 255, atol=0.51)


def test_grayscale_stays_one_channel_and_scale_one_is_a_copy(tmp_path):
    gray = np.random.default_rng(2).integers(0, 256, (10, 12, 1)).astype(np.uint8)
    images.write_image(tmp_path / "g.png", gray)
    convert.convert(tmp_path / "g.png", tmp_path / "g.npy", scale=1.0)
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), gray)


def test_image_outputs_equal_the_npy_output(tmp_path, chart_png):
    convert.convert(chart_png, tmp_path / "o.npy", scale=0.5)
    convert.convert(chart_png, tmp_path / "sub" / "o.png", scale=0.5)  # creates sub/
    convert.convert(chart_png, tmp_path / "o.jpg", scale=0.5)
    reference = np.load(tmp_path / "o.npy")
    np.testing.assert_array_equal(images.read_image(tmp_path / "sub" / "o.png"), reference)
    assert psnr(images.read_image(tmp_path / "o.jpg"), reference) >= 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png", "o.jpg", "o.npy", "sub"]


# ----------------------------------------------------------------------------- CLI

def test_cli_default_output_name_and_width(tmp_path, chart_png, capsys):
    status, out, _ = run_main(["-i", chart_png, "--width", 60], capsys)
    assert status == 0 and "60x45" in out
    assert np.load(tmp_path / "chart.npy").shape == (45, 60, 3)
    status, _, _ = run_main(["-i", chart_png, "-o", tmp_path / "h.npy", "--height", 30], capsys)
    assert status == 0 and np.load(tmp_path / "h.npy").shape == (30, 40, 3)


def test_cli_refuses_to_overwrite_its_input(tmp_path, chart_png, capsys):
    before = chart_png.read_bytes()
    status, _, err = run_main(["-i", chart_png, "-o", chart_png], capsys)
    assert_cli_error(status, err, chart_png, "overwrite the input")
    assert chart_png.read_bytes() == before


@pytest.mark.parametrize("argv,needle", [
    (["--scale", "0"], "--scale must be > 0"),
    (["--scale", "-2"], "--scale must be > 0"),
    (["--width", "0"], "--width must be > 0"),
    (["--scale", "0.001"], "0 pixels"),
    (["--scale", "0.5", "--width", "10"], "cannot be combined"),
    (["--dtype", "float16", "-o", "{tmp}/x.png"], "float16 needs a .npy"),
    (["-o", "{tmp}/x.gif"], "unsupported output extension"),
    (["--max-pixels", "100"], "exceeds the limit of 100"),
    (["--max-pixels", "-1"], "expected an integer >= 0"),
    (["--quality", "101"], "expected an integer 1..100"),
    (["--quality", "x"], "invalid integer value"),
])
def test_cli_errors_are_one_line(tmp_path, chart_png, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    status, _, err = run_main(["-i", chart_png, *argv], capsys)
    assert_cli_error(status, err, needle)


def test_cli_missing_and_broken_inputs(tmp_path, capsys):
    status, _, err = run_main(["-i", tmp_path / "absent.jpg"], capsys)
    assert_cli_error(status, err, tmp_path / "absent.jpg", "no such file")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    status, _, err = run_main(["-i", broken], capsys)
    assert_cli_error(status, err, broken)
    assert not (tmp_path / "broken.npy").exists()
    status, _, err = run_main([], capsys)
    assert_cli_error(status, err, "-i/--input is required")


def test_max_pixels_zero_lifts_the_limit(tmp_path, chart_png, capsys):
    status, _, _ = run_main(["-i", chart_png, "--max-pixels", "0"], capsys)
    assert status == 0


@pytest.mark.parametrize("argv,status,needle", [
    (["--scale", "0"], 2, "--scale must be > 0"),
    (["--bogus"], 2, "unrecognized arguments"),
])
def test_cli_subprocess_exit_status(chart_png, argv, status, needle):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "-i",
                             str(chart_png), *argv], capture_output=True, text=True)
    assert result.returncode == status
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("convert.py: error: ") and needle in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- chart

def test_chart_is_deterministic_and_independent_of_tiling():
    width, height = 700, 530
    whole = chart_tile(0, height, 0, width, width, height)
    assert whole.shape == (height, width, 3) and whole.dtype == np.uint8
    np.testing.assert_array_equal(chart_tile(0, height, 0, width, width, height), whole)
    tiled = np.empty_like(whole)
    for y0 in range(0, height, 97):
        for x0 in range(0, width, 131):
            y1, x1 = min(height, y0 + 97), min(width, x0 + 131)
            tiled[y0:y1, x0:x1] = chart_tile(y0, y1, x0, x1, width, height)
    np.testing.assert_array_equal(tiled, whole)
    banded = np.concatenate([b for _, b in convert.chart_bands(width, height, band_rows=7)])
    np.testing.assert_array_equal(banded, whole)


def test_chart_has_energy_at_the_highest_frequencies():
    chart = chart_tile(0, 1024, 0, 1536, 1536, 1024).astype(np.int16)
    # A smooth photo has mean neighbour differences of a few codes; the chart's zone
    # plates, 1-pixel gratings, glyph strokes and noise keep it far above that.
    assert np.abs(np.diff(chart, axis=1)).mean() > 30
    assert np.abs(np.diff(chart, axis=0)).mean() > 30
    # Every channel varies, and the whole range is used.
    assert chart.min() <= 5 and chart.max() >= 240
    assert all(chart[:, :, c].std() > 30 for c in range(3))


def test_cli_chart_npy_and_png(tmp_path, capsys):
    status, _, _ = run_main(["--chart", "300x200", "-o", tmp_path / "c.npy"], capsys)
    assert status == 0
    chart = images.read_image(tmp_path / "c.npy")
    assert isinstance(chart, np.memmap)
    np.testing.assert_array_equal(chart, chart_tile(0, 200, 0, 300, 300, 200))
    status, _, _ = run_main(["--chart", "300x200", "-o", tmp_path / "c.png"], capsys)
    assert status == 0
    np.testing.assert_array_equal(images.read_image(tmp_path / "c.png"), chart)
    status, _, err = run_main(["--chart", "0x5", "-o", tmp_path / "z.npy"], capsys)
    assert_cli_error(status, err, "WIDTHxHEIGHT")
    status, _, err = run_main(["--chart", "20000x20000", "-o", tmp_path / "z.png"], capsys)
    assert_cli_error(status, err, "write .npy")


# --- photos as shown, TIFFs as scientists have them, a clean stop ------------------------

def jpeg_with_orientation(path, stored, orientation):
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[images.ORIENTATION_TAG] = orientation
    im.save(path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_photos_are_converted_the_way_they_are_shown(tmp_path, orientation):
    stored = chart_tile(0, 96, 0, 128, 128, 96)
    jpeg_with_orientation(tmp_path / "photo.jpg", stored, orientation)
    with Image.open(tmp_path / "photo.jpg") as im:
        shown = np.asarray(ImageOps.exif_transpose(im))
    convert.convert(tmp_path / "photo.jpg", tmp_path / "full.npy", scale=1, draft=False)
    np.testing.assert_array_equal(np.load(tmp_path / "full.npy"), shown)
    # halved through the JPEG draft: the upright image halved (PIL's two passes swap with a
    # turn, so a code may round the other way)
    convert.convert(tmp_path / "photo.jpg", tmp_path / "half.npy", scale=0.5)
    jpeg_with_orientation(tmp_path / "upright.jpg", stored, 1)
    convert.convert(tmp_path / "upright.jpg", tmp_path / "upright.npy", scale=0.5)
    half = np.load(tmp_path / "half.npy")
    expected = images.orient(np.load(tmp_path / "upright.npy"), orientation)
    assert half.shape == expected.shape == ((64, 48, 3) if orientation >= 5 else (48, 64, 3))
    assert np.abs(half.astype(int) - expected).max() <= 1


def test_float_tiff_is_resampled_as_linear_light(tmp_path):
    linear = np.random.default_rng(0).random((40, 60, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "hdr.tif", linear, photometric="rgb", tile=(16, 16),
                     compression="zlib")
    convert.convert(tmp_path / "hdr.tif", tmp_path / "half.npy", scale=0.5, dtype="float16")
    expected = linear.reshape(20, 2, 30, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(np.load(tmp_path / "half.npy"), expected, atol=1e-3)


@pytest.mark.parametrize("layout", ["strips", "tiles", "planar"])
def test_every_tiff_layout_converts_like_the_plain_one(tmp_path, layout):
    from test_images import write_tiff
    pixels = chart_tile(0, 90, 0, 130, 130, 90)
    write_tiff(tmp_path / "plain.tif", pixels, "contiguous")
    write_tiff(tmp_path / "other.tif", pixels, layout)
    for name in ("plain", "other"):
        convert.convert(tmp_path / f"{name}.tif", tmp_path / f"{name}.npy", scale=0.37)
    np.testing.assert_array_equal(np.load(tmp_path / "other.npy"), np.load(tmp_path / "plain.npy"))


def big_tiff(path, width, height):
    """An uncompressed RGB BigTIFF written band by band (never whole in this process)."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write((chart_tile(y0, min(height, y0 + 256), 0, width, width, height)
                   for y0 in range(0, height, 256)), shape=(height, width, 3), dtype=np.uint8,
                  photometric="rgb", rowsperstrip=256)


def test_gigapixel_tiff_converts_in_bounded_memory(tmp_path):
    """convert.py --scale 0.5 of an uncompressed RGB BigTIFF: peak resident memory at most
    2 bytes per input pixel, interpreter included (48 Mpx here; 144 Mpx measured 0.37)."""
    width, height = 8000, 6000
    big_tiff(tmp_path / "big.tif", width, height)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking (pytest) process
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import convert; "
              "convert.main(['-i', sys.argv[2], '-o', sys.argv[3], '--scale', '0.5']); "
              "print([int(line.split()[1]) * 1024 for line in open('/proc/self/status') "
              "if line.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", script, ROOT, str(tmp_path / "big.tif"),
                             str(tmp_path / "half.npy")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split()[-1])
    assert peak <= 2 * width * height, f"{peak / (width * height):.2f} bytes per input pixel"
    half = np.load(tmp_path / "half.npy", mmap_mode="r")
    assert half.shape == (3000, 4000, 3)
    top = chart_tile(0, 2, 0, width, width, height).astype(np.float64)
    expected = top.reshape(1, 2, 4000, 2, 3).mean(axis=(1, 3))
    assert np.abs(half[:1] - expected).max() <= 1            # box average, rounded


@pytest.mark.parametrize("argv, signum", [
    (["--chart", "16384x8192", "-o", "chart.npy"], signal.SIGTERM),
    (["-i", "big.tif", "-o", "copy.png", "--scale", "1"], signal.SIGINT)])
def test_a_signal_stops_convert_cleanly(tmp_path, argv, signum):
    if "big.tif" in argv:
        big_tiff(tmp_path / "big.tif", 4096, 4096)
    before = set(os.listdir(tmp_path))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "convert.py"), *argv],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(2.5)
    assert process.poll() is None, "convert finished before the signal"
    sent = time.monotonic()
    process.send_signal(signum)
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert process.returncode == 128 + signum
    output = argv[argv.index("-o") + 1]
    assert err.strip().splitlines()[-1] == (f"convert.py: stopped by {signum.name}; {output} was "
                                            f"not written")
    assert set(os.listdir(tmp_path)) == before                # no temporary file left


CONVERT_ERRORS = [
    (["--scale", "inf"], "--scale must be > 0 and finite"),
    (["--scale", "nan"], "--scale must be > 0 and finite"),
    (["--width", "1000000000"], "free"),
]


@pytest.mark.parametrize("flags, needle", CONVERT_ERRORS,
                         ids=[" ".join(f) for f, _ in CONVERT_ERRORS])
def test_convert_errors_are_one_line(tmp_path, chart_png, capsys, flags, needle):
    out = tmp_path / "out" / "x.npy"
    expect_error(capsys, convert.main, ["-i", str(chart_png), "-o", str(out), *flags], needle,
                 prog="convert.py")
    assert not out.exists()


def test_non_finite_pixels_are_refused(tmp_path, capsys):
    source = nan_image(tmp_path / "hdr.npy")
    for flags in ([], ["--scale", "1"], ["--dtype", "float16"]):
        out = tmp_path / "small.npy"
        expect_error(capsys, convert.main, ["-i", source, "-o", str(out), *flags],
                     "3 of 2880 values are NaN or infinite", prog="convert.py")
        assert not out.exists() and leftovers(tmp_path) == []
