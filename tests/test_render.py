"""Tests for render.py: pixel-centre sampling, crops, seamless tiles, memmap output, zoom
sequences (GIF/WebP/PNG frames/ffmpeg pipe) and the command line from a real checkpoint."""
import os
import re
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import images
import outputs
import render
import tiles
from conftest import mlp_field, reference_render
from field import FieldConfig, load_field

RENDER_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "render.py")


# --- core -------------------------------------------------------------------------------

def test_native_render_equals_forward_on_pixel_centres():
    field = mlp_field()
    image = render.render_region(field, 40, 24)
    assert image.dtype == np.uint8 and image.shape == (24, 40, 3)
    np.testing.assert_array_equal(image, reference_render(field, 40, 24))
    assert len(np.unique(image)) > 50  # a field with structure, not a constant


def test_hashgrid_field_native_and_tiled_equal_forward():
    # The real network (FieldConfig: hash grid + MLP) with random weights.
    torch.manual_seed(0)
    field = FieldConfig(48, 32, 3, n_levels=4, log2_hashmap_size=10).build().eval()
    with torch.no_grad():
        for parameter in field.parameters():
            parameter.normal_(0.0, 0.5)
    expected = reference_render(field, 48, 32)
    assert len(np.unique(expected)) > 50
    for max_batch in (5, 48 * 3 + 1, 2**18):
        np.testing.assert_array_equal(render.render_region(field, 48, 32, max_batch=max_batch),
                                      expected)


def test_analytic_callable_single_channel():
    # colour = x: column c of an 8-wide render is linear_to_uint8((c + 0.5) / 8).
    image = render.render_region(lambda xy: xy[:, :1], 8, 3)
    expected = images.linear_to_uint8((np.arange(8) + 0.5) / 8)
    assert image.shape == (3, 8, 1)
    np.testing.assert_array_equal(image[..., 0], np.broadcast_to(expected, (3, 8)))


@pytest.mark.parametrize("region, size, crop", [
    # Dyadic sizes and regions: the region's pixel centres equal the crop's bit for bit.
    ((0.25, 0.25, 0.75, 0.75), (32, 16), (slice(8, 24), slice(16, 48))),
    ((0.5, 0.0, 0.625, 0.5), (8, 16), (slice(0, 16), slice(32, 40))),
])
def test_region_render_equals_crop_of_larger_render(region, size, crop):
    field = mlp_field()
    big = render.render_region(field, 64, 32)
    part = render.render_region(field, *size, region)
    np.testing.assert_array_equal(part, big[crop])


def test_render_above_source_resolution_is_a_crop_of_a_bigger_render():
    field = mlp_field()
    zoomed = render.render_region(field, 32, 32, (0.5, 0.5, 0.75, 0.75))
    huge = render.render_region(field, 128, 128)
    np.testing.assert_array_equal(zoomed, huge[64:96, 64:96])


@pytest.mark.parametrize("max_batch", [1, 5, 37, 40, 3 * 40 + 7])
def test_tiled_equals_untiled_exactly(max_batch):
    field = mlp_field()
    region = (0.1, 0.2, 0.7, 0.9)
    untiled = render.render_region(field, 40, 30, region, max_batch=2**30)
    tiled = render.render_region(field, 40, 30, region, max_batch=max_batch)
    np.testing.assert_array_equal(tiled, untiled)


@pytest.mark.parametrize("width, height, max_batch", [(7, 5, 1), (7, 5, 6), (7, 5, 14),
                                                      (7, 5, 15), (7, 5, 100), (10, 3, 4)])
def test_tiles_cover_every_pixel_once_within_budget(width, height, max_batch):
    hits = np.zeros((height, width), dtype=int)
    for (r0, r1), (c0, c1) in tiles.tiles(width, height, max_batch):
        assert 0 < (r1 - r0) * (c1 - c0) <= max_batch
        hits[r0:r1, c0:c1] += 1
    np.testing.assert_array_equal(hits, 1)


def test_pixel_centres_match_formula_and_do_not_depend_on_tile():
    region = (0.1, 0.3, 0.7, 0.8)
    full = tiles.pixel_centres(region, 9, 7, (0, 7), (0, 9)).reshape(7, 9, 2)
    c, r = 4, 5
    assert full[r, c, 0] == pytest.approx(0.1 + (c + 0.5) * 0.6 / 9, abs=1e-15)
    assert full[r, c, 1] == pytest.approx(0.3 + (r + 0.5) * 0.5 / 7, abs=1e-15)
    piece = tiles.pixel_centres(region, 9, 7, (2, 6), (3, 8)).reshape(4, 5, 2)
    np.testing.assert_array_equal(piece, full[2:6, 3:8])


