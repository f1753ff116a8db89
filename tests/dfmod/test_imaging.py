"""Decoding untrusted bytes: formats, orientation, DCT downscaling, and every kind of bad input."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dfmod.imaging import ImageLimits, ImageRejected, decode_image, probe_image

from tests.utils.images import make_image_bytes

LIMITS = ImageLimits(max_bytes=5_000_000, max_pixels=20_000_000, min_side=16)


def test_jpeg_decodes_to_rgb_and_draft_downscales_large_jpegs():
    data = make_image_bytes("JPEG", size=(2000, 1800))
    image = decode_image(data, LIMITS, target=(224, 224))
    assert image.mode == "RGB"
    # draft picks the largest DCT scale (1/8 here) that keeps both sides >= the target.
    assert image.size == (250, 225)
    assert decode_image(data, LIMITS).size == (2000, 1800)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (120, 60), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), LIMITS).size == (60, 120)


@pytest.mark.parametrize(
    "mode,fmt,expected_pixel",
    [
        ("L", "PNG", (128, 128, 128)),
        ("CMYK", "JPEG", None),
        ("RGBA", "PNG", None),
        ("P", "PNG", None),
    ],
)
def test_other_modes_become_rgb(mode, fmt, expected_pixel):
    image = Image.new(mode, (40, 40))
    if mode == "L":
        image = Image.new("L", (40, 40), 128)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = decode_image(buffer.getvalue(), LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (40, 40)
    if expected_pixel:
        assert decoded.getpixel((5, 5)) == expected_pixel


def test_transparent_pixels_are_flattened_onto_white():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), LIMITS).getpixel((3, 3)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    image = Image.new("I;16", (32, 32), 32768)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), LIMITS).getpixel((1, 1)) == (128, 128, 128)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("P", (32, 32), index) for index in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    decoded = decode_image(buffer.getvalue(), LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (32, 32)


def test_text_renamed_to_jpg_is_not_an_image():
    with pytest.raises(ImageRejected) as info:
        decode_image(b"hello, I am definitely a JPEG\n" * 10, LIMITS)
    assert info.value.reason == "not_an_image"


def test_truncated_jpeg_is_rejected():
    data = make_image_bytes("JPEG", size=(256, 256))
    with pytest.raises(ImageRejected) as info:
        decode_image(data[: len(data) // 2], LIMITS)
    assert info.value.reason in ("truncated", "corrupt")


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = Image.new("1", (6000, 6000))
    buffer = io.BytesIO()
    bomb.save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 100_000  # tiny file, 36 megapixels
    with pytest.raises(ImageRejected) as info:
        probe_image(buffer.getvalue(), ImageLimits(max_pixels=10_000_000))
    assert info.value.reason == "decompression_bomb"


def test_one_pixel_image_is_too_small():
    with pytest.raises(ImageRejected) as info:
        decode_image(make_image_bytes("PNG", size=(1, 1)), LIMITS)
    assert info.value.reason == "too_small"


def test_empty_and_oversized_inputs():
    with pytest.raises(ImageRejected) as info:
        probe_image(b"", LIMITS)
    assert info.value.reason == "empty"
    with pytest.raises(ImageRejected) as info:
        probe_image(make_image_bytes("PNG", size=(64, 64)), ImageLimits(max_bytes=10))
    assert info.value.reason == "too_large"


def test_unsupported_format_is_rejected():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="ICO")
    with pytest.raises(ImageRejected) as info:
        probe_image(buffer.getvalue(), LIMITS)
    assert info.value.reason == "not_an_image"
