"""Image bytes made on the fly, in any format, size and mode Pillow writes."""

from __future__ import annotations

import io

from PIL import Image


def make_image_bytes(fmt: str = "JPEG", size=(64, 64), color=(200, 40, 40), mode: str = "RGB", **save) -> bytes:
    image = Image.new(mode, size, color if mode != "L" else 128)
    # Some texture, so JPEG encoders and the model see more than a flat field.
    for x in range(0, size[0], 8):
        for y in range(0, size[1], 8):
            if (x // 8 + y // 8) % 2 and mode in ("RGB", "RGBA"):
                image.putpixel((x, y), (0, 0, 0) if mode == "RGB" else (0, 0, 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()