def test_out_memmap_is_filled_in_place(tmp_path):
    field = mlp_field()
    path = tmp_path / "out.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(24, 40, 3))
    returned = render.render_region(field, 40, 24, out=out, max_batch=100)
    assert returned is out
    out.flush()
    del out, returned
    np.testing.assert_array_equal(np.load(path), reference_render(field, 40, 24))


@pytest.mark.parametrize("out, message", [
    (np.zeros((24, 40, 1), np.uint8), "channels"),
    (np.zeros((24, 41, 3), np.uint8), "shape"),
    (np.zeros((24, 40, 3), np.float32), "uint8"),
])
def test_out_must_match(out, message):
    with pytest.raises(ValueError, match=message):
        render.render_region(mlp_field(), 40, 24, out=out)


def test_field_device_follows_parameters():
    assert tiles.field_device(torch.nn.Linear(2, 3).to("meta")) == torch.device("meta")
    assert tiles.field_device(lambda xy: xy) == torch.device("cpu")


@pytest.mark.parametrize("region", [(-0.1, 0, 1, 1), (0, 0, 1.5, 1), (0.5, 0, 0.5, 1),
                                    (0, 0.8, 1, 0.2), (0, 0, float("nan"), 1), (0, 0, 1)])
def test_bad_regions_rejected(region):
    with pytest.raises(ValueError):
        render.check_region(region)


def test_output_size_rules():
    half = (0.0, 0.0, 0.5, 1.0)  # 50 x 80 source pixels of a 100 x 80 image
    assert render.output_size(100, 80) == (100, 80)
    assert render.output_size(100, 80, half) == (50, 80)
    assert render.output_size(100, 80, half, width=25) == (25, 40)
    assert render.output_size(100, 80, half, height=160) == (100, 160)
    assert render.output_size(100, 80, half, width=7, height=9) == (7, 9)
    assert render.output_size(100, 80, half, scale=2.5) == (125, 200)
    assert render.output_size(100, 80, scale=1e-9) == (1, 1)
    for bad in ({"width": 0}, {"height": -3}, {"scale": 0.0}, {"scale": 2.0, "width": 5}):
        with pytest.raises(ValueError):
            render.output_size(100, 80, **bad)


# --- zoom -------------------------------------------------------------------------------

def test_zoom_factors_hold_ease_hold_ease():
    z = render.zoom_factors(12, 16.0)
    # Frame i sits at time i/12: holds at 1 for [0, 1/6), eases in over [1/6, 1/2),
    # holds at 16 over [1/2, 2/3), eases out over [2/3, 1). Half way through an ease the
    # cosine ease is 0.5, i.e. the geometric middle 16 ** 0.5 = 4.
    expected = {0: 1, 1: 1, 2: 1, 4: 4, 6: 16, 7: 16, 8: 16, 10: 4}
    for i, value in expected.items():
        assert z[i] == pytest.approx(value, rel=1e-12)
    assert np.all(np.diff(z[2:7]) > 0) and np.all(np.diff(z[8:]) < 0)
    # Geometric: log-zoom steps are symmetric around the middle of the ease.
    assert np.log(z[3]) + np.log(z[5]) == pytest.approx(np.log(16), rel=1e-12)


@pytest.mark.parametrize("n, zoom", [(1, 2.0), (10, 0.5), (10, float("inf"))])
def test_zoom_factors_reject_bad_input(n, zoom):
    with pytest.raises(ValueError):
        render.zoom_factors(n, zoom)


def test_zoom_regions_shrink_towards_center_and_stay_inside():
    regions = np.array(render.zoom_regions(12, 8.0, center=(0.3, 0.6)))
    z = render.zoom_factors(12, 8.0)
    np.testing.assert_allclose(regions[:, 2] - regions[:, 0], 1 / z, rtol=1e-12)
    np.testing.assert_allclose(regions[:, 3] - regions[:, 1], 1 / z, rtol=1e-12)
    np.testing.assert_array_equal(regions[0], [0, 0, 1, 1])
    full = regions[6]  # full zoom: centred on the target
    np.testing.assert_allclose(full, [0.3 - 1 / 16, 0.6 - 1 / 16, 0.3 + 1 / 16, 0.6 + 1 / 16])
    assert regions.min() >= 0 and regions.max() <= 1


