#!/usr/bin/env python3
"""GPU figures for the ops guide: model-only, decode-only and the worker data path, on whatever GPU is lent.

    python scripts/gpu_bench.py --json > gpu.json          # on a machine with CUDA and `pip install -e '.[gpu]'`
    python scripts/gpu_bench.py --device cpu --images 256  # a smoke run of the same code on CPU

* model-only: the torch serving module (uint8 NHWC in, BatchNorm folded, channels_last) under bf16 autocast
  (fp16 where bf16 is missing) at ``--batch``, on random pixels already on the device;
* decode-only: nvJPEG batched decode + on-device resize (:func:`dfmod.gpu_pipeline.decode_to_pixels`) of
  256 px JPEGs already in host memory;
* data path: JPEG files in a local folder -> parallel reads (prefetched one batch ahead) -> GPU decode ->
  model -> probabilities on the host, which is what a GPU worker does per batch minus the database;
* ``--compare``: the largest probability difference between the GPU path and the CPU reference path.

Every figure is the median of ``--repeats`` timed runs after a warm-up, with CUDA synchronised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfmod.bench import synthetic_jpegs
from dfmod.detector import default_checkpoint_path, load_pixels, read_meta, resolve_checkpoint_path
from dfmod.gpu_pipeline import Prefetcher, decode_to_pixels, fetch_all, probabilities_on_device
from dfmod.imaging import ImageLimits


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(run, device: str, repeats: int) -> list[float]:
    run()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="JPEGs for the decode and data-path runs")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", action="store_true", help="also report GPU vs CPU path probability difference")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from dfmod.torch_model import load_serving_module

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device visible; use --device cpu for a smoke run")
    checkpoint = resolve_checkpoint_path(args.checkpoint) if args.checkpoint else default_checkpoint_path()
    meta = read_meta(checkpoint)
    serving, _, folded = load_serving_module(checkpoint)
    serving = serving.to(device, memory_format=torch.channels_last)
    autocast = None
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    height, width = meta.input_size[1:]
    results: dict = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "batch": args.batch, "images": args.images, "jpeg_side": args.size,
        "autocast": str(autocast).replace("torch.", "") if autocast else "fp32", "batchnorm_folded": folded,
    }

    # --- model-only -----------------------------------------------------------------------------------------
    pixels = torch.randint(0, 256, (args.batch, height, width, 3), dtype=torch.uint8, device=device)

    def forward() -> None:
        with torch.inference_mode():
            if autocast is not None:
                with torch.autocast("cuda", dtype=autocast):
                    serving(pixels)
            else:
                serving(pixels)

    runs = _timed(lambda: [forward() for _ in range(10)], device, args.repeats)
    results["model_only_img_s"] = round(10 * args.batch / statistics.median(runs), 1)

    # --- decode-only ----------------------------------------------------------------------------------------
    jpegs = synthetic_jpegs(args.images, size=args.size, seed=3)
    limits = ImageLimits()

    def decode_all() -> None:
        for start in range(0, len(jpegs), args.batch):
            decode_to_pixels(jpegs[start : start + args.batch], meta, limits, device=device,
                             torch_decode=True)

    runs = _timed(decode_all, device, args.repeats)
    results["decode_only_img_s"] = round(len(jpegs) / statistics.median(runs), 1)

    # --- data path: files -> prefetched reads -> GPU decode -> model -> host ------------------------------------
    with tempfile.TemporaryDirectory(prefix="dfmod-gpu-bench-") as scratch:
        folder = Path(scratch)
        paths = []
        for index, data in enumerate(jpegs):
            path = folder / f"{index:06d}.jpg"
            path.write_bytes(data)
            paths.append(path)
        batches = [paths[start : start + args.batch] for start in range(0, len(paths), args.batch)]

        def data_path() -> None:
            prefetch = Prefetcher(batches, lambda batch: fetch_all(Path.read_bytes, batch), depth=2)
            for datas in prefetch:
                decoded = decode_to_pixels(datas, meta, limits, device=device, torch_decode=True)
                probabilities_on_device(serving, decoded.pixels.contiguous(), autocast)

        runs = _timed(data_path, device, args.repeats)
        results["data_path_img_s"] = round(len(paths) / statistics.median(runs), 1)

    if args.compare:
        sample = jpegs[: args.batch]
        decoded = decode_to_pixels(sample, meta, limits, device=device, torch_decode=True)
        on_device = probabilities_on_device(serving, decoded.pixels.contiguous(), autocast)
        reference_pixels = np.stack([load_pixels(data, limits, meta) for data in sample])
        serving_cpu, _, _ = load_serving_module(checkpoint)
        reference = probabilities_on_device(serving_cpu, torch.from_numpy(reference_pixels))
        results["max_probability_difference_vs_cpu_path"] = round(float(np.abs(on_device - reference).max()), 5)

    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        for key, value in results.items():
            print(f"{key:40} {value}")


if __name__ == "__main__":
    main()
