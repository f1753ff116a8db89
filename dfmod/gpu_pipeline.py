"""The GPU data path: batched JPEG decode on the device, preprocessing kept there, fetch overlapped with inference.

On a GPU the model is not what limits a worker (an H200 runs MobileNetV4-Small at ~78,000 img/s in fp16);
the CPU work per image is: libjpeg decode and the resize alone cost ~1.2 ms of CPU per 256 px image, so
a 16-core node cannot feed more than ~13,000 img/s even with every core decoding. This module moves that
work to the GPU and hides the rest:

* :func:`decode_to_pixels` decodes a batch of JPEGs with nvJPEG (``torchvision.io.decode_jpeg`` on a list,
  ``device="cuda"``), resizes each on the device (bilinear with antialiasing, like Pillow's) and returns
  one uint8 NHWC batch *on the device*, the input :class:`dfmod.torch_model.ServingModule` takes, so the
  pixels never return to the host. Anything nvJPEG refuses (PNG, WebP, CMYK or progressive corner cases,
  corrupt data) falls back to the CPU path (:func:`dfmod.detector.load_pixels`) for that image alone, which
  also enforces the decode limits; on a machine without CUDA the whole batch takes the CPU path.
* :class:`Prefetcher` fetches batch n+1 (storage GET, hash) in a thread while batch n decodes and runs.
* The model runs with the torch backend on CUDA: channels_last, bf16 (fp16 where bf16 is missing) autocast.

The GPU decode and resize are not bit-identical to libjpeg and Pillow: probabilities differ from the CPU path by
a few 1e-3 (0.003 at most on 32 synthetic JPEGs, measured on CPU)
(measured by ``scripts/gpu_bench.py --compare``), which is why the CPU path stays the reference that
``dfmod evaluate`` measures.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from dfmod.detector import ModelMeta, load_pixels
from dfmod.imaging import ImageLimits, ImageRejected

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class DecodedBatch:
    """uint8 (N, H, W, 3) pixels on ``device`` for the images that decoded, their indices, and the failures."""

    pixels: object  # torch.Tensor
    indices: list[int]
    failures: dict[int, ImageRejected]
    on_device: int  # how many were decoded by nvJPEG (the rest went through the CPU path)


def decode_to_pixels(
    datas: Sequence[bytes], meta: ModelMeta, limits: ImageLimits, device: str = "cuda",
    torch_decode: bool | None = None,
) -> DecodedBatch:
    """Decode and resize a batch of images to the model input on ``device``; non-JPEGs via the CPU path.

    ``torch_decode`` forces (or forbids) the torchvision decode-and-resize path; by default it is used
    when ``device`` is a visible CUDA device. (Forced on CPU, it is how the tests exercise it.)
    """
    import torch
    from torch.nn import functional
    from torchvision.io import ImageReadMode, decode_jpeg

    height, width = meta.input_size[1:]
    on_cuda = device.startswith("cuda") and torch.cuda.is_available()
    target = torch.device(device if on_cuda else "cpu")
    use_torch = on_cuda if torch_decode is None else torch_decode
    jpegs = [i for i, data in enumerate(datas) if use_torch and data[:3] == JPEG_MAGIC and len(data) <= limits.max_bytes]
    rows: dict[int, torch.Tensor] = {}
    failures: dict[int, ImageRejected] = {}
    if jpegs:
        from dfmod.imaging import probe_image

        checked = []
        for i in jpegs:
            try:
                probe_image(datas[i], limits)  # header limits (pixels, sides) before any pixel is decoded
                checked.append(i)
            except ImageRejected as exc:
                failures[i] = exc
        try:
            decoded = decode_jpeg(
                [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in checked],
                mode=ImageReadMode.RGB, device=target,
            )
        except RuntimeError as exc:  # one bad image fails the whole nvJPEG batch: redo them on the CPU
            logger.info("nvJPEG refused the batch (%s); decoding it on the CPU", exc)
            decoded = None
        if decoded is not None:
            for i, image in zip(checked, decoded, strict=True):
                # (3, h, w) uint8 -> (h, w, 3) uint8 at the model's size, still on the device
                resized = functional.interpolate(image[None].float(), size=(height, width), mode="bilinear",
                                        antialias=True, align_corners=False)
                rows[i] = resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
    on_device = len(rows)
    for i, data in enumerate(datas):
        if i in rows or i in failures:
            continue
        try:
            rows[i] = torch.from_numpy(load_pixels(data, limits, meta).copy()).to(target, non_blocking=True)
        except ImageRejected as exc:
            failures[i] = exc
    indices = sorted(rows)
    pixels = (
        torch.stack([rows[i] for i in indices]) if indices else torch.zeros((0, height, width, 3), dtype=torch.uint8)
    )
    return DecodedBatch(pixels, indices, failures, on_device)


class Prefetcher(Iterator[R]):
    """Runs ``fetch`` on the next item of ``items`` in a thread while the caller works on the current one.

    A bounded queue (``depth`` items ahead) keeps memory flat; an exception in ``fetch`` is raised to the
    caller at the item where it happened. Order is preserved.
    """

    _DONE = object()

    def __init__(self, items: Iterable[T], fetch: Callable[[T], R], depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items), fetch), daemon=True,
                                        name="dfmod-prefetch")
        self._thread.start()

    def _run(self, items: Iterator[T], fetch: Callable[[T], R]) -> None:
        for item in items:
            if self._stop.is_set():
                return
            try:
                result = (True, fetch(item))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                result = (False, exc)
            self._queue.put(result)
        self._queue.put((True, self._DONE))

    def __next__(self) -> R:
        ok, value = self._queue.get()
        if ok and value is self._DONE:
            raise StopIteration
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass


def fetch_all(get: Callable[[str], bytes], keys: Sequence[str], threads: int = 16) -> list[bytes]:
    """Storage GETs of one batch in parallel (network latency overlaps; no decoding here)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(get, keys))


def probabilities_on_device(serving, pixels, autocast_dtype=None) -> np.ndarray:
    """P(fake) for a device batch through the torch serving module (channels_last, optional autocast)."""
    import torch

    from dfmod.detector import fake_probabilities

    with torch.inference_mode():
        if autocast_dtype is not None and pixels.is_cuda:
            with torch.autocast("cuda", dtype=autocast_dtype):
                logits = serving(pixels)
        else:
            logits = serving(pixels)
    return fake_probabilities(logits.float().cpu().numpy())