def test_zoom_center_near_edge_is_pulled_inside_base():
    base = (0.5, 0.0, 1.0, 0.5)
    regions = np.array(render.zoom_regions(12, 2.0, center=(0.99, 0.01), base=base))
    np.testing.assert_allclose(regions[6], [0.75, 0.0, 1.0, 0.25], atol=1e-15)
    assert np.all(regions[:, 0] >= 0.5) and np.all(regions[:, 2] <= 1.0)
    assert np.all(regions[:, 1] >= 0.0) and np.all(regions[:, 3] <= 0.5)
    with pytest.raises(ValueError, match="outside"):
        render.zoom_regions(12, 2.0, center=(0.2, 0.2), base=base)


def zoom_frames(n=6, channels=1):
    regions = render.zoom_regions(n, 4.0, center=(0.4, 0.6))
    return list(render.render_frames(mlp_field(channels), 24, 16, regions, max_batch=100))


def expand_by_duration(path, frame_ms):
    """Frames of an animation, each repeated duration / frame_ms times (Pillow stores runs
    of identical frames, such as the holds, as one longer frame)."""
    shown = []
    with Image.open(path) as animation:
        for frame in ImageSequence.Iterator(animation):
            repeat = round(frame.info["duration"] / frame_ms)
            shown += [np.array(frame.convert("L"))] * repeat
    return shown


def test_gif_has_n_frames_equal_to_the_renders(tmp_path):
    frames = zoom_frames(6)
    assert tiles.write_animation(str(tmp_path / "zoom.gif"), frames, duration=40) == 6
    shown = expand_by_duration(tmp_path / "zoom.gif", frame_ms=40)
    assert len(shown) == 6
    for got, want in zip(shown, frames):
        np.testing.assert_array_equal(got, want[..., 0])  # 8-bit gray GIF is lossless


def test_webp_animation_has_n_frames(tmp_path):
    frames = zoom_frames(6)
    tiles.write_animation(str(tmp_path / "zoom.webp"), frames, duration=40)
    with Image.open(tmp_path / "zoom.webp") as animation:
        got = [(np.array(f.convert("L")), f.info["duration"])
               for f in ImageSequence.Iterator(animation)]
    assert sum(duration for _, duration in got) == 6 * 40
    error = np.abs(got[0][0].astype(int) - frames[0][..., 0]).mean()
    assert error < 3  # lossy at quality 95


def test_png_frames_folder(tmp_path):
    frames = zoom_frames(5)
    assert render.write_frames(str(tmp_path / "frames"), frames) == 5
    names = sorted(os.listdir(tmp_path / "frames"))
    assert names == [f"frame_{i:06d}.png" for i in range(5)]
    for name, frame in zip(names, frames):
        saved = np.array(Image.open(tmp_path / "frames" / name))
        np.testing.assert_array_equal(saved.reshape(frame.shape), frame)


def test_video_pipes_raw_frames_to_ffmpeg(tmp_path, monkeypatch):
    # A stand-in ffmpeg that stores its stdin and arguments: checks what render.py sends.
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    "open(sys.argv[-1], 'wb').write(sys.stdin.buffer.read())\n"
                    f"open({str(tmp_path / 'args')!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake.parent))
    encoder = render.video_encoder()
    assert encoder == str(fake)
    frames = zoom_frames(4, channels=3)
    out = str(tmp_path / "zoom.mp4")
    assert render.write_video(out, frames, 24.0, encoder) == 4
    raw = np.fromfile(out, dtype=np.uint8)
    np.testing.assert_array_equal(raw, np.concatenate([f.ravel() for f in frames]))
    args = open(tmp_path / "args").read().split()
    assert args[args.index("-pix_fmt") + 1] == "rgb24"
    assert args[args.index("-s") + 1] == "24x16" and args[args.index("-r") + 1] == "24.0"


def test_video_reports_an_encoder_failure(tmp_path):
    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('no libx264 here')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(OSError, match="ffmpeg failed writing .*no libx264 here"):
        render.write_video(str(tmp_path / "z.mp4"), zoom_frames(3, channels=3), 24.0,
                           str(fake))


