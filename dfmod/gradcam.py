"""Grad-CAM heatmaps: where in the image the detector's "fake" evidence lies, for reviewers to look at.

Grad-CAM (Selvaraju et al., 2017) on the output of the model's last convolutional stage: each channel of
that feature map is weighted by the spatial mean of the gradient of the "fake" logit with respect to it,
the weighted sum is rectified, upsampled to the image and blended over it as a colour map.

The features and the gradient come from timm's ``forward_features`` / ``forward_head`` split rather than
from forward hooks: a hook on the shared model would also fire for the classify batches that a threads
pool runs concurrently in the same process and capture their activations instead.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dfmod.detector import FAKE_INDEX, Predictor, preprocess


def gradcam(predictor: Predictor, image: Image.Image) -> tuple[np.ndarray, float]:
    """(heatmap in [0, 1] at the model's feature resolution, fake probability) for one RGB image."""
    torch = predictor._torch
    model = predictor.model
    batch = torch.from_numpy(preprocess(image, predictor.meta)[None]).to(predictor.device)
    with torch.enable_grad():
        features = model.forward_features(batch)  # (1, C, h, w): the last stage's output
        logits = model.forward_head(features).float()
        (gradient,) = torch.autograd.grad(logits[0, FAKE_INDEX], features)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1))[0].detach().float().cpu().numpy()
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    probability = float(torch.softmax(logits.detach(), dim=1)[0, FAKE_INDEX])
    return cam, probability


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
