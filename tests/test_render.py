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
from PIL import Image

import images
import outputs
import render
import tiles
from conftest import expect_error, mlp_field, prog_lines, run_limited
from test_tiles import expand_by_duration

RENDER_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "render.py")


# --- output geometry ----------------------------------------------------------------------

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


# --- command line, from a real train.py checkpoint -----------------------------------------


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


# --- outputs are all or nothing; bad requests are one line, refused up front ------------------

@pytest.mark.parametrize("ext", [".npy", ".tif"])
def test_render_failing_mid_write_keeps_the_previous_output(tmp_path, checkpoint, ext):
    out = tmp_path / "out"
    out.mkdir()
    target = out / f"x{ext}"
    images.write_image(str(target), np.full((8, 8, 3), 200, np.uint8))
    before = target.read_bytes()
    done = run_limited([sys.executable, RENDER_PY, "--ckpt", checkpoint, "-o", str(target),
                        "--width", "512", "--height", "512", "--device", "cpu"],
                       200_000, tmp_path)               # the output is 786 KB
    assert done.returncode != 0
    lines = prog_lines(done.stderr, "render.py")
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith("render.py: error: ") and "File too large" in lines[0]
    assert str(target) in lines[0] and ".partial" not in lines[0]   # the name asked for
    assert target.read_bytes() == before
    assert sorted(os.listdir(out)) == [target.name]


def test_huge_render_is_refused_up_front(tmp_path, capsys, checkpoint):
    out = tmp_path / "out"
    start = time.monotonic()
    err = expect_error(capsys, render.main,
                       ["--ckpt", checkpoint, "-o", str(out / "x.npy"), "--width", "1000000",
                        "--height", "1000000", "--device", "cpu"], "free", prog="render.py")
    assert "3.0 TB" in err
    assert time.monotonic() - start < 20
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("quality", ["0", "101"])
def test_render_quality_out_of_range_is_one_line(tmp_path, capsys, checkpoint, quality):
    expect_error(capsys, render.main, ["--ckpt", checkpoint, "-o", str(tmp_path / "x.jpg"),
                                       "--quality", quality],
                 f"--quality: expected an integer 1..100, got {quality}", prog="render.py")
    assert not (tmp_path / "x.jpg").exists()