def test_tiny_field_calls_give_the_large_batch_result_bit_for_bit():
    # Some BLAS kernels for a handful of rows round differently from the large-batch ones;
    # render pads tiny calls so a 1-pixel tile matches the same pixel in a big tile.
    field = mlp_field()
    xy = torch.rand(256, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = field(xy)
        for n in (1, 3, 5, 7, 11):
            assert torch.equal(tiles._evaluate(field, xy[:n]), full[:n])


# --- command line, from a real train.py checkpoint -----------------------------------------

@pytest.fixture(scope="module")
def fitted(checkpoint):
    field, info = load_field(checkpoint)
    assert (info["width"], info["height"], info["channels"]) == (40, 24, 3)
    return field


def run_cli(*argv):
    assert render.main([str(a) for a in argv]) == 0


def test_cli_native_png_equals_render(checkpoint, fitted, tmp_path):
    run_cli("--ckpt", checkpoint, "-o", tmp_path / "fit.png")
    saved = np.array(Image.open(tmp_path / "fit.png"))
    np.testing.assert_array_equal(saved, render.render_region(fitted, 40, 24))


def test_cli_region_px_region_scale_and_width(checkpoint, fitted, tmp_path):
    # Source pixels 10..30 x 6..18 of the 40 x 24 image = normalised 0.25..0.75 both ways.
    expected = render.render_region(fitted, 40, 24, (0.25, 0.25, 0.75, 0.75))
    run_cli("--ckpt", checkpoint, "-o", tmp_path / "px.png", "--region_px", 10, 6, 30, 18,
            "--width", 40)  # height follows the region's 20:12 aspect -> 24
    run_cli("--ckpt", checkpoint, "-o", tmp_path / "norm.png",
            "--region", 0.25, 0.25, 0.75, 0.75, "--scale", 2)
    for name in ("px.png", "norm.png"):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / name)), expected)


def test_cli_npy_is_rendered_into_a_memmap(checkpoint, fitted, tmp_path):
    run_cli("--ckpt", checkpoint, "-o", tmp_path / "big.npy", "--scale", 2, "--max_batch", 500)
    np.testing.assert_array_equal(np.load(tmp_path / "big.npy"),
                                  render.render_region(fitted, 80, 48))


def test_cli_zoom_gif_and_frames_folder(checkpoint, fitted, tmp_path):
    run_cli("--ckpt", checkpoint, "-o", tmp_path / "zoom.gif", "--zoom", 3, "--frames", 6,
            "--fps", 20)
    assert len(expand_by_duration(tmp_path / "zoom.gif", frame_ms=50)) == 6
    run_cli("--ckpt", checkpoint, "-o", tmp_path / "frames", "--zoom", 3, "--frames", 6,
            "--center", 0.3, 0.6)
    regions = render.zoom_regions(6, 3.0, center=(0.3, 0.6))
    for i, region in enumerate(regions):
        saved = np.array(Image.open(tmp_path / "frames" / f"frame_{i:06d}.png"))
        np.testing.assert_array_equal(saved, render.render_region(fitted, 40, 24, region))


