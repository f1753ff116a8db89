"""Training and evaluation of the dfmod detector (``dfmod train``, ``evaluate``, ``calibrate``, ``loso`` and
``evaluate-faces``).

The package reproduces the training recipe of "Efficient DeepFake Image Classification Using Lightweight
MobileNetV4-Small Architecture" on a data set in the paper's layout, and evaluates checkpoints with the same
decoding, preprocessing and prediction code as the moderation worker.

It imports only torch, timm, scikit-learn (and its scipy), matplotlib, Pillow, numpy, tqdm, typer and rich
(and :mod:`dfmod.detector` / :mod:`dfmod.imaging`; ``evaluate-faces`` also :mod:`dfmod.faces` with the
``faces`` extra), so it runs on a training machine without the service's
dependencies (pydantic-settings, Celery, SQLAlchemy, FastAPI, boto3). Run it there as
``python -m dfmod.training train DATA_DIR --out CKPT``.

Submodules are imported lazily by their users; importing this package is cheap.
"""
