"""Heatmaps on demand: fetch an item's image, explain the worker's loaded model on it, cache the PNG.

Grad-CAM where the worker runs the torch backend; an occlusion map where it runs ONNX Runtime or OpenVINO
(a torch-free CPU worker), so heatmaps work on every deployment (see :mod:`dfmod.gradcam`).

The API asks for a heatmap by enqueueing ``(item id, model version)`` and serves the PNG once it exists
under :func:`dfmod.storage.heatmap_key` in the upload bucket. Making one is idempotent: an existing PNG is left alone.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from dfmod.db import Item, session_scope
from dfmod.detector import Predictor
from dfmod.imaging import ImageRejected, decode_image
from dfmod.settings import Settings
from dfmod.storage import ObjectNotFound, Storage, StorageError, heatmap_key

logger = logging.getLogger(__name__)


class HeatmapMaker:
    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], storage: Storage, predictor: Predictor
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.storage = storage
        self.predictor = predictor
        self.limits = settings.image_limits

    def make(self, item_id: str, model_version: str) -> str | None:
        """Write the heatmap PNG if it is missing; returns its key, or None if it cannot be made here."""
        from dfmod.gradcam import heatmap, overlay_png

        if model_version != self.predictor.model_version:
            # Another model's heatmap needs that model: a worker running it will pick the task up.
            logger.warning(
                "heatmap for %s asks for model %s; this worker runs %s", item_id, model_version,
                self.predictor.model_version,
            )
            return None
        key = heatmap_key(item_id, model_version)
        bucket = self.settings.upload_bucket
        try:
            self.storage.head(bucket, key)
            return key
        except ObjectNotFound:
            pass
        with session_scope(self.session_factory) as session:
            item = session.get(Item, item_id)
            location = (item.bucket, item.key) if item is not None else None
        if location is None:
            logger.warning("heatmap requested for unknown item %s", item_id)
            return None
        try:
            data = self.storage.get(*location, self.settings.max_upload_bytes)
            image = decode_image(data, self.limits, target=(768, 768))
        except (StorageError, ImageRejected) as exc:
            logger.warning("no heatmap for %s: %s", item_id, exc)
            return None
        cam, _probability, method = heatmap(self.predictor, image)
        self.storage.put(bucket, key, overlay_png(image, cam), content_type="image/png")
        logger.info("heatmap (%s) for %s (%s) written to %s", method, item_id, model_version, key)
        return key
