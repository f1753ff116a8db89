"""Safe image decoding shared by the API (validation), the worker and evaluation.

Untrusted bytes go through :func:`decode_image`, which either returns an RGB image no larger than it needs
to be or raises :class:`ImageRejected` with a reason a reviewer can read. It guards against decompression
bombs before any pixel is decoded, applies EXIF orientation, lets libjpeg downscale in the DCT domain
(``Image.draft``) so a 6000-px JPEG costs little more than a 750-px one, flattens alpha onto white, takes the
first frame of animations and converts grayscale, CMYK and palette images to RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dfmod.errors import DfmodError

# Formats people upload; anything else (PDF, PSD, ICO, ...) is rejected before a decoder is chosen,
# which keeps the attack surface to the decoders we expect.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO (multi-picture) files

# Truncated files must fail, not decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel limit is checked on the header before decoding; Pillow's warning below its hard limit is noise.
# (Filtered once here: warnings.catch_warnings() per call is not thread-safe, and the worker decodes in threads.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(DfmodError, ValueError):
    """The bytes are not an image dfmod will classify; ``reason`` is a short machine-friendly code.

    The API answers 413 for ``too_large``, 415 for ``not_an_image`` and 422 for every other reason (the
    request was well formed, its image cannot be used), wherever the image was read.
    """

    _STATUS = {"too_large": 413, "not_an_image": 415}

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail, code=reason, http_status=self._STATUS.get(reason, 422))
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 16


@dataclass(frozen=True)
class ProbeResult:
    format: str
    width: int
    height: int
    mime: str


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open untrusted bytes lazily (header only) and enforce the byte, format and dimension limits."""
    if not data:
        raise ImageRejected("empty", "the file is empty")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_an_image", f"not a supported image ({', '.join(ACCEPTED_FORMATS)})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("corrupt", str(exc) or type(exc).__name__) from exc
    _check_dimensions(*image.size, limits)
    return image


def probe_image(data: bytes, limits: ImageLimits) -> ProbeResult:
    """Read only the header: format and size. Cheap enough for the API to call on every upload."""
    with _open(data, limits) as image:
        fmt = image.format or "unknown"
        return ProbeResult(
            format=fmt, width=image.size[0], height=image.size[1], mime=Image.MIME.get(fmt, "application/octet-stream")
        )


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "decompression_bomb", f"{width}x{height} exceeds the limit of {limits.max_pixels} pixels"
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected("too_small", f"{width}x{height} is below the minimum side of {limits.min_side} px")


def decode_image(data: bytes, limits: ImageLimits, target: tuple[int, int] | None = None) -> Image.Image:
    """Decode untrusted bytes into an RGB image, downscaled by the JPEG decoder towards ``target``.

    ``target`` is (width, height) of the model input; the result is never smaller than it on either side
    (``draft`` only picks scales that keep the image at least that large), so the final resize still
    sees real pixels. The limits are checked on the header, before any pixel is decoded.
    """
    image = _open(data, limits)
    try:
        if target is not None and image.format in ("JPEG", "MPO"):
            image.draft("RGB", target)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        reason = "truncated" if "truncated" in message.lower() else "corrupt"
        raise ImageRejected(reason, message) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # Palette images may carry transparency in their info; RGBA keeps it for the flattening below.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits rather than clipping everything above 255 to white.
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")
