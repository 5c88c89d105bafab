"""tiles.py: a field rendered tile by tile equals its forward pass on the pixel centres, bit
for bit, whatever the tiles; resumable .npy renders; animations."""
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import images
import outputs
import tiles
from conftest import mlp_field, reference_render
from field import FieldConfig


def test_native_render_equals_forward_on_pixel_centres():
    field = mlp_field()
    image = tiles.render_region(field, 40, 24)
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
        np.testing.assert_array_equal(tiles.render_region(field, 48, 32, max_batch=max_batch),
                                      expected)


def test_analytic_callable_single_channel():
    # colour = x: column c of an 8-wide render is linear_to_uint8((c + 0.5) / 8).
    image = tiles.render_region(lambda xy: xy[:, :1], 8, 3)
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
    big = tiles.render_region(field, 64, 32)
    part = tiles.render_region(field, *size, region)
    np.testing.assert_array_equal(part, big[crop])


def test_render_above_source_resolution_is_a_crop_of_a_bigger_render():
    field = mlp_field()
    zoomed = tiles.render_region(field, 32, 32, (0.5, 0.5, 0.75, 0.75))
    huge = tiles.render_region(field, 128, 128)
    np.testing.assert_array_equal(zoomed, huge[64:96, 64:96])


@pytest.mark.parametrize("max_batch", [1, 5, 37, 40, 3 * 40 + 7])
def test_tiled_equals_untiled_exactly(max_batch):
    field = mlp_field()
    region = (0.1, 0.2, 0.7, 0.9)
    untiled = tiles.render_region(field, 40, 30, region, max_batch=2**30)
    tiled = tiles.render_region(field, 40, 30, region, max_batch=max_batch)
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
    returned = tiles.render_region(field, 40, 24, out=out, max_batch=100)
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
        tiles.render_region(mlp_field(), 40, 24, out=out)


def test_field_device_follows_parameters():
    assert tiles.field_device(torch.nn.Linear(2, 3).to("meta")) == torch.device("meta")
    assert tiles.field_device(lambda xy: xy) == torch.device("cpu")


@pytest.mark.parametrize("region", [(-0.1, 0, 1, 1), (0, 0, 1.5, 1), (0.5, 0, 0.5, 1),
                                    (0, 0.8, 1, 0.2), (0, 0, float("nan"), 1), (0, 0, 1)])
def test_bad_regions_rejected(region):
    with pytest.raises(ValueError):
        tiles.check_region(region)


def test_tiny_field_calls_give_the_large_batch_result_bit_for_bit():
    # Some BLAS kernels for a handful of rows round differently from the large-batch ones;
    # render pads tiny calls so a 1-pixel tile matches the same pixel in a big tile.
    field = mlp_field()
    xy = torch.rand(256, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = field(xy)
        for n in (1, 3, 5, 7, 11):
            assert torch.equal(tiles._evaluate(field, xy[:n]), full[:n])


# --- animations --------------------------------------------------------------------------

def zoom_frames(n):
    """n gray renders of a shrinking window: every frame differs."""
    return [tiles.render_region(mlp_field(1), 24, 16, (0, 0, 1 - i / (2 * n), 1 - i / (2 * n)),
                                max_batch=100) for i in range(n)]


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


# --- a resumable .npy render: a signal stops it, the same call continues -------------------

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
        tiles.render_to_file(field, 80, 48, 3, path, max_batch=500, resume=True,
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
    np.testing.assert_array_equal(np.load(path), tiles.render_region(fitted, 80, 48))


def test_a_partial_render_of_another_fit_is_refused(fitted, tmp_path):
    with pytest.raises(SystemExit):
        render_npy(SignalAt(fitted, call=2), tmp_path / "fit.npy")
    other = SignalAt(mlp_field())
    with pytest.raises(ValueError, match="fingerprint.*delete it or pick another output name"):
        tiles.render_to_file(other, 80, 48, 3, tmp_path / "fit.npy", max_batch=500,
                              resume=True, stamp={"global_step": 3})
