"""pixels.py: batches drawn from the source and the PSNR probe, against float64 references."""
import numpy as np
import pytest
import torch

import images
import pixels
from test_train import smooth_image


def test_bilinear_sample_matches_float64_reference():
    codes = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    lut = images.SRGB_TO_LINEAR_LUT.astype(np.float64)
    rng = np.random.default_rng(2)
    xy = np.concatenate([rng.uniform(0, 1, (200, 2)), [[0, 0], [1, 1], [0, 1], [0.5 / 7, 0.5 / 5]]])
    linear = lut[codes]
    expected = []
    for x, y in xy:
        u, v = x * 7 - 0.5, y * 5 - 0.5
        c0, r0 = int(np.floor(u)), int(np.floor(v))
        fx, fy = u - c0, v - r0
        at = lambda r, c: linear[min(max(r, 0), 4), min(max(c, 0), 6)]
        expected.append((1 - fy) * ((1 - fx) * at(r0, c0) + fx * at(r0, c0 + 1))
                        + fy * ((1 - fx) * at(r0 + 1, c0) + fx * at(r0 + 1, c0 + 1)))
    got = pixels.bilinear_sample(torch.from_numpy(codes), torch.from_numpy(lut).float(),
                                torch.from_numpy(xy).float())
    np.testing.assert_allclose(got.numpy(), np.array(expected), atol=2e-6)
    # at a pixel centre the target is that pixel, in linear light
    centre = pixels.bilinear_sample(torch.from_numpy(codes), torch.from_numpy(lut).float(),
                                   torch.tensor([[(3 + 0.5) / 7, (2 + 0.5) / 5]]))
    np.testing.assert_allclose(centre[0].numpy(), linear[2, 3], atol=1e-7)


class ConstantField(torch.nn.Module):
    """xy (N, 2) -> the same linear colour (N, C) everywhere."""

    def __init__(self, colour):
        super().__init__()
        self.colour = torch.nn.Parameter(torch.tensor(colour, dtype=torch.float32))

    def forward(self, xy):
        return self.colour.expand(len(xy), -1)


@pytest.mark.parametrize("max_pixels", [10 ** 6, 1000])
def test_psnr_probe_counts_squared_8bit_errors(max_pixels):
    source = smooth_image(40, 60)
    field = ConstantField([0.2, 0.5, 0.8])
    code = images.linear_to_uint8(np.array([0.2, 0.5, 0.8], np.float32)).astype(np.int64)
    probe = pixels.PsnrProbe(source, max_pixels=max_pixels)
    values = source.reshape(-1, 3)
    if probe.index is not None:                        # the fixed random subset
        assert len(probe.index) == max_pixels
        values = values[probe.index]
    expected = ((values.astype(np.int64) - code) ** 2).sum()
    shares = [probe.sse(field, rank, 3, max_batch=120) for rank in range(3)]   # 2-row bands
    assert sum(s for s, _ in shares) == expected
    assert sum(n for _, n in shares) == values.size
    assert pixels.psnr_from_sse(expected, values.size) == pytest.approx(
        10 * np.log10(255 ** 2 * values.size / expected))


def test_mean_colour_against_a_float64_reference():
    source = smooth_image(40, 60)
    image = pixels.PixelSource(source)
    lut = np.asarray(images.SRGB_TO_LINEAR_LUT, np.float64)
    assert image.mean_colour().numpy() == pytest.approx(lut[source].mean((0, 1)), abs=1e-6)
    # a grid of at most ~max_pixels: every 3rd row and column here
    assert image.mean_colour(max_pixels=250).numpy() == pytest.approx(
        lut[source[::3, ::3]].mean((0, 1)), abs=1e-6)
