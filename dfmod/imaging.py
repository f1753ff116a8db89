"""Safe image decoding shared by the API (validation), the worker and evaluation.

Untrusted bytes go through :func:`decode_image`, which either returns an RGB image no larger than it needs
to be or raises :class:`ImageRejected` with a reason a reviewer can read. It guards against decompression
bombs before any pixel is decoded, applies EXIF orientation, lets libjpeg downscale in the DCT domain
(``Image.draft``) so a 6000-px JPEG costs little more than a 750-px one, flattens alpha onto white, takes the
first frame of animations and converts grayscale, CMYK and palette images to RGB.

Two things Pillow alone lets through are caught here:

* **Truncated JPEGs.** libjpeg treats a missing end of scan data as a warning: a file cut inside its scan
  data with an end-of-image marker appended, or a header that claims more pixels than the data holds,
  decodes "successfully" with the missing part filled in grey. Pillow discards those warnings, so
  :func:`decode_image` (1) checks that the scan data can hold the claimed size at all (every block of the
  first scan costs at least one bit) and (2) decodes single-scan JPEGs with the end-of-image marker replaced
  by a few bytes of padding: a complete scan never needs them, while a cut one runs out of data and fails
  as ``truncated`` instead of reading a marker as the end of its pixels.
* **Speed.** Pillow's ``draft`` only scales by halves, so a 256-px face decodes at 256 px and is then
  resized to 224 (the resize costs more than the decode). :func:`decode_jpeg_scaled` lets libjpeg-turbo
  scale by any of its M/8 factors instead (7/8: straight to 224 px, no resize) for the common case, a
  colour or grey JPEG, after the same checks; anything it does not take cleanly goes to Pillow's path.
* **Memory.** Decoded pixels cost far more than encoded bytes (a 1 MB PNG can hold 50 megapixels, 200 MB as
  RGBA). A :class:`DecodeBudget` caps the pixels being decoded at once in a process: each decode reserves
  its image's size (after JPEG DCT scaling) before allocating and gives it back when done, so peak memory is
  bounded by the budget, not by how many bad files arrive together.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dfmod.errors import DfmodError

try:
    import simplejpeg  # libjpeg-turbo's scaled decoding (a base dependency, MIT)
except ImportError:  # pragma: no cover - without it every JPEG takes Pillow's path
    simplejpeg = None

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


def share_allocator_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas so memory a decode thread frees is reused by the next decode.

    With one arena per thread (glibc's default, up to 8 per core), each of the worker's sixteen fetch
    threads keeps the hundreds of MB its last large decode freed, and the decode budget bounds pixels in
    flight but not the process: measured 1.46 GB peak RSS for eight 50-megapixel PNGs decoded one at a time,
    0.40 GB with two arenas. Returns False where there is no glibc (nothing to do).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_arena_max = -8  # from glibc's malloc.h
    return bool(mallopt(m_arena_max, arenas))


class DecodeBudget:
    """A semaphore weighted by pixels: at most ``pixels`` being decoded at once in this process.

    An image larger than the whole budget still runs, but alone, so every allowed image can be decoded.
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError("a decode budget needs at least one pixel")
        self.capacity = pixels
        self._in_use = 0
        self._peak = 0
        self._condition = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def peak(self) -> int:
        """The most pixels ever held at once (for tests and the benchmark)."""
        return self._peak

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        weight = max(1, min(pixels, self.capacity))
        with self._condition:
            self._condition.wait_for(lambda: self._in_use + weight <= self.capacity)
            self._in_use += weight
            self._peak = max(self._peak, self._in_use)
        try:
            yield
        finally:
            with self._condition:
                self._in_use -= weight
                self._condition.notify_all()


# Bytes of padding that stand in for a single-scan JPEG's end-of-image marker: enough for libjpeg's
# look-ahead past the last Huffman code of a complete scan (measured: 8 suffices), too few to stand in for
# more than a block or two of a cut one.
_JPEG_SCAN_PADDING = b"\x00" * 16
_SOI, _SOS, _EOI = b"\xff\xd8", 0xDA, b"\xff\xd9"
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


@dataclass(frozen=True)
class _JpegScan:
    start: int  # first byte of entropy-coded data of the first scan
    end: int  # position of the end-of-image marker (len(data) if there is none)
    scans: int  # number of SOS markers


def _first_scan_start(data: bytes) -> int:
    """Where the first scan's entropy-coded data starts; :class:`ImageRejected` if the marker walk fails."""
    if not data.startswith(_SOI):
        raise _malformed_markers()
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise _malformed_markers()
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            raise _malformed_markers()
        if marker == _SOS:
            return position + 2 + length
        position += 2 + length
    raise _malformed_markers()


def _malformed_markers() -> ImageRejected:
    return ImageRejected("corrupt", "the JPEG's marker segments are malformed")


def _blocks(width: int, height: int) -> int:
    """8x8 blocks of a component at full resolution: the scan-size rule spends at least one bit on each."""
    return math.ceil(width / 8) * math.ceil(height / 8)


def _check_scan_size(start: int, end: int, width: int, height: int) -> None:
    """The scan-size rule: a scan must spend at least one bit on each 8x8 block of the first component it codes."""
    blocks = _blocks(width, height)
    if 8 * max(0, end - start) < blocks:
        raise ImageRejected(
            "truncated",
            f"the header claims {width}x{height} ({blocks} blocks) but the scan data holds {end - start} bytes",
        )


