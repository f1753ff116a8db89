#!/usr/bin/env python3
"""CPU per image of the worker's per-image steps outside the S3 GET and the forward pass: the figures behind
the README's account of the worker's CPU outside the forward pass (Benchmarks).

    python scripts/decode_costs.py [--images 64] [--loops 2000] [--cpu 0]

On the bench's 256 px synthetic JPEGs (:func:`dfmod.bench.synthetic_jpegs`), one step at a time in one
thread pinned to ``--cpu``: sha256, the worker's whole decode (:func:`dfmod.detector.load_pixels`, with and
without libjpeg-turbo's scaled decode), and its parts (Pillow's checks, the scan walk, libjpeg-turbo at the
7/8 scale that gives 224 px straight away, a full 256 px decode, Pillow's resize from 256 to 224). The S3
GET's client and server CPU are in ``scripts/service_costs.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import numpy as np
import simplejpeg
from PIL import Image

from dfmod import imaging
from dfmod.bench import synthetic_jpegs
from dfmod.detector import load_pixels, read_meta, resize_for_model, resolve_checkpoint_path
from dfmod.settings import Settings


def cpu_ms(step, images: list[bytes], loops: int) -> float:
    step(images[0])
    started = time.process_time()
    for index in range(loops):
        step(images[index % len(images)])
    return 1000.0 * (time.process_time() - started) / loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--loops", type=int, default=2000)
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin this process to (Linux)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    images = synthetic_jpegs(args.images, seed=5)
    settings = Settings()
    limits = settings.image_limits
    meta = read_meta(resolve_checkpoint_path(settings.checkpoint))
    width, height = meta.image_size
    full = simplejpeg.decode_jpeg(images[0], colorspace="RGB")

    def pillow_checks(data: bytes) -> None:
        with imaging._open(data, limits) as image:
            image.getexif()

    steps = {
        "sha256": lambda data: hashlib.sha256(data).hexdigest(),
        "load_pixels (the worker's decode)": lambda data: load_pixels(data, limits, meta),
        "load_pixels, Pillow only": lambda data: load_pixels(data, limits, meta, scaled_jpeg=False),
        "  Pillow's checks (open, EXIF)": pillow_checks,
        "  the scan walk": lambda data: imaging._checked_jpeg_scan(data, 256, 256),
        f"  libjpeg-turbo, scaled to {width} px": lambda data: simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=height, min_width=width
        ),
        "  libjpeg-turbo, full 256 px": lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB"),
        f"  Pillow resize 256 -> {width} ({meta.interpolation})": lambda _data: resize_for_model(
            Image.fromarray(full), meta
        ),
    }
    print(f"{len(images)} JPEGs of {int(np.mean([len(d) for d in images]))} bytes, CPU {args.cpu}, {args.loops} loops")
    for name, step in steps.items():
        print(f"{name:42s} {cpu_ms(step, images, args.loops):7.3f} ms of CPU per image")


if __name__ == "__main__":
    main()
