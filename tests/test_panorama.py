"""Periodic (360-degree) images end to end: sampling wraps, the fit is seamless, the checkpoint
records it, and render.py crosses the seam."""
import numpy as np
import pytest
import torch

import images
import pixels
import render
import train
from conftest import psnr
from field import FieldConfig, load_field

def panorama(width=96, height=32):
    """(H, W, 3) uint8 that wraps around in x: whole periods of waves across the width, and a
    bright band that crosses the seam."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    u, v = x / width, y / height
    rgb = [0.5 + 0.4 * np.sin(2 * np.pi * (2 * u + v)), 0.5 + 0.3 * np.cos(2 * np.pi * 3 * u),
           0.2 + 0.7 * (np.cos(2 * np.pi * u) > 0.9)]
    return np.rint(np.clip(np.stack(rgb, -1), 0, 1) * 255).astype(np.uint8)


def test_bilinear_sampling_wraps_across_the_seam():
    codes = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    lut = images.SRGB_TO_LINEAR_LUT.astype(np.float64)
    xy = torch.tensor([[0.0, 0.125], [1.0, 0.125], [0.5 / 6, 0.125]])   # seam, seam, centre
    got = pixels.bilinear_sample(torch.from_numpy(codes), torch.from_numpy(lut).float(), xy, "x")
    seam = (lut[codes[0, 0]] + lut[codes[0, -1]]) / 2      # halfway between last and first
    np.testing.assert_allclose(got[0].numpy(), seam, rtol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), seam, rtol=1e-6)
    np.testing.assert_allclose(got[2].numpy(), lut[codes[0, 0]], rtol=1e-6)
    clamped = pixels.bilinear_sample(torch.from_numpy(codes), torch.from_numpy(lut).float(), xy)
    np.testing.assert_allclose(clamped[0].numpy(), lut[codes[0, 0]], rtol=1e-6)


def test_periodic_field_is_the_same_on_both_edges():
    field = FieldConfig(96, 32, 3, n_levels=4, log2_hashmap_size=10, periodic="x").build()
    y = torch.rand(64, 1, dtype=torch.float32)
    left = field(torch.cat([torch.zeros_like(y), y], 1))
    right = field(torch.cat([torch.ones_like(y), y], 1))
    torch.testing.assert_close(left, right, rtol=0, atol=0)
    shifted = field(torch.cat([torch.full_like(y, 1.25), y], 1))      # x taken modulo 1
    torch.testing.assert_close(shifted, field(torch.cat([torch.full_like(y, 0.25), y], 1)))
    with pytest.raises(ValueError, match="periodic"):
        FieldConfig(8, 8, 3, enc_method="freq", periodic="x")


def test_a_panorama_fit_is_seamless_and_renders_across_the_seam(tmp_path):
    source = panorama()
    path = tmp_path / "pano.png"
    images.write_image(path, source)
    summary = train.main(["-i", str(path), "--root", str(tmp_path / "logs"), "--accelerator",
                          "cpu", "--batch_size", "4096", "--max_steps", "300", "--periodic", "x",
                          "--n_levels", "8", "--log2_hashmap_size", "12"])
    field, info = load_field(summary["checkpoint"])
    assert info["config"].periodic == "x"
    width, height = 96, 32
    # the seam region (x from 0.9 to 1.1) of the fit, at the trained resolution, against the
    # source's own last and first columns side by side
    out = tmp_path / "seam.png"
    assert render.main(["--ckpt", summary["checkpoint"], "-o", str(out),
                        "--region_px", "86", "0", "106", "32"]) == 0
    seam = images.read_image(out)
    assert render.main(["--ckpt", summary["checkpoint"], "-o", str(tmp_path / "r.png"),
                        "--region", "0.9", "0", "1.1", "1"]) == 0
    assert images.read_image(tmp_path / "r.png").shape == (32, 19, 3)   # 0.2 x 96 columns
    expected = np.concatenate([source[:, -10:], source[:, :10]], 1)
    assert seam.shape == expected.shape
    whole = render.render_region(field, width, height)
    assert psnr(whole, source) > 28
    assert psnr(seam, expected) > 30        # the seam region holds the band's sharp edges
    # the columns either side of the seam differ no more than neighbours elsewhere do
    step = np.abs(np.diff(seam.astype(int), axis=1)).mean(axis=(0, 2))
    source_step = np.abs(np.diff(expected.astype(int), axis=1)).mean(axis=(0, 2))
    assert step[9] <= source_step[9] + 4


def test_regions_past_the_edge_need_a_periodic_axis():
    assert render.check_region((0.9, 0, 1.1, 1), "x") == (0.9, 0.0, 1.1, 1.0)
    with pytest.raises(ValueError, match="outside"):
        render.check_region((0.9, 0, 1.1, 1))
    with pytest.raises(ValueError, match="outside"):
        render.check_region((0.9, 0, 1.1, 1.2), "x")
