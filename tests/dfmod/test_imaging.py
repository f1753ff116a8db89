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


# --- truncation that Pillow alone decodes as grey ---------------------------------------------------


def _textured_jpeg(rng, size, progressive=False, quality=85) -> bytes:
    """A JPEG with real detail everywhere, so every block costs scan data."""
    small = bytes(rng.randrange(256) for _ in range((size[0] // 8) * (size[1] // 8) * 3))
    image = Image.frombytes("RGB", (size[0] // 8, size[1] // 8), small).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, progressive=progressive)
    return buffer.getvalue()


def _scan_start(data: bytes) -> int:
    position = 2
    while True:
        marker, length = data[position + 1], int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            return position + 2 + length
        position += 2 + length


def _claim_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header's dimensions, leaving the scan data as it is."""
    patched = bytearray(data)
    position = 2
    while True:
        marker, length = patched[position + 1], int.from_bytes(patched[position + 2 : position + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            patched[position + 5 : position + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return bytes(patched)
        position += 2 + length


def test_a_jpeg_cut_inside_its_scan_with_an_end_marker_appended_fails_as_truncated():
    import random

    rng = random.Random(9)
    for _ in range(25):
        data = _textured_jpeg(rng, (rng.randrange(64, 400), rng.randrange(64, 400)), quality=rng.randrange(40, 95))
        start = _scan_start(data)
        assert decode_image(data, LIMITS, target=(224, 224)).mode == "RGB"  # the whole file is fine
        # Pillow on its own decodes the cut file, filling the rest with grey: that is what we must refuse.
        cut = data[: rng.randrange(start + 1, len(data) - 12)] + b"\xff\xd9"
        Image.open(io.BytesIO(cut)).load()
        for target in (None, (224, 224)):
            with pytest.raises(ImageRejected) as info:
                decode_image(cut, LIMITS, target=target)
            assert info.value.reason == "truncated"


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_whose_header_claims_more_pixels_than_its_data_holds_fails_as_truncated(progressive):
    import random

    data = _textured_jpeg(random.Random(1), (256, 256), progressive=progressive)
    liar = _claim_size(data, 7071, 7071)
    assert Image.open(io.BytesIO(liar)).size == (7071, 7071)
    with pytest.raises(ImageRejected) as info:
        decode_image(liar, ImageLimits(max_pixels=50_000_000), target=(224, 224))
    assert info.value.reason == "truncated"


def test_complete_jpegs_of_every_kind_still_decode():
    import random

    rng = random.Random(3)
    for progressive in (False, True):
        for subsampling in (0, 1, 2):
            image = Image.frombytes("RGB", (40, 30), rng.randbytes(40 * 30 * 3)).resize((317, 239))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", progressive=progressive, subsampling=subsampling, quality=90)
            decoded = decode_image(buffer.getvalue(), LIMITS)
            assert decoded.size == (317, 239)
    # Restart markers, a grayscale JPEG and trailing bytes after the end marker (some cameras add them).
    gray = io.BytesIO()
    Image.new("L", (100, 80), 90).save(gray, format="JPEG")
    assert decode_image(gray.getvalue() + b"trailer", LIMITS).getpixel((5, 5))[0] in range(85, 96)
    restarts = io.BytesIO()
    Image.frombytes("RGB", (64, 64), rng.randbytes(64 * 64 * 3)).save(restarts, format="JPEG", restart_marker_blocks=1)
    assert decode_image(restarts.getvalue(), LIMITS).size == (64, 64)


# --- the decode budget -------------------------------------------------------------------------------


def test_decode_budget_caps_pixels_in_flight_and_admits_an_image_larger_than_itself():
    import threading

    from dfmod.imaging import DecodeBudget

    budget = DecodeBudget(1_000_000)
    images = [make_image_bytes("PNG", size=(1000, 600)) for _ in range(6)]  # 600k pixels each
    threads = [threading.Thread(target=decode_image, args=(data, LIMITS, None, budget)) for data in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.peak == 600_000  # never two at once: 1.2 M would exceed the budget
    assert budget.in_use == 0
    # Larger than the whole budget: decoded alone rather than refused or deadlocked.
    assert decode_image(make_image_bytes("PNG", size=(1500, 1000)), LIMITS, budget=budget).size == (1500, 1000)
    assert budget.peak == 1_000_000


def test_decode_budget_is_weighted_by_the_jpeg_size_after_dct_scaling():
    from dfmod.imaging import DecodeBudget

    budget = DecodeBudget(10_000_000)
    decode_image(make_image_bytes("JPEG", size=(2000, 1800)), LIMITS, target=(224, 224), budget=budget)
    assert budget.peak == 250 * 225


# --- libjpeg-turbo's scaled decoding (the worker's fast path) ----------------------------------------


def _pillow_pixels(data: bytes, size=(224, 224)):
    """The model input the way Pillow alone makes it (the path every file took before the fast path)."""
    import numpy as np

    return np.asarray(decode_image(data, LIMITS, target=size).resize(size, Image.Resampling.BILINEAR))


def test_a_256px_jpeg_is_dct_scaled_straight_to_224_and_matches_pillow_closely():
    import random

    import numpy as np

    from dfmod.imaging import decode_jpeg_scaled

    rng = random.Random(5)
    for _ in range(5):
        smooth = Image.frombytes("RGB", (16, 16), rng.randbytes(16 * 16 * 3)).resize((256, 256), Image.Resampling.BICUBIC)
        data = io.BytesIO()
        smooth.save(data, format="JPEG", quality=90)
        pixels = decode_jpeg_scaled(data.getvalue(), LIMITS, target=(224, 224))
        assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8  # 7/8: no resize left to do
        difference = np.abs(pixels.astype(int) - _pillow_pixels(data.getvalue()).astype(int))
        assert difference.mean() < 2.0, difference.mean()


def test_the_scaled_decode_never_upscales_and_keeps_both_sides_at_least_the_target():
    from dfmod.imaging import decode_jpeg_scaled

    assert decode_jpeg_scaled(make_image_bytes("JPEG", size=(120, 90)), LIMITS, target=(224, 224)).shape == (90, 120, 3)
    # 2000x1800: libjpeg-turbo's 1/8 (250x225) as Pillow's draft; 1000x300 at 3/4 -> 750x225 (draft: 1/1).
    assert decode_jpeg_scaled(make_image_bytes("JPEG", size=(2000, 1800)), LIMITS, target=(224, 224)).shape == (225, 250, 3)
    assert decode_jpeg_scaled(make_image_bytes("JPEG", size=(1000, 300)), LIMITS, target=(224, 224)).shape == (225, 750, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_scaled_decode_applies_every_exif_orientation_as_pillow_does(orientation):
    import numpy as np

    from dfmod.imaging import decode_jpeg_scaled

    # Four flat quadrants of different colours: any wrong flip or turn moves a colour.
    image = Image.new("RGB", (96, 64))
    for index, colour in enumerate([(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]):
        image.paste(colour, ((index % 2) * 48, (index // 2) * 32, (index % 2) * 48 + 48, (index // 2) * 32 + 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    expected = np.asarray(decode_image(buffer.getvalue(), LIMITS))
    pixels = decode_jpeg_scaled(buffer.getvalue(), LIMITS, target=expected.shape[1::-1])  # 1/1: same decode
    assert pixels.shape == expected.shape
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 2


def test_files_the_scaled_decode_does_not_take_are_decoded_or_rejected_exactly_as_by_pillow():
    """Seeded hostile files: load_pixels (fast path first) and Pillow's path accept and reject the same
    files, with the same reasons; the fast path declines CMYK and cut scans, among others."""
    import random

    from dfmod.detector import load_pixels, read_meta
    from dfmod.imaging import decode_jpeg_scaled
    from tests.utils.hostile_inputs import bad_image, valid_image

    meta = read_meta(_shipped_checkpoint())
    rng = random.Random(2024)
    outcomes = {"both_rejected": 0, "both_decoded": 0}
    for _ in range(300):
        kind, data = bad_image(rng) if rng.random() < 0.8 else ("valid", valid_image(rng))
        results = []
        for decode in (lambda d: load_pixels(d, LIMITS, meta), lambda d: _pillow_pixels(d, meta.image_size)):
            try:
                results.append(("decoded", decode(data).shape))
            except ImageRejected as exc:
                results.append(("rejected", exc.reason))
        assert results[0] == results[1], (kind, results)
        outcomes["both_rejected" if results[0][0] == "rejected" else "both_decoded"] += 1
    assert min(outcomes.values()) > 30, outcomes
    # What the fast path declines (None: Pillow decides), although it is a JPEG with a valid header.
    cmyk = make_image_bytes("JPEG", size=(64, 64), mode="CMYK")
    whole = make_image_bytes("JPEG", size=(300, 200))
    cut = whole[: len(whole) // 2] + b"\xff\xd9"
    for declined in (cmyk, cut):
        assert decode_jpeg_scaled(declined, LIMITS, target=(224, 224)) is None


def _shipped_checkpoint():
    from pathlib import Path

    import dfmod

    return Path(dfmod.__file__).parent / "models" / "mnv4s-faces256.safetensors"


def test_the_hot_paths_scan_check_agrees_with_the_whole_file_walk_at_every_cut():
    """The scaled decode's scan check reads only the bytes the rule needs; it must reach the same verdict and
    reason as the whole-file walk: seeded hostile files, and every cut of real scans around the boundary."""
    import random

    from dfmod.imaging import _check_jpeg_scan_size, _checked_jpeg_scan
    from tests.utils.hostile_inputs import bad_image, valid_image

    def outcome(check, data, size):
        try:
            check(data, *size)
        except ImageRejected as exc:
            return exc.reason, str(exc)
        return "ok"

    rng = random.Random(77)
    seen = set()
    cases = [bad_image(rng)[1] if rng.random() < 0.7 else valid_image(rng) for _ in range(200)]
    for _ in range(6):
        data = _textured_jpeg(rng, (rng.randrange(16, 300), rng.randrange(16, 300)), quality=rng.randrange(40, 95))
        start = _scan_start(data)
        for cut in range(start, min(len(data), start + 400)):  # an end marker at each place in and past the need
            cases.append(data[:cut] + b"\xff\xd9")
        cases.append(data[: start + 3])  # cut with no end marker at all
    for data in cases:
        for size in ((64, 64), (256, 256), (300, 17), (1, 1)):
            expected = outcome(_checked_jpeg_scan, data, size)
            assert outcome(_check_jpeg_scan_size, data, size) == expected, (len(data), size)
            seen.add(expected if expected == "ok" else expected[0])
    assert seen == {"ok", "truncated", "corrupt"}
