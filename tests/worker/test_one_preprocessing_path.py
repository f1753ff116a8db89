"""Evaluation measures exactly what the service runs: `dfmod evaluate` and the worker's batch classifier
give the same probability for the same file (decode -> resize to uint8 -> batch -> normalise inside the model)."""

from __future__ import annotations

import csv
import io
import shutil

import pytest
from PIL import Image
from sqlalchemy import select

from dfmod import migrate
from dfmod.db import Verdict, make_engine, make_session_factory, session_scope
from dfmod.detector import Predictor
from dfmod.lifecycle import NewItem, record_items
from dfmod.settings import Settings
from dfmod.storage import make_storage
from dfmod.training.evaluate import evaluate
from worker.classify import BatchClassifier


def _odd_files() -> dict[str, bytes]:
    """Files that take the other branches of the path: PNG with alpha, a large JPEG (DCT scaling), grayscale."""
    files = {}
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 200), (200, 30, 60, 128)).save(buffer, format="PNG")
    files["alpha.png"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.effect_mandelbrot((1600, 1200), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(buffer, format="JPEG")
    files["large.jpg"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.linear_gradient("L").save(buffer, format="JPEG")
    files["gray.jpg"] = buffer.getvalue()
    return files


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_evaluate_and_the_worker_give_identical_probabilities(exported_checkpoint, generated_faces, tmp_path, backend):
    folder = tmp_path / "eval"
    shutil.copytree(generated_faces / "Real", folder / "Real")
    (folder / "Fake").mkdir()
    for name, data in _odd_files().items():
        (folder / "Fake" / name).write_bytes(data)
    files = sorted(p for p in folder.rglob("*") if p.is_file())

    report = evaluate(folder, exported_checkpoint, tmp_path / "report", device="cpu", backend=backend, workers=2,
                      progress=False)
    with (tmp_path / "report" / "predictions.csv").open() as handle:
        evaluated = {row["file"]: float(row["p_fake"]) for row in csv.DictReader(handle)}

    settings = Settings(data_dir=tmp_path / "data", metrics_port=None, backend=backend, device="cpu")
    settings.data_dir.mkdir()
    migrate.upgrade(settings)
    storage = make_storage(settings)
    keys = {}
    for path in files:
        key = str(path.relative_to(folder))
        storage.put(settings.upload_bucket, key, path.read_bytes())
        keys[key] = key
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        ids = {r.item.key: r.item.id for r in record_items(session, [NewItem(settings.upload_bucket, k) for k in keys])}
    predictor = Predictor(exported_checkpoint, device="cpu", torch_threads=1, backend=backend)
    assert report["backend"] == predictor.backend
    classifier = BatchClassifier(settings, factory, storage, predictor)
    try:
        result = classifier.run(list(ids.values()))
    finally:
        classifier.close()
    assert result.classified == len(files) and result.failed == 0
    with session_scope(factory) as session:
        served = {item_id: p for item_id, p in session.execute(select(Verdict.item_id, Verdict.fake_probability))}
    engine.dispose()
    for key, item_id in ids.items():
        # predictions.csv keeps six decimals
        assert served[item_id] == pytest.approx(evaluated[key], abs=1e-6), key
