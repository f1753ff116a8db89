"""Checkpoints, the one preprocessing path and the predictor that the worker, evaluation and the benchmark share."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dfmod.detector import (
    IMAGENET_MEAN,
    ModelMeta,
    ModelNotAvailable,
    Predictor,
    build_model,
    default_checkpoint_path,
    fold_batchnorm,
    load_checkpoint,
    read_meta,
    resolve_checkpoint_path,
    save_checkpoint,
)


def test_checkpoint_round_trips_weights_and_metadata(tmp_path):
    import torch

    meta = ModelMeta(threshold=0.37, model_version="v-test", threshold_rule="max F1", extra={"epochs": 3})
    model = build_model(meta)
    path = save_checkpoint(model, meta, tmp_path / "m.safetensors")
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta and read_meta(path) == meta
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_half_checkpoint_is_smaller_and_predicts_alike(tmp_path):
    meta = ModelMeta(model_version="v-half")
    model = build_model(meta).eval()
    full = save_checkpoint(model, meta, tmp_path / "full.safetensors")
    half = save_checkpoint(model, meta, tmp_path / "half.safetensors", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    images = [Image.new("RGB", (256, 256), (i * 40, 100, 200 - i * 30)) for i in range(4)]
    a = Predictor(full, device="cpu", backend="torch").predict_images(images)
    b = Predictor(half, device="cpu", backend="torch").predict_images(images)
    assert np.allclose(a, b, atol=1e-2)


def test_pixels_are_resized_uint8_and_the_serving_module_normalises_them():
    import torch

    from dfmod.detector import to_pixels
    from dfmod.torch_model import ServingModule

    meta = ModelMeta()
    pixels = to_pixels(Image.new("RGB", (500, 300), (255, 0, 0)), meta)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8 and tuple(pixels[0, 0]) == (255, 0, 0)
    normalised = ServingModule(torch.nn.Identity(), meta).normalise(torch.from_numpy(pixels[None]))
    assert normalised.shape == (1, 3, 224, 224)
    assert normalised[0, 0, 0, 0].item() == pytest.approx((1.0 - IMAGENET_MEAN[0]) / 0.229, rel=1e-5)
    assert normalised[0, 1, 0, 0].item() == pytest.approx((0.0 - IMAGENET_MEAN[1]) / 0.224, rel=1e-5)


def test_predictor_returns_one_probability_per_image(checkpoint_path):
    predictor = Predictor(checkpoint_path, device="cpu")
    probabilities = predictor.predict_images([Image.new("RGB", (64, 64), (c, c, c)) for c in (0, 128, 255)])
    assert probabilities.shape == (3,)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    assert predictor.model_version == "test-random-0001"
    assert predictor.label_for(0.5) == "fake" and predictor.label_for(0.49) == "real"


def test_missing_checkpoint_is_reported_loudly(tmp_path):
    with pytest.raises(ModelNotAvailable, match="not found"):
        resolve_checkpoint_path(tmp_path / "nope.safetensors")


def test_non_dfmod_safetensors_is_rejected(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no dfmod metadata"):
        read_meta(tmp_path / "other.safetensors")


def _randomise_norm_statistics(model, seed: int = 0) -> None:
    """Fresh models have mean 0, var 1, weight 1, bias 0: folding those would prove little."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 0.1)
            module.weight.data.copy_(torch.randn(shape, generator=generator))
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.2)


def test_folding_batchnorm_keeps_the_function_and_removes_every_norm():
    import copy

    import torch

    model = build_model(ModelMeta()).eval()
    _randomise_norm_statistics(model)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded_model = copy.deepcopy(model)
    assert fold_batchnorm(folded_model) == norms > 40
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded_model.modules())
    batch = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, actual = model(batch), folded_model(batch)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(build_model(ModelMeta()).train())


def test_predictor_serves_the_shipped_model_folded_with_unchanged_probabilities():
    import torch

    from dfmod.detector import to_pixels
    from dfmod.torch_model import normalised_tensor

    predictor = Predictor(default_checkpoint_path(), device="cpu", backend="torch")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.runner.model.modules())
    reference, meta = load_checkpoint(default_checkpoint_path())
    rng = np.random.default_rng(2)
    pixels = [to_pixels(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), meta) for _ in range(4)]
    with torch.inference_mode():
        logits = reference(torch.stack([normalised_tensor(p, meta) for p in pixels]))
    expected = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
    assert np.allclose(predictor.predict_pixels(pixels), expected, atol=1e-4)
