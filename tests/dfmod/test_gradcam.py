"""Grad-CAM on the real MobileNetV4-Small: it matches a textbook hook-based computation on the last stage,
reports the same probability as the worker, and renders an overlay at the image's proportions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dfmod.detector import FAKE_INDEX, Predictor, to_pixels
from dfmod.gradcam import gradcam, heatmap, occlusion_map, overlay_png
from tests.utils.images import make_image_bytes


@pytest.fixture(scope="module")
def predictor(checkpoint_path):
    return Predictor(checkpoint_path, device="cpu", torch_threads=1, backend="torch")


def _reference_cam(predictor, image) -> np.ndarray:
    """Grad-CAM as usually written: a forward hook on the last stage captures activations."""
    import torch

    captured = {}
    from dfmod.torch_model import normalised_tensor

    model = predictor.runner.model
    handle = model.blocks[-1].register_forward_hook(lambda _m, _i, output: captured.setdefault("a", output))
    try:
        batch = normalised_tensor(to_pixels(image, predictor.meta), predictor.meta)[None]
        with torch.enable_grad():
            logits = model(batch)
            (gradient,) = torch.autograd.grad(logits[0, FAKE_INDEX], captured["a"])
    finally:
        handle.remove()
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured["a"]).sum(dim=1))[0].detach().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def test_gradcam_matches_the_hook_based_reference_and_the_workers_probability(predictor):
    image = Image.open(io.BytesIO(make_image_bytes(size=(320, 240), color=(180, 120, 90)))).convert("RGB")
    cam, probability = gradcam(predictor, image)
    assert cam.shape == (7, 7) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cam, _reference_cam(predictor, image), rtol=1e-4, atol=1e-5)
    assert probability == pytest.approx(float(predictor.predict_images([image])[0]), abs=1e-5)


def test_different_images_give_different_maps(predictor):
    first = Image.open(io.BytesIO(make_image_bytes(size=(224, 224), color=(250, 10, 10)))).convert("RGB")
    second = Image.new("RGB", (224, 224), (10, 10, 250))
    second.paste((250, 250, 250), (0, 0, 112, 112))
    assert not np.allclose(gradcam(predictor, first)[0], gradcam(predictor, second)[0])


def test_overlay_keeps_the_image_proportions_and_is_capped(predictor):
    image = Image.open(io.BytesIO(make_image_bytes(size=(1600, 800)))).convert("RGB")
    cam, _ = gradcam(predictor, image)
    rendered = Image.open(io.BytesIO(overlay_png(image, cam)))
    assert rendered.format == "PNG" and rendered.size == (768, 384)
    # The overlay is not the image: the heat colours are blended in.
    base = np.asarray(image.resize((768, 384)), dtype=np.float32)
    assert np.abs(np.asarray(rendered, dtype=np.float32) - base).mean() > 5


@pytest.fixture(scope="module")
def onnx_predictor(exported_checkpoint):
    return Predictor(exported_checkpoint, device="cpu", torch_threads=1, backend="onnxruntime", precision="fp32")


def test_torch_free_backends_make_occlusion_maps_that_follow_the_evidence(onnx_predictor):
    """A worker without torch explains with occlusion: the map is high exactly where occluding moves P(fake)."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    cam, probability, method = heatmap(onnx_predictor, image)
    assert method == "occlusion" and cam.shape == (7, 7)
    assert probability == pytest.approx(float(onnx_predictor.predict_images([image])[0]), abs=1e-6)
    # Recompute the strongest cell by hand: greying it out lowers P(fake) by the map's peak.
    pixels = to_pixels(image, onnx_predictor.meta)
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    occluded = pixels.copy()
    occluded[row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32] = 128
    drop = probability - float(onnx_predictor.predict_pixels([occluded])[0])
    if cam.max() > 0:
        assert drop > 0 and cam.max() == pytest.approx(1.0)
    assert Image.open(io.BytesIO(overlay_png(image, cam))).size == (224, 224)


def test_gradcam_refuses_a_backend_without_gradients(onnx_predictor):
    with pytest.raises(ValueError, match="torch backend"):
        gradcam(onnx_predictor, Image.new("RGB", (64, 64)))
    assert occlusion_map(onnx_predictor, Image.new("RGB", (64, 64)))[0].shape == (7, 7)
