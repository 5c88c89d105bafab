"""Tests for the Deep Zoom output of render.py (``-o fit.dzi``): the pyramid geometry against
hand-computed values, tiles equal to direct renders at each level's size, the .dzi XML,
resuming an interrupted pyramid, refusing a foreign tiles folder, and the command line from
a real train.py checkpoint."""
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

import images
import render
from conftest import mlp_field, psnr, reference_render
from field import load_field
from tiles import DZI_NAMESPACE, dzi_levels, dzi_tiles, dzi_xml


def read_level(folder, level, fmt="png"):
    """{(col, row): (H, W, C) array} of one level's tiles."""
    level_dir = os.path.join(folder, str(level))
    tiles = {}
    for name in os.listdir(level_dir):
        stem, ext = os.path.splitext(name)
        assert ext == "." + fmt and not name.startswith("."), name  # no stray partial files
        col, row = map(int, stem.split("_"))
        array = np.array(Image.open(os.path.join(level_dir, name)))
        tiles[col, row] = array.reshape(array.shape[0], array.shape[1], -1)
    return tiles


def stitch(tiles, width, height, tile_size, overlap):
    """A level put back together from its tiles, every tile checked against the geometry and
    its overlaps dropped; every pixel must be written exactly once."""
    rects = dzi_tiles(width, height, tile_size, overlap)
    assert sorted(tiles) == sorted((c, r) for c, r, *_ in rects)
    channels = next(iter(tiles.values())).shape[2]
    out = np.zeros((height, width, channels), np.uint8)
    hits = np.zeros((height, width), int)
    for col, row, x0, y0, x1, y1 in rects:
        tile = tiles[col, row]
        assert tile.shape[:2] == (y1 - y0, x1 - x0)
        cx0, cy0 = col * tile_size, row * tile_size     # the tile's own square
        cx1, cy1 = min(width, cx0 + tile_size), min(height, cy0 + tile_size)
        out[cy0:cy1, cx0:cx1] = tile[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        hits[cy0:cy1, cx0:cx1] += 1
    np.testing.assert_array_equal(hits, 1)
    return out


def read_dzi(path):
    root = ET.parse(path).getroot()
    ns = "{" + DZI_NAMESPACE + "}"
    size = root.find(ns + "Size")
    assert root.tag == ns + "Image" and size is not None
    return dict(root.attrib), dict(size.attrib)


SMALL = dict(tile_size=8, overlap=1, tile_format="png")


# --- geometry ------------------------------------------------------------------------------

def test_levels_of_an_odd_size_by_hand():
    # max side 37 -> ceil(log2 37) = 6 -> 7 levels; level L = ceil(37 / 2**(6-L)) x ...
    assert dzi_levels(37, 23) == [(1, 1), (2, 1), (3, 2), (5, 3), (10, 6), (19, 12),
                                         (37, 23)]
    assert dzi_levels(1, 1) == [(1, 1)]
    assert dzi_levels(256, 100)[-2:] == [(128, 50), (256, 100)]
    assert len(dzi_levels(256, 100)) == 9 and len(dzi_levels(257, 3)) == 10
    with pytest.raises(ValueError):
        dzi_levels(0, 5)


def test_tiles_of_an_odd_level_by_hand():
    # 37 wide, tile 8, overlap 1: squares at 0, 8, 16, 24, 32; one overlap pixel on each
    # interior side; the last column is 32..37 plus 1 on the left = 31..37 (6 px).
    rects = dzi_tiles(37, 23, 8, 1)
    assert len(rects) == 5 * 3
    cols = sorted({(c, x0, x1) for c, r, x0, y0, x1, y1 in rects})
    rows = sorted({(r, y0, y1) for c, r, x0, y0, x1, y1 in rects})
    assert cols == [(0, 0, 9), (1, 7, 17), (2, 15, 25), (3, 23, 33), (4, 31, 37)]
    assert rows == [(0, 0, 9), (1, 7, 17), (2, 15, 23)]
    assert rects[0] == (0, 0, 0, 0, 9, 9) and rects[-1] == (4, 2, 31, 15, 37, 23)
    # 19 x 12 (level 5): 3 x 2 tiles, the last 4 + 1 wide and 4 + 1 high
    assert dzi_tiles(19, 12, 8, 1)[-1] == (2, 1, 15, 7, 19, 12)
    # a level smaller than one tile is a single tile without overlap
    assert dzi_tiles(5, 3, 8, 1) == [(0, 0, 0, 0, 5, 3)]
    # overlap 0 partitions the level
    assert dzi_tiles(16, 9, 8, 0) == [(0, 0, 0, 0, 8, 8), (1, 0, 8, 0, 16, 8),
                                             (0, 1, 0, 8, 8, 9), (1, 1, 8, 8, 16, 9)]


@pytest.mark.parametrize("tile_size, overlap", [(0, 0), (8, -1), (8, 9)])
def test_bad_tile_geometry_rejected(tile_size, overlap):
    with pytest.raises(ValueError):
        dzi_tiles(37, 23, tile_size, overlap)


def test_xml_parses_with_the_right_attributes(tmp_path):
    path = tmp_path / "a.dzi"
    path.write_text(dzi_xml(37, 23, 254, 1, "jpg"))
    image, size = read_dzi(path)
    assert image == {"TileSize": "254", "Overlap": "1", "Format": "jpg"}
    assert size == {"Width": "37", "Height": "23"}


# --- pixels --------------------------------------------------------------------------------

def test_every_level_equals_a_direct_render_at_its_size(tmp_path):
    field = mlp_field()
    path = tmp_path / "fit.dzi"
    # 37x23 in 8 px tiles: 5x3 (37x23) + 3x2 (19x12) + 2x1 (10x6) + 1 for each of 4 levels
    assert render.write_deep_zoom(field, 37, 23, 3, path, **SMALL) == (27, 27)
    folder = str(tmp_path / "fit_files")
    top = stitch(read_level(folder, 6), 37, 23, 8, 1)
    np.testing.assert_array_equal(top, render.render_region(field, 37, 23))
    np.testing.assert_array_equal(top, reference_render(field, 37, 23))
    assert len(np.unique(top)) > 50
    # Every tile, overlaps included, is its block of the direct render at that level's size.
    for level, (w, h) in enumerate(dzi_levels(37, 23)):
        direct = render.render_region(field, w, h)
        tiles = read_level(folder, level)
        for col, row, x0, y0, x1, y1 in dzi_tiles(w, h, 8, 1):
            np.testing.assert_array_equal(tiles[col, row], direct[y0:y1, x0:x1])
    np.testing.assert_array_equal(stitch(read_level(folder, 4), 10, 6, 8, 1),
                                  render.render_region(field, 10, 6))
    image, size = read_dzi(path)
    assert image == {"TileSize": "8", "Overlap": "1", "Format": "png"}
    assert size == {"Width": "37", "Height": "23"}


def test_region_pyramid_and_small_batches(tmp_path):
    field = mlp_field(channels=1)
    region = (0.25, 0.1, 0.75, 0.6)
    render.write_deep_zoom(field, 20, 16, 1, tmp_path / "r.dzi", region, max_batch=7,
                           **SMALL)
    top = stitch(read_level(str(tmp_path / "r_files"), 5), 20, 16, 8, 1)
    np.testing.assert_array_equal(top, render.render_region(field, 20, 16, region))


def test_jpg_tiles(tmp_path):
    field = mlp_field()
    render.write_deep_zoom(field, 37, 23, 3, tmp_path / "j.dzi", tile_size=16, overlap=2,
                           tile_format="jpg", quality=90)
    top = stitch(read_level(str(tmp_path / "j_files"), 6, "jpg"), 37, 23, 16, 2)
    assert psnr(top, render.render_region(field, 37, 23)) > 28
    assert read_dzi(tmp_path / "j.dzi")[0]["Format"] == "jpg"


# --- resume and refusal ----------------------------------------------------------------------

def tile_bytes(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def count_renders(monkeypatch):
    calls = []
    real = render.render_region

    def counting(field, width, height, region, window=None, **kwargs):
        calls.append((width, height, *window))
        return real(field, width, height, region, window=window, **kwargs)
    monkeypatch.setattr(render, "render_region", counting)
    return calls


def test_resume_renders_only_the_missing_tiles(tmp_path, monkeypatch):
    field = mlp_field()
    complete = tmp_path / "complete.dzi"
    render.write_deep_zoom(field, 37, 23, 3, complete, **SMALL)
    expected = tile_bytes(tmp_path / "complete_files")
    assert len(expected) == 27 + 1                        # tiles + manifest

    # Interrupted after 5 tiles: those 5 are complete files, nothing partial, no .dzi.
    path = tmp_path / "fit.dzi"
    real_write, written = images.write_image, []

    def failing_write(target, array, quality=95):
        real_write(target, array, quality=quality)
        if len(written) == 5:      # the 6th tile is written in full but never renamed
            raise KeyboardInterrupt
        written.append(target)
    monkeypatch.setattr(images, "write_image", failing_write)
    with pytest.raises(KeyboardInterrupt):
        render.write_deep_zoom(field, 37, 23, 3, path, **SMALL)
    monkeypatch.setattr(images, "write_image", real_write)
    assert not path.exists()
    assert len(tile_bytes(tmp_path / "fit_files")) == 5 + 1

    calls = count_renders(monkeypatch)
    assert render.write_deep_zoom(field, 37, 23, 3, path, **SMALL) == (22, 27)
    assert len(calls) == 22
    assert tile_bytes(tmp_path / "fit_files") == expected
    assert path.read_text() == complete.read_text()

    # Delete three tiles of two levels: exactly those are rendered again.
    for name in ("6/2_1.png", "6/4_2.png", "3/0_0.png"):
        os.remove(tmp_path / "fit_files" / name)
    calls.clear()
    assert render.write_deep_zoom(field, 37, 23, 3, path, **SMALL) == (3, 27)
    assert sorted(calls) == sorted([(37, 23, (7, 17), (15, 25)), (37, 23, (15, 23), (31, 37)),
                                    (5, 3, (0, 3), (0, 5))])
    assert tile_bytes(tmp_path / "fit_files") == expected
    calls.clear()
    assert render.write_deep_zoom(field, 37, 23, 3, path, **SMALL) == (0, 27)
    assert calls == []


@pytest.mark.parametrize("change, message", [
    (dict(tile_size=16), "tile_size 8 vs 16"),
    (dict(overlap=0), "overlap 1 vs 0"),
    (dict(tile_format="jpg"), "tile_format"),
    (dict(width=36), "width 37 vs 36"),
    (dict(region=(0, 0, 0.5, 1)), "region"),
    (dict(field=mlp_field(seed=1)), "fingerprint"),
    (dict(stamp={"global_step": 7}), "global_step"),
])
def test_a_different_pyramid_in_the_folder_is_refused(tmp_path, change, message):
    field = mlp_field()
    args = dict(field=field, width=37, height=23, channels=3, path=tmp_path / "fit.dzi",
                stamp={"global_step": 3}, **SMALL)
    render.write_deep_zoom(**args)
    before = tile_bytes(tmp_path)
    with pytest.raises(ValueError, match="delete it or pick another output name") as error:
        render.write_deep_zoom(**{**args, **change})
    assert message in str(error.value)
    assert tile_bytes(tmp_path) == before


def test_a_foreign_tiles_folder_is_refused_an_empty_one_used(tmp_path):
    (tmp_path / "fit_files" / "0").mkdir(parents=True)
    (tmp_path / "fit_files" / "0" / "0_0.jpeg").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match="not written by render.py"):
        render.write_deep_zoom(mlp_field(), 37, 23, 3, tmp_path / "fit.dzi", **SMALL)
    (tmp_path / "e_files").mkdir()
    render.write_deep_zoom(mlp_field(), 37, 23, 3, tmp_path / "e.dzi", **SMALL)
    assert (tmp_path / "e.dzi").exists()


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(images.shutil, "disk_usage",
                        lambda p: usage._replace(free=1000))
    with pytest.raises(images.ImageError, match="Deep Zoom pyramid needs"):
        render.write_deep_zoom(mlp_field(), 37, 23, 3, tmp_path / "fit.dzi", **SMALL)
    assert list(tmp_path.iterdir()) == []


# --- command line, from a real train.py checkpoint -----------------------------------------

def test_cli_scale_2_png_pyramid_and_resume(checkpoint, tmp_path, capsys):
    fitted, info = load_field(checkpoint)
    argv = ["--ckpt", checkpoint, "-o", str(tmp_path / "fit.dzi"), "--scale", "2",
            "--tile_size", "16", "--tile_format", "png", "--max_batch", "100"]
    assert render.main(argv) == 0
    assert "80x48, 8 levels" in capsys.readouterr().out
    image, size = read_dzi(tmp_path / "fit.dzi")
    assert image == {"TileSize": "16", "Overlap": "1", "Format": "png"}
    assert size == {"Width": "80", "Height": "48"}
    folder = str(tmp_path / "fit_files")
    np.testing.assert_array_equal(stitch(read_level(folder, 7), 80, 48, 16, 1),
                                  render.render_region(fitted, 80, 48))
    np.testing.assert_array_equal(stitch(read_level(folder, 5), 20, 12, 16, 1),
                                  render.render_region(fitted, 20, 12))
    with open(os.path.join(folder, render.DZI_MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["global_step"] == info["global_step"] == 3
    assert render.main(argv) == 0
    # 80x48 in 16 px tiles: 5x3 + 3x2 + 2x1 + one tile for each of the 5 levels below
    assert "28 tiles, 28 of them already there" in capsys.readouterr().out


def test_cli_defaults_jpg_254_and_region(checkpoint, tmp_path):
    fitted, _ = load_field(checkpoint)
    render.main(["--ckpt", checkpoint, "-o", str(tmp_path / "d.dzi")])
    image, size = read_dzi(tmp_path / "d.dzi")
    assert image == {"TileSize": "254", "Overlap": "1", "Format": "jpg"}
    assert size == {"Width": "40", "Height": "24"}
    assert sorted(os.listdir(tmp_path / "d_files")) == [".pyramid.json"] + [
        str(level) for level in range(7)]
    render.main(["--ckpt", checkpoint, "-o", str(tmp_path / "r.dzi"), "--tile_format", "png",
                 "--region_px", "10", "6", "30", "18"])
    top = np.array(Image.open(tmp_path / "r_files" / "5" / "0_0.png"))
    np.testing.assert_array_equal(top, render.render_region(fitted, 20, 12,
                                                            (0.25, 0.25, 0.75, 0.75)))


@pytest.mark.parametrize("argv, message", [
    (["-o", "z.dzi", "--zoom", "2"], "--zoom cannot write a Deep Zoom"),
    (["-o", "out.png", "--tile_size", "64"], "only apply to a .dzi"),
    (["-o", "out.png", "--tile_format", "png"], "only apply to a .dzi"),
    (["-o", "z.dzi", "--tile_size", "0"], "expected an integer >= 1"),
    (["-o", "z.dzi", "--overlap", "-1"], "expected an integer >= 0"),
    (["-o", "z.dzi", "--tile_size", "8", "--overlap", "9"], "overlap"),
    (["-o", "z.dzi", "--tile_format", "gif"], "invalid choice"),
])
def test_cli_errors_are_one_line_exit_2(checkpoint, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a in ("z.dzi", "out.png") else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        render.main(["--ckpt", checkpoint, *argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("render.py: error: ")
    assert message in lines[0]
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_mismatched_pyramid(checkpoint, tmp_path, capsys):
    base = ["--ckpt", checkpoint, "-o", str(tmp_path / "fit.dzi"), "--tile_format", "png"]
    assert render.main(base) == 0
    capsys.readouterr()                                   # the first run's progress bar
    with pytest.raises(SystemExit) as exit_info:
        render.main(base + ["--scale", "2"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "delete it or pick another output name" in lines[0]