@pytest.mark.parametrize("argv, message", [
    (["--region", 0, 0, 1.5, 1], "outside"),
    (["--region", 0.5, 0, 0.5, 1], "empty"),
    (["--region_px", 0, 0, 80, 24], "outside the 40x24 image"),
    (["--region", 0, 0, 1], "expected 4 arguments"),
    (["--region", 0, 0, 1, 1, "--region_px", 0, 0, 4, 4], "not allowed with"),
    (["--width", 0], "positive"),
    (["--height", -4], "positive"),
    (["--scale", 0], "scale"),
    (["--scale", 2, "--width", 10], "either scale"),
    (["--max_batch", 0], "max_batch"),
    (["--zoom", 0.5, "-o", "zoom.gif"], "zoom factor"),
    (["--zoom", 2, "--frames", 1, "-o", "zoom.gif"], "at least 2 frames"),
    (["--zoom", 2, "--fps", 0, "-o", "zoom.gif"], "fps"),
    (["--zoom", 2, "--center", 1.5, 0.5, "-o", "zoom.gif"], "outside"),
    (["--center", 0.5, 0.5], "only apply with --zoom"),
    (["-o", "out.xyz"], "cannot write"),
    (["--zoom", 2, "-o", "zoom.png"], "--zoom writes"),
    (["--device", "nonsense"], "not usable"),
])
def test_cli_errors_are_one_line_exit_2(checkpoint, tmp_path, capsys, argv, message):
    args = ["--ckpt", checkpoint, "-o", "out.png", *argv]
    if "-o" in argv:  # the case names its own output
        args = ["--ckpt", checkpoint, *argv]
    args = [str(tmp_path / a) if a in ("out.png", "zoom.gif", "zoom.png", "out.xyz") else a
            for a in args]
    with pytest.raises(SystemExit) as exit_info:
        render.main([str(a) for a in args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("render.py: error: ")
    assert message in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_mp4_without_encoder_says_so(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(render, "video_encoder", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        render.main(["--ckpt", checkpoint, "-o", str(tmp_path / "z.mp4"), "--zoom", "2"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["render.py: error: writing .mp4 needs ffmpeg (on PATH, or pip install "
                     "imageio-ffmpeg); write .gif, .webp or a frames folder instead"]


def test_cli_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        render.main(["--ckpt", str(tmp_path / "nope.ckpt"), "-o", str(tmp_path / "o.png")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("render.py: error: ")
    assert str(tmp_path / "nope.ckpt") in lines[0]


def test_cli_corrupt_checkpoint_through_the_entry_point(tmp_path):
    # The real `python render.py`: exit status 2, one line naming the file, no traceback.
    ckpt = tmp_path / "fit.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, RENDER_PY, "--ckpt", str(ckpt),
                             "-o", str(tmp_path / "out.png")], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("render.py: error: ")
    assert str(ckpt) in lines[0]
    assert not (tmp_path / "out.png").exists()


# --- long outputs: a signal stops them cleanly; a .npy render resumes -----------------------

class SignalAt(torch.nn.Module):
    """The fit, sending this process a real SIGTERM on its `call`-th evaluation (0: never)."""

    def __init__(self, field, call=0):
        super().__init__()
        self.field, self.call, self.calls = field, call, 0

    def forward(self, xy):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.field(xy)


def render_npy(field, path):
    with outputs.stop_on_signals("render.py", f"{path} was not written"):
        render.render_to_file(field, 80, 48, 3, path, max_batch=500, resume=True,
                              stamp={"global_step": 3})


def test_a_stopped_npy_render_resumes_bit_for_bit(fitted, tmp_path, capsys):
    path = tmp_path / "fit.npy"
    with pytest.raises(SystemExit) as stopped:
        render_npy(SignalAt(fitted, call=3), path)           # 8 tiles of 6 rows
    assert stopped.value.code == 128 + signal.SIGTERM
    partial, manifest = tmp_path / "fit.partial.npy", tmp_path / "fit.partial.json"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"render.py: stopped by SIGTERM; {path} not finished: 12 of 48 rows are in {partial} "
        f"(manifest {manifest}); run the same command again to continue, or delete both to "
        f"discard them")
    assert sorted(os.listdir(tmp_path)) == ["fit.partial.json", "fit.partial.npy"]
    again = SignalAt(fitted)
    render_npy(again, path)
    assert again.calls == 6                                   # only the missing tiles
    assert sorted(os.listdir(tmp_path)) == ["fit.npy"]
    render_npy(SignalAt(fitted), tmp_path / "whole.npy")
    assert (tmp_path / "fit.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    np.testing.assert_array_equal(np.load(path), render.render_region(fitted, 80, 48))


def test_a_partial_render_of_another_fit_is_refused(fitted, tmp_path):
    with pytest.raises(SystemExit):
        render_npy(SignalAt(fitted, call=2), tmp_path / "fit.npy")
    other = SignalAt(mlp_field())
    with pytest.raises(ValueError, match="fingerprint.*delete it or pick another output name"):
        render.render_to_file(other, 80, 48, 3, tmp_path / "fit.npy", max_batch=500,
                              resume=True, stamp={"global_step": 3})


def stop_during(argv, wait_for, cwd):
    """Run argv, SIGTERM it once `wait_for` shows on its stderr: (status, stderr, seconds the
    stop took)."""
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while wait_for.encode() not in seen:
        chunk = process.stderr.read1(4096)
        assert chunk, f"ended before {wait_for!r}: {seen[-500:]!r}"
        seen += chunk
    time.sleep(0.5)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=60)[1]
    return process.returncode, (seen + rest).decode(), time.monotonic() - sent


@pytest.mark.parametrize("output", ["fit.png", "fit.tif", "fit.npy", "fit.dzi"])
def test_render_cli_stops_on_sigterm_with_one_line(checkpoint, tmp_path, output):
    status, err, seconds = stop_during(
        [sys.executable, RENDER_PY, "--ckpt", checkpoint, "-o", output, "--scale", "80",
         "--max_batch", "20000"], "deep zoom:" if output.endswith(".dzi") else "render:",
        tmp_path)
    assert status == 128 + signal.SIGTERM and seconds < 5
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    left = sorted(os.listdir(tmp_path))
    if output == "fit.npy":
        assert line.startswith("render.py: stopped by SIGTERM; fit.npy not finished: ")
        assert left == ["fit.partial.json", "fit.partial.npy"]
    elif output == "fit.dzi":
        assert re.fullmatch(r"render.py: stopped by SIGTERM; fit.dzi not finished: \d+ of \d+ "
                            r"tiles are in fit_files; run the same command again to continue, "
                            r"or delete fit_files to discard them", line)
        assert left == ["fit_files"]
        assert not [name for _, _, names in os.walk(tmp_path) for name in names
                    if "partial" in name]
    else:
        assert line == f"render.py: stopped by SIGTERM; {output} was not written"
        assert left == []


@pytest.mark.parametrize("output, dtype", [("fit.png", "uint16"), ("fit.tif", "uint16"),
                                           ("fit.tif", "float32"), ("fit.npy", "float16")])
def test_cli_wide_outputs_hold_the_fit_in_more_than_8_bits(checkpoint, fitted, tmp_path,
                                                            output, dtype):
    run_cli("--ckpt", checkpoint, "-o", tmp_path / output, "--dtype", dtype)
    with torch.no_grad():
        xy = torch.from_numpy(tiles.pixel_centres(tiles.FULL, 40, 24, (0, 24), (0, 40)))
        colour = fitted(xy.float())
    expected = images.from_linear(colour, dtype).numpy().astype(dtype).reshape(24, 40, 3)
    back = images.read_image(tmp_path / output)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, expected)


def test_cli_refuses_a_dtype_the_format_cannot_hold(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        render.main(["--ckpt", checkpoint, "-o", str(tmp_path / "x.jpg"), "--dtype", "uint16"])
    assert error.value.code == 2
    assert "uint16 images can be written as .png, .tif, .tiff, .npy, not .jpg" in \
        capsys.readouterr().err


TRAIN_THEN_SIGTERM = """
import os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import lightning.pytorch as pl
import train

class SigtermAfterTraining(pl.Callback):      # the export comes right after training
    def on_train_end(self, trainer, module):
        threading.Timer(float(sys.argv[2]), os.kill, (os.getpid(), signal.SIGTERM)).start()

train.main(sys.argv[3:], callbacks=[SigtermAfterTraining()])
"""


def test_train_export_stops_on_sigterm_naming_the_saved_checkpoint(tmp_path):
    y, x = np.mgrid[0:1800, 0:2400]            # an export of several seconds
    images.write_image(tmp_path / "src.png", np.stack([x % 256, y % 256, (x + y) % 256],
                                                      -1).astype(np.uint8))
    ckpt = os.path.join("logs", "experiments", "src", "version_0", "checkpoints", "last.ckpt")
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_THEN_SIGTERM, os.path.dirname(RENDER_PY), "1.0",
         "-i", "src.png", "--root", "logs", "--max_steps", "2", "--batch_size", "1024",
         "--n_levels", "4", "--log2_hashmap_size", "10", "--val_every", "2", "--export",
         "out/fit.png"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"train.py: stopped by SIGTERM; out/fit.png was not written; the fit is saved: python "
        f"render.py --ckpt {ckpt} -o out/fit.png writes it")
    assert os.listdir(tmp_path / "out") == []                 # no temporary file left
    assert os.path.exists(tmp_path / ckpt)


def test_train_refuses_an_export_dtype_its_format_cannot_hold(tmp_path, capsys):
    import train
    images.write_image(tmp_path / "src.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as error:
        train.main(["-i", str(tmp_path / "src.png"), "--root", str(tmp_path / "logs"),
                    "--export", str(tmp_path / "fit.jpg"), "--export_dtype", "float32"])
    assert error.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"train.py: error: --export {tmp_path / 'fit.jpg'}: float32 images can be "
        f"written as .tif, .tiff, .npy, not .jpg")
