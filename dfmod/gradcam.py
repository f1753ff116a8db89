"""Grad-CAM heatmaps: where in the image the detector's "fake" evidence lies, for reviewers to look at.

Grad-CAM (Selvaraju et al., 2017) on the output of the model's last convolutional stage: each channel of
that feature map is weighted by the spatial mean of the gradient of the "fake" logit with respect to it,
the weighted sum is rectified, upsampled to the image and blended over it as a colour map.

The features and the gradient come from timm's ``forward_features`` / ``forward_head`` split rather than
from forward hooks: a hook on the shared model would also fire for the classify batches that a threads
pool runs concurrently in the same process and capture their activations instead.

Grad-CAM needs gradients, so it needs the ``torch`` backend. Workers serving on ONNX Runtime or OpenVINO
(no torch installed) make occlusion maps instead (:func:`occlusion_map`): the change of P(fake) when each
patch of the image is greyed out, computed in one batch on whatever backend serves the model.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dfmod.detector import FAKE_INDEX, Predictor, to_pixels


def supports_gradcam(predictor: Predictor) -> bool:
    return predictor.choice.backend == "torch"


def heatmap(predictor: Predictor, image: Image.Image) -> tuple[np.ndarray, float, str]:
    """(heatmap in [0, 1], fake probability, method): Grad-CAM on torch, occlusion on the other backends."""
    if supports_gradcam(predictor):
        return (*gradcam(predictor, image), "gradcam")
    return (*occlusion_map(predictor, image), "occlusion")


def gradcam(predictor: Predictor, image: Image.Image) -> tuple[np.ndarray, float]:
    """(heatmap in [0, 1] at the model's feature resolution, fake probability) for one RGB image."""
    if not supports_gradcam(predictor):
        raise ValueError(f"Grad-CAM needs the torch backend; this predictor runs {predictor.backend}")
    runner = predictor.runner
    torch = runner.torch
    model = runner.model
    pixels = torch.from_numpy(to_pixels(image, predictor.meta)[None].copy()).to(predictor.device)
    with torch.enable_grad():
        features = model.forward_features(runner.serving.normalise(pixels))  # (1, C, h, w): the last stage
        logits = model.forward_head(features).float()
        (gradient,) = torch.autograd.grad(logits[0, FAKE_INDEX], features)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1))[0].detach().float().cpu().numpy()
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    probability = float(torch.softmax(logits.detach(), dim=1)[0, FAKE_INDEX])
    return cam, probability


def occlusion_map(predictor: Predictor, image: Image.Image, grid: int = 7) -> tuple[np.ndarray, float]:
    """(map in [0, 1] on a ``grid`` x ``grid`` raster, fake probability) by occlusion sensitivity.

    Each cell of the model input is replaced in turn by mid-grey; the drop in P(fake) it causes is that
    cell's evidence (Zeiler & Fergus, 2014). All ``grid**2`` variants and the original run as one batch.
    """
    pixels = to_pixels(image, predictor.meta)
    height, width = pixels.shape[:2]
    batch = np.repeat(pixels[None], grid * grid + 1, axis=0)
    rows = np.linspace(0, height, grid + 1).astype(int)
    cols = np.linspace(0, width, grid + 1).astype(int)
    for cell in range(grid * grid):
        r, c = divmod(cell, grid)
        batch[cell + 1, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = 128
    probabilities = predictor.predict_pixels(batch)
    base = float(probabilities[0])
    drop = np.maximum(base - probabilities[1:], 0.0).reshape(grid, grid)
    peak = float(drop.max())
    return (drop / peak if peak > 0 else np.zeros_like(drop)), base


def overlay_png(image: Image.Image, cam: np.ndarray, max_side: int = 768, alpha: float = 0.45) -> bytes:
    """The heatmap as a colour map blended over the image (at most ``max_side`` px), PNG-encoded."""
    from matplotlib import colormaps

    base = image.convert("RGB")
    base.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(base.size, Image.Resampling.BICUBIC)
    colored = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    blended = (1 - alpha) * np.asarray(base, dtype=np.float32) / 255.0 + alpha * colored
    out = Image.fromarray(np.uint8(np.clip(blended, 0, 1) * 255))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
