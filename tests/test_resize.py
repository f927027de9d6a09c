"""Resize geometry: exact centre crop, squash, pad; clear error for an unknown mode."""

import numpy as np
import pytest
from conftest import photo_like
from PIL import Image
from subspectral.pipeline.resize import decoded_minimum, pixels, resize_square


def test_center_crop_takes_the_exact_centre_square():
    image = Image.fromarray(photo_like(672, 336))
    expected = np.asarray(image.crop((168, 0, 504, 336)))
    np.testing.assert_array_equal(resize_square(image, 336, "center-crop"), expected)


def test_center_crop_box_is_sub_pixel_for_odd_margins():
    # 501 x 375: the crop starts at 63 px; a whole-pixel crop would start at 63 too, but 500 x 375 needs 62.5.
    image = Image.fromarray(photo_like(500, 375))
    exact = resize_square(image, 336, "center-crop").astype(np.int16)
    shifted = np.asarray(image.crop((62, 0, 437, 375)).resize((336, 336), Image.Resampling.BICUBIC)).astype(np.int16)
    assert np.abs(exact - shifted).mean() > 0.5  # half a pixel of difference is visible


def test_squash_and_pad():
    image = Image.fromarray(photo_like(400, 200))
    assert resize_square(image, 100, "squash").shape == (100, 100, 3)
    padded = resize_square(image, 100, "pad")
    assert padded.shape == (100, 100, 3)
    assert padded[:20].max() == 0 and padded[-20:].max() == 0  # black bands above and below
    assert padded[30:70].mean() > 20


def test_decoded_minimum_keeps_the_side_that_matters():
    assert decoded_minimum(500, 375, 336, "center-crop") == (1, 336)
    assert decoded_minimum(375, 500, 336, "center-crop") == (336, 1)
    assert decoded_minimum(500, 375, 336, "squash") == (336, 336)
    assert decoded_minimum(500, 375, 336, "pad") == (336, 1)


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="--resize-mode"):
        resize_square(Image.new("RGB", (10, 10)), 8, "stretch")


@pytest.mark.parametrize(("mode", "size"), [("RGBX", (336, 336)), ("RGBA", (57, 31)), ("RGB", (40, 30)),
                                            ("RGBX", (4000, 3000))])
def test_pixels_view_equals_a_copy(mode, size):
    image = Image.fromarray(photo_like(*size)).convert(mode)
    np.testing.assert_array_equal(pixels(image), np.asarray(image))
