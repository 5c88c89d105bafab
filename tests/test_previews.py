"""previews.py: when previews are written, and their geometry (what train.py shows is tested
through train.py in test_train)."""
import previews


def test_preview_steps_are_log_spaced():
    steps = [s for s in range(0, 2001) if previews.is_preview_step(s)]
    assert steps == ([1, 2, 4, 8] + list(range(10, 100, 10)) + list(range(100, 1000, 100))
                     + [1000, 2000])


def test_preview_geometry_bounds_a_large_image():
    (pw, ph), (x0, y0, cw, ch) = previews.preview_geometry(3250, 4333)
    assert (pw, ph) == (768, 1024)                   # long side 1024, aspect kept
    assert (cw, ch) == (768, 512) and (x0, y0) == ((3250 - 768) // 2, (4333 - 512) // 2)
    assert 2 * pw <= 2048 and ph + ch <= 2048
