"""The GPU data path, tested on CPU: torchvision's batched decode and on-device resize match the CPU path
closely, anything it cannot decode falls back per image, and the prefetcher overlaps fetching with work."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from dfmod.detector import Predictor, default_checkpoint_path, load_pixels, read_meta
from dfmod.gpu_pipeline import Prefetcher, decode_to_pixels, probabilities_on_device
from dfmod.imaging import ImageLimits
from tests.utils.images import make_image_bytes

pytest.importorskip("torchvision")


def _jpegs(count: int, size=(320, 256)) -> list[bytes]:
    rng = np.random.default_rng(5)
    out = []
    for _ in range(count):
        small = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def test_torch_decode_and_resize_stay_close_to_the_cpu_path():
    meta = read_meta(default_checkpoint_path())
    datas = _jpegs(6)
    batch = decode_to_pixels(datas, meta, ImageLimits(), device="cpu", torch_decode=True)
    assert batch.on_device == 6 and batch.indices == list(range(6)) and not batch.failures
    assert tuple(batch.pixels.shape) == (6, 224, 224, 3) and str(batch.pixels.dtype) == "torch.uint8"
    # Pixels: the GPU path decodes whole and resizes as Pillow does, so Pillow's path is its reference (the
    # CPU worker's DCT-scaled decode resamples differently; the verdicts below are what must agree with it).
    pillow = np.stack([load_pixels(data, ImageLimits(), meta, scaled_jpeg=False) for data in datas])
    difference = np.abs(batch.pixels.numpy().astype(int) - pillow.astype(int))
    assert difference.mean() < 2.0  # a few levels: different IDCT and resampling kernels
    reference = np.stack([load_pixels(data, ImageLimits(), meta) for data in datas])
    from dfmod.torch_model import load_serving_module

    serving, _meta, _ = load_serving_module(default_checkpoint_path())
    on_device = probabilities_on_device(serving, batch.pixels)
    cpu_path = Predictor(default_checkpoint_path(), device="cpu", backend="torch").predict_pixels(reference)
    assert np.abs(on_device - cpu_path).max() < 0.05


def test_without_cuda_the_batch_takes_the_cpu_path_exactly():
    meta = read_meta(default_checkpoint_path())
    datas = _jpegs(3)
    batch = decode_to_pixels(datas, meta, ImageLimits(), device="cuda")  # no CUDA here: CPU path
    assert batch.on_device == 0
    expected = np.stack([load_pixels(data, ImageLimits(), meta) for data in datas])
    assert np.array_equal(batch.pixels.numpy(), expected)


def test_bad_and_non_jpeg_images_fail_or_fall_back_one_by_one():
    meta = read_meta(default_checkpoint_path())
    good = _jpegs(2)
    png = make_image_bytes("PNG", size=(100, 80))
    truncated = good[0][: len(good[0]) // 3]
    datas = [good[0], png, truncated, good[1], b"\xff\xd8\xffnot really"]
    batch = decode_to_pixels(datas, meta, ImageLimits(), device="cpu", torch_decode=True)
    assert batch.indices == [0, 1, 3]
    assert set(batch.failures) == {2, 4}
    assert all(exc.reason in ("truncated", "corrupt", "not_an_image") for exc in batch.failures.values())


def test_prefetcher_fetches_the_next_batch_while_the_current_one_is_worked_on():
    started = {i: threading.Event() for i in range(4)}

    def fetch(i: int) -> int:
        started[i].set()
        if i == 3:
            raise OSError("storage fault on the last batch")
        return i * 10

    prefetch = Prefetcher(range(4), fetch, depth=1)
    seen = []
    with pytest.raises(OSError, match="storage fault"):
        for value in prefetch:
            index = value // 10
            if index + 1 < 4:
                # While the consumer still holds batch n, batch n+1 is already being fetched.
                assert started[index + 1].wait(timeout=5)
            seen.append(value)
    assert seen == [0, 10, 20]
    prefetch.close()