def _checked_jpeg_scan(data: bytes, width: int, height: int) -> _JpegScan:
    """The JPEG's first scan, or :class:`ImageRejected` if its markers are malformed or it is too short."""
    start = _first_scan_start(data)
    # Entropy-coded data stuffs every 0xFF with 0x00, so these byte pairs can only be markers.
    end = data.find(_EOI, start)
    end = len(data) if end < 0 else end
    _check_scan_size(start, end, width, height)
    return _JpegScan(start, end, scans=1 + data.count(b"\xff\xda", start, end))


def _check_jpeg_scan_size(data: bytes, width: int, height: int) -> None:
    """:func:`_checked_jpeg_scan`'s checks, with the same outcome and reason, reading only the bytes the rule needs.

    The rule asks for ``blocks / 8`` bytes before the first end-of-image marker, so only those bytes are
    searched for one (128 of a 256-px face's 15-30 KB). This is the worker's hot path, where searching the
    whole file and counting its scans cost about 0.07 ms per image.
    """
    start = _first_scan_start(data)
    needed = math.ceil(_blocks(width, height) / 8)
    end = data.find(_EOI, start, start + needed + 1)  # a marker at start + needed or later leaves enough
    _check_scan_size(start, min(len(data), start + needed) if end < 0 else end, width, height)


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


# EXIF orientations that turn the picture by 90 degrees (width and height swap when displayed).
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def oriented_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header alone.

    Only for bytes that :func:`decode_image` already accepted."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
            return height, width
        return width, height


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


def decode_image(
    data: bytes, limits: ImageLimits, target: tuple[int, int] | None = None, budget: DecodeBudget | None = None
) -> Image.Image:
    """Decode untrusted bytes into an RGB image, downscaled by the JPEG decoder towards ``target``.

    ``target`` is (width, height) of the model input; the result is never smaller than it on either side
    (``draft`` only picks scales that keep the image at least that large), so the final resize still
    sees real pixels. The limits are checked on the header, before any pixel is decoded; with a ``budget``,
    the decode waits until its pixels fit in it.
    """
    image = _open(data, limits)
    if image.format in ("JPEG", "MPO"):
        scan = _checked_jpeg_scan(data, *image.size)
        # (An MPO's later pictures follow its first one's end-of-image marker: leave those files whole.)
        if scan.scans == 1 and image.format == "JPEG":
            # See the module docstring: a cut scan must run out of data rather than meet a marker.
            image.close()
            image = _open(data[: scan.end] + _JPEG_SCAN_PADDING, limits)
    try:
        if target is not None and image.format in ("JPEG", "MPO"):
            image.draft("RGB", target)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        width, height = image.size
        with budget.reserve(width * height) if budget is not None else _no_budget():
            image.load()
            if target is not None:
                image = _reduce_towards(image, target)
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        reason = "truncated" if "truncated" in message.lower() else "corrupt"
        raise ImageRejected(reason, message) from exc


def decode_jpeg_scaled(
    data: bytes, limits: ImageLimits, target: tuple[int, int], budget: DecodeBudget | None = None
) -> np.ndarray | None:
    """A colour or grey JPEG as RGB uint8 (H, W, 3), orientation applied, decoded by libjpeg-turbo at the
    smallest of its M/8 scales that keeps both sides >= ``target`` (never above 1/1); None otherwise.

    The bytes pass the checks of :func:`decode_image` first (limits, marker walk, scan size), which raise
    :class:`ImageRejected` as there. The decode itself is strict: any libjpeg warning (a scan cut short, a
    marker inside scan data) raises, and then, as for CMYK, MPO files or an unreadable EXIF
    block, this returns None so that :func:`decode_image` decodes the file or rejects it with its reason.
    So a file is accepted or rejected exactly as before; only clean files take this path.
    """
    if simplejpeg is None:
        return None
    with _open(data, limits) as image:
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a malformed EXIF block, whatever it raises: Pillow's path decides
            return None
    _check_jpeg_scan_size(data, width, height)
    min_width, min_height = target
    if orientation in _TRANSPOSING_ORIENTATIONS:  # the target applies to the picture as displayed
        min_width, min_height = min_height, min_width
    try:
        out_height, out_width, _, _ = simplejpeg.decode_jpeg_header(data, min_height=min_height, min_width=min_width)
        with budget.reserve(out_width * out_height) if budget is not None else _no_budget():
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height, min_width=min_width)
    except ValueError:
        return None
    return _orient(pixels, orientation)


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to (H, W, C) pixels, as :func:`PIL.ImageOps.exif_transpose` does."""
    oriented = {
        2: lambda a: a[:, ::-1],  # mirrored
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # flipped
        5: lambda a: a.transpose(1, 0, 2),  # transposed
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # rotated 90 clockwise
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
        8: lambda a: a.transpose(1, 0, 2)[::-1],  # rotated 90 counter-clockwise
    }.get(orientation)
    return pixels if oriented is None else np.ascontiguousarray(oriented(pixels))


# Modes Image.reduce handles; others (palette, 1-bit, 16-bit) are converted first at full size.
_REDUCIBLE_MODES = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F", "CMYK", "YCbCr")


def _reduce_towards(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Box-reduce a large decoded image by an integer factor that keeps both sides >= the target's longest
    side (so any later rotation still covers it): every copy after this one is small."""
    factor = min(image.size) // max(target)
    if factor < 2 or image.mode not in _REDUCIBLE_MODES:
        return image
    reduced = image.reduce(factor)
    reduced.info = image.info  # keeps the EXIF orientation for exif_transpose
    return reduced


@contextmanager
def _no_budget() -> Iterator[None]:
    yield


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
