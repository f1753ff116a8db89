"""Database rows and request headers for API tests: items seeded as the worker leaves them, bearer headers."""

from __future__ import annotations

import uuid


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def seed_items(settings, specs: list[dict]) -> list[str]:
    """Insert items as the worker leaves them, without running the model; returns their ids in order.

    Each spec may set ``score`` (None: not classified), ``threshold`` (0.5), ``model_version`` ("m1"),
    ``source``, ``status``, ``created_at``, ``key``, ``bucket`` and ``tenant_id`` (default: the default tenant);
    a scored item gets a matching verdict row.
    """
    from datetime import datetime, timedelta, timezone

    from dfmod.db import (
        DEFAULT_TENANT_ID,
        Item,
        ItemStatus,
        Verdict,
        make_engine,
        make_session_factory,
        new_id,
        session_scope,
    )

    engine = make_engine(settings.resolved_database_url, pool_size=1)
    base = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    ids = []
    with session_scope(make_session_factory(engine)) as session:
        for index, spec in enumerate(specs):
            score = spec.get("score")
            threshold = spec.get("threshold", 0.5)
            version = spec.get("model_version", "m1")
            created = spec.get("created_at", base + timedelta(minutes=index))
            status = spec.get("status", "classified" if score is not None else "queued")
            item = Item(
                id=spec.get("id", new_id()), tenant_id=spec.get("tenant_id", DEFAULT_TENANT_ID),
                bucket=spec.get("bucket", settings.upload_bucket),
                key=spec.get("key", f"seed/{uuid.uuid4().hex}.jpg"), version="", source=spec.get("source", "upload"),
                ingest="upload", status=ItemStatus(status), attempts=1, created_at=created, updated_at=created,
                score=score, threshold=threshold if score is not None else None,
                label=None if score is None else ("fake" if score >= threshold else "real"),
                model_version=version if score is not None else None,
                classified_at=created if score is not None else None,
            )
            session.add(item)
            if score is not None:
                session.add(
                    Verdict(
                        item=item, label=item.label, fake_probability=score, threshold=threshold,
                        model_version=version, created_at=created,
                    )
                )
            ids.append(item.id)
    engine.dispose()
    return ids
